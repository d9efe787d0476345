"""The sparsity-cost predictor, the budget in DP units, and the straight-through masks (paper §3.2).

Costs: a layer cost C_l (T, L, |S|) — one learnable number per step, cacheable layer and candidate
— and a step cost C_f (T, 2) (columns: partial step, full step). The DP solver (dp_solver.py)
turns costs into a hard allocation under the global budget; the straight-through estimator makes
the forward pass use that hard one-hot choice while the backward pass uses the gradient of
softmax(-C / tau), so the costs learn from the distillation loss.

Budget: each candidate's MACs for each layer, in integer units (the gcd of all of them, or a
coarser unit when the gcd would make the DP table too wide), so "exactly the budget" is exact in
MACs whenever the gcd is used. Step 0 is always full (the cache is empty before it) and is not a
decision. Under a latency budget (`Budget.for_latency`) the weights are a latency table's
measured per-layer costs c(κ, K) in units of max c / MAX_UNITS_PER_CHOICE, the fixed part is the
table's partial-step fixed cost and a refresh step pays its measured surcharge (`refresh_extra_units`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np
import torch
from diffsparse.train.dp_solver import InfeasibleBudget, solve
from torch import nn

from diffsparse.latency_table import LatencyTable
from diffsparse.models.base import ModelSpec
from diffsparse.schedule import Schedule

MAX_UNITS_PER_CHOICE = 64  # caps the DP budget axis at T·L·64 states


@dataclass(frozen=True)
class Budget:
    """What the DP allocates: integer weights per (layer, candidate) and the exact target."""

    token_counts: tuple[int, ...]       # K for each candidate, ascending
    weights: np.ndarray                 # (L, |S|) int units per layer and candidate
    unit_macs: float                    # MACs per unit (ms per unit under a latency budget)
    exact: bool                         # units are the gcd (no rounding)
    fixed_units: int = 0                # a computed step's fixed part (embeddings, modulation, head), rounded
    dense_step_units: float = 0.0       # a plain dense step, unrounded (the reference of a ratio)
    fixed_exact: float = 0.0            # fixed_units unrounded
    refresh_extra_units: int = 0        # what a refresh step costs beyond fixed + every layer at N (latency)
    unit: str = "macs"                  # what a unit measures: "macs" or "latency" (ms)

    @property
    def full_step_units(self) -> int:
        return int(self.weights[:, -1].sum())

    @classmethod
    def for_spec(cls, spec: ModelSpec, token_counts) -> Budget:
        counts = tuple(sorted(int(k) for k in token_counts))
        if counts[-1] != spec.num_tokens:
            raise ValueError(f"the candidate set must include all N={spec.num_tokens} tokens, got {list(counts)}")
        macs = np.array([[spec.layer_macs(layer, k) for k in counts] for layer in spec.layers], dtype=np.int64)
        nonzero = [int(v) for v in macs.ravel() if v > 0]
        unit = reduce(math.gcd, nonzero) if nonzero else 1
        exact = macs.max() // unit <= MAX_UNITS_PER_CHOICE
        if not exact:
            unit = macs.max() / MAX_UNITS_PER_CHOICE
        fixed = spec.fixed_macs() / unit   # joint space only (train/joint.py): skips save it
        dense = spec.step_macs(spec.dense_keep()) / spec.rows / unit
        return cls(counts, np.rint(macs / unit).astype(np.int64), float(unit), bool(exact), int(round(fixed)),
                   float(dense), float(fixed))

    @classmethod
    def for_latency(cls, spec: ModelSpec, token_counts, table: LatencyTable) -> Budget:
        """Units of measured latency (diffsparse/latency_table.py): per layer and candidate the
        table's c(kind, K), the fixed part of a computed step the partial-step fixed cost."""
        counts = tuple(sorted(int(k) for k in token_counts))
        if counts[-1] != spec.num_tokens:
            raise ValueError(f"the candidate set must include all N={spec.num_tokens} tokens, got {list(counts)}")
        table.check_model(spec)
        ms = np.array([[table.layer_ms(layer, k) for k in counts] for layer in spec.layers], dtype=np.float64)
        unit = max(float(ms.max()), 1e-9) / MAX_UNITS_PER_CHOICE
        weights = np.rint(ms / unit).astype(np.int64)
        fixed = table.partial_fixed_ms / unit
        extra = int(round(table.refresh_ms / unit - round(fixed) - weights[:, -1].sum()))
        return cls(counts, weights, unit, False, int(round(fixed)), table.dense_step_ms / unit, fixed, extra, "latency")

    def units_of(self, keep_rows) -> int:
        """Units used by a (T, L) table of token counts (every count must be a candidate)."""
        col = {k: j for j, k in enumerate(self.token_counts)}
        return int(sum(self.weights[l, col[k]] for row in keep_rows for l, k in enumerate(row)))

    def units_for_ratio(self, num_steps: int, ratio: float) -> int:
        """Layer units that make a schedule of `num_steps` computed steps cost `ratio` of dense
        (fixed parts included): R·T·dense − T·fixed, in units."""
        return int(round(ratio * num_steps * self.dense_step_units - num_steps * self.fixed_exact))


def nearest_feasible(cost: np.ndarray, weight: np.ndarray, budget: int, search: int = 64):
    """solve() at `budget`, or at the nearest budget the weights can reach exactly."""
    for delta in range(search + 1):
        for b in ((budget,) if delta == 0 else (budget - delta, budget + delta)):
            try:
                return solve(cost, weight, b)
            except InfeasibleBudget:
                continue
    raise InfeasibleBudget(f"no allocation within {search} units of budget {budget}")


