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
    steps    [{index, timestep, graph}]            graph = index into graphs
    weights  {file, sha256, bytes, tensors, index, parameters}
             index:      stored tensor -> [offset, bytes, dtype, shape] in the weights file
             parameters: model parameter or buffer -> [stored tensor, transposed]: the model's
                         own tensors, so the torch backend runs the bundle's weights
    macs     {dense_total, total, ratio, per_step}
    source   {model, seed}                         provenance only: nothing reads the model from it
    universal, engines                             TensorRT (dsexport --tensorrt)

Version 1 bundles (no parameter map, an unread sampler field) are refused with "re-export".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffsparse.bundle_format import MANIFEST_FILE
from diffsparse.cache_layout import CacheLayout
from diffsparse.sampler import SamplerPlan
from diffsparse.schedule import Schedule, ScheduleError
from diffsparse.tensors import TensorSpec

FORMAT = "diffsparse-bundle"
VERSION = 2


class BundleError(ValueError):
    """A bundle that is missing, half-written, corrupted or of an unknown version."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    def parameters(self) -> dict[str, list]:
        """Model parameter/buffer name -> [stored tensor name, transposed] (weights.bin)."""
        return self.weights["parameters"]

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
            "universal": self.universal, "engines": self.engines,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str) -> Manifest:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BundleError(f"{source} is not a diffsparse bundle manifest (format must be {FORMAT!r})")
        if d.get("version") != VERSION:
            raise BundleError(f"{source}: bundle version {d.get('version')!r} is not supported by this "
                              f"diffsparse (it reads version {VERSION}); re-export the bundle with dsexport")
        try:
            schedule = Schedule.from_dict(d["schedule"], source=f"{source}: schedule")
            m = cls(family=d["family"], diffusers_class=d["diffusers_class"], model_config=d["model_config"],
                    batch_size=int(d["batch_size"]), guidance=bool(d["guidance"]),
                    spec_options=dict(d.get("spec_options", {})),
                    guidance_scale=None if d.get("guidance_scale") is None else float(d["guidance_scale"]),
                    inputs=[TensorSpec.from_dict(t) for t in d["inputs"]],
                    outputs=[TensorSpec.from_dict(t) for t in d["outputs"]],
                    cache=CacheLayout.from_tensors([TensorSpec.from_dict(t) for t in d["cache"]]),
                    schedule=schedule, sampler=SamplerPlan.from_dict(d["sampler"]),
                    graphs=[GraphEntry(**g) for g in d["graphs"]], steps=list(d["steps"]),
                    weights=dict(d["weights"]), macs=dict(d["macs"]), source=dict(d.get("source", {})),
                    universal=d.get("universal"), engines=list(d.get("engines", [])),
                    tool=d.get("tool", ""), created=d.get("created", ""))
        except ScheduleError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{source}: malformed manifest ({type(e).__name__}: {e}); re-export the bundle") from None
        if not m.layer_cache and m.schedule.reuses_tokens:
            raise BundleError(f"{source}: the schedule reuses tokens but the bundle records no layer cache; "
                              "re-export the bundle")
        m.check_consistent(source)
        m.check_weights(source)
        return m

    def check_consistent(self, source: str) -> None:
        t = self.schedule.num_steps
        if len(self.steps) != t or len(self.sampler.timesteps) != t:
            raise BundleError(f"{source}: {len(self.steps)} steps and {len(self.sampler.timesteps)} timesteps "
                              f"for a schedule of T={t}; the manifest is inconsistent, re-export the bundle")
        for s in self.steps:
            if not 0 <= s["graph"] < len(self.graphs):
                raise BundleError(f"{source}: step {s['index']} names graph {s['graph']} of {len(self.graphs)}")
            if self.graphs[s["graph"]].keep != self.schedule.keep[s["index"]]:
                raise BundleError(f"{source}: step {s['index']}'s graph does not match the schedule's K for it")

    def check_weights(self, source: str) -> None:
        """Every parameter names a stored tensor of its shape (transposed where marked)."""
        index = self.weights.get("index")
        params = self.weights.get("parameters")
        if not isinstance(index, dict) or not isinstance(params, dict):
            raise BundleError(f"{source}: the weights entry has no tensor index or parameter map; re-export the bundle")
        for name, entry in params.items():
            stored = entry[0] if isinstance(entry, list) and len(entry) == 2 else None
            if not isinstance(stored, str) or stored not in index:
                raise BundleError(f"{source}: parameter {name} names {stored}, which weights.bin does not hold; "
                                  "re-export the bundle")

    def save(self, folder: Path) -> Path:
        path = folder / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> Manifest:
        """Read and validate a bundle's manifest; with verify, check every file's size and checksum."""
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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path} is not valid JSON ({e}): the bundle is corrupted; re-export it") from None
        m = cls.from_dict(data, str(path))
        if verify:
            files = [(g.file, g.sha256, g.bytes) for g in m.graphs]
            files.append((m.weights["file"], m.weights["sha256"], m.weights["bytes"]))
            files += [(e["file"], e["sha256"], e["bytes"]) for e in ([m.universal] if m.universal else []) + m.engines]
            for name, digest, size in files:
                f = folder / name
                if not f.is_file():
                    raise BundleError(f"bundle {folder} is missing {name}; re-export it")
                if f.stat().st_size != size:
                    raise BundleError(f"bundle file {f} has {f.stat().st_size} bytes, the manifest says {size}: "
                                      "it is truncated or was modified; re-export the bundle")
                if sha256_file(f) != digest:
                    raise BundleError(f"bundle file {f} fails its checksum: it is corrupted; re-export the bundle")
        return m
