import numpy as np
import pytest
import torch

from diffsparse.sampler import (
    DDIMConfig,
    DPMSolverConfig,
    FlowMatchConfig,
    SamplerError,
    sampler_config,
    ddim_plan,
    ddim_update,
    initial_noise,
)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_update_matches_diffusers(clip, steps):
    cfg = DDIMConfig(clip_sample=clip)
    plan = ddim_plan(cfg, steps)
    sched = cfg.scheduler()
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(plan.timesteps, sched.timesteps.numpy().astype(np.float32))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ours = x.clone()
    for i, t in enumerate(sched.timesteps):
        eps = torch.randn(2, 4, 8, 8, generator=g) * 2
        x = sched.step(eps, t, x).prev_sample
        ours = ddim_update(ours, eps, torch.from_numpy(plan.coefficients[i]), plan.clip_sample_range)
    assert torch.allclose(ours, x, atol=1e-5, rtol=1e-5)


def test_unsupported_scheduler_settings():
    with pytest.raises(SamplerError, match="v_prediction"):
        DDIMConfig.from_scheduler_config({"prediction_type": "v_prediction"})
    with pytest.raises(SamplerError, match="thresholding"):
        DDIMConfig.from_scheduler_config({"thresholding": True})


def test_initial_noise_is_per_sample():
    a = initial_noise(3, 4, (1, 4, 4))
    b = initial_noise(3, 2, (1, 4, 4))
    np.testing.assert_array_equal(a[:2], b)
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(initial_noise(4, 1, (1, 4, 4))[0], a[0])


def _run_both(cfg, plan, sched, shape=(2, 4, 8, 8), eps_fn=None):
    """Step diffusers' scheduler and our in-graph update side by side on the same model outputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    ours, state = x.clone(), [torch.zeros(shape) for _ in cfg.state]
    for i, t in enumerate(sched.timesteps):
        out = 0.8 * x / x.std() + 0.3 * torch.randn(shape, generator=g)
        x = sched.step(out, t, x).prev_sample
        ours, state = cfg.update(ours, out, torch.from_numpy(plan.coefficients[i]), state)
    return ours, x


@pytest.mark.parametrize("steps", [8, 20])
def test_dpm_solver_update_matches_diffusers(steps):
    cfg = DPMSolverConfig()
    plan = cfg.plan(steps)
    sched = cfg.scheduler()
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(plan.timesteps, sched.timesteps.numpy().astype(np.float32))
    assert plan.coefficients.shape == (steps, cfg.num_coefficients)
    ours, ref = _run_both(cfg, plan, sched)
    # float32 rounding only: the samples grow to O(100) over 20 steps with these outputs
    assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("cfg, seq", [(FlowMatchConfig(), None), (FlowMatchConfig(shift=3.0, schnell_sigmas=False), None),
                                      (FlowMatchConfig(use_dynamic_shifting=True), 1024)])
def test_flow_euler_update_matches_diffusers(cfg, seq):
    plan = cfg.plan(4, image_seq_len=seq)
    sched = cfg.scheduler()
    sigmas = np.linspace(1.0, 1 / 4, 4) if cfg.schnell_sigmas else None
    sched.set_timesteps(4, sigmas=sigmas, mu=cfg.mu(seq))
    np.testing.assert_allclose(plan.timesteps, sched.timesteps.numpy(), rtol=1e-6)
    ours, ref = _run_both(cfg, plan, sched)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_sampler_configs_reject_what_they_do_not_support():
    with pytest.raises(SamplerError, match="solver_order 2"):
        DPMSolverConfig.from_scheduler_config({"solver_order": 3})
    with pytest.raises(SamplerError, match="algorithm_type"):
        DPMSolverConfig.from_scheduler_config({"algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(SamplerError, match="not supported"):
        sampler_config("heun", {})
    assert FlowMatchConfig.from_scheduler_config({"flow_shift": 3.0, "prediction_type": "flow_prediction"}).shift == 3.0
    with pytest.raises(SamplerError, match="image token count"):
        FlowMatchConfig(use_dynamic_shifting=True).plan(4)