class CostPredictor(nn.Module):
    """(T·L)×|S| layer costs plus a T×2 step cost (paper §3.2, Algorithm 1)."""

    def __init__(self, num_steps: int, num_layers: int, num_candidates: int) -> None:
        super().__init__()
        self.layer_cost = nn.Parameter(torch.zeros(num_steps, num_layers, num_candidates))
        self.step_cost = nn.Parameter(torch.zeros(num_steps, 2))

    @torch.no_grad()
    def init_from_schedule(self, schedule: Schedule, token_counts) -> None:
        """Costs whose DP solution at the schedule's own budget is that schedule: the cost of a
        candidate is its distance (as a fraction of N) to the schedule's K; full steps cost less."""
        counts = torch.tensor(token_counts, dtype=torch.float32)
        keep = torch.tensor(schedule.keep, dtype=torch.float32)
        n = float(schedule.num_tokens)
        self.layer_cost.copy_((counts.view(1, 1, -1) - keep.unsqueeze(-1)).abs() / n)
        full = torch.tensor(schedule.full_steps, dtype=torch.float32)
        self.step_cost.zero_()
        self.step_cost[:, 1] = 1.0 - 2.0 * full


def straight_through(hard: torch.Tensor, cost: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward: the hard one-hot choice. Backward: the gradient of softmax(-cost / temperature)."""
    soft = torch.softmax(-cost / temperature, dim=-1)
    return hard + (soft - soft.detach())  # parenthesised: the forward value is exactly `hard`


def one_hot(choice, num: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(choice, dtype=torch.long), num).to(torch.float32)


@dataclass
class Allocation:
    """One DP allocation: straight-through weights (T, L, |S|) and the hard schedule they encode.
    In the joint space (train/joint.py) also the straight-through step weights (T, 2) = (skip,
    compute) and the skipped steps; in the paper's space no step is skipped (step_weights None)."""

    weights: torch.Tensor
    keep: list[list[int]]
    full_steps: list[bool]
    units: int
    step_weights: torch.Tensor | None = None
    skip: list[bool] | None = None

    def __post_init__(self) -> None:
        if self.skip is None:
            self.skip = [False] * len(self.keep)


def _layer_choice(cost: np.ndarray, budget: Budget, units: int) -> np.ndarray:
    """DP over the (steps, layers) rows of `cost` (S, L, |S|) -> choice (S, L)."""
    s, l, c = cost.shape
    weight = np.tile(budget.weights, (s, 1))
    return nearest_feasible(cost.reshape(s * l, c), weight, units).choice.reshape(s, l)


def _assemble(choice: np.ndarray, full: list[bool], budget: Budget) -> tuple[list[list[int]], int]:
    n = budget.token_counts[-1]
    keep = [[n] * choice.shape[1] if full[t] else [budget.token_counts[j] for j in choice[t]]
            for t in range(choice.shape[0])]
    return keep, budget.units_of(keep)


def allocate_stage1(pred: CostPredictor, budget: Budget, units: int, num_full: int,
                    temperature: float = 1.0) -> Allocation:
    """Stage 1: the step DP picks `num_full` full steps (step 0 always); the layer DP spreads the
    rest of the budget over the partial steps. Full steps also get a "shadow" allocation (what they
    would run if partial, at the mean per-step budget) so that the step cost learns the loss
    difference between running a step full and running it partial."""
    t_steps, _, n_cand = pred.layer_cost.shape
    c_l = pred.layer_cost.detach().cpu().numpy().astype(np.float64)
    c_f = pred.step_cost.detach().cpu().numpy().astype(np.float64)
    num_full = max(1, min(num_full, t_steps))
    picks = solve(c_f[1:], np.array([0, 1]), num_full - 1).choice if t_steps > 1 else np.zeros(0, int)
    full = [True] + [bool(p) for p in picks]
    partial = [t for t in range(t_steps) if not full[t]]
    choice = np.full(c_l.shape[:2], n_cand - 1, dtype=np.int64)
    layer_units = units - num_full * budget.full_step_units
    if partial:
        choice[partial] = _layer_choice(c_l[partial], budget, layer_units)
        per_step = int(round(layer_units / len(partial)))
        for t in range(1, t_steps):
            if full[t]:
                choice[t] = _layer_choice(c_l[t:t + 1], budget, per_step)[0]
    hard_l = one_hot(choice, n_cand)
    hard_f = one_hot(np.array(full, dtype=np.int64), 2)
    w_l = straight_through(hard_l, pred.layer_cost, temperature)
    f = straight_through(hard_f, pred.step_cost, temperature)
    dense = one_hot(np.full(c_l.shape[:2], n_cand - 1), n_cand)
    weights = f[:, 1, None, None] * dense + f[:, 0, None, None] * w_l
    weights = torch.cat([dense[:1], weights[1:]])
    keep, used = _assemble(choice, full, budget)
    return Allocation(weights, keep, full, used)


def allocate_unified(cost: torch.Tensor, budget: Budget, units: int, temperature: float = 1.0) -> Allocation:
    """Stage 2 (and any single-cost allocation): one DP over every (step ≥ 1, layer)."""
    t_steps, n_layers, n_cand = cost.shape
    c = cost.detach().cpu().numpy().astype(np.float64)
    choice = np.full((t_steps, n_layers), n_cand - 1, dtype=np.int64)
    if t_steps > 1:
        choice[1:] = _layer_choice(c[1:], budget, units - budget.full_step_units)
    hard = one_hot(choice, n_cand)
    weights = straight_through(hard, cost, temperature)
    weights = torch.cat([hard[:1], weights[1:]])
    full = [True] + [bool((choice[t] == n_cand - 1).all()) for t in range(1, t_steps)]
    keep, used = _assemble(choice, [t == 0 for t in range(t_steps)], budget)
    return Allocation(weights, keep, full, used)
