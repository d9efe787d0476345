"""What a schedule costs, in the unit its budget is set in: the paper's MACs, or latency measured
on the target (diffsparse/latency_table.py). Built-in schedules, the trainer's warm starts and
`dsexport` scale to a budget through one of these, so "50% of dense" means the same thing to
all of them.

For a schedule with computed steps C (skipped steps cost nothing) the cost ratio is

    R = Σ_{t ∈ C} cost(t) / (T · cost(dense step))

with cost(t) = `ModelSpec.step_macs(K(t, ·))` under a MACs budget and the latency table's
prediction under a latency budget.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

from diffsparse.latency_table import LatencyTable, LatencyTableError, model_fingerprint
from diffsparse.models.base import ModelSpec
from diffsparse.schedule import Schedule

log = logging.getLogger(__name__)

#: the budget units a schedule can be scaled in
BUDGETS = ("macs", "latency")


class StepCosts(abc.ABC):
    """Per-step costs of schedules for one model; subclasses implement `step_cost` and `dense_step_cost`."""

    budget: ClassVar[str]

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    @abc.abstractmethod
    def step_cost(self, row: Sequence[int], reuses_tokens: bool) -> float:
        """Cost of one computed step running K row `row`; `reuses_tokens`: whether the schedule
        reuses tokens anywhere (if not, its bundle runs the plain model)."""

    @abc.abstractmethod
    def dense_step_cost(self) -> float:
        """Cost of one step of the plain dense model."""

    def total(self, keep: Sequence[Sequence[int]], skip: Sequence[bool] | None = None) -> float:
        skip = skip or [False] * len(keep)
        dense = self.spec.dense_keep()
        computed = [list(row) for row, s in zip(keep, skip) if not s]
        reuses = any(row != dense for row in computed)
        return float(sum(self.step_cost(row, reuses) for row in computed))

    def ratio(self, keep: Sequence[Sequence[int]], skip: Sequence[bool] | None = None) -> float:
        return self.total(keep, skip) / (len(keep) * self.dense_step_cost())

    def record(self, keep: Sequence[Sequence[int]], skip: Sequence[bool] | None, target: float | None
               ) -> dict[str, Any] | None:
        """What a schedule scaled in these costs records in its provenance beyond its MACs ratio
        (which every schedule records); None: nothing."""
        return None


class MacsCosts(StepCosts):
    budget = "macs"

    def step_cost(self, row: Sequence[int], reuses_tokens: bool) -> float:
        return float(self.spec.step_macs(row))

    def dense_step_cost(self) -> float:
        return float(self.spec.step_macs(self.spec.dense_keep()))


class LatencyCosts(StepCosts):
    """Costs in ms predicted by a latency table (its cost model, diffsparse/latency_table.py)."""

    budget = "latency"

    def __init__(self, spec: ModelSpec, table: LatencyTable, source: str | None = None, same_batch: bool = True) -> None:
        """same_batch: warn when the table was measured at another batch or guidance than `spec`'s
        (False for the trainer, whose batch is its own, not the deployed bundle's)."""
        super().__init__(spec)
        table.check_model(spec)
        self.table = table
        self.source = source
        here = model_fingerprint(spec)
        if not same_batch:
            here = {k: v for k, v in here.items() if k not in ("batch_size", "guidance")}
        differ = table.mismatches(here)
        if differ:
            log.warning("latency table %s was measured for another run shape (%s): its predictions may not hold; "
                        "re-run dscalibrate latency for this one", source or "", "; ".join(differ))

    def step_cost(self, row: Sequence[int], reuses_tokens: bool) -> float:
        return self.table.step_ms(self.spec.layers, self.spec.dense_keep(), row, reuses_tokens)

    def dense_step_cost(self) -> float:
        return self.table.dense_step_ms

    def record(self, keep: Sequence[Sequence[int]], skip: Sequence[bool] | None, target: float | None) -> dict[str, Any]:
        """The provenance's `latency`: the prediction, the dense reference and the table it came from."""
        return {"budget": "latency", "target": target, "predicted_ratio": self.ratio(keep, skip),
                "predicted_ms": self.total(keep, skip), "dense_ms": len(keep) * self.table.dense_step_ms,
                "table": self.source, "fingerprint": dict(self.table.fingerprint)}


def record_costs(schedule: Schedule, costs: StepCosts, target: float) -> Schedule:
    """Record on a schedule scaled to `target` in `costs`: its achieved MACs ratio (always; the
    MACs target only under a MACs budget) and what `costs.record` adds (a latency prediction)."""
    schedule.macs_ratio = {"target": target if costs.budget == "macs" else None,
                           "achieved": costs.spec.macs_ratio(schedule)}
    record = costs.record(schedule.keep, schedule.skip, target)
    if record is not None:
        schedule.provenance["latency"] = record
    return schedule


def make_costs(spec: ModelSpec, budget: str = "macs", table: str | None = None, same_batch: bool = True) -> StepCosts:
    """The costs of a budget by name; a latency budget needs the table's path (same_batch: as for
    `LatencyCosts`)."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if budget == "macs":
        return MacsCosts(spec)
    if table is None:
        raise LatencyTableError("a latency budget needs a latency table (--latency-table T, written by dscalibrate latency)")
    return LatencyCosts(spec, LatencyTable.load(table), source=str(table), same_batch=same_batch)
