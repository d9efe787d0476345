"""The joint space in training: the exact DP over (skip | compute with K per layer), the rollout's
skipped steps, and the trainer learning in it."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from diffsparse.train.costs import Budget
from diffsparse.train.dp_solver import InfeasibleBudget
from diffsparse.train.joint import (
    COMPUTE,
    SKIP,
    init_step_cost,
    joint_allocation,
    joint_choice,
    joint_units,
)
from diffsparse.train.losses import DistillLossConfig
from diffsparse.train.student import ScheduleRollout
from diffsparse.train.trainer import ScheduleTrainer, TrainConfig

from diffsparse.builtin_schedules import fewer_steps_schedule, toca_schedule

STEPS = 6


def _budget(weights, fixed, refresh_extra=0):
    w = np.asarray(weights, dtype=np.int64)
    return Budget(token_counts=tuple(range(w.shape[1])), weights=w, unit_macs=1.0, exact=True, fixed_units=fixed,
                  refresh_extra_units=refresh_extra)


@pytest.mark.parametrize("extra", [0, 2, -1])
def test_joint_dp_is_exact_against_brute_force(extra):
    """Every (skip | compute, K per layer) of steps 1..T-1, step 0 a full step: the DP finds the
    cheapest schedule using exactly the budget, or none when none does. `extra`: a refresh step's
    surcharge (a latency budget prices a refresh step as measured, not as its layers)."""
    rng = np.random.default_rng(0)
    t_steps, n_layers = 4, 2
    budget = _budget([[0, 1, 3], [0, 2, 3]], fixed=1, refresh_extra=extra)
    full = budget.fixed_units + budget.full_step_units + extra

    def step_units(choice):
        refresh = all(j == 2 for j in choice)
        return budget.fixed_units + sum(budget.weights[l, j] for l, j in enumerate(choice)) + (extra if refresh else 0)

    for trial in range(20):
        c_l = rng.normal(size=(t_steps, n_layers, 3))
        c_k = rng.normal(size=(t_steps, 2))
        best = {}
        per_step = [None] + list(itertools.product([0, 1, 2], repeat=n_layers))   # None: skipped
        for steps in itertools.product(per_step, repeat=t_steps - 1):
            units, cost = full, 0.0
            for t, choice in enumerate(steps, start=1):
                if choice is None:
                    cost += c_k[t, SKIP]
                else:
                    units += step_units(choice)
                    cost += c_k[t, COMPUTE] + sum(c_l[t, l, j] for l, j in enumerate(choice))
            best[units] = min(best.get(units, np.inf), cost)
        for units in range(full, full + 3 * (t_steps - 1) * 7):
            if units not in best:
                with pytest.raises(InfeasibleBudget):
                    joint_choice(c_l, c_k, budget, units)
                continue
            computed, choice = joint_choice(c_l, c_k, budget, units)
            assert computed[0] and (choice[0] == 2).all()
            got_units, got = full, 0.0
            for t in range(1, t_steps):
                if not computed[t]:
                    got += c_k[t, SKIP]
                    continue
                got_units += step_units(choice[t])
                got += c_k[t, COMPUTE] + sum(c_l[t, l, j] for l, j in enumerate(choice[t]))
            assert got_units == units and got == pytest.approx(best[units]), (trial, units)
            keep = [[int(j) for j in row] for row in choice]
            assert joint_units(budget, keep, [not c for c in computed]) == units


@pytest.mark.parametrize("make", [lambda s: fewer_steps_schedule(s, STEPS, 0.5),
                                  lambda s: toca_schedule(s, STEPS, 0.5, full_every=3)])
def test_warm_start_costs_reproduce_the_schedule(tiny_spec, make):
    sched = make(tiny_spec)
    budget = Budget.for_spec(tiny_spec, sched.allowed_keep())
    counts = torch.tensor(budget.token_counts, dtype=torch.float32)
    layer_cost = (counts.view(1, 1, -1) - torch.tensor(sched.keep, dtype=torch.float32).unsqueeze(-1)).abs()
    alloc = joint_allocation(layer_cost, init_step_cost(sched.skip), budget, joint_units(budget, sched.keep, sched.skip))
    assert alloc.skip == sched.skip and alloc.keep == sched.keep


def _skipping_and_folded_rollouts(spec, sched):
    """(the T-step rollout with the schedule's skip weights, the rollout of its computed steps
    alone on the folded plan), on one batch."""
    counts = sched.allowed_keep()
    full = ScheduleRollout(spec, spec.sampler_plan(STEPS), counts, sched.selector)
    folded = ScheduleRollout(spec, spec.schedule_plan(sched), counts, sched.selector)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = {"class_labels": np.array([1, 2])}
    a = full.sample(noise, cond, 2.0, full.weights_for(sched.keep), full.step_weights_for(sched.skip))
    return a, folded.sample(noise, cond, 2.0, folded.weights_for(sched.computed_keep))


def test_rollout_skips_are_the_sampler_on_the_folded_plan(tiny_spec):
    """Skip weights of 1 in the rollout (the last model output reused) = the rollout of the
    computed steps alone on the folded plan the exported schedule runs."""
    a, b = _skipping_and_folded_rollouts(tiny_spec, fewer_steps_schedule(tiny_spec, STEPS, 0.5))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_joint_training_learns_at_the_budget_and_reaches_the_step_costs(tiny_spec):
    cfg = TrainConfig(ratio=0.5, num_steps=STEPS, batch_size=2, samples=4, stage2_epochs=2, space="joint",
                      init="fewer-steps", loss=DistillLossConfig(features=0.0, l2=1.0), validate_every=0)
    trainer = ScheduleTrainer(tiny_spec, cfg)
    trainer.train_step()
    assert trainer.step_kind.grad is not None and trainer.step_kind.grad[1:].abs().sum() > 0
    sched = trainer.run()
    assert sched.provenance["space"] == "joint" and len(trainer.state.history) == 4
    budget = trainer.budget
    assert joint_units(budget, sched.keep, sched.skip) == trainer.units
    assert sched.keep[0] == tiny_spec.dense_keep() and not sched.skip[0]
    with pytest.raises(ValueError, match="needs space='joint'"):
        ScheduleTrainer(tiny_spec, TrainConfig(ratio=0.5, num_steps=STEPS, batch_size=2, init="fewer-steps"))


def test_forecasting_rollout_skips_are_the_folded_forecasting_plan(tiny_spec):
    """With a forecasting sampler, skip weights of 1 run the forecast x0 of the last two computed
    steps: the rollout of the computed steps alone on the exported schedule's folded plan."""
    sched = fewer_steps_schedule(tiny_spec, STEPS, 0.5).forecasting()
    a, b = _skipping_and_folded_rollouts(tiny_spec.for_schedule(sched), sched)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    reusing, _ = _skipping_and_folded_rollouts(tiny_spec, dataclasses.replace(sched, skip_forecast=False))
    assert (a - reusing).abs().max() > 1e-3


def test_joint_training_with_forecasting_skips(tiny_spec):
    cfg = TrainConfig(ratio=0.5, num_steps=STEPS, batch_size=2, samples=4, stage2_epochs=1, space="joint",
                      init="fewer-steps", skip_forecast=True, loss=DistillLossConfig(features=0.0, l2=1.0),
                      validate_every=0)
    trainer = ScheduleTrainer(tiny_spec, cfg)
    trainer.train_step()
    assert trainer.step_kind.grad is not None and trainer.step_kind.grad[1:].abs().sum() > 0
    sched = trainer.run()
    assert sched.skip_forecast == any(sched.skip) and trainer.spec.forecasts_skips and not tiny_spec.forecasts_skips
    with pytest.raises(ValueError, match="skip_forecast forecasts skipped steps: it needs space='joint'"):
        ScheduleTrainer(tiny_spec, TrainConfig(ratio=0.5, num_steps=STEPS, batch_size=2, skip_forecast=True))
