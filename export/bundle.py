"""Write a bundle: schedule + model -> per-step ONNX graphs, shared weights, manifest.

Faults during an export lose nothing: a kill (even SIGKILL) at any moment, a full disk or a power
cut never leaves a folder under the target name that loads as a bundle unless it is a complete one
(the old or the new), never harms an existing bundle there, and the next export succeeds.

- Everything is written into a hidden temporary folder `.{name}.tmp-{pid}` beside the target,
  flushed to disk (fsync: files, then folder) and renamed into place only when complete and
  verified; a write failure (ENOSPC, EIO, ...) removes it and raises an `ExportError` that names the
  target, the OS error and the fix.
- Replacing an existing bundle is one atomic swap where the OS has one: Linux's
  renameat2(RENAME_EXCHANGE) (through ctypes, glibc >= 2.28) exchanges the temporary folder and the
  target, so the target always names a complete bundle; the old one, now under the temporary
  name, is then deleted. Elsewhere (or on a file system without the flag) the old bundle is first
  renamed to `.{name}.old-{pid}` and the new one renamed into place: a kill between the two
  renames leaves no folder at the target, and the old bundle complete under that backup name.
- Recovery rule (`recover_interrupted`, run at the start of every export): a `.{name}.old-{pid}`
  of a process that is no longer running is restored to the target if the target is missing (the
  kill landed between the two renames), else deleted; a `.{name}.tmp-{pid}` of such a process is
  deleted. A backup name only ever holds a complete bundle: after the swap it is renamed back to
  the (free) temporary name before being deleted, so a kill during that deletion cannot leave a
  half-deleted bundle under a name recovery would restore. Folders of live processes (a concurrent
  export) are left alone; liveness is checked by pid on this machine (a zombie counts as dead), so
  a recycled pid at worst delays a cleanup, and two machines exporting to one shared folder at
  once are not supported.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from diffsparse import __version__
from diffsparse.cache_layout import output_name
from diffsparse.bundle_format import (UNIVERSAL_FILE, WEIGHTS_FILE, current_engine_key, engine_file, graph_file,
                                      in_place_writes, needs_layer_cache, step_cache_writes, step_graph_indices,
                                      timing_cache_file)
from diffsparse.export.onnx_export import export_step
from diffsparse.export.prune import graph_cache_io, prune_outputs
from diffsparse.export.quantize import PRECISIONS, QuantizationError, QuantizeConfig, quantize_bundle_graphs
from diffsparse.export.tensorrt import (EXPLICITLY_QUANTIZED, TensorRTUnavailable, build_engine, check_available,
                                        step_profiles)
from diffsparse.export.tensorrt_quantize import quantize_universal
from diffsparse.export.trt_compat import operator_set, tensorrt_problems
from diffsparse.export.universal import export_universal_step
from diffsparse.export.verify import SelectionMismatch, verify_graphs
from diffsparse.export.weights import WeightStore
from diffsparse.manifest import GraphEntry, Manifest, sha256_file
from diffsparse.models.base import ModelSpec
from diffsparse.models.lazy import is_lazy
from diffsparse.schedule import Schedule
from diffsparse.tokencache import TOPK_LIMIT

log = logging.getLogger(__name__)

# Test hook: when set, called with the name of each point an export passes (after each file it
# writes, each rename), so fault tests (tests/export/test_export_faults.py,
# benchmarks/export_faults.py) can stop or kill an export at a deterministic point. None in use.
FAULT_HOOK: Callable[[str], None] | None = None

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def _load_renameat2():
    """libc's renameat2 (Linux, glibc >= 2.28), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()


class ExportError(RuntimeError):
    pass


