"""Write a bundle: schedule + model -> per-step ONNX graphs, shared weights, manifest.

Everything is written into a hidden temporary folder beside the target and renamed into place
only when complete and verified, so an interrupted export never leaves a half bundle under the
target name and never destroys an existing one.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from diffsparse import __version__
from diffsparse.cache_layout import output_name
from diffsparse.bundle_format import (UNIVERSAL_FILE, WEIGHTS_FILE, current_engine_key, engine_file, graph_file,
                                      needs_layer_cache, step_graph_indices, timing_cache_file)
from diffsparse.export.onnx_export import export_step
from diffsparse.export.prune import graph_cache_io, prune_outputs, step_cache_writes
from diffsparse.export.tensorrt import TensorRTUnavailable, build_engine, check_available, step_profiles
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


class ExportError(RuntimeError):
    pass


@dataclass
class ExportConfig:
    """Options of `export_bundle`.

    overwrite: replace an existing bundle at the target (only once the new one is complete).
    verify: run every graph on ONNX Runtime against the PyTorch step on the same inputs and fail
        if the max abs difference exceeds `tolerance` (recorded per graph in the manifest).
    check_tensorrt: fail if a graph leaves TensorRT's supported subset.
    """

    overwrite: bool = False
    verify: bool = True
    tolerance: float = 1e-3
    check_tensorrt: bool = True
    tensorrt: str | None = None   # build a TensorRT engine at this precision (fp32/fp16/bf16)


def export_bundle(spec: ModelSpec, schedule: Schedule, out: str | Path, source: dict[str, Any] | None = None,
                  config: ExportConfig | None = None) -> Manifest:
    config = config or ExportConfig()
    out = Path(out)
    if out.exists() and not config.overwrite:
        raise ExportError(f"{out} already exists; pass overwrite (dsexport --overwrite) to replace it")
    spec.check_schedule(schedule)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_disk_space(spec, out.parent)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _write(spec, schedule, tmp, source or {}, config)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


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


def _build_engines(spec: ModelSpec, schedule: Schedule, folder: Path, precision: str):
    """The TensorRT engine of this machine's TensorRT + GPU from the universal graph."""
    key = current_engine_key()
    rel = engine_file(key)
    build_engine(folder / UNIVERSAL_FILE, step_profiles(spec, schedule), folder / rel, precision,
                 timing_cache=folder / timing_cache_file(key))
    engine = {**_file_entry(folder, rel), "key": key, "precision": precision,
              "profiles": len(schedule.distinct_signatures())}
    return _file_entry(folder, UNIVERSAL_FILE), [engine]


def _replace(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write(spec: ModelSpec, schedule: Schedule, folder: Path, source: dict[str, Any],
           config: ExportConfig) -> Manifest:
    selector = schedule.selector
    layer_cache = needs_layer_cache(schedule, tensorrt=config.tensorrt is not None)
    plan = spec.sampler_plan(schedule.num_steps)
    store = WeightStore(folder / WEIGHTS_FILE)
    if is_lazy(spec.model):  # larger than memory: initialised straight into the bundle's weights
        store.adopt(spec.model, spec.sliced_parameters())
    graphs: list[GraphEntry] = []
    signatures = schedule.distinct_signatures()
    for i, sig in enumerate(signatures):
        t0 = time.perf_counter()
        # weights go to the store first: a >2 GB model cannot be serialised for shape inference
        model = export_step(spec, list(sig), selector, store, layer_cache=layer_cache)
        if config.check_tensorrt:
            problems = tensorrt_problems(model)
            if problems:
                raise ExportError(f"step graph {i} is outside TensorRT's supported subset: " + "; ".join(problems))
        rel = graph_file(i)
        onnx.save(model, str(folder / rel))
        # checksum, size and operators are recorded once the graphs are pruned (_prune_cache_writes)
        graphs.append(GraphEntry(file=rel, sha256="", bytes=0, keep=list(sig), macs=spec.step_macs(sig), ops=[]))
        log.info("exported graph %d/%d in %.1fs", i + 1, len(signatures), time.perf_counter() - t0)
    if config.tensorrt is not None:
        universal = export_universal_step(spec, selector, store=store)  # same weights: stored once
        onnx.save(universal, str(folder / UNIVERSAL_FILE))
    parameters = store.parameter_map(spec.model)
    weights = store.close()
    weights["parameters"] = parameters
    weights["sha256"] = sha256_file(folder / weights["file"])
    universal_entry, engines = None, []
    if config.tensorrt is not None:
        universal_entry, engines = _build_engines(spec, schedule, folder, config.tensorrt)
    steps = [{"index": t, "timestep": float(plan.timesteps[t]), "graph": g}
             for t, g in enumerate(step_graph_indices(schedule))]
    dense = spec.dense_macs(schedule.num_steps)
    total = spec.schedule_macs(schedule)
    diffusers_class = type(spec.model).__name__
    manifest = Manifest(
        universal=universal_entry, engines=engines,
        family=spec.family, diffusers_class=diffusers_class, model_config=spec.model_config(),
        batch_size=spec.batch_size, guidance=spec.guidance, spec_options=dict(spec.options),
        guidance_scale=spec.default_guidance_scale,
        inputs=spec.step_inputs(),
        outputs=spec.step_outputs(), cache=spec.cache_layout(selector, layer_cache),
        schedule=schedule, sampler=plan,
        graphs=graphs, steps=steps, weights=weights,
        macs={"dense_total": dense, "total": total, "ratio": total / dense,
              "per_step": [spec.step_macs(row) for row in schedule.keep]},
        source=source, tool=f"diffsparse {__version__}",
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    manifest.save(folder)
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
    # verified with every output (the tie check reads reuse counts); pruning only removes nodes
    _prune_cache_writes(folder, manifest)
    manifest.save(folder)
    return manifest


def _prune_cache_writes(folder: Path, manifest: Manifest) -> None:
    """Give each step a graph that outputs only the cache entries a later step reads
    (export/prune.py): one graph per (sparsity pattern, entries written), numbered by first use."""
    traced = [onnx.load(str(folder / g.file), load_external_data=False) for g in manifest.graphs]
    io = [graph_cache_io(model, manifest.cache) for model in traced]
    writes = step_cache_writes(manifest.step_graphs, [r for r, _ in io], [c for _, c in io])
    variants: dict[tuple[int, frozenset[str]], int] = {}
    for g, w in zip(manifest.step_graphs, writes):
        variants.setdefault((g, w), len(variants))
    for g in manifest.graphs:
        (folder / g.file).unlink()
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
