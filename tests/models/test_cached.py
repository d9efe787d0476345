"""The step shared by every family (models/cached.py): a schedule that never reuses tokens runs
the plain model, without the layer cache."""

import numpy as np
import pytest
import torch

from diffsparse import tokencache as tc
from diffsparse.cache_layout import Role
from diffsparse.models.base import StepCall
from diffsparse.models.zoo import make_spec
from diffsparse.sampler import initial_noise


def _step_args(spec):
    plan = spec.sampler_plan(4)
    feeds = spec.feeds(StepCall(float(plan.timesteps[1]), plan.coefficients[1]),
                       spec.example_conditioning(np.random.default_rng(0)), 4.0)
    latent = initial_noise(0, spec.batch_size, spec.latent_shape)
    return [torch.from_numpy(latent)] + [torch.from_numpy(feeds[s.name]) for s in spec.step_inputs()[1:]]


@pytest.mark.parametrize("model", ["dit-tiny", "pixart-tiny", "flux-tiny", "wan-tiny"])
def test_dense_step_without_layer_cache_is_the_same_step(model):
    spec = make_spec(model, batch_size=1, guidance=model != "flux-tiny")  # FLUX.1-schnell: no CFG
    sel = spec.default_selector()
    args = _step_args(spec)
    with torch.no_grad():
        cached = spec.build_step(spec.dense_keep(), sel)(*args, *spec.cache_layout(sel).zeros())
        plain_step = spec.build_step(spec.dense_keep(), sel, layer_cache=False)
        plain = plain_step(*args, *spec.cache_layout(sel, layer_cache=False).zeros())
    sampler_state = [f"sampler.{n}" for n in spec.sampler.state]
    assert plain_step.cache_names == sampler_state and len(plain) == 1 + len(sampler_state)
    assert len(cached) > len(plain)
    # fused attention in the plain step, an explicit softmax where the cached step scores tokens
    torch.testing.assert_close(plain[0], cached[0], atol=2e-5, rtol=1e-5)


def test_a_step_that_reuses_tokens_needs_the_layer_cache(tiny_spec):
    keep = [k // 2 for k in tiny_spec.dense_keep()]
    with pytest.raises(ValueError, match="needs the layer cache"):
        tiny_spec.build_step(keep, tiny_spec.default_selector(), layer_cache=False)


@pytest.mark.parametrize("model", ["dit-tiny", "wan-tiny"])
def test_cached_value_norms_are_the_norms_of_the_cached_values(model):
    """The `vnorm` entry is kept beside the values so that partial steps take the norms of their K
    fresh values only: after a refresh and a partial step it still equals the norms of all values."""
    spec = make_spec(model, batch_size=1, guidance=True)
    sel = spec.default_selector()
    assert sel.score == "value_norm"
    layout = spec.cache_layout(sel)
    args = _step_args(spec)
    partial = [max(1, k // 3) for k in spec.dense_keep()]
    with torch.no_grad():
        cache = spec.build_step(spec.dense_keep(), sel)(*args, *layout.zeros())[1:]
        cache = spec.build_step(partial, sel)(*args, *cache)[1:]
    entries = dict(zip(layout.names, cache))
    checked = 0
    for layer in spec.layers:
        if layout.has(Role.VALUE_NORM, layer):
            values = entries[layout.name(Role.VALUE, layer)]
            torch.testing.assert_close(entries[layout.name(Role.VALUE_NORM, layer)], tc.value_norms(values, 2))
            checked += 1
    assert checked == sum(layer.kind == "SA" for layer in spec.layers) > 0
