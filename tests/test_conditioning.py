"""Hoisted conditioning (diffsparse/conditioning.py): refresh steps compute the modulation rows of
the partial steps they serve; the result is the same as every step computing its own."""

import numpy as np
import onnx
import pytest
import torch
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.runtime.pipeline import Pipeline

from diffsparse.builtin_schedules import toca_schedule
from diffsparse.cache_layout import Role
from diffsparse.conditioning import plan_conditioning
from diffsparse.manifest import Manifest
from diffsparse.models.base import StepCall
from diffsparse.models.zoo import make_spec
from diffsparse.sampler import initial_noise


def test_plan_groups_partial_steps_under_their_refresh():
    plan = plan_conditioning([900, 700, 500, 300, 100], [True, False, False, True, False], width=6, rows=2, macs=10)
    assert plan.groups == ((0, 1, 2), (3, 4))
    assert plan.shape == (3, 2, 6)
    np.testing.assert_array_equal(plan.row(), [0, 1, 2, 0, 1])
    # each step knows its group's timesteps; the shorter group is padded with its last
    np.testing.assert_array_equal(plan.served()[1], [900, 700, 500])
    np.testing.assert_array_equal(plan.served()[4], [300, 100, 100])
    # a refresh computes G row sets instead of one, a partial step none
    assert [plan.step_macs_delta(k) for k in range(5)] == [40, -20, -20, 40, -20]
    assert plan.graph_macs_delta(True) == 40 and plan.graph_macs_delta(False) == -20


@pytest.mark.parametrize("timesteps, refresh, width", [
    ([900, 500], [True, True], 6),          # nothing partial: nothing to hoist
    ([900, 500], [False, True], 6),         # the first step has no refresh to read from
    ([900, 900], [True, False], 6),         # a graph finds its step by timestep
    ([900, 500], [True, False], None),      # a family that computes its own
])
def test_no_plan_where_it_would_not_help_or_not_be_exact(timesteps, refresh, width):
    assert plan_conditioning(timesteps, refresh, width, rows=2, macs=1) is None


def test_the_spec_plans_sparse_schedules_only(tiny_spec, tiny_schedules):
    toca = tiny_schedules["toca"]
    plan = tiny_spec.conditioning_plan(toca)
    assert plan is not None and plan.rows == tiny_spec.rows
    assert plan.width == tiny_spec.conditioning_width() and not plan.context
    assert tiny_spec.conditioning_plan(tiny_schedules["dense"]) is None
    # the universal step's K are inputs: it cannot tell a refresh from a partial step
    assert tiny_spec.conditioning_plan(toca, universal=True) is None


def _run(spec, schedule, plan, steps=None, count_macs=None, seed=0):
    """The schedule's computed steps on the PyTorch step modules -> (final latent, per-step MACs
    counted by PyTorch's FLOP counter when `count_macs` is given)."""
    sampler = spec.schedule_plan(schedule)
    cond = spec.example_conditioning(np.random.default_rng(seed))
    latent = torch.from_numpy(initial_noise(seed, spec.batch_size, spec.latent_shape))
    cache = spec.cache_layout(schedule.selector, True, plan).zeros()
    modules, counted = {}, []
    for k, keep in enumerate(schedule.computed_keep[:steps]):
        step = modules.setdefault(tuple(keep), spec.build_step(keep, schedule.selector, True, plan))
        feeds = spec.feeds(StepCall(float(sampler.timesteps[k]), sampler.coefficients[k]), cond, 3.0)
        args = [torch.from_numpy(np.asarray(feeds[s.name])) for s in spec.step_inputs()[1:]]
        with torch.no_grad():
            if count_macs is not None:
                counted.append(count_macs(step, latent, *args, *cache))
            out = step(latent, *args, *cache)
        latent, cache = out[0], list(out[1:])
    return latent.numpy(), counted


FAMILIES = ["dit-tiny", "pixart-tiny"]


