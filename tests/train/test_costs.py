"""Budget units, DP allocations under the exact budget, the STE and the cost initialisation."""

import numpy as np
import pytest
import torch
from diffsparse.train.costs import (
    Budget,
    CostPredictor,
    allocate_stage1,
    allocate_unified,
    straight_through,
)
from diffsparse.train.joint import joint_units

from diffsparse.builtin_schedules import fora_schedule, toca_schedule
from diffsparse.step_costs import LatencyCosts

STEPS = 8


@pytest.fixture()
def setup(tiny_spec):
    sched = toca_schedule(tiny_spec, STEPS, 0.5, full_every=4)
    budget = Budget.for_spec(tiny_spec, sched.allowed_keep())
    return tiny_spec, sched, budget


def test_budget_units_are_exact_macs(setup):
    spec, sched, budget = setup
    assert budget.exact
    layer_macs = spec.schedule_macs(sched) // spec.rows - STEPS * spec.fixed_macs()
    assert budget.units_of(sched.keep) * budget.unit_macs == layer_macs
    assert budget.units_for_ratio(STEPS, spec.macs_ratio(sched)) == budget.units_of(sched.keep)


def test_candidate_set_must_contain_all_tokens(tiny_spec):
    with pytest.raises(ValueError, match="must include all N"):
        Budget.for_spec(tiny_spec, [0, 16, 32])


def test_initial_costs_reproduce_the_initial_schedule(setup):
    spec, sched, budget = setup
    pred = CostPredictor(STEPS, len(spec.layers), len(budget.token_counts))
    pred.init_from_schedule(sched, budget.token_counts)
    units = budget.units_of(sched.keep)
    alloc = allocate_stage1(pred, budget, units, num_full=sum(sched.full_steps))
    assert alloc.keep == sched.keep and alloc.full_steps == sched.full_steps and alloc.units == units
    unified = allocate_unified(pred.layer_cost, budget, units)
    assert unified.units == units


@pytest.mark.parametrize("ratio", [0.3, 0.45, 0.7])
def test_allocations_meet_the_budget_exactly_for_any_costs(setup, ratio):
    spec, sched, budget = setup
    rng = np.random.default_rng(int(ratio * 100))
    pred = CostPredictor(STEPS, len(spec.layers), len(budget.token_counts))
    with torch.no_grad():
        pred.layer_cost.copy_(torch.from_numpy(rng.normal(size=pred.layer_cost.shape)))
        pred.step_cost.copy_(torch.from_numpy(rng.normal(size=pred.step_cost.shape)))
    units = budget.units_for_ratio(STEPS, ratio)
    for alloc in (allocate_stage1(pred, budget, units, num_full=2), allocate_unified(pred.layer_cost, budget, units)):
        assert alloc.units == units
        assert alloc.keep[0] == [spec.num_tokens] * len(spec.layers)
        hard = alloc.weights.detach()
        assert torch.equal(hard, torch.nn.functional.one_hot(hard.argmax(-1), hard.shape[-1]).float())
    assert sum(allocate_stage1(pred, budget, units, num_full=3).full_steps) == 3


def test_straight_through_forward_is_hard_and_backward_is_softmax():
    cost = torch.tensor([[0.3, -1.0, 2.0]], requires_grad=True)
    hard = torch.tensor([[0.0, 0.0, 1.0]])
    g = torch.tensor([[1.0, -2.0, 0.5]])
    w = straight_through(hard, cost, temperature=0.5)
    assert torch.equal(w.detach(), hard)
    (w * g).sum().backward()
    ref = cost.detach().clone().requires_grad_(True)
    (torch.softmax(-ref / 0.5, -1) * g).sum().backward()
    assert torch.allclose(cost.grad, ref.grad)


def test_latency_budget_units_are_the_tables_prediction(tiny_spec, synthetic_table):
    """Budget.for_latency: a schedule's joint units times the unit are its predicted latency (up
    to the rounding of each entry to the unit), refresh steps at their measured price."""
    n = tiny_spec.num_tokens
    tokens = (0, n // 4, n // 2, 3 * n // 4, n)
    table = synthetic_table(tiny_spec, sa=(0.0, 1.1, 2.3, 3.2, 4.0), mlp=(0.0, 0.3, 0.6, 0.8, 1.2), fixed=2.5,
                            refresh=25.0, dense=21.0)
    costs = LatencyCosts(tiny_spec, table)
    budget = Budget.for_latency(tiny_spec, tokens, table)
    assert budget.unit == "latency" and budget.refresh_extra_units != 0
    for sched in (toca_schedule(tiny_spec, STEPS, 0.5, costs=costs), fora_schedule(tiny_spec, STEPS, 0.4, costs=costs)):
        predicted = costs.total(sched.keep, sched.skip)
        got = joint_units(budget, sched.keep, sched.skip) * budget.unit_macs
        assert got == pytest.approx(predicted, abs=(len(tiny_spec.layers) + 2) * STEPS * budget.unit_macs)
    assert budget.units_for_ratio(STEPS, 1.0) * budget.unit_macs == pytest.approx(STEPS * (21.0 - 2.5), abs=budget.unit_macs)
