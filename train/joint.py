"""The joint schedule space: each step is skipped or computed, and a computed step picks K per
layer (all N everywhere being a refresh, K = 0 everywhere FORA-style reuse) — diffsparse/schedule.py.

Costs: the layer cost C_l (T, L, |S|) as in train/costs.py, and a step cost C_k (T, 2) whose
columns are (skip, compute). Budget units are `Budget`'s layer units; a computed step also pays
the fixed part (embeddings, modulation, head) as `fixed_units` (the fixed MACs in layer units,
rounded: the DP is exact in its units, the schedule records its exact MACs), a skipped step pays
nothing at all.

The DP (`joint_choice`) is exact under the budget. Per step t, the cheapest layer choice for
every number of layer units u,

    g_t(u) = min over (K_l) with Σ_l w(l, K_l) = u  of  Σ_l C_l(t, l, K_l)       (a knapsack per step),

then over steps, with step 0 always computed in full (the cache is empty before it):

    F_t(r) = min( F_{t-1}(r) + C_k(t, skip),
                  min_u F_{t-1}(r − f − u) + C_k(t, compute) + g_t(u) ),      f = fixed_units,

and F_{T-1}(budget) is the answer; both tables keep their argmins for backtracking. Under a
latency budget a refresh step (every layer at N) costs what the table measured for it, f + U_N + e
(e = `refresh_extra_units`, U_N the layers at N), not f + U_N: the refresh row is then taken out
of g_t and offered as its own option at that price:

    F_t(r) = min( ..., F_{t-1}(r − f − U_N − e) + C_k(t, compute) + Σ_l C_l(t, l, N) ).

The straight-through estimator (`joint_allocation`) makes the forward pass use the hard choices
and the backward pass the gradients of softmax(−C / τ) over the candidates and over (skip,
compute); the rollout (train/student.py) mixes a skipped step's update on the last model output
with the computed one through the skip weight, so the loss reaches the step costs.
"""

from __future__ import annotations

import numpy as np
import torch
from diffsparse.train.costs import Allocation, Budget, one_hot, straight_through
from diffsparse.train.dp_solver import InfeasibleBudget

SKIP, COMPUTE = 0, 1
REFRESH = 2   # a DP choice only (a computed step with every layer at N, priced as measured)