@dataclass
class ExportConfig:
    """Options of `export_bundle`.

    overwrite: replace an existing bundle at the target (only once the new one is complete).
    verify: run every graph on ONNX Runtime against the PyTorch step on the same inputs and fail
        if the max abs difference exceeds `tolerance` (recorded per graph in the manifest).
    check_tensorrt: fail if a graph leaves TensorRT's supported subset.
    precision: "fp32", or "int8" (post-training quantization of every step graph after the fp32
        graphs are verified, export/quantize.py, configured by `quantize`; the int8 graphs are then
        checked against the fp32 PyTorch step at `quantize.tolerance`, which the manifest records).
    hoist_conditioning: refresh steps compute the conditioning of the partial steps they serve,
        which read it from the cache (diffsparse/conditioning.py), wherever the family and the
        schedule allow (`ModelSpec.conditioning_plan`); False: every step computes its own (the
        bundles before 2026-12-03; the runtime reads both).
    """

    overwrite: bool = False
    verify: bool = True
    tolerance: float = 1e-3
    check_tensorrt: bool = True
    tensorrt: str | None = None   # build a TensorRT engine at this precision (export/tensorrt.py PRECISIONS)
    precision: str = "fp32"
    quantize: QuantizeConfig | None = None   # int8 options (also of --tensorrt int8/fp8); None: QuantizeConfig()
    hoist_conditioning: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            hint = " (fp16/bf16 graphs run on TensorRT: use --tensorrt fp16)" if self.precision in ("fp16", "bf16") else ""
            raise ExportError(f"precision must be one of {PRECISIONS}, got {self.precision!r}{hint}")


