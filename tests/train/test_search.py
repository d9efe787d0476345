"""Baselines: FORA-style reuse, fewer steps, random search and the GA, on the budget."""

import numpy as np
import pytest

from diffsparse.builtin_schedules import fewer_steps_schedule, fora_schedule, toca_schedule
from diffsparse.train.costs import Budget
from diffsparse.train.search import genetic_search, random_search

STEPS = 8


def test_fora_reuses_whole_layers_between_full_steps(tiny_spec):
    sched = fora_schedule(tiny_spec, STEPS, 0.5)
    n = tiny_spec.num_tokens
    assert all(set(row) in ({n}, {0}) for row in sched.keep) and sched.keep[0][0] == n
    assert sched.macs_ratio["achieved"] == pytest.approx(tiny_spec.macs_ratio(sched))
    assert abs(sched.macs_ratio["achieved"] - 0.5) < 0.1


def test_fewer_steps_skips_steps_of_the_grid(tiny_spec):
    """Fewer steps is a schedule of the same T: round(R·T) dense steps spread evenly, the rest
    skipped (no network evaluation, no MACs, no layer cache needed)."""
    sched = fewer_steps_schedule(tiny_spec, STEPS, 0.4)
    assert sched.num_steps == STEPS and sched.computed_steps == [0, 3, 5]
    assert sched.macs_ratio["achieved"] == pytest.approx(3 / STEPS) == pytest.approx(tiny_spec.macs_ratio(sched))
    assert not sched.reuses_tokens and sched.computed_keep == [tiny_spec.dense_keep()] * 3


@pytest.fixture()
def problem(tiny_spec):
    toca = toca_schedule(tiny_spec, STEPS, 0.5, full_every=4)
    budget = Budget.for_spec(tiny_spec, toca.allowed_keep())
    units = budget.units_of(toca.keep)
    target = np.array(toca.keep)

    def fitness(keep):  # distance to a known allocation that meets the budget
        return float(np.abs(np.array(keep) - target).sum())

    return budget, units, (STEPS, len(tiny_spec.layers), len(budget.token_counts)), fitness, toca


def test_random_search_meets_the_budget_and_keeps_the_best(problem):
    budget, units, shape, fitness, _ = problem
    keep, best, trace = random_search(budget, units, shape, fitness, iterations=6, seed=1)
    assert budget.units_of(keep) == units and best == fitness(keep) == trace[-1]
    assert all(a >= b for a, b in zip(trace, trace[1:]))


def test_genetic_search_improves_and_meets_the_budget(problem):
    budget, units, shape, fitness, _ = problem
    keep, best, trace = genetic_search(budget, units, shape, fitness, population=10, generations=4, seed=0)
    assert budget.units_of(keep) == units and best == fitness(keep)
    assert all(a >= b for a, b in zip(trace, trace[1:])) and trace[-1] < trace[0]


def test_genetic_search_keeps_a_seeded_optimum(problem):
    budget, units, shape, fitness, toca = problem
    _, best, _ = genetic_search(budget, units, shape, fitness, population=6, generations=1, initial=[toca.keep])
    assert best == 0.0
