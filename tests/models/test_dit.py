"""The DiT adapter and its token-cached step against diffusers' own model and scheduler."""

import numpy as np
import pytest
import torch

from diffsparse import tokencache as tc
from diffsparse.models.base import StepCall
from diffsparse.models.cached import StepEntries
from diffsparse.models.zoo import make_spec
from diffsparse.schedule import SelectorConfig


def run_step(spec, module, latent, t_index, labels, cache, guidance=4.0, plan=None):
    plan = plan or spec.sampler_plan(6)
    feeds = spec.feeds(StepCall(float(plan.timesteps[t_index]), plan.coefficients[t_index]),
                       {"class_labels": labels}, guidance)
    args = [torch.from_numpy(feeds[s.name]) for s in spec.step_inputs()[1:]]
    with torch.no_grad():
        out = module(latent, *args, *cache)
    return out[0], list(out[1:])


def test_dense_step_reproduces_diffusers_forward(tiny_spec):
    spec = tiny_spec
    sel = spec.default_selector()
    step = spec.build_step([spec.num_tokens] * len(spec.layers), sel)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 16, 16, generator=g)
    t = torch.tensor([981.0, 500.0, 20.0, 1.0])
    labels = torch.tensor([0, 3, 9, 10])  # 10 = the null class
    with torch.no_grad():
        ours = step.forward_rows(x, t, labels, dict(zip(step.cache_names, spec.cache_layout(sel).zeros())), StepEntries())
        ref = spec.model(x, timestep=t, class_labels=labels).sample
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_dense_schedule_reproduces_diffusers_ddim_loop(guidance):
    """A full CFG DDIM sampling loop with every token recomputed == diffusers model + DDIMScheduler."""
    spec = make_spec("dit-tiny", batch_size=2, sampler_overrides={"clip_sample": True})
    steps = 8
    plan = spec.sampler_plan(steps)
    sel = spec.default_selector()
    dense = spec.build_step([spec.num_tokens] * len(spec.layers), sel)
    labels = np.array([2, 7])
    x0 = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 4, 16, 16), dtype=np.float32))

    sched = spec.sampler.scheduler()
    sched.set_timesteps(steps)
    ref = x0.clone()
    class_in = torch.tensor([2, 7, 10, 10])
    for t in sched.timesteps:
        with torch.no_grad():
            out = spec.model(torch.cat([ref, ref]), timestep=t.expand(4), class_labels=class_in).sample
        cond, uncond = out.chunk(2)
        ref = sched.step(uncond + guidance * (cond - uncond), t, ref).prev_sample

    ours, cache = x0.clone(), spec.cache_layout(sel).zeros()
    for i in range(steps):
        ours, cache = run_step(spec, dense, ours, i, labels, cache, guidance, plan)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def _state_after_full_step(spec, sel, labels=np.array([1, 5])):
    dense = spec.build_step([spec.num_tokens] * len(spec.layers), sel)
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 4, 16, 16), dtype=np.float32))
    return run_step(spec, dense, x, 0, labels, spec.cache_layout(sel).zeros())


@pytest.mark.parametrize("score", ["attention", "l2norm", "cosine"])
def test_sparse_step_keeps_exactly_k_fresh_tokens_shared_by_cfg_halves(tiny_spec, score):
    spec = tiny_spec
    sel = SelectorConfig(score=score, lambdas=(1.0, 0.0, 0.25 / 3, 0.6), window=2)
    latent, cache = _state_after_full_step(spec, sel)
    names = spec.cache_layout(sel).names
    keep = [16, 32, 0, 48]
    step = spec.build_step(keep, sel)
    _, new = run_step(spec, step, latent, 1, np.array([1, 5]), cache)
    before, after = dict(zip(names, cache)), dict(zip(names, new))
    for layer, k in zip(spec.layers, keep):
        out0, out1 = before[f"out.{layer.name}"], after[f"out.{layer.name}"]
        changed = (out0 != out1).any(-1)                       # (rows, N)
        assert changed.shape == (4, spec.num_tokens)
        assert torch.equal(changed[:2], changed[2:]), "both guidance halves must recompute the same tokens"
        assert (changed[:2].sum(1) <= k).all() and (changed[:2].sum(1) >= k - 1).all()
        reuse = after[f"reuse.{layer.name}"]
        assert ((reuse == 0).sum(1) == k).all(), "reuse counts reset exactly for the K computed tokens"
        assert ((reuse == 1).sum(1) == spec.num_tokens - k).all()
        if k == 0:
            assert torch.equal(out0, out1)


def test_batch_samples_select_their_own_tokens(tiny_spec):
    spec = tiny_spec
    sel = spec.default_selector()
    latent, cache = _state_after_full_step(spec, sel, labels=np.array([0, 9]))
    names = spec.cache_layout(sel).names
    step = spec.build_step([16, 16, 16, 16], sel)
    _, new = run_step(spec, step, latent, 1, np.array([0, 9]), cache)
    reuse = dict(zip(names, new))["reuse.sa0"]
    assert not torch.equal(reuse[0] == 0, reuse[1] == 0)


def test_selection_is_top_k_of_the_composite_score():
    score = torch.tensor([[0.1, 0.9, 0.3, 0.2, 0.5, 0.4, 0.8, 0.7, 0.0, 0.6, 0.05, 0.15, 0.25, 0.35, 0.45, 0.55]])
    reuse = torch.zeros_like(score)
    sel = SelectorConfig(lambdas=(1.0, 0.0, 0.0, 10.0), window=2)
    s = tc.composite_score(score, reuse, sel, (4, 4))
    idx = sorted(tc.top_tokens(s, 4)[0].tolist())
    # grid rows [0.1 .9 .3 .2] [.5 .4 .8 .7] [0 .6 .05 .15] [.25 .35 .45 .55]: the max of each 2x2 tile
    assert idx == [1, 6, 9, 15]
    # reuse count pushes long-cached tokens up
    sel = SelectorConfig(lambdas=(1.0, 0.0, 1.0, 0.0), window=2)
    reuse[0, 8] = 5
    assert 8 in tc.top_tokens(tc.composite_score(score, reuse, sel, (4, 4)), 1)[0].tolist()


@pytest.mark.parametrize("keep", [[64, 64, 64, 64], [16, 32, 0, 48], [0, 0, 0, 0]])
def test_macs_count_what_is_computed(tiny_spec, keep, count_macs):
    """The spec's MACs equal PyTorch's own FLOP count / 2 for the matmuls and convolutions run."""
    spec = tiny_spec
    sel = spec.default_selector()
    latent, cache = _state_after_full_step(spec, sel)
    step = spec.build_step(keep, sel)
    assert spec.step_macs(keep) == count_macs(run_step, spec, step, latent, 1, np.array([1, 5]), cache)
