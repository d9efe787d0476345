"""The bundle manifest: one schema, written by `dsexport` and validated by the runtime on load.

The files of a bundle and the rules writer and reader share are in diffsparse/bundle_format.py.

`manifest.json` (version 2)::

    format, version, tool, created
    family, diffusers_class, model_config          rebuild the model/spec (structure only)
    batch_size, guidance                           static shapes the graphs were exported for
    guidance_scale                                 the scale generation uses unless told otherwise
    inputs, outputs                                [{name, shape, dtype}]: the step signature
    cache                                          [{name, shape, dtype}]: the cache layout
                                                   (diffsparse/cache_layout.py); no layer entries
                                                   when the schedule never reuses tokens
    schedule                                       the schedule file's content (same schema)
    sampler                                        SamplerPlan: timesteps, coefficients, config
    graphs   [{file, sha256, bytes, keep, macs, ops, parity_max_abs_err, cache_writes}]
    steps    [{index, timestep, graph}]            the computed steps (a skipped one runs nothing);
                                                   index = step t, graph = index into graphs
    weights  {file, sha256, bytes, tensors, index, parameters}
             index:      stored tensor -> [offset, bytes, dtype, shape] in the weights file
             parameters: model parameter or buffer -> [stored tensor, transposed]: the model's
                         own tensors, so the torch backend runs the bundle's weights
    macs     {dense_total, total, ratio, per_step}
    source   {model, seed}                         provenance only: nothing reads the model from it
    universal, engines                             TensorRT (dsexport --tensorrt)
    precision {dtype, parity_tolerance, quantization}
             dtype: "fp32" or "int8" (the step graphs' weight-matmul precision, dsexport
             --precision); parity_tolerance: what every graph's parity_max_abs_err was checked
             against at export (vs the fp32 PyTorch step); quantization: how (informational).
             Absent in older manifests: read as fp32 with the 1e-3 tolerance export used then.

Version 1 bundles (no parameter map, an unread sampler field) are refused with "re-export".

Validation. A manifest may be corrupted, hand-edited or hostile, and every load checks it as
strictly as a schedule file (diffsparse/schedule.py): each field's JSON type, range and finiteness,
its consistency with the others, and that every file it names is a plain name inside the bundle
folder. Whatever is wrong gives one `BundleError` naming the field by its path (e.g.
`graphs[2].keep`) and the fix, never a traceback from deep inside numpy, torch or ONNX Runtime. What
can only be checked against the model (the step signature and cache shapes the spec builds, the
sampler plan its sampler computes, the graphs' external data) is checked when the runtime builds
the spec or opens the graphs (runtime/bundle.py).

Fields are of three kinds:

* informational (`INFORMATIONAL_FIELDS`): provenance and statistics. They are type-checked (tools
  read them) but no value of theirs changes what a bundle generates;
* settings (`SETTING_FIELDS`): meant to be edited, they change the output by design (the default
  guidance scale), within a sanity range;
* everything else describes the graphs and weights as exported: a value other than the exported
  one is refused (checked against the spec, the graphs, the schedule or the file checksums) or,
  where the ONNX Runtime graphs do not read it (e.g. the selector's λ when the cache layout stays
  the same), cannot change their output.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffsparse.bundle_format import ENGINES_DIR, MANIFEST_FILE, engine_file, graph_file
from diffsparse.cache_layout import CacheLayout, CacheLayoutError
from diffsparse.sampler import SamplerError, SamplerPlan
from diffsparse.schedule import Schedule, ScheduleError
from diffsparse.tensors import TensorSpec, TensorSpecError

FORMAT = "diffsparse-bundle"
VERSION = 2

#: fields that do not affect the generated output (paths as in error messages; `[]` any element):
#: provenance and statistics for reports and profiles
INFORMATIONAL_FIELDS = ("tool", "created", "source", "macs", "schedule.provenance", "schedule.macs_ratio",
                        "graphs[].macs", "graphs[].ops", "graphs[].parity_max_abs_err",
                        "engines[].precision", "engines[].profiles", "precision.parity_tolerance",
                        "precision.quantization")
#: fields meant to be edited: they change the output by design
SETTING_FIELDS = ("guidance_scale",)
#: a guidance scale outside this range is a corruption, not a setting (diffusers' defaults are 1-10)
GUIDANCE_SCALE_RANGE = (0.0, 1000.0)
#: weights.bin tensor dtypes (numpy `dtype.str`, little-endian as the exporter writes them)
WEIGHT_DTYPES = ("<f4", "<f2", "<f8", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1")
#: model_config integers whose name says they count layers or blocks: the model is built from the
#: config before anything else can be compared with it, and a corrupted count would build for hours
MAX_LAYER_COUNT = 512
MAX_CONFIG_INT = 1 << 24
MAX_BATCH_SIZE = 1 << 16
#: step graph precisions (precision.dtype) and the parity tolerance of bundles written before the field
GRAPH_PRECISIONS = ("fp32", "int8")
LEGACY_PARITY_TOLERANCE = 1e-3
_ENGINE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIX = "re-export the bundle with dsexport"


class BundleError(ValueError):
    """A bundle that is missing, half-written, corrupted or of an unknown version."""


class _Invalid(Exception):
    """One manifest field is wrong: its path (graphs[2].keep) and what is wrong with it."""

    def __init__(self, path: str, problem: str) -> None:
        # a problem of a sub-field (".shape must be ...", "[2] is ...") continues the path
        super().__init__(f"{path}{'' if problem.startswith(('.', '[')) else ' '}{problem}")
        self.path, self.problem = path, problem


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _short(value: Any, limit: int = 60) -> str:
    """repr for an error message, cut short (a corrupted field may hold a 400-digit number)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- field readers: each returns the value or raises _Invalid naming the field ---------------------