@pytest.mark.parametrize("model", FAMILIES)
def test_hoisted_steps_sample_what_inline_steps_do(model):
    spec = make_spec(model, batch_size=2)
    schedule = toca_schedule(spec, 7, 0.5, full_every=4)   # groups of 4 and 3: padding rows too
    plan = spec.conditioning_plan(schedule)
    assert plan is not None and [len(g) for g in plan.groups] == [4, 3]
    np.testing.assert_allclose(_run(spec, schedule, plan)[0], _run(spec, schedule, None)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", FAMILIES)
def test_partial_steps_count_no_conditioning_macs(model, count_macs):
    spec = make_spec(model, batch_size=2)
    schedule = toca_schedule(spec, 6, 0.5, full_every=3)
    plan = spec.conditioning_plan(schedule)
    _, counted = _run(spec, schedule, plan, steps=3, count_macs=count_macs)
    assert counted == spec.schedule_step_macs(schedule, plan)[:3]
    assert spec.schedule_step_macs(schedule, plan)[1] < spec.schedule_step_macs(schedule)[1]


def test_the_sparse_bundle_carries_the_rows_and_its_partial_graphs_no_modulation_weights(tiny_bundles, tiny_spec):
    m = Manifest.load(tiny_bundles["toca"])
    name = m.cache.conditioning_name
    assert name is not None and m.cache.entry(name).role is Role.COND
    plan = tiny_spec.conditioning_plan(m.schedule)
    assert m.macs["per_step"] == tiny_spec.schedule_step_macs(m.schedule, plan)
    dense_keep = tiny_spec.dense_keep()
    for g in m.graphs:
        model = onnx.load(str(tiny_bundles["toca"] / g.file), load_external_data=False)
        reads = {i.name for i in model.graph.input}
        modulation = any("norm1.linear" in i.name for i in model.graph.initializer)
        if g.keep == dense_keep:
            assert name not in reads and modulation
        else:
            assert name in reads and not modulation
    assert Manifest.load(tiny_bundles["dense"]).cache.conditioning_name is None


def test_a_bundle_exported_without_hoisting_runs_and_samples_the_same(tmp_path, tiny_spec, tiny_bundles):
    schedule = Manifest.load(tiny_bundles["toca"]).schedule
    inline = export_bundle(tiny_spec, schedule, tmp_path / "inline", source={"model": "dit-tiny", "seed": 0},
                           config=ExportConfig(hoist_conditioning=False))
    assert inline.cache.conditioning_name is None
    hoisted = Manifest.load(tiny_bundles["toca"])
    assert sum(inline.macs["per_step"]) == sum(tiny_spec.schedule_step_macs(schedule))
    assert hoisted.macs["per_step"][1] < inline.macs["per_step"][1]
    labels = {"class_labels": np.array([3, 7])}
    a = Pipeline.from_bundle(tmp_path / "inline", backend="onnxruntime").generate(conditioning=labels, seed=1)
    b = Pipeline.from_bundle(tiny_bundles["toca"], backend="onnxruntime").generate(conditioning=labels, seed=1)
    assert a.samples.shape == b.samples.shape
    np.testing.assert_allclose(a.samples, b.samples, atol=1e-5, rtol=0)


def test_pixart_hoists_its_text_keys_and_values_only():
    spec = make_spec("pixart-tiny", batch_size=1)
    schedule = toca_schedule(spec, 6, 0.5, full_every=3)
    plan = spec.conditioning_plan(schedule)
    assert plan.width is None and plan.context   # adaLN-single: no per-block modulation matmul
    layout = spec.cache_layout(schedule.selector, True, plan)
    assert layout.conditioning_name is None
    ca = next(layer for layer in spec.layers if layer.kind == "CA")
    heads = spec.model.config.num_attention_heads   # split into heads once, by the refresh step
    assert layout.entry(layout.name(Role.TEXT_KEY, ca)).shape == (spec.rows, heads, spec.text_len, spec.dim // heads)
    assert not any(layout.has(Role.TEXT_KEY, layer) for layer in spec.layers if layer.kind != "CA")
    # a refresh computes them as it always did; a partial step saves them and the text projection
    assert plan.step_macs_delta(0) == 0 and plan.step_macs_delta(1) == -spec.context_macs() * spec.rows
