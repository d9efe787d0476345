"""The trainable masked step against the exported-path step, and its gradient."""

import numpy as np
import pytest
import torch
from diffsparse.runtime.pipeline import Pipeline
from diffsparse.train.student import ScheduleRollout

from diffsparse.builtin_schedules import toca_schedule
from diffsparse.sampler import initial_noise
from diffsparse.schedule import SelectorConfig

STEPS = 6


def _reference(spec, sched, labels, seed, guidance):
    from diffsparse.runtime.backends.torch_backend import TorchBackend

    sigs = sched.distinct_signatures()
    steps = [sigs.index(sched.step_signature(t)) for t in range(sched.num_steps)]
    pipe = Pipeline(TorchBackend(spec, sched), spec, spec.sampler_plan(sched.num_steps), steps)
    return pipe.generate(labels, seed=seed, guidance_scale=guidance).samples


def _rollout(spec, selector=None):
    sched = toca_schedule(spec, STEPS, 0.5, full_every=3, selector=selector)
    counts = sched.allowed_keep()
    return sched, ScheduleRollout(spec, spec.sampler_plan(STEPS), counts, sched.selector)


@pytest.mark.parametrize("score", ["attention", "l2norm", "cosine"])
def test_one_hot_weights_reproduce_the_cached_step(tiny_spec, score):
    """Masked mixing with a one-hot schedule == gather/compute/scatter with that schedule."""
    spec = tiny_spec
    sel = SelectorConfig(score=score, lambdas=spec.default_selector().lambdas, window=2)
    sched, rollout = _rollout(spec, sel)
    labels = np.array([3, 7])
    ref = _reference(spec, sched, labels, 5, 4.0)
    noise = torch.from_numpy(initial_noise(5, 2, spec.latent_shape))
    with torch.no_grad():
        ours = rollout.sample(noise, {"class_labels": labels}, 4.0, rollout.weights_for(sched.keep))
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-5)


def test_attention_score_without_lambda1_keeps_no_received_attention(tiny_spec):
    """Score "attention" with λ1 = 0 never reads attention received: the cache layout keeps no
    `recv` entry and the masked step (which asks the layout, as the cached step does) runs fused
    attention and still reproduces the exported path. Both run scaled_dot_product_attention over
    different query counts, so they agree to float32 rounding, amplified by the unclipped steps:
    compared over 3 steps, relative to the latent's size."""
    spec = tiny_spec
    sel = SelectorConfig(score="attention", lambdas=(0.0, *spec.default_selector().lambdas[1:]), window=2)
    assert not any(e.role.value == "recv" for e in spec.cache_layout(sel))
    sched = toca_schedule(spec, 3, 0.5, full_every=3, selector=sel)
    rollout = ScheduleRollout(spec, spec.sampler_plan(3), sched.allowed_keep(), sel)
    labels = np.array([3, 7])
    ref = _reference(spec, sched, labels, 5, 4.0)
    noise = torch.from_numpy(initial_noise(5, 2, spec.latent_shape))
    with torch.no_grad():
        ours = rollout.sample(noise, {"class_labels": labels}, 4.0, rollout.weights_for(sched.keep))
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4 * float(np.abs(ref).max()))


def test_dense_weights_reproduce_dense_sampling(tiny_spec):
    from diffsparse.builtin_schedules import dense_schedule

    spec = tiny_spec
    _, rollout = _rollout(spec)
    labels = np.array([1, 2])
    ref = _reference(spec, dense_schedule(spec, STEPS), labels, 1, 3.0)
    noise = torch.from_numpy(initial_noise(1, 2, spec.latent_shape))
    # the reference is the plain model (fused attention), the teacher an explicit softmax: float32
    # rounding on a latent of magnitude ~100 after 6 unclipped steps
    np.testing.assert_allclose(rollout.teacher(noise, {"class_labels": labels}, 3.0).numpy(), ref,
                               atol=1e-6 * float(np.abs(ref).max()))


def test_gradient_wrt_mask_weights_matches_finite_differences(tiny_spec):
    """The loss is differentiated exactly with respect to the candidate weights (float64)."""
    spec = tiny_spec
    sched, rollout = _rollout(spec)
    spec.model.double()
    try:
        labels = np.array([0, 4])
        noise = torch.from_numpy(initial_noise(2, 2, spec.latent_shape)).double()
        target = torch.zeros_like(noise)
        base = rollout.weights_for(sched.keep).double()

        def loss(w):
            return ((rollout.sample(noise, {"class_labels": labels}, 2.0, w) - target) ** 2).mean()

        w = base.clone().requires_grad_(True)
        loss(w).backward()
        rng = np.random.default_rng(0)
        eps = 1e-6
        for _ in range(4):
            t = int(rng.integers(1, STEPS))
            l = int(rng.integers(0, len(spec.layers)))
            s = int(rng.integers(0, len(rollout.token_counts)))
            d = torch.zeros_like(base)
            d[t, l, s] = eps
            with torch.no_grad():
                fd = (loss(base + d) - loss(base - d)) / (2 * eps)
            assert abs(float(fd) - float(w.grad[t, l, s])) <= 1e-6 + 1e-4 * abs(float(fd)), (t, l, s)
    finally:
        spec.model.float()