def _keys(d: Any, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise _Invalid(path, f"must be a JSON object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    unknown = sorted(str(k) for k in d if k not in required and k not in optional)
    if missing or unknown:
        raise _Invalid(path, f"has missing key(s) {missing}, unknown key(s) {unknown} "
                             f"(it has {list(required)}{f', optionally {list(optional)}' if optional else ''})")
    return d


def _int(v: Any, path: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise _Invalid(path, f"must be an integer {rng}, got {_short(v)}")
    return v


def _number(v: Any, path: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    ok = not isinstance(v, bool) and isinstance(v, (int, float))
    ok = ok and (math.isfinite(v) if isinstance(v, float) else abs(v) < 1 << 1000) and lo <= v <= hi
    if not ok:
        rng = "" if (lo, hi) == (-math.inf, math.inf) else f" in [{lo:g}, {hi:g}]"
        raise _Invalid(path, f"must be a finite number{rng}, got {_short(v)}")
    return float(v)


def _str(v: Any, path: str, empty: bool = True) -> str:
    if not isinstance(v, str) or (not empty and not v):
        raise _Invalid(path, f"must be a {'' if empty else 'non-empty '}string, got {_short(v)}")
    return v


def _bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(path, f"must be true or false, got {_short(v)}")
    return v


def _list(v: Any, path: str) -> list:
    if not isinstance(v, list):
        raise _Invalid(path, f"must be a list, got {type(v).__name__}")
    return v


def _dict(v: Any, path: str) -> dict:
    if not isinstance(v, dict):
        raise _Invalid(path, f"must be a JSON object, got {type(v).__name__}")
    return v


def is_plain_file_name(name: Any) -> bool:
    """Whether `name` is a plain file name inside the bundle folder: no separator, no "..", not
    absolute, not hidden, so that no manifest (or graph naming external data) makes the runtime
    read a file elsewhere."""
    return (isinstance(name, str) and bool(name) and not name.startswith(".") and name == name.strip()
            and not any(c in name for c in "/\\:\0"))


def _file_name(name: Any, path: str) -> str:
    if not is_plain_file_name(name):
        raise _Invalid(path, f"must be a plain file name inside the bundle folder (no separators, no '..', not "
                             f"absolute), got {_short(name)}")
    return name


def _file_entry(d: Any, path: str, extra: tuple[str, ...] = (), optional: tuple[str, ...] = (),
                plain: bool = True) -> dict[str, Any]:
    """{file, sha256, bytes, ...}: a file of the bundle with its checksum and size. plain: the
    file is a plain name (an engine's is checked against its key instead)."""
    _keys(d, path, ("file", "sha256", "bytes", *extra), optional)
    if plain:
        _file_name(d["file"], f"{path}.file")
    # "" while an export is still writing the bundle (export/bundle.py verifies before it records them)
    if not isinstance(d["sha256"], str) or not (d["sha256"] == "" or _SHA256.fullmatch(d["sha256"])):
        raise _Invalid(f"{path}.sha256", f"must be 64 lowercase hex digits, got {_short(d['sha256'])}")
    _int(d["bytes"], f"{path}.bytes")
    return d


def _json_value(v: Any, path: str, depth: int = 0) -> None:
    """A model config value: JSON with finite numbers and bounded integers (a huge or infinite
    value would make the model constructor allocate, loop or fail deep inside diffusers)."""
    if depth > 8:
        raise _Invalid(path, "nests too deep")
    if isinstance(v, dict):
        for k, x in v.items():
            _json_value(x, f"{path}.{k}", depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _json_value(x, f"{path}[{i}]", depth + 1)
    elif isinstance(v, float):
        _number(v, path)
    elif isinstance(v, int) and not isinstance(v, bool):
        name = path.rpartition(".")[2].lower()
        hi = MAX_LAYER_COUNT if ("layers" in name or "blocks" in name) else MAX_CONFIG_INT
        _int(v, path, -MAX_CONFIG_INT, hi)
    elif not (v is None or isinstance(v, (str, bool))):
        raise _Invalid(path, f"must be a JSON value, got {type(v).__name__}")


def _precision(v: Any) -> dict[str, Any]:
    """The precision record; None (a manifest older than the field): fp32 at the tolerance of then."""
    if v is None:
        return {"dtype": "fp32", "parity_tolerance": LEGACY_PARITY_TOLERANCE}
    _keys(v, "precision", ("dtype", "parity_tolerance"), ("quantization",))
    if v["dtype"] not in GRAPH_PRECISIONS:
        raise _Invalid("precision.dtype", f"must be one of {list(GRAPH_PRECISIONS)}, got {_short(v['dtype'])}")
    _number(v["parity_tolerance"], "precision.parity_tolerance", 0, 1)
    if v["parity_tolerance"] <= 0:
        raise _Invalid("precision.parity_tolerance", f"must be above 0, got {_short(v['parity_tolerance'])}")
    if "quantization" in v:
        _dict(v["quantization"], "precision.quantization")
    return dict(v)


def _tensors(v: Any, path: str) -> list[TensorSpec]:
    out = []
    for i, t in enumerate(_list(v, path)):
        try:
            out.append(TensorSpec.from_dict(t))
        except TensorSpecError as e:
            raise _Invalid(f"{path}[{i}]", str(e)) from None
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise _Invalid(path, f"names a tensor more than once: {names}")
    return out


@dataclass
class GraphEntry:
    file: str
    sha256: str
    bytes: int
    keep: list[int]
    macs: int
    ops: list[str]
    parity_max_abs_err: float | None = None   # vs the PyTorch step on the same inputs (dsexport verify)
    # the cache entries the graph outputs (those a later step reads, export/prune.py); the others
    # keep their latest buffer. None: every entry
    cache_writes: list[str] | None = None

    @classmethod
    def from_dict(cls, d: Any, path: str, num_layers: int, cache: CacheLayout) -> GraphEntry:
        _file_entry(d, path, ("keep", "macs", "ops"), ("parity_max_abs_err", "cache_writes"))
        keep = _list(d["keep"], f"{path}.keep")
        if len(keep) != num_layers:
            raise _Invalid(f"{path}.keep", f"must hold one token count per schedule layer ({num_layers}), got {len(keep)}")
        for j, k in enumerate(keep):
            _int(k, f"{path}.keep[{j}]")
        _number(d["macs"], f"{path}.macs", 0)
        if not all(isinstance(op, str) for op in _list(d["ops"], f"{path}.ops")):
            raise _Invalid(f"{path}.ops", "must be a list of operator names")
        err = d.get("parity_max_abs_err")
        if err is not None:
            _number(err, f"{path}.parity_max_abs_err", 0)
        writes = d.get("cache_writes")
        if writes is not None:
            names = cache.names
            if not all(isinstance(w, str) and w in names for w in _list(writes, f"{path}.cache_writes")):
                raise _Invalid(f"{path}.cache_writes", f"must list entries of the manifest's cache, got {_short(writes)}")
        return cls(file=d["file"], sha256=d["sha256"], bytes=d["bytes"], keep=list(keep), macs=d["macs"],
                   ops=list(d["ops"]), parity_max_abs_err=err, cache_writes=None if writes is None else list(writes))


@dataclass
class Manifest:
    family: str
    diffusers_class: str
    model_config: dict[str, Any]
    batch_size: int
    guidance: bool
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    cache: CacheLayout
    schedule: Schedule
    sampler: SamplerPlan
    graphs: list[GraphEntry]
    steps: list[dict[str, Any]]
    weights: dict[str, Any]
    macs: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    spec_options: dict[str, Any] = field(default_factory=dict)
    guidance_scale: float | None = None   # the model's default (None in bundles older than the field)
    # TensorRT (dsexport --tensorrt): the universal step graph {file, sha256, bytes} and the engines
    # built from it [{key, file, sha256, bytes, precision, profiles}], one per TensorRT version + GPU
    universal: dict[str, Any] | None = None
    engines: list[dict[str, Any]] = field(default_factory=list)
    # {dtype, parity_tolerance, quantization?}: see the module docstring
    precision: dict[str, Any] = field(default_factory=lambda: {"dtype": "fp32",
                                                               "parity_tolerance": LEGACY_PARITY_TOLERANCE})
    tool: str = ""
    created: str = ""

    @property
    def layer_cache(self) -> bool:
        """Whether the graphs carry the layer cache (False: the plain model, a dense schedule)."""
        return self.cache.has_layer_cache

    @property
    def step_graphs(self) -> list[int]:
        """The graph index of each step, in step order."""
        return [s["graph"] for s in self.steps]

    @property
    def steps_per_graph(self) -> list[int]:
        """How many steps run each graph, in graph order."""
        graphs = self.step_graphs
        return [graphs.count(g) for g in range(len(self.graphs))]

    @property
    def parameters(self) -> dict[str, list]:
        """Model parameter/buffer name -> [stored tensor name, transposed] (weights.bin)."""
        return self.weights["parameters"]

    @property
    def files(self) -> list[tuple[str, str, int]]:
        """(file name, sha256, bytes) of every file the manifest names."""
        files = [(g.file, g.sha256, g.bytes) for g in self.graphs]
        files.append((self.weights["file"], self.weights["sha256"], self.weights["bytes"]))
        return files + [(e["file"], e["sha256"], e["bytes"]) for e in ([self.universal] if self.universal else [])
                        + self.engines]

    def engine(self, key: str) -> dict[str, Any] | None:
        """The entry of the engine built for engine key `key`, if any."""
        return next((e for e in self.engines if e["key"] == key), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "tool": self.tool, "created": self.created,
            "family": self.family, "diffusers_class": self.diffusers_class, "model_config": self.model_config,
            "batch_size": self.batch_size, "guidance": self.guidance, "guidance_scale": self.guidance_scale,
            "spec_options": self.spec_options,
            "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
            "cache": self.cache.to_list(),
            "schedule": self.schedule.to_dict(), "sampler": self.sampler.to_dict(),
            "graphs": [vars(g) for g in self.graphs], "steps": self.steps,
            "weights": self.weights, "macs": self.macs, "source": self.source,
            "universal": self.universal, "engines": self.engines, "precision": self.precision,
        }

    _REQUIRED = ("format", "version", "family", "diffusers_class", "model_config", "batch_size", "guidance",
                 "inputs", "outputs", "cache", "schedule", "sampler", "graphs", "steps", "weights", "macs")
    _OPTIONAL = ("tool", "created", "source", "spec_options", "guidance_scale", "universal", "engines", "precision")

    @classmethod
    def from_dict(cls, d: Any, source: str) -> Manifest:
        """Read and validate a manifest (module docstring); BundleError naming the field and the fix."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BundleError(f"{source} is not a diffsparse bundle manifest (format must be {FORMAT!r})")
        if d.get("version") != VERSION or isinstance(d.get("version"), bool):
            raise BundleError(f"{source}: bundle version {_short(d.get('version'))} is not supported by this "
                              f"diffsparse (it reads version {VERSION}); re-export the bundle with dsexport")
        try:
            return cls._read(d, source)
        except _Invalid as e:
            raise BundleError(f"{source}: {e}; the manifest is corrupted or was edited: {_FIX}") from None

    @classmethod
    def _read(cls, d: dict[str, Any], source: str) -> Manifest:
        _keys(d, "manifest", cls._REQUIRED, cls._OPTIONAL)
        try:
            schedule = Schedule.from_dict(d["schedule"], source="schedule")
        except ScheduleError as e:  # one error type for a bad manifest, whichever part is bad
            raise _Invalid("schedule", f"is invalid ({e})") from None
        except (ArithmeticError, TypeError, ValueError, KeyError, AttributeError) as e:
            # Schedule.from_dict refuses what it knows; anything else in the embedded copy is still this field
            raise _Invalid("schedule", f"is malformed ({type(e).__name__}: {_short(str(e), 120)})") from None
        try:
            sampler = SamplerPlan.from_dict(d["sampler"], num_steps=len(schedule.computed_steps))
        except SamplerError as e:
            raise _Invalid("sampler", f"is invalid: {e}") from None
        try:
            cache = CacheLayout.from_tensors(_tensors(d["cache"], "cache"))
        except CacheLayoutError as e:
            raise _Invalid("cache", str(e)) from None
        if not cache.has_layer_cache and schedule.reuses_tokens:
            raise _Invalid("cache", "has no layer entries: the schedule reuses tokens but the bundle records no layer cache")
        guidance_scale = d.get("guidance_scale")
        if guidance_scale is not None:
            guidance_scale = _number(guidance_scale, "guidance_scale", *GUIDANCE_SCALE_RANGE)
        model_config = _dict(d["model_config"], "model_config")
        _json_value(model_config, "model_config")
        spec_options = _dict(d.get("spec_options", {}), "spec_options")
        _json_value(spec_options, "spec_options")
        engines = [_file_entry(e, f"engines[{i}]", ("key", "precision", "profiles"), ("quantization",), plain=False)
                   for i, e in enumerate(_list(d.get("engines", []), "engines"))]
        for i, e in enumerate(engines):
            if not isinstance(e["key"], str) or not _ENGINE_KEY.fullmatch(e["key"]) or ".." in e["key"]:
                raise _Invalid(f"engines[{i}].key", f"must be an engine key (letters, digits, '.', '_', '-'), got "
                                                    f"{_short(e['key'])}")
            if e["file"] != engine_file(e["key"]):
                raise _Invalid(f"engines[{i}].file", f"must be {engine_file(e['key'])!r} (the engine of its key, in "
                                                     f"{ENGINES_DIR}/), got {_short(e['file'])}")
            _str(e["precision"], f"engines[{i}].precision")
            _int(e["profiles"], f"engines[{i}].profiles")
            if "quantization" in e:   # int8/fp8: how the Q/DQ graph it was built from was calibrated
                _dict(e["quantization"], f"engines[{i}].quantization")
        universal = d.get("universal")
        if universal is not None:
            _file_entry(universal, "universal")
        source_info = _dict(d.get("source", {}), "source")
        precision = _precision(d.get("precision"))
        m = cls(family=_str(d["family"], "family", empty=False),
                diffusers_class=_str(d["diffusers_class"], "diffusers_class", empty=False),
                model_config=model_config, batch_size=_int(d["batch_size"], "batch_size", 1, MAX_BATCH_SIZE),
                guidance=_bool(d["guidance"], "guidance"), spec_options=dict(spec_options),
                guidance_scale=guidance_scale, inputs=_tensors(d["inputs"], "inputs"),
                outputs=_tensors(d["outputs"], "outputs"), cache=cache, schedule=schedule, sampler=sampler,
                graphs=[GraphEntry.from_dict(g, f"graphs[{i}]", schedule.num_layers, cache)
                        for i, g in enumerate(_list(d["graphs"], "graphs"))],
                steps=_list(d["steps"], "steps"), weights=_dict(d["weights"], "weights"),
                macs=_dict(d["macs"], "macs"), source=dict(source_info),
                universal=universal, engines=engines, precision=precision, tool=_str(d.get("tool", ""), "tool"),
                created=_str(d.get("created", ""), "created"))
        if not m.inputs or not m.outputs:
            raise _Invalid("inputs" if not m.inputs else "outputs", "must name at least one tensor (the latent)")
        m._check_steps()
        m._check_macs()
        m._check_weights()
        return m

    def _check_steps(self) -> None:
        """steps[i] = {index: the schedule's i-th computed step t, timestep: the sampler's i-th,
        graph: a graph running the schedule's K for step t}; every graph is run by some step,
        numbered in order of first use. A skipped step has no entry (it runs nothing)."""
        computed = self.schedule.computed_steps
        if len(self.steps) != len(computed):
            raise _Invalid("steps", f"has {len(self.steps)} entries for a schedule that computes {len(computed)} steps")
        if not self.graphs:
            raise _Invalid("graphs", "is empty")
        first_use: list[int] = []
        for i, s in enumerate(self.steps):
            _keys(s, f"steps[{i}]", ("index", "timestep", "graph"))
            if _int(s["index"], f"steps[{i}].index") != computed[i]:
                raise _Invalid(f"steps[{i}].index", f"must be {computed[i]} (the schedule's computed steps, in order), "
                                                    f"got {s['index']}")
            if _number(s["timestep"], f"steps[{i}].timestep") != float(self.sampler.timesteps[i]):
                raise _Invalid(f"steps[{i}].timestep", f"must be the sampler's timestep {float(self.sampler.timesteps[i])}, "
                                                       f"got {s['timestep']}")
            g = _int(s["graph"], f"steps[{i}].graph", 0, len(self.graphs) - 1)
            if g not in first_use:
                if g != len(first_use):
                    raise _Invalid(f"steps[{i}].graph", f"is {g}, but graphs are numbered in order of first use "
                                                        f"(expected {len(first_use)} or one of {first_use})")
                first_use.append(g)
            if self.graphs[g].keep != self.schedule.keep[computed[i]]:
                raise _Invalid(f"graphs[{g}].keep", f"is not the schedule's K for step {computed[i]}, which runs it")
        if len(first_use) != len(self.graphs):
            raise _Invalid("graphs", f"lists {len(self.graphs)} graphs but the steps run only {len(first_use)}")
        for i, g in enumerate(self.graphs):
            if g.file != graph_file(i):
                raise _Invalid(f"graphs[{i}].file", f"must be {graph_file(i)!r} (graph files are numbered), got "
                                                    f"{_short(g.file)}")

    def _check_macs(self) -> None:
        """Informational, but read by profiles and reports: numbers of the right shape."""
        _keys(self.macs, "macs", ("dense_total", "total", "ratio", "per_step"))
        for k in ("dense_total", "total", "ratio"):
            _number(self.macs[k], f"macs.{k}", 0)
        per_step = _list(self.macs["per_step"], "macs.per_step")
        if len(per_step) != len(self.schedule.computed_steps):
            raise _Invalid("macs.per_step", f"must hold one number per computed step ({len(self.schedule.computed_steps)})")
        for i, x in enumerate(per_step):
            _number(x, f"macs.per_step[{i}]", 0)

    def _check_weights(self) -> None:
        """weights {file, sha256, bytes, tensors, index, parameters}: every stored tensor lies
        inside the file, apart from the others, its length dtype size × elements; every
        parameter names a stored tensor."""
        w = _file_entry(self.weights, "weights", ("tensors", "index", "parameters"))
        size = w["bytes"]
        index = _dict(w["index"], "weights.index")
        if _int(w["tensors"], "weights.tensors") != len(index):
            raise _Invalid("weights.tensors", f"is {w['tensors']} but the index lists {len(index)} tensors")
        spans = []
        for name, entry in index.items():
            path = f"weights.index[{name!r}]"
            if not isinstance(entry, list) or len(entry) != 4:
                raise _Invalid(path, f"must be [offset, bytes, dtype, shape], got {_short(entry)}")
            offset, length, dtype, shape = entry
            if not isinstance(dtype, str) or dtype not in WEIGHT_DTYPES:
                raise _Invalid(f"{path}[2]", f"(dtype) must be one of {list(WEIGHT_DTYPES)}, got {_short(dtype)}")
            itemsize = int(dtype[2:])
            _int(offset, f"{path}[0]", 0, size)
            if offset % itemsize:
                raise _Invalid(f"{path}[0]", f"(offset {offset}) is not aligned to its dtype's {itemsize} bytes")
            if not isinstance(shape, list) or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 40
                                                      for x in shape):
                raise _Invalid(f"{path}[3]", f"(shape) must be a list of non-negative integers, got {_short(shape)}")
            elements = math.prod(shape)
            if _int(length, f"{path}[1]", 0, size - offset) != elements * itemsize:
                raise _Invalid(f"{path}[1]", f"(bytes) is {length}, but shape {shape} of {dtype} takes {elements * itemsize}")
            spans.append((offset, offset + length, name))
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise _Invalid(f"weights.index[{b!r}]", f"overlaps {a!r} in {w['file']}")
        params = _dict(w["parameters"], "weights.parameters")
        for name, entry in params.items():
            stored = entry[0] if isinstance(entry, list) and len(entry) == 2 else None
            if not isinstance(stored, str) or stored not in index:
                raise _Invalid(f"weights.parameters[{name!r}]", f"names {_short(stored)}, which weights.bin does not hold")
            _bool(entry[1], f"weights.parameters[{name!r}][1] (transposed)")

    def save(self, folder: Path) -> Path:
        path = folder / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> Manifest:
        """Read and validate a bundle's manifest; every file it names must lie inside the folder
        (no symbolic link out of it); with verify, check every file's size and checksum."""
        folder = Path(folder)
        if not folder.is_dir():
            raise BundleError(f"bundle folder {folder} does not exist")
        path = folder / MANIFEST_FILE
        if not path.is_file():
            partial = "" if not folder.name.startswith(".") else " (it looks like an unfinished export)"
            raise BundleError(f"{folder} has no {MANIFEST_FILE}: not a diffsparse bundle, or its export did not "
                              f"finish{partial}; run dsexport again")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise BundleError(f"{path} is not valid JSON ({_short(str(e), 120)}): the bundle is corrupted; "
                              "re-export it") from None
        m = cls.from_dict(data, str(path))
        for name, digest, size in m.files:
            f = bundle_file(folder, name)
            if not verify:
                continue
            if f.stat().st_size != size:
                raise BundleError(f"bundle file {f} has {f.stat().st_size} bytes, the manifest says {size}: "
                                  "it is truncated or was modified; re-export the bundle")
            if sha256_file(f) != digest:
                raise BundleError(f"bundle file {f} fails its checksum: it is corrupted; re-export the bundle")
        return m


def bundle_file(folder: Path, name: str) -> Path:
    """The path of a file the manifest names: a regular file that resolves inside the bundle
    folder (a symbolic link pointing out of it is refused: the manifest's checksum would then
    vouch for a file someone else controls). BundleError otherwise."""
    root = folder.resolve()
    f = folder / name
    if not f.is_file():
        raise BundleError(f"bundle {folder} is missing {name}; re-export it")
    if not f.resolve().is_relative_to(root):
        raise BundleError(f"bundle file {f} is a link to {f.resolve()}, outside the bundle folder: a bundle's files "
                          "must lie inside it; copy the file into the bundle or re-export it")
    return f
