"""The schedule file: which steps evaluate the model, and which tokens each cacheable layer
recomputes at each step that does.

One schema, versioned, shared by the trainer (writes it), `dsexport` (bakes it into per-step graphs)
and the bundle manifest (embeds it). `Schedule.load` validates everything it reads and raises
`ScheduleError` naming the problem and the fix.

File layout (JSON)::

    {
      "format": "diffsparse-schedule", "version": 3,
      "family": "dit",                      # model family the layers belong to
      "num_tokens": 256,                    # N: tokens per layer (image/video tokens)
      "layer_tokens": [256, 256, ...],      # optional: N_l per layer where layers differ (FLUX's
                                            # text MLP runs over text tokens); default N for all
      "layers": [{"block": 0, "kind": "SA"}, {"block": 0, "kind": "MLP"}, ...],   # L, in order
      "num_steps": 20,                      # T denoising steps
      "candidates": [0, 0.25, 0.5, 0.75, 1.0],   # S, fractions of N
      "keep": [[256, 256, ...], ...],       # K(t, l): tokens recomputed, T rows of L ints
      "full_steps": [true, false, ...],     # steps that recompute every token of every layer
      "skip": [false, false, true, ...],    # steps with no network evaluation (K row all 0)
      "skip_forecast": false,               # skipped steps forecast x0 from the last two computed
                                            # steps (true) or reuse the last model output (false)
      "selector": {"score": "attention", "lambdas": [1, 0, 0.0833, 0.6], "window": 2},
      "macs_ratio": {"target": 0.5, "achieved": 0.49},
      "provenance": {"method": "toca", "created": "...", "tool": "diffsparse 0.1.0", ...}
    }

One space holds every baseline. Each step t is one of
    skip     no network evaluation: the sampler goes on from the last computed step's model
             output. For DDIM (η = 0) and flow-matching Euler this is exactly sampling on the
             sub-grid of computed steps; the sampler plans that sub-grid (`Sampler.plan`'s
             `computed`), so a skipped step costs nothing at all, fixed part included, and no
             graph runs for it. Skipping steps evenly is "fewer steps".
             With `skip_forecast` the skipped steps instead run on x0 extrapolated linearly
             from the last two computed steps (`diffsparse.sampler.ForecastingSampler`): still
             no network evaluation, folded into the computed step's update the same way.
    refresh  every token of every layer (`full_steps`);
    partial  K(t, l) ∈ S per layer; K = 0 everywhere is FORA-style whole-layer reuse.
Version 1 files (no `skip`) are read as schedules without skipped steps, version 2 files (no
`skip_forecast`) as schedules whose skipped steps reuse the last model output. Version 3 added
`skip_forecast`: a version 2 reader would run such a schedule's skipped steps the other way, so
it refuses the file.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from diffsparse import __version__
from diffsparse.jsonfile import load_json, save_json

FORMAT = "diffsparse-schedule"
VERSION = 3
#: versions this diffsparse reads (1: no skipped steps; 2: no skip_forecast)
READ_VERSIONS = (1, 2, 3)
#: the step signature of a skipped step (no graph runs it)
SKIP_SIGNATURE: tuple = ("skip",)
# SA self-attention, CA cross-attention, MLP feed-forward (image tokens), TMLP feed-forward of a
# separate text stream (FLUX's double-stream blocks)
LAYER_KINDS = ("SA", "CA", "MLP", "TMLP")
SCORES = ("attention", "l2norm", "cosine", "value_norm")
DEFAULT_CANDIDATES = (0.0, 0.25, 0.5, 0.75, 1.0)


class ScheduleError(ValueError):
    """A schedule that is malformed or does not fit the model it is used with."""


@dataclass(frozen=True)
class LayerRef:
    """One cacheable layer: the transformer block it sits in and its kind (SA, CA or MLP)."""

    block: int
    kind: str

    @property
    def name(self) -> str:
        return f"{self.kind.lower()}{self.block}"


@dataclass(frozen=True)
class SelectorConfig:
    """Token selector settings (paper eq. 10, A.5.1).

    score: the main per-token signal s1: "attention" (attention received, the paper's for DiT,
        and what a selector without a score reads as), "l2norm" (norm of the layer input),
        "cosine" (1 - cosine similarity of the layer input to its value when the token was last
        computed; Table 5 of the paper) or "value_norm" (tokens with *smaller* self-attention
        value norms score higher, the DuCa choice the paper uses for Wan2.1 and DiT's family
        default here: it needs no attention map, so fused attention stays usable).
    lambdas: (λ1 main score, λ2 cross-attention entropy, λ3 reuse count, λ4 spatial bonus).
        DiT defaults (1, 0, 0.25/3, 0.6) from the paper; PixArt-α and FLUX (0, 1, 0.25/3, 0.4).
    window: k of the k×k neighbourhood whose maximum gets the spatial bonus λ4.
    """

    score: str = "attention"
    lambdas: tuple[float, float, float, float] = (1.0, 0.0, 0.25 / 3, 0.6)
    window: int = 2

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ScheduleError(f"selector.score {self.score!r} is unknown; use one of {SCORES}")
        if len(self.lambdas) != 4:
            raise ScheduleError("selector.lambdas must hold 4 numbers (λ1 score, λ2 cross-attention, λ3 reuse, λ4 bonus)")
        object.__setattr__(self, "lambdas", tuple(float(x) for x in self.lambdas))
        if not all(math.isfinite(x) for x in self.lambdas):
            raise ScheduleError(f"selector.lambdas must be finite numbers, got {list(self.lambdas)}")
        if isinstance(self.window, float) and not math.isfinite(self.window) or int(self.window) < 1:
            raise ScheduleError(f"selector.window must be >= 1, got {self.window}")


@dataclass
class Schedule:
    """K(t, l) for every step t and cacheable layer l, with what is needed to check it fits a model."""

    family: str
    num_tokens: int
    layers: list[LayerRef]
    keep: list[list[int]]
    candidates: tuple[float, ...] = DEFAULT_CANDIDATES
    full_steps: list[bool] | None = None
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    macs_ratio: dict[str, float | None] = field(default_factory=lambda: {"target": None, "achieved": None})
    provenance: dict[str, Any] = field(default_factory=dict)
    layer_tokens: list[int] | None = None
    skip: list[bool] | None = None
    skip_forecast: bool = False

    def __post_init__(self) -> None:
        self._check_layer_tokens()
        if self.layer_tokens is not None and all(n == self.num_tokens for n in self.layer_tokens):
            self.layer_tokens = None  # uniform: stored as num_tokens alone
        if self.skip is None:
            self.skip = [False] * len(self.keep)
        if self.full_steps is None:
            self.full_steps = [row == self.dense_keep() and not skip for row, skip in zip(self.keep, self.skip)]
        self.validate()

    # ---- derived ---------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.keep)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def tokens_of(self, l: int) -> int:
        """N_l: the tokens layer l runs over."""
        return self.num_tokens if self.layer_tokens is None else self.layer_tokens[l]

    def dense_keep(self) -> list[int]:
        return [self.tokens_of(l) for l in range(len(self.layers))]

    def allowed_keep(self, n: int | None = None) -> list[int]:
        """Token counts allowed by the candidate set S for a layer of n tokens (default N)."""
        n = self.num_tokens if n is None else n
        return sorted({int(round(s * n)) for s in self.candidates})

    @property
    def computed(self) -> list[bool]:
        """Per step, whether it evaluates the model (not skipped)."""
        return [not s for s in self.skip]

    @property
    def computed_steps(self) -> list[int]:
        """The steps that evaluate the model, in order: the steps a bundle's graphs run."""
        return [t for t in range(self.num_steps) if not self.skip[t]]

    @property
    def computed_keep(self) -> list[list[int]]:
        """K rows of the computed steps: what the model runs (a skipped step runs nothing)."""
        return [self.keep[t] for t in self.computed_steps]

    @property
    def reuses_tokens(self) -> bool:
        """Whether any computed step reuses any layer's tokens. A schedule that never does (dense,
        fewer steps) needs no layer cache: its graphs are the plain model, so a dense baseline pays
        nothing for caching."""
        dense = self.dense_keep()
        return any(row != dense for row in self.computed_keep)

    def step_signature(self, t: int) -> tuple:
        """Steps with the same signature compile to the same graph (deduplicated on export); a
        skipped step's is `SKIP_SIGNATURE` (it runs no graph)."""
        return SKIP_SIGNATURE if self.skip[t] else tuple(self.keep[t])

    def distinct_signatures(self) -> list[tuple[int, ...]]:
        """The signatures of the computed steps, in order of first use."""
        seen: dict[tuple[int, ...], None] = {}
        for t in self.computed_steps:
            seen.setdefault(self.step_signature(t), None)
        return list(seen)

    def forecasting(self) -> Schedule:
        """This schedule with forecasting skipped steps (`skip_forecast`); ScheduleError when it skips
        no step, where forecasting would change nothing but the sampler's state."""
        if not any(self.skip):
            raise ScheduleError("the schedule skips no step, so there is nothing to forecast; use a schedule with "
                                "skipped steps (e.g. fewer-steps)")
        return replace(self, skip_forecast=True)

    # ---- validation ------------------------------------------------------------------------
    def _check_layer_tokens(self) -> None:
        if self.layer_tokens is not None and (
                len(self.layer_tokens) != len(self.layers)
                or any(not isinstance(x, int) or isinstance(x, bool) or x <= 0 for x in self.layer_tokens)):
            raise ScheduleError(f"layer_tokens must hold one positive integer per layer ({len(self.layers)}), "
                                f"got {self.layer_tokens!r}")

    def validate(self) -> None:
        n = self.num_tokens
        if not isinstance(n, int) or n <= 0:
            raise ScheduleError(f"num_tokens must be a positive integer, got {n!r}")
        if not self.layers:
            raise ScheduleError("schedule has no layers")
        self._check_layer_tokens()
        for layer in self.layers:
            if layer.kind not in LAYER_KINDS:
                raise ScheduleError(f"layer {layer} has kind {layer.kind!r}; kinds are {LAYER_KINDS}")
        if not self.keep:
            raise ScheduleError("schedule has no steps (keep is empty)")
        if any(not (0.0 <= s <= 1.0) for s in self.candidates) or not self.candidates:
            raise ScheduleError(f"candidates must be fractions in [0, 1], got {list(self.candidates)}")
        if (not isinstance(self.skip, list) or len(self.skip) != self.num_steps
                or any(not isinstance(x, bool) for x in self.skip)):
            raise ScheduleError(f"skip must hold one true/false per step ({self.num_steps}), got {self.skip!r}")
        if not isinstance(self.skip_forecast, bool):
            raise ScheduleError(f"skip_forecast must be true or false, got {self.skip_forecast!r}")
        allowed_by_n = {nl: set(self.allowed_keep(nl)) for nl in set(self.dense_keep())}
        dense = self.dense_keep()
        for t, row in enumerate(self.keep):
            if len(row) != self.num_layers:
                raise ScheduleError(
                    f"keep[{t}] has {len(row)} entries but the schedule lists {self.num_layers} layers")
            if self.skip[t]:
                continue  # checked below: all 0
            for l, k in enumerate(row):
                nl = dense[l]
                if not isinstance(k, int) or isinstance(k, bool):
                    raise ScheduleError(f"K(t={t}, l={l}) = {k!r} is not an integer token count")
                if not 0 <= k <= nl:
                    raise ScheduleError(f"K(t={t}, l={l}) = {k} is outside [0, N={nl}]")
                if k not in allowed_by_n[nl]:
                    raise ScheduleError(
                        f"K(t={t}, l={l}) = {k} is not in the candidate set S={list(self.candidates)} "
                        f"(allowed token counts for N={nl}: {sorted(allowed_by_n[nl])})")
        if self.skip[0]:
            raise ScheduleError("step 0 cannot be skipped: there is no model output before it to go on from")
        if self.keep[0] != dense:
            raise ScheduleError("step 0 must recompute every token of every layer: the token cache is empty before it")
        if len(self.full_steps) != self.num_steps:
            raise ScheduleError(f"full_steps has {len(self.full_steps)} entries for {self.num_steps} steps")
        for t, full in enumerate(self.full_steps):
            if full and self.keep[t] != dense:
                raise ScheduleError(f"step {t} is marked full but does not keep every token of every layer")
            if self.skip[t] and (full or any(not isinstance(k, int) or isinstance(k, bool) or k for k in self.keep[t])):
                raise ScheduleError(f"step {t} is skipped, so it computes no token: its K row must be all 0 and it "
                                    "cannot be a full step")

    def check_fits(self, family: str, layers: Sequence[LayerRef], num_tokens: int,
                   num_steps: int | None = None, layer_tokens: Sequence[int] | None = None) -> None:
        """Raise ScheduleError unless this schedule was made for a model with these properties."""
        if family != self.family:
            raise ScheduleError(f"schedule is for model family {self.family!r}, the model is {family!r}")
        if num_tokens != self.num_tokens:
            raise ScheduleError(
                f"schedule has N={self.num_tokens} tokens per layer but the model has {num_tokens}; "
                "make a schedule for this model's resolution and patch size")
        if list(layers) != list(self.layers):
            raise ScheduleError(
                f"schedule has L={self.num_layers} cacheable layers but the model has {len(layers)} "
                f"({_describe_layers(layers)} vs schedule {_describe_layers(self.layers)}); "
                "make or train a schedule for this model")
        if layer_tokens is not None and list(layer_tokens) != self.dense_keep():
            raise ScheduleError(
                f"schedule has per-layer token counts {self.dense_keep()} but the model's layers run over "
                f"{list(layer_tokens)} tokens (text length or resolution differs); make a schedule for this model")
        if num_steps is not None and num_steps != self.num_steps:
            raise ScheduleError(
                f"schedule has T={self.num_steps} steps but {num_steps} were asked for; "
                "use the schedule's step count or make one with that many steps")

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "family": self.family,
            "num_tokens": self.num_tokens,
            **({"layer_tokens": list(self.layer_tokens)} if self.layer_tokens is not None else {}),
            "layers": [{"block": l.block, "kind": l.kind} for l in self.layers],
            "num_steps": self.num_steps,
            "candidates": list(self.candidates),
            "keep": [list(r) for r in self.keep],
            "full_steps": list(self.full_steps),
            "skip": list(self.skip),
            "skip_forecast": self.skip_forecast,
            "selector": {**asdict(self.selector), "lambdas": list(self.selector.lambdas)},
            "macs_ratio": dict(self.macs_ratio),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "schedule") -> Schedule:
        if not isinstance(data, dict):
            raise ScheduleError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ScheduleError(f"{source}: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") not in READ_VERSIONS:
            raise ScheduleError(
                f"{source}: schedule version {data.get('version')!r} is not supported by this diffsparse "
                f"(it reads versions {list(READ_VERSIONS)}); upgrade diffsparse or re-create the schedule")
        if data["version"] == 1 and "skip" in data:
            raise ScheduleError(f"{source}: a version 1 schedule has no 'skip' field (skipped steps need version 2)")
        if data["version"] < 3 and "skip_forecast" in data:
            raise ScheduleError(f"{source}: a version {data['version']} schedule has no 'skip_forecast' field "
                                "(forecasting skipped steps needs version 3)")
        required = ("family", "num_tokens", "layers", "num_steps", "keep")
        missing = [k for k in required if k not in data]
        if missing:
            raise ScheduleError(f"{source}: missing field(s) {missing}")
        try:
            layers = [LayerRef(int(l["block"]), str(l["kind"])) for l in data["layers"]]
            sel = data.get("selector", {})
            if not isinstance(sel, dict):
                raise ScheduleError(f"selector must be an object {{score, lambdas, window}}, got {type(sel).__name__}")
            selector = SelectorConfig(score=sel.get("score", "attention"),
                                      lambdas=tuple(sel.get("lambdas", SelectorConfig.lambdas)),
                                      window=int(sel.get("window", 2)))
            sched = cls(
                family=str(data["family"]), num_tokens=data["num_tokens"], layers=layers,
                keep=[list(r) for r in data["keep"]],
                candidates=tuple(float(s) for s in data.get("candidates", DEFAULT_CANDIDATES)),
                full_steps=[bool(x) for x in data["full_steps"]] if "full_steps" in data else None,
                selector=selector,
                macs_ratio=dict(data.get("macs_ratio", {})),
                provenance=dict(data.get("provenance", {})),
                layer_tokens=list(data["layer_tokens"]) if data.get("layer_tokens") is not None else None,
                skip=list(data["skip"]) if "skip" in data else None,
                skip_forecast=data.get("skip_forecast", False),
            )
        except ScheduleError as e:
            raise ScheduleError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
            raise ScheduleError(f"{source}: malformed field ({type(e).__name__}: {e})") from None
        if data["num_steps"] != sched.num_steps:
            raise ScheduleError(f"{source}: num_steps={data['num_steps']} but keep has {sched.num_steps} rows")
        return sched

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file, then rename) so a crash never leaves half a schedule."""
        return save_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        return cls.from_dict(load_json(path, ScheduleError, "schedule file"), source=str(path))


def _describe_layers(layers: Sequence[LayerRef]) -> str:
    kinds = sorted({l.kind for l in layers})
    blocks = len({l.block for l in layers})
    return f"{blocks} blocks x {'/'.join(kinds)}"


def provenance(method: str, **extra: Any) -> dict[str, Any]:
    return {"method": method, "tool": f"diffsparse {__version__}",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra}


def snap_to_candidates(fraction: float, candidates: Sequence[float]) -> float:
    """The candidate fraction nearest to `fraction` (ties go to the larger, i.e. safer, one)."""
    return min(candidates, key=lambda s: (abs(s - fraction), -s))

