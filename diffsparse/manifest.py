"""The bundle manifest: one schema, written by `dsexport` and validated by the runtime on load.

A bundle folder::

    manifest.json            this schema
    weights.bin              every weight tensor once (ONNX external data shared by all graphs)
    step_XXX.onnx            one graph per distinct step (steps with the same K(t, l) share one);
                             beside weights.bin, which their external data names

`manifest.json` (version 1)::

    format, version, tool, created
    family, diffusers_class, model_config          rebuild the model/spec
    batch_size, guidance                           static shapes the graphs were exported for
    guidance_scale                                 the scale generation uses unless told otherwise
    inputs, outputs, cache                         [{name, shape, dtype}]: the step signature
    schedule                                       the schedule file's content (same schema)
    sampler                                        SamplerPlan: timesteps, coefficients, config
    graphs   [{file, sha256, bytes, keep, macs, ops}]
    steps    [{index, timestep, graph}]            graph = index into graphs
    weights  {file, sha256, bytes, tensors}
    macs     {dense_total, total, ratio}
    source   {model, seed}                         where the PyTorch reference model comes from
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffsparse.models.base import TensorSpec
from diffsparse.sampler import SamplerPlan
from diffsparse.schedule import Schedule, ScheduleError

FORMAT = "diffsparse-bundle"
VERSION = 1
MANIFEST = "manifest.json"


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


@dataclass
class Manifest:
    family: str
    diffusers_class: str
    model_config: dict[str, Any]
    batch_size: int
    guidance: bool
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    cache: list[TensorSpec]
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
    # False: the schedule never reuses tokens, so the graphs carry no layer cache (the plain model)
    layer_cache: bool = True
    tool: str = ""
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "tool": self.tool, "created": self.created,
            "family": self.family, "diffusers_class": self.diffusers_class, "model_config": self.model_config,
            "batch_size": self.batch_size, "guidance": self.guidance, "guidance_scale": self.guidance_scale,
            "spec_options": self.spec_options,
            "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
            "cache": [t.to_dict() for t in self.cache], "layer_cache": self.layer_cache,
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
                    cache=[TensorSpec.from_dict(t) for t in d["cache"]], layer_cache=bool(d.get("layer_cache", True)),
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

    def save(self, folder: Path) -> Path:
        path = folder / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> Manifest:
        """Read and validate a bundle's manifest; with verify, check every file's size and checksum."""
        folder = Path(folder)
        if not folder.is_dir():
            raise BundleError(f"bundle folder {folder} does not exist")
        path = folder / MANIFEST
        if not path.is_file():
            partial = "" if not folder.name.startswith(".") else " (it looks like an unfinished export)"
            raise BundleError(f"{folder} has no {MANIFEST}: not a diffsparse bundle, or its export did not "
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