def _step_knapsack(cost: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """g(u) for one step: cost (L, S), weight (L, S) ints -> g (U+1,), and per layer the argmin
    table (U+1,) int8 for backtracking (-1 where unreachable)."""
    g = np.zeros(1)
    picks = []
    for l in range(cost.shape[0]):
        size = len(g) + int(weight[l].max())
        nxt = np.full(size, np.inf)
        arg = np.full(size, -1, dtype=np.int8)
        for j in range(cost.shape[1]):
            w = int(weight[l, j])
            cand = g + cost[l, j]
            window = nxt[w:w + len(g)]
            better = cand < window
            window[better] = cand[better]
            arg[w:w + len(g)][better] = j
        g = nxt
        picks.append(arg)
    return g, picks


def _backtrack_layers(picks: list[np.ndarray], weight: np.ndarray, u: int) -> np.ndarray:
    choice = np.empty(len(picks), dtype=np.int64)
    for l in range(len(picks) - 1, -1, -1):
        j = int(picks[l][u])
        choice[l] = j
        u -= int(weight[l, j])
    return choice


def joint_choice(layer_cost: np.ndarray, step_cost: np.ndarray, budget: Budget, units: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The exact joint DP (module docstring): -> (computed (T,) bool, choice (T, L) candidate
    index; a skipped step's row is all 0). `units`: the total, step 0's refresh included.
    InfeasibleBudget when no schedule meets it exactly."""
    t_steps, n_layers, n_cand = layer_cost.shape
    weight = np.asarray(budget.weights)
    full_units = budget.fixed_units + budget.full_step_units + budget.refresh_extra_units   # step 0
    rest = units - full_units
    if rest < 0:
        raise InfeasibleBudget(f"budget {units} units is below one full step ({full_units})")
    f = np.full(rest + 1, np.inf)
    f[0] = 0.0
    kind_arg, u_arg, tables = [], [], []
    surcharge = budget.refresh_extra_units != 0
    refresh_shift = full_units   # a refresh step's units: fixed part, every layer at N, surcharge
    for t in range(1, t_steps):
        g, picks = _step_knapsack(layer_cost[t], weight)
        if surcharge:   # the all-N row is priced as a refresh (its own option below), not as a partial step
            g = g.copy()
            g[budget.full_step_units] = np.inf
        tables.append(picks)
        skip = f + step_cost[t, SKIP]
        best, kind, used = skip.copy(), np.zeros(rest + 1, dtype=np.int8), np.zeros(rest + 1, dtype=np.int32)
        offset = budget.fixed_units
        for u in np.flatnonzero(np.isfinite(g)):
            shift = offset + int(u)
            if shift > rest:
                break
            cand = f[:rest + 1 - shift] + (step_cost[t, COMPUTE] + g[u])
            window = best[shift:]
            better = cand < window
            window[better] = cand[better]
            kind[shift:][better] = COMPUTE
            used[shift:][better] = u
        if surcharge and 0 <= refresh_shift <= rest:
            cand = f[:rest + 1 - refresh_shift] + (step_cost[t, COMPUTE] + float(layer_cost[t, :, -1].sum()))
            window = best[refresh_shift:]
            better = cand < window
            window[better] = cand[better]
            kind[refresh_shift:][better] = REFRESH
        f = best
        kind_arg.append(kind)
        u_arg.append(used)
    if not np.isfinite(f[rest]):
        raise InfeasibleBudget(f"no joint schedule uses exactly {units} units")
    computed = np.ones(t_steps, dtype=bool)
    choice = np.full((t_steps, n_layers), n_cand - 1, dtype=np.int64)
    r = rest
    for t in range(t_steps - 1, 0, -1):
        kind = kind_arg[t - 1][r]
        if kind == SKIP:
            computed[t] = False
            choice[t] = 0
        elif kind == REFRESH:
            r -= refresh_shift
        else:
            u = int(u_arg[t - 1][r])
            choice[t] = _backtrack_layers(tables[t - 1], weight, u)
            r -= budget.fixed_units + u
    return computed, choice


def nearest_joint_choice(layer_cost, step_cost, budget: Budget, units: int, search: int = 64):
    """joint_choice at `units`, or at the nearest total it can reach exactly."""
    for delta in range(search + 1):
        for b in ((units,) if delta == 0 else (units - delta, units + delta)):
            try:
                return joint_choice(layer_cost, step_cost, budget, b)
            except InfeasibleBudget:
                continue
    raise InfeasibleBudget(f"no joint schedule within {search} units of {units}")


def joint_units(budget: Budget, keep: list[list[int]], skip: list[bool]) -> int:
    """The joint budget units of a schedule: per computed step, the fixed part and its layers (and
    a refresh step's surcharge under a latency budget)."""
    computed = [row for row, s in zip(keep, skip) if not s]
    n = budget.token_counts[-1]
    refreshes = sum(all(k == n for k in row) for row in computed)
    return len(computed) * budget.fixed_units + budget.units_of(computed) + refreshes * budget.refresh_extra_units


def joint_allocation(layer_cost: torch.Tensor, step_cost: torch.Tensor, budget: Budget, units: int,
                     temperature: float = 1.0) -> Allocation:
    """The hard joint allocation under the budget with its straight-through weights."""
    c_l = layer_cost.detach().cpu().numpy().astype(np.float64)
    c_k = step_cost.detach().cpu().numpy().astype(np.float64)
    computed, choice = nearest_joint_choice(c_l, c_k, budget, units)
    n_cand = c_l.shape[2]
    hard = one_hot(choice, n_cand)
    weights = torch.cat([hard[:1], straight_through(hard, layer_cost, temperature)[1:]])
    kinds = one_hot(computed.astype(np.int64), 2)
    step_weights = torch.cat([kinds[:1], straight_through(kinds, step_cost, temperature)[1:]])
    skip = [not c for c in computed.tolist()]
    keep = [[0] * choice.shape[1] if skip[t] else [budget.token_counts[j] for j in choice[t]]
            for t in range(choice.shape[0])]
    n = budget.token_counts[-1]
    full = [not s and all(k == n for k in row) for row, s in zip(keep, skip)]
    return Allocation(weights, keep, full, joint_units(budget, keep, skip), step_weights, skip)


def init_step_cost(skip: list[bool]) -> torch.Tensor:
    """Step costs whose DP choice is `skip` (with layer costs that reproduce the K rows)."""
    cost = torch.zeros(len(skip), 2)
    for t, s in enumerate(skip):
        cost[t, SKIP if s else COMPUTE] = -1.0
    return cost
