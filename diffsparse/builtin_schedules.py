"""Built-in schedules, all in the one schedule space (diffsparse/schedule.py: skip / refresh /
partial steps):

- `dense`: every token of every layer at every step;
- `toca`: the ToCa-style hand schedule below;
- `fora`: FORA-style whole-layer reuse: full steps spread evenly, every layer reused (K = 0) in
  between; the number of full steps is the one whose MACs ratio is nearest the target;
- `fewer-steps`: round(R·T) computed dense steps spread evenly over the T-step grid (step 0 among
  them), the others skipped: the sampler on a sub-grid, at R of the dense MACs.

The ToCa-style schedule (the paper's main baseline, after Zou et al. 2025) recomputes, at step t and
layer l, the fraction

    r(t, l) = base · f_step(j) · f_depth(l) · f_kind(l)       snapped to the candidate set S

with a full step every `full_every` steps (and at step 0), where
    j        = steps since the last full step; f_step grows from 0.75 to 1.25 across the cycle,
               since the cache is freshest right after a full step,
    f_depth  = 1.25 for the first block down to 0.75 for the last: errors in shallow layers
               propagate through the whole network,
    f_kind   = 1.1 for self-attention, 1.0 for cross-attention, 0.9 for MLP layers (image or text).
`base` is searched so that the schedule's MACs ratio (from the model spec's MACs count) is as
close as the candidate set allows to the target.

Every builder takes `costs` (diffsparse/step_costs.py): the unit the target ratio is in, MACs by
default or latency predicted by a latency table; a latency-scaled schedule records its predicted
latency in its provenance (`latency`) beside its MACs ratio.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffsparse.models.base import ModelSpec
from diffsparse.step_costs import MacsCosts, StepCosts, record_costs
from diffsparse.schedule import (
    DEFAULT_CANDIDATES,
    Schedule,
    ScheduleError,
    SelectorConfig,
    provenance,
    snap_to_candidates,
)

KIND_FACTOR = {"SA": 1.1, "CA": 1.0, "MLP": 0.9, "TMLP": 0.9}
BUILTIN_NAMES = ("dense", "toca", "fora", "fewer-steps")
# learned schedules shipped for the built-in models (written by dstrain), by file stem
SHIPPED_DIR = Path(__file__).resolve().parent / "schedules"


def shipped_schedules() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def shipped_schedule(name: str) -> Schedule:
    """A schedule shipped in `SHIPPED_DIR`, by file stem (not yet checked against a model)."""
    return Schedule.load(SHIPPED_DIR / f"{name}.json")


def dense_schedule(spec: ModelSpec, num_steps: int, selector: SelectorConfig | None = None) -> Schedule:
    sched = Schedule(family=spec.family, num_tokens=spec.num_tokens, layers=spec.layers,
                     layer_tokens=spec.dense_keep(), keep=[spec.dense_keep() for _ in range(num_steps)],
                     selector=selector or spec.default_selector(), provenance=provenance("dense"))
    sched.macs_ratio = {"target": 1.0, "achieved": spec.macs_ratio(sched)}
    return sched


def _spread(num_steps: int, count: int) -> set[int]:
    """`count` of the steps 0..T-1 spread evenly, step 0 among them."""
    return set(np.round(np.linspace(0, num_steps, count, endpoint=False)).astype(int).tolist())


def _check_ratio(target_ratio: float) -> None:
    if not 0.0 < target_ratio <= 1.0:
        raise ScheduleError(f"target MACs ratio must be in (0, 1], got {target_ratio}")


def _finish(sched: Schedule, spec: ModelSpec, target_ratio: float, costs: StepCosts | None) -> Schedule:
    return record_costs(sched, costs or MacsCosts(spec), target_ratio)


def fora_schedule(spec: ModelSpec, num_steps: int, target_ratio: float = 0.5,
                  candidates: tuple[float, ...] = DEFAULT_CANDIDATES, selector: SelectorConfig | None = None,
                  costs: StepCosts | None = None) -> Schedule:
    _check_ratio(target_ratio)
    costs = costs or MacsCosts(spec)
    if 0.0 not in candidates or 1.0 not in candidates:
        raise ScheduleError("FORA-style reuse needs 0 and 1 in the candidate set")
    zero = [0] * len(spec.layers)
    best = None
    for full in range(1, num_steps + 1):
        steps = _spread(num_steps, full)
        keep = [spec.dense_keep() if t in steps else zero for t in range(num_steps)]
        ratio = costs.ratio(keep)
        if best is None or abs(ratio - target_ratio) < abs(best[0] - target_ratio):
            best = (ratio, keep, full)
    ratio, keep, full = best
    sched = Schedule(family=spec.family, num_tokens=spec.num_tokens, layers=spec.layers, keep=keep,
                     layer_tokens=spec.dense_keep(), candidates=tuple(candidates),
                     selector=selector or spec.default_selector(), provenance=provenance("fora", full_steps=full))
    return _finish(sched, spec, target_ratio, costs)


def fewer_steps_schedule(spec: ModelSpec, num_steps: int, target_ratio: float = 0.5,
                         candidates: tuple[float, ...] = DEFAULT_CANDIDATES,
                         selector: SelectorConfig | None = None, costs: StepCosts | None = None) -> Schedule:
    """Its computed steps run the plain model, so its ratio is the computed fraction under any budget."""
    _check_ratio(target_ratio)
    computed = _spread(num_steps, max(1, int(round(target_ratio * num_steps))))
    zero = [0] * len(spec.layers)
    sched = Schedule(family=spec.family, num_tokens=spec.num_tokens, layers=spec.layers,
                     keep=[spec.dense_keep() if t in computed else zero for t in range(num_steps)],
                     skip=[t not in computed for t in range(num_steps)], layer_tokens=spec.dense_keep(),
                     candidates=tuple(candidates), selector=selector or spec.default_selector(),
                     provenance=provenance("fewer-steps", computed_steps=len(computed)))
    return _finish(sched, spec, target_ratio, costs)


def _toca_keep(spec: ModelSpec, num_steps: int, base: float, full_every: int,
               candidates: tuple[float, ...]) -> list[list[int]]:
    blocks = max(l.block for l in spec.layers) + 1
    keep = []
    for t in range(num_steps):
        j = t % full_every
        if j == 0:
            keep.append(spec.dense_keep())
            continue
        f_step = 0.75 + 0.5 * (j - 1) / max(1, full_every - 2)
        row = []
        for layer in spec.layers:
            f_depth = 1.25 - 0.5 * layer.block / max(1, blocks - 1)
            frac = min(1.0, base * f_step * f_depth * KIND_FACTOR[layer.kind])
            row.append(int(round(snap_to_candidates(frac, candidates) * spec.layer_tokens(layer))))
        keep.append(row)
    return keep


#: toca_schedule(full_every=None) takes the shortest full-step period (from 3) within this of the target
TOCA_RATIO_TOLERANCE = 0.01


def toca_schedule(spec: ModelSpec, num_steps: int, target_ratio: float = 0.5, full_every: int | None = 3,
                  candidates: tuple[float, ...] = DEFAULT_CANDIDATES,
                  selector: SelectorConfig | None = None, costs: StepCosts | None = None) -> Schedule:
    """full_every None: the shortest period from 3 up whose schedule reaches the target MACs ratio
    within `TOCA_RATIO_TOLERANCE` (low budgets need rarer full steps: at 20 steps, a full step
    every 3 alone costs 35%), else the period that comes closest."""
    _check_ratio(target_ratio)
    costs = costs or MacsCosts(spec)
    if full_every is None:
        best = None
        for period in range(min(3, num_steps), num_steps + 1):
            sched = toca_schedule(spec, num_steps, target_ratio, period, candidates, selector, costs)
            gap = abs(costs.ratio(sched.keep) - target_ratio)
            if gap <= TOCA_RATIO_TOLERANCE:
                return sched
            if best is None or gap < best[0]:
                best = (gap, sched)
        return best[1]
    if full_every < 1:
        raise ScheduleError(f"full_every must be >= 1, got {full_every}")
    selector = selector or spec.default_selector()
    best = None
    for base in np.linspace(0.0, 2.0, 401):
        keep = _toca_keep(spec, num_steps, float(base), full_every, candidates)
        ratio = costs.ratio(keep)
        if best is None or abs(ratio - target_ratio) < abs(best[0] - target_ratio) - 1e-12:
            best = (ratio, keep, float(base))
    ratio, keep, base = best
    sched = Schedule(family=spec.family, num_tokens=spec.num_tokens, layers=spec.layers, keep=keep,
                     layer_tokens=spec.dense_keep(), candidates=tuple(candidates), selector=selector,
                     provenance=provenance("toca", base=round(base, 4), full_every=full_every))
    return _finish(sched, spec, target_ratio, costs)


def resolve_schedule(name_or_path: str | Path, spec: ModelSpec, num_steps: int | None,
                     target_ratio: float = 0.5, full_every: int = 3, costs: StepCosts | None = None) -> Schedule:
    """A built-in by name (needs num_steps), scaled to `target_ratio` of dense in `costs`' unit
    (MACs by default), or a schedule file, checked against the model."""
    name = str(name_or_path)
    if name in BUILTIN_NAMES:
        if num_steps is None:
            raise ScheduleError(f"built-in schedule {name!r} needs a step count (--steps)")
        if name == "dense":
            return dense_schedule(spec, num_steps)
        if name == "fora":
            return fora_schedule(spec, num_steps, target_ratio, costs=costs)
        if name == "fewer-steps":
            return fewer_steps_schedule(spec, num_steps, target_ratio, costs=costs)
        return toca_schedule(spec, num_steps, target_ratio, full_every, costs=costs)
    if name in shipped_schedules():
        sched = shipped_schedule(name)
    elif Path(name).exists():
        sched = Schedule.load(name)
    else:
        known = ", ".join((*BUILTIN_NAMES, *shipped_schedules()))
        raise ScheduleError(f"schedule {name!r} is neither a built-in ({known}) nor a file")
    spec.check_schedule(sched, num_steps)
    return sched