def export_bundle(spec: ModelSpec, schedule: Schedule, out: str | Path, source: dict[str, Any] | None = None,
                  config: ExportConfig | None = None) -> Manifest:
    config = config or ExportConfig()
    out = Path(out)
    if out.parent.is_dir():  # before the existence check: an interrupted swap may have moved the bundle aside
        recover_interrupted(out)
    if out.exists() and not config.overwrite:
        raise ExportError(f"{out} already exists; pass overwrite (dsexport --overwrite) to replace it")
    spec.check_schedule(schedule)
    spec = spec.for_schedule(schedule)
    if config.precision == "int8" and is_lazy(spec.model):
        raise ExportError("int8 export of a model larger than memory is not supported (calibration runs every graph "
                          "in memory): export it in fp32")
    if config.tensorrt is not None:  # fail before any work
        if not spec.supports_universal_step:
            raise ExportError(f"TensorRT engines are not yet supported for the {spec.family!r} family")
        widest = max(spec.layer_tokens(layer) for layer in spec.layers)
        if widest > TOPK_LIMIT:  # the universal graph runs TopK at every K up to N (export/universal.py)
            raise ExportError(f"TensorRT engines are not yet supported for layers of more than {TOPK_LIMIT} tokens "
                              f"(TensorRT's TopK limit; this model has {widest}): use ONNX Runtime for it")
        try:
            check_available()
        except TensorRTUnavailable as e:
            raise ExportError(str(e)) from None
    tmp = _leftover_name(out, "tmp", os.getpid())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _check_disk_space(spec, out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _checkpoint("started")
        manifest = _write(spec, schedule, tmp, source or {}, config)
        _sync_tree(tmp)
        _checkpoint("synced")
        _replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = _os_error(e)
        if failure is not None:
            raise ExportError(_write_failure(out, failure)) from e
        raise
    return manifest


def _checkpoint(name: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


def _os_error(e: BaseException) -> OSError | None:
    """The OS error behind a failed write: `e` itself, or (for a full disk) one that a library
    wrapped in its own exception type."""
    if isinstance(e, OSError):
        return e
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e
        e = e.__cause__ or e.__context__
    return None


def _write_failure(out: Path, e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in _DISK_FULL:
        quota = "" if e.errno == errno.ENOSPC else f" ({e.strerror})"
        return (f"writing the bundle {out} failed: no space left on the device{quota}{where}. "
                f"The partial export was removed and {out} is unchanged; free space on {out.parent} "
                "or export elsewhere (--out), then run dsexport again")
    return (f"writing the bundle {out} failed: {e.strerror or e}{where}. The partial export was removed and "
            f"{out} is unchanged; fix the cause (permissions, device) or export elsewhere (--out), then run "
            "dsexport again")


def _check_disk_space(spec: ModelSpec, folder: Path) -> None:
    """Fail before writing anything when the bundle's weights cannot fit: a streamed model writes
    tens of GB before the first graph is traced."""
    need = sum(p.numel() * p.element_size() for p in spec.model.parameters())
    free = shutil.disk_usage(folder).free
    if free < need * 1.02:
        raise ExportError(f"{folder} has {free / 2**30:.1f} GiB free; the bundle's weights alone need "
                          f"{need / 2**30:.1f} GiB: free space or export elsewhere")


def _file_entry(folder: Path, rel: str) -> dict[str, Any]:
    return {"file": rel, "sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}


def _build_engine(spec: ModelSpec, schedule: Schedule, folder: Path, graph: Path, precision: str,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TensorRT engine of this machine's TensorRT + GPU from the universal graph `graph`: its
    manifest entry."""
    key = current_engine_key()
    rel = engine_file(key)
    build_engine(graph, step_profiles(spec, schedule), folder / rel, precision,
                 timing_cache=folder / timing_cache_file(key))
    return {**_file_entry(folder, rel), "key": key, "precision": precision,
            "profiles": len(schedule.distinct_signatures()), **(extra or {})}


def _build_quantized_engine(spec: ModelSpec, schedule: Schedule, folder: Path, config: ExportConfig) -> dict[str, Any]:
    """An int8/fp8 engine from the universal graph explicitly quantized on the bundle's calibration
    set (export/tensorrt_quantize.py); the Q/DQ graph is an intermediate, removed after the build."""
    work = folder / ".tensorrt-quantize"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        try:
            quantization = quantize_universal(folder, spec.model, config.tensorrt, config.quantize or QuantizeConfig(),
                                              work / UNIVERSAL_FILE)
        except QuantizationError as e:
            raise ExportError(str(e)) from None
        _checkpoint("tensorrt-quantized")
        return _build_engine(spec, schedule, folder, work / UNIVERSAL_FILE, config.tensorrt, {"quantization": quantization})
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _leftover_name(out: Path, kind: str, pid: int) -> Path:
    """`.{name}.tmp-{pid}` (an export in progress) or `.{name}.old-{pid}` (a bundle moved aside)."""
    return out.parent / f".{out.name}.{kind}-{pid}"


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs on this machine (a zombie does not); unsure counts as alive."""
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill would end the process, so never delete
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS) or it just exited
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def recover_interrupted(out: str | Path) -> list[str]:
    """Clean up after exports to `out` that were killed: restore a bundle an interrupted swap moved
    aside (when `out` is missing), delete their temporary folders and backups. Folders of running
    exports are left alone. Returns what was done, one line each (also logged)."""
    out = Path(out)
    done = []
    try:
        entries = sorted(out.parent.iterdir(), key=lambda p: p.name)
    except OSError:
        return done
    stale = []
    for path in entries:
        m = _LEFTOVER.match(path.name)
        if m and m["name"] == out.name and not _alive(int(m["pid"])):
            stale.append((m["kind"], path))
    for kind, path in sorted(stale, key=lambda kp: kp[0] != "old"):  # restore before deleting anything
        try:
            if kind == "old" and not os.path.lexists(out):
                os.rename(path, out)
                done.append(f"restored {out} from {path.name}, left by an interrupted export")
                continue
            shutil.rmtree(path)
            done.append(f"removed {path.name}, left by an interrupted export")
        except FileNotFoundError:  # another export cleaned it up first
            continue
        except OSError as e:
            log.warning("could not clean up %s (%s); delete it by hand", path, e)
    for line in done:
        log.warning("%s", line)
    return done


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where the OS or file system has no
    such call, so the caller falls back to two renames."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """Flush the bundle's files and folder entry to disk before it is renamed into place, so that a
    power cut cannot leave a renamed but empty bundle (data is written back after metadata)."""
    for f in folder.iterdir():
        if f.is_file():
            _fsync(f)
    if os.name != "nt":  # folders cannot be opened for fsync there
        _fsync(folder)


def _replace(tmp: Path, out: Path) -> None:
    """Put the complete bundle at `tmp` in place of `out` (see the module docstring)."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        _checkpoint("renamed")
    elif _exchange(tmp, out):
        _checkpoint("swapped")  # tmp now holds the old bundle
    else:
        old = _leftover_name(out, "old", os.getpid())
        os.rename(out, old)
        _checkpoint("moved-aside")
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        _checkpoint("renamed")
        try:  # out of its recoverable name in one step, then deleted at leisure
            os.rename(old, tmp)
        except OSError as e:
            log.warning("could not remove the replaced bundle %s (%s); the next export removes it", old, e)
    if os.name != "nt":
        try:  # the rename's durability; the new bundle is in place either way
            _fsync(out.parent)
        except OSError as e:
            log.warning("could not flush %s to disk (%s)", out.parent, e)
    shutil.rmtree(tmp, ignore_errors=True)
    _checkpoint("cleaned")


def _write(spec: ModelSpec, schedule: Schedule, folder: Path, source: dict[str, Any],
           config: ExportConfig) -> Manifest:
    selector = schedule.selector
    layer_cache = needs_layer_cache(schedule, tensorrt=config.tensorrt is not None)
    plan = spec.schedule_plan(schedule)   # one row per computed step
    conditioning = (spec.conditioning_plan(schedule, universal=config.tensorrt is not None)
                    if config.hoist_conditioning else None)
    store = WeightStore(folder / WEIGHTS_FILE)
    if is_lazy(spec.model):  # larger than memory: initialised straight into the bundle's weights
        store.adopt(spec.model, spec.sliced_parameters())
    graphs: list[GraphEntry] = []
    signatures = schedule.distinct_signatures()
    for i, sig in enumerate(signatures):
        t0 = time.perf_counter()
        # weights go to the store first: a >2 GB model cannot be serialised for shape inference
        model = export_step(spec, list(sig), selector, store, layer_cache=layer_cache, conditioning=conditioning)
        if config.check_tensorrt:
            problems = tensorrt_problems(model)
            if problems:
                raise ExportError(f"step graph {i} is outside TensorRT's supported subset: " + "; ".join(problems))
        rel = graph_file(i)
        onnx.save(model, str(folder / rel))
        _checkpoint(f"graph-{i}")
        # checksum, size and operators are recorded once the graphs are pruned (_prune_cache_writes)
        graphs.append(GraphEntry(file=rel, sha256="", bytes=0, keep=list(sig), macs=spec.graph_macs(sig, conditioning), ops=[]))
        log.info("exported graph %d/%d in %.1fs", i + 1, len(signatures), time.perf_counter() - t0)
    if config.tensorrt is not None:
        universal = export_universal_step(spec, selector, store=store)  # same weights: stored once
        onnx.save(universal, str(folder / UNIVERSAL_FILE))
    parameters = store.parameter_map(spec.model)
    weights = store.close()
    weights["parameters"] = parameters
    weights["sha256"] = sha256_file(folder / weights["file"])
    _checkpoint("weights")
    universal_entry, engines = None, []
    if config.tensorrt is not None:
        universal_entry = _file_entry(folder, UNIVERSAL_FILE)
        if config.tensorrt not in EXPLICITLY_QUANTIZED:  # those are calibrated on the verified bundle, below
            engines = [_build_engine(spec, schedule, folder, folder / UNIVERSAL_FILE, config.tensorrt)]
    steps = [{"index": t, "timestep": float(plan.timesteps[k]), "graph": g}
             for k, (t, g) in enumerate(zip(schedule.computed_steps, step_graph_indices(schedule)))]
    dense = spec.dense_macs(schedule.num_steps)
    per_step = spec.schedule_step_macs(schedule, conditioning)
    total = sum(per_step)
    diffusers_class = type(spec.model).__name__
    manifest = Manifest(
        universal=universal_entry, engines=engines,
        family=spec.family, diffusers_class=diffusers_class, model_config=spec.model_config(),
        batch_size=spec.batch_size, guidance=spec.guidance, spec_options=dict(spec.options),
        guidance_scale=spec.default_guidance_scale,
        inputs=spec.step_inputs(),
        outputs=spec.step_outputs(), cache=spec.cache_layout(selector, layer_cache, conditioning),
        schedule=schedule, sampler=plan,
        graphs=graphs, steps=steps, weights=weights,
        macs={"dense_total": dense, "total": total, "ratio": total / dense,
              "per_step": per_step},
        source=source, tool=f"diffsparse {__version__}", precision={"dtype": "fp32", "parity_tolerance": config.tolerance},
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    manifest.save(folder)
    _checkpoint("manifest")
    if config.verify:
        try:
            errors = verify_graphs(folder, spec)
        except SelectionMismatch as e:
            raise ExportError(f"an exported graph selects different tokens than the PyTorch step: {e}") from None
        for g, err in zip(graphs, errors):
            g.parity_max_abs_err = float(err)
        worst = max(errors)
        if not np.isfinite(worst) or worst > config.tolerance:
            raise ExportError(f"exported graphs differ from the PyTorch step by up to {worst:.3g} "
                              f"(tolerance {config.tolerance:g}); per graph: {errors}")
    if config.tensorrt in EXPLICITLY_QUANTIZED:  # before --precision int8: calibrated on the fp32 trajectory
        manifest.engines = [_build_quantized_engine(spec, schedule, folder, config)]
        manifest.save(folder)
    if config.precision == "int8":
        manifest = _quantize(folder, spec, manifest, config)
    # verified with every output (the tie check reads reuse counts); pruning only removes nodes
    _checkpoint("verified")
    _prune_cache_writes(folder, manifest)
    manifest.save(folder)
    _checkpoint("complete")
    return manifest


def _quantize(folder: Path, spec: ModelSpec, manifest: Manifest, config: ExportConfig) -> Manifest:
    """int8 graphs in place of the verified fp32 ones, checked against the fp32 PyTorch step."""
    qconfig = config.quantize or QuantizeConfig()
    fp32_parity = [g.parity_max_abs_err for g in manifest.graphs]
    try:
        manifest = quantize_bundle_graphs(folder, spec.model, qconfig)
    except QuantizationError as e:
        raise ExportError(str(e)) from None
    _checkpoint("quantized")
    manifest.precision["quantization"]["fp32_parity_max_abs_err"] = fp32_parity
    if config.verify:
        try:
            errors = verify_graphs(folder, spec, quantized=True)
        except SelectionMismatch as e:  # a reuse count that is not K: the graph itself is broken
            raise ExportError(f"a quantized graph's token bookkeeping is wrong: {e}") from None
        for g, err in zip(manifest.graphs, errors):
            g.parity_max_abs_err = float(err)
        worst = max(errors)
        if not np.isfinite(worst) or worst > qconfig.tolerance:
            raise ExportError(f"int8 graphs differ from the fp32 PyTorch step by up to {worst:.3g} (tolerance "
                              f"{qconfig.tolerance:g}); per graph: {errors}. Keep the worst layers in fp32 "
                              "(dsexport --keep-fp32, from dscalibrate precision) or raise --parity-tolerance")
    manifest.save(folder)
    return manifest


def _prune_cache_writes(folder: Path, manifest: Manifest) -> None:
    """Give each step a graph that outputs only the cache entries a later step reads
    (export/prune.py): one graph per (sparsity pattern, entries written), numbered by first use.

    An entry no later step reads stays an output where the graph updates it by a scatter the
    runtime may write in place (`in_place_writes`): bound to the buffer it was read from it costs
    the K fresh rows, while as an inner tensor ONNX Runtime first copies all N rows of the graph
    input (the last partial step of a DiT-XL/2 bundle: scatters 16 ms instead of 8)."""
    traced = [onnx.load(str(folder / g.file), load_external_data=False) for g in manifest.graphs]
    io = [graph_cache_io(model, manifest.cache) for model in traced]
    live = step_cache_writes(manifest.step_graphs, [r for r, _ in io], [c for _, c in io])
    # in_place_writes decides each entry on its own, so once per graph over all it changes
    free = [in_place_writes(model.graph, changes) for model, (_, changes) in zip(traced, io)]
    writes = [w | free[g] for g, w in zip(manifest.step_graphs, live)]
    variants: dict[tuple[int, frozenset[str]], int] = {}
    for g, w in zip(manifest.step_graphs, writes):
        variants.setdefault((g, w), len(variants))
    for g in manifest.graphs:
        (folder / g.file).unlink()
    _checkpoint("pruning")  # the manifest now names graphs that are gone
    graphs = []
    for (g, w), i in variants.items():
        model = onnx.ModelProto()
        model.CopyFrom(traced[g])
        cache_outputs = [n for n in manifest.cache.names if n in w]
        prune_outputs(model, {o.name for o in manifest.outputs} | {output_name(n) for n in cache_outputs})
        rel = graph_file(i)
        onnx.save(model, str(folder / rel))
        source = manifest.graphs[g]
        graphs.append(GraphEntry(file=rel, sha256=sha256_file(folder / rel), bytes=(folder / rel).stat().st_size,
                                 keep=source.keep, macs=source.macs, ops=operator_set(model),
                                 parity_max_abs_err=source.parity_max_abs_err, cache_writes=cache_outputs))
    for step, g, w in zip(manifest.steps, manifest.step_graphs, writes):
        step["graph"] = variants[(g, w)]
    manifest.graphs = graphs
