"""Exact dynamic-programming solver for the per-(step, layer) sparsity allocation (paper eq. 6-7).

Given M = T·L decisions, each picking one candidate s from S with a learned cost C[i, s] and an
integer weight w[s] (the candidate's share of the budget, e.g. 0..4 quarter-tokens for
S = {0, .25, .5, .75, 1}), find the choice per decision that minimises the total cost subject to
the total weight being exactly the budget:

    F(i, r) = min_s F(i-1, r - w[i, s]) + C[i, s],     F(0, 0) = 0.

Each row of F is computed with |S| vectorised shifts over the budget axis, and pre-pruned to the
budgets that are still reachable from the left (at most the sum of the largest weights so far) and
still able to reach the target on the right (at least target minus what the remaining decisions
can add at most, at most target minus what they must add at least). The argmin per state is kept
(int8) for backtracking. Time O(M · B · |S|), memory O(M · B) bytes, B the budget range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class InfeasibleBudget(ValueError):
    pass


@dataclass(frozen=True)
class Allocation:
    choice: np.ndarray      # (M,) index into the candidates per decision
    cost: float             # total cost of the allocation
    weight: int             # total weight (== the budget)


def solve(cost: np.ndarray, weight: np.ndarray, budget: int) -> Allocation:
    """Minimise sum cost[i, choice[i]] s.t. sum weight[i, choice[i]] == budget.

    cost: (M, S) float; weight: (S,) or (M, S) non-negative ints; budget: int.
    """
    cost = np.asarray(cost, dtype=np.float64)
    m, s = cost.shape
    weight = np.broadcast_to(np.asarray(weight, dtype=np.int64), (m, s))
    if (weight < 0).any():
        raise ValueError("weights must be non-negative integers")
    if s > 127:
        raise ValueError("at most 127 candidates per decision")
    lo_each, hi_each = weight.min(1), weight.max(1)
    # suffix sums: what decisions i+1.. can add at least / at most
    lo_after = np.concatenate([np.cumsum(lo_each[::-1])[::-1][1:], [0]])
    hi_after = np.concatenate([np.cumsum(hi_each[::-1])[::-1][1:], [0]])
    if not lo_each.sum() <= budget <= hi_each.sum():
        raise InfeasibleBudget(f"budget {budget} is outside the reachable range [{lo_each.sum()}, {hi_each.sum()}]")
    size = budget + 1
    inf = np.inf
    f = np.full(size, inf)
    f[0] = 0.0
    choice = np.full((m, size), -1, dtype=np.int8)
    reach_lo, reach_hi = 0, 0
    for i in range(m):
        reach_lo, reach_hi = reach_lo + lo_each[i], min(budget, reach_hi + hi_each[i])
        lo = max(reach_lo, budget - hi_after[i])      # pre-pruning: states that can still finish
        hi = min(reach_hi, budget - lo_after[i])
        g = np.full(size, inf)
        best = np.full(size, -1, dtype=np.int8)
        for j in range(s):
            w = int(weight[i, j])
            a, b = max(lo, w), hi
            if a > b:
                continue
            cand = f[a - w:b - w + 1] + cost[i, j]
            window = g[a:b + 1]
            better = cand < window
            window[better] = cand[better]
            best[a:b + 1][better] = j
        f, choice[i] = g, best
    if not np.isfinite(f[budget]):
        raise InfeasibleBudget(f"no allocation reaches budget {budget} exactly")
    picks = np.empty(m, dtype=np.int64)
    r = budget
    for i in range(m - 1, -1, -1):
        j = int(choice[i, r])
        picks[i] = j
        r -= int(weight[i, j])
    return Allocation(picks, float(cost[np.arange(m), picks].sum()), int(weight[np.arange(m), picks].sum()))
