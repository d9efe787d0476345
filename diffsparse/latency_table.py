"""The latency table: what each cacheable layer and each step kind costs on one target, measured
by `dscalibrate latency` (calibrate/latency.py) and read by the trainer, `dsexport` and `dsprofile`.

Cost model (per computed step t of a schedule that reuses tokens; ms on the table's target)::

    latency(t) = refresh_ms                                  if K(t, l) = N_l for every layer l
               = partial_fixed_ms + Σ_l c(kind_l, K(t, l))   otherwise (a partial step)

and a skipped step costs nothing (the sampler folds it into the next step's coefficients). A
schedule that never reuses tokens (dense, fewer steps) exports the plain model, whose computed
steps cost `dense_step_ms` each. c(κ, K) is one layer of kind κ recomputing K tokens, measured
relative to K = 0 (so c(κ, 0) = 0 and a K = 0 layer's reuse cost is inside `partial_fixed_ms`):
layers of one kind have the same shapes, so they cost the same.

File layout (JSON)::

    {"format": "diffsparse-latency-table", "version": 1,
     "fingerprint": {"backend": "onnxruntime", "device": "cpu", "cpu": "...", "threads": 2,
                     "prepacked": true, "onnxruntime": "1.32.0", "torch": "2.13.0",
                     "family": "dit", "num_tokens": 64, "num_layers": 8, "batch_size": 10,
                     "guidance": true, ...},
     "kinds": {"SA": {"tokens": [0, 16, 32, 48, 64], "ms": [0.0, 0.21, ...]}, "MLP": {...}},
     "partial_fixed_ms": 2.1, "refresh_ms": 9.8, "dense_step_ms": 9.5,
     "samples": {...raw per-configuration medians, informational...}}

A table measured for another target (host, backend, versions, model, batch, guidance) still loads;
`mismatches` names what differs so callers can warn instead of silently using it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffsparse.jsonfile import load_json, save_json
from diffsparse.models.base import ModelSpec
from diffsparse.schedule import LAYER_KINDS, LayerRef, Schedule

FORMAT = "diffsparse-latency-table"
VERSION = 1
#: the fingerprint keys that describe the model and run shape (a mismatch makes predictions wrong
#: in kind, not only in degree)
MODEL_KEYS = ("family", "num_tokens", "num_layers", "batch_size", "guidance")
#: the fingerprint keys that describe the target (host, backend, libraries)
TARGET_KEYS = ("backend", "device", "cpu", "gpu", "threads", "prepacked", "dtype", "onnxruntime", "torch")


class LatencyTableError(ValueError):
    """A latency table that is missing, malformed or does not cover the model or schedule."""


@dataclass(frozen=True)
class KindLatency:
    """One layer kind: per token count K (ascending, first 0) the latency of one layer, ms."""

    tokens: tuple[int, ...]
    ms: tuple[float, ...]

    def at(self, k: int, kind: str) -> float:
        try:
            return self.ms[self.tokens.index(int(k))]
        except ValueError:
            raise LatencyTableError(
                f"the latency table has no {kind} layer measured at K={k} (it has K in {list(self.tokens)}); "
                "re-run dscalibrate latency with the schedule's candidate set") from None


def model_fingerprint(spec: ModelSpec) -> dict[str, Any]:
    """The model and run-shape part of a fingerprint, for a spec."""
    return {"family": spec.family, "num_tokens": spec.num_tokens, "num_layers": len(spec.layers),
            "batch_size": spec.batch_size, "guidance": spec.guidance}


@dataclass
class LatencyTable:
    fingerprint: dict[str, Any]
    kinds: dict[str, KindLatency]
    partial_fixed_ms: float
    refresh_ms: float
    dense_step_ms: float
    samples: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- predictions ------------------------------------------------------------------------
    def layer_ms(self, layer: LayerRef, k: int) -> float:
        """c(kind_l, K): one layer recomputing K tokens, beyond its K = 0 cost."""
        if layer.kind not in self.kinds:
            raise LatencyTableError(f"the latency table has no {layer.kind} layers (it has {sorted(self.kinds)}); "
                                    "it was measured for another model: re-run dscalibrate latency for this one")
        return self.kinds[layer.kind].at(k, layer.kind)

    def step_ms(self, layers: Sequence[LayerRef], dense_row: Sequence[int], row: Sequence[int],
                reuses_tokens: bool = True) -> float:
        """Predicted latency of one computed step running K row `row` (module docstring)."""
        if not reuses_tokens:
            return self.dense_step_ms
        if list(row) == list(dense_row):
            return self.refresh_ms
        return self.partial_fixed_ms + sum(self.layer_ms(layer, k) for layer, k in zip(layers, row))

    def schedule_step_ms(self, spec: ModelSpec, schedule: Schedule) -> list[float]:
        """Predicted latency of each computed step of `schedule` (the steps a bundle runs)."""
        return [self.step_ms(spec.layers, spec.dense_keep(), row, schedule.reuses_tokens)
                for row in schedule.computed_keep]

    def check_model(self, spec: ModelSpec) -> None:
        """Raise if the table cannot predict this model at all (its layer kinds or counts differ)."""
        fp = self.fingerprint
        if fp.get("num_layers") != len(spec.layers) or fp.get("num_tokens") != spec.num_tokens:
            raise LatencyTableError(
                f"the latency table was measured for a model with {fp.get('num_layers')} layers of "
                f"{fp.get('num_tokens')} tokens, this one has {len(spec.layers)} of {spec.num_tokens}: "
                "re-run dscalibrate latency for this model")
        for layer in spec.layers:
            if layer.kind not in self.kinds:
                raise LatencyTableError(f"the latency table has no {layer.kind} layers: re-run dscalibrate latency "
                                        "for this model")

    def mismatches(self, expected: dict[str, Any]) -> list[str]:
        """What differs between this table's fingerprint and `expected` (keys present in both)."""
        return [f"{key}: table {self.fingerprint[key]!r}, here {expected[key]!r}"
                for key in (*MODEL_KEYS, *TARGET_KEYS)
                if key in expected and key in self.fingerprint and self.fingerprint[key] != expected[key]]

    # ---- validation and files ----------------------------------------------------------------
    def validate(self) -> None:
        if not isinstance(self.fingerprint, dict):
            raise LatencyTableError("fingerprint must be an object")
        missing = [k for k in MODEL_KEYS if k not in self.fingerprint]
        if missing:
            raise LatencyTableError(f"fingerprint lacks {missing}")
        if not self.kinds:
            raise LatencyTableError("kinds must name at least one layer kind")
        for kind, entry in self.kinds.items():
            if kind not in LAYER_KINDS:
                raise LatencyTableError(f"kinds: unknown layer kind {kind!r} (known: {list(LAYER_KINDS)})")
            if len(entry.tokens) != len(entry.ms) or not entry.tokens:
                raise LatencyTableError(f"kinds.{kind}: tokens and ms must be non-empty lists of one length")
            if list(entry.tokens) != sorted(set(entry.tokens)) or entry.tokens[0] != 0:
                raise LatencyTableError(f"kinds.{kind}.tokens must ascend strictly from 0, got {list(entry.tokens)}")
            if not all(_time(x) for x in entry.ms):
                raise LatencyTableError(f"kinds.{kind}.ms must be finite non-negative numbers, got {list(entry.ms)}")
        for name in ("partial_fixed_ms", "refresh_ms", "dense_step_ms"):
            if not _time(getattr(self, name)):
                raise LatencyTableError(f"{name} must be a finite non-negative number, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "fingerprint": dict(self.fingerprint),
                "kinds": {k: {"tokens": list(v.tokens), "ms": list(v.ms)} for k, v in self.kinds.items()},
                "partial_fixed_ms": self.partial_fixed_ms, "refresh_ms": self.refresh_ms,
                "dense_step_ms": self.dense_step_ms, "samples": self.samples}

    @classmethod
    def from_dict(cls, data: Any, source: str = "latency table") -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LatencyTableError(f"{source}: not a latency table (format must be {FORMAT!r}); "
                                    "write one with dscalibrate latency")
        if data.get("version") != VERSION:
            raise LatencyTableError(f"{source}: latency table version {data.get('version')!r} is not supported "
                                    f"(this diffsparse reads {VERSION}); re-run dscalibrate latency")
        try:
            kinds = {str(k): KindLatency(tuple(int(x) for x in v["tokens"]), tuple(float(x) for x in v["ms"]))
                     for k, v in data["kinds"].items()}
            return cls(fingerprint=dict(data["fingerprint"]), kinds=kinds,
                       partial_fixed_ms=float(data["partial_fixed_ms"]), refresh_ms=float(data["refresh_ms"]),
                       dense_step_ms=float(data["dense_step_ms"]), samples=dict(data.get("samples", {})))
        except LatencyTableError as e:
            raise LatencyTableError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LatencyTableError(f"{source}: malformed field ({type(e).__name__}: {e}); "
                                    "re-run dscalibrate latency") from None

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file, then rename)."""
        return save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        data = load_json(path, LatencyTableError, "latency table", "; write one with dscalibrate latency")
        return cls.from_dict(data, source=str(path))


def _time(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
