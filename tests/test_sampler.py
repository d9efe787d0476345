import numpy as np
import pytest
import torch

from diffsparse.sampler import (
    DDIMConfig,
    SamplerError,
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
