import itertools

import numpy as np
import pytest
from diffsparse.train.dp_solver import InfeasibleBudget, solve


def brute_force(cost, weight, budget):
    m, s = cost.shape
    best = None
    for picks in itertools.product(range(s), repeat=m):
        if sum(weight[i, p] for i, p in enumerate(picks)) != budget:
            continue
        c = sum(cost[i, p] for i, p in enumerate(picks))
        if best is None or c < best:
            best = c
    return best


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    m, s = rng.integers(2, 6), rng.integers(2, 5)
    cost = rng.normal(size=(m, s))
    weight = np.tile(np.arange(s), (m, 1)) if seed % 2 else rng.integers(0, 4, size=(m, s))
    lo, hi = weight.min(1).sum(), weight.max(1).sum()
    budget = int(rng.integers(lo, hi + 1))
    expected = brute_force(cost, weight, budget)
    if expected is None:
        with pytest.raises(InfeasibleBudget):
            solve(cost, weight, budget)
        return
    alloc = solve(cost, weight, budget)
    assert alloc.weight == budget, "the budget is met exactly"
    assert alloc.cost == pytest.approx(expected)
    assert alloc.cost == pytest.approx(cost[np.arange(m), alloc.choice].sum())


def test_out_of_range_budget_is_refused():
    with pytest.raises(InfeasibleBudget, match="outside the reachable range"):
        solve(np.zeros((3, 2)), np.array([0, 1]), 4)


def test_paper_sized_instance_is_exact_and_fast():
    """T=20, L=84, S={0,.25,.5,.75,1}: the budget is met and a cheaper swap does not exist."""
    import time

    rng = np.random.default_rng(0)
    cost = rng.normal(size=(20 * 84, 5))
    t0 = time.perf_counter()
    alloc = solve(cost, np.arange(5), 20 * 84 * 2)
    elapsed = time.perf_counter() - t0
    assert alloc.weight == 20 * 84 * 2
    # necessary condition of optimality: no move of one decision up by d candidates combined with
    # a move of another decision down by d (budget unchanged) lowers the cost
    rows = np.arange(len(cost))
    c = cost[rows, alloc.choice]
    for d in (1, 2):
        up = np.where(alloc.choice + d <= 4, cost[rows, np.minimum(alloc.choice + d, 4)] - c, np.inf)
        down = np.where(alloc.choice - d >= 0, cost[rows, np.maximum(alloc.choice - d, 0)] - c, np.inf)
        i, j = np.argsort(up)[:2], np.argsort(down)[:2]
        best = min(up[a] + down[b] for a in i for b in j if a != b)
        assert best >= -1e-9
    assert elapsed < 30  # generous: timing belongs to the benchmark, this only guards a blow-up
