import dataclasses
from dataclasses import asdict

import numpy as np
import pytest
import torch

from diffsparse.sampler import (
    SAMPLERS,
    DDIMSampler,
    DPMSolverSampler,
    FlowMatchSampler,
    Sampler,
    SamplerError,
    SamplerPlan,
    sampler_config,
    initial_noise,
)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_update_matches_diffusers(clip, steps):
    cfg = DDIMSampler(clip_sample=clip)
    plan = cfg.plan(steps)
    sched = cfg.scheduler()
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(plan.timesteps, sched.timesteps.numpy().astype(np.float32))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ours = x.clone()
    for i, t in enumerate(sched.timesteps):
        eps = torch.randn(2, 4, 8, 8, generator=g) * 2
        x = sched.step(eps, t, x).prev_sample
        ours, state = cfg.update(ours, eps, torch.from_numpy(plan.coefficients[i]), [])
        assert state == []
    assert torch.allclose(ours, x, atol=1e-5, rtol=1e-5)


def test_unsupported_scheduler_settings():
    with pytest.raises(SamplerError, match="v_prediction"):
        DDIMSampler.from_scheduler_config({"prediction_type": "v_prediction"})
    with pytest.raises(SamplerError, match="thresholding"):
        DDIMSampler.from_scheduler_config({"thresholding": True})


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
    cfg = DPMSolverSampler()
    plan = cfg.plan(steps)
    sched = cfg.scheduler()
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(plan.timesteps, sched.timesteps.numpy().astype(np.float32))
    assert plan.coefficients.shape == (steps, cfg.num_coefficients)
    ours, ref = _run_both(cfg, plan, sched)
    # float32 rounding only: the samples grow to O(100) over 20 steps with these outputs
    assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("cfg, seq", [(FlowMatchSampler(), None), (FlowMatchSampler(shift=3.0, schnell_sigmas=False), None),
                                      (FlowMatchSampler(use_dynamic_shifting=True), 1024)])
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
        DPMSolverSampler.from_scheduler_config({"solver_order": 3})
    with pytest.raises(SamplerError, match="algorithm_type"):
        DPMSolverSampler.from_scheduler_config({"algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(SamplerError, match="not supported"):
        sampler_config("heun", {})
    assert FlowMatchSampler.from_scheduler_config({"flow_shift": 3.0, "prediction_type": "flow_prediction"}).shift == 3.0
    with pytest.raises(SamplerError, match="image token count"):
        FlowMatchSampler(use_dynamic_shifting=True).plan(4)


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_registered_samplers_implement_the_protocol(kind):
    cls = SAMPLERS[kind]
    assert issubclass(cls, Sampler) and not cls.__abstractmethods__ and cls.kind == kind
    sampler = cls()
    for name in ("kind", "state", "num_coefficients"):   # attributes (a forecasting sampler's depend on it), not settings
        assert hasattr(sampler, name) and name not in cls.__dataclass_fields__
    assert isinstance(sampler.state, tuple) and all(isinstance(n, str) for n in sampler.state)
    assert isinstance(sampler.num_coefficients, int)
    assert isinstance(sampler, Sampler) and sampler_config(kind, {}) == sampler
    plan = sampler.plan(5, image_seq_len=256)
    assert plan.kind == kind and plan.timesteps.shape == (5,) and plan.timesteps.dtype == np.float32
    assert plan.coefficients.shape == (5, sampler.num_coefficients) and plan.coefficients.dtype == np.float32
    # the plan's config is the sampler's settings: the sampler rebuilds from it
    assert plan.config == asdict(sampler) and sampler_config(kind, plan.config) == sampler
    assert cls.from_scheduler_config(plan.config) == sampler
    x = torch.randn(1, 2, 3, 3)
    out, state = sampler.update(x, 0.5 * x, torch.from_numpy(plan.coefficients[1]),
                                [torch.zeros_like(x) for _ in sampler.state])
    assert out.shape == x.shape and len(state) == len(sampler.state)
    assert all(s.shape == x.shape for s in state)
    assert type(sampler.scheduler()).__name__.endswith("Scheduler")


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_plan_round_trips_through_to_dict(kind):
    import json

    sampler = SAMPLERS[kind](**({"clip_sample": True, "clip_sample_range": 2.0} if kind == "ddim" else {}))
    plan = sampler.plan(7, image_seq_len=256)
    data = json.loads(json.dumps(plan.to_dict()))           # as the manifest stores it
    back = SamplerPlan.from_dict(data)
    assert back.kind == plan.kind and back.config == plan.config
    np.testing.assert_array_equal(back.timesteps, plan.timesteps)
    np.testing.assert_array_equal(back.coefficients, plan.coefficients)
    assert back.timesteps.dtype == back.coefficients.dtype == np.float32
    assert back.to_dict() == data
    assert sampler_config(back.kind, back.config) == sampler   # e.g. DDIM's clipping comes from config


def test_plan_from_dict_reads_exactly_its_keys():
    data = DDIMSampler().plan(3).to_dict()
    assert set(data) == {"kind", "timesteps", "coefficients", "config"}
    with pytest.raises(SamplerError, match="unknown key.*clip_sample_range"):
        SamplerPlan.from_dict({**data, "clip_sample_range": 1.0})   # the field older manifests wrote
    with pytest.raises(SamplerError, match="missing key.*config"):
        SamplerPlan.from_dict({k: v for k, v in data.items() if k != "config"})
    with pytest.raises(SamplerError, match="JSON object"):
        SamplerPlan.from_dict([data])


def _reuse_last_output(cfg, plan, computed, x, outputs):
    """The definition of a skipped step: no model call, the update runs on the last model output."""
    last = None
    for i, c in enumerate(computed):
        if c:
            last = outputs[i]
        x, _ = cfg.update(x, last, torch.from_numpy(plan.coefficients[i]), [])
    return x


@pytest.mark.parametrize("cfg", [DDIMSampler(), DDIMSampler(clip_sample=True), FlowMatchSampler(),
                                 FlowMatchSampler(shift=3.0, schnell_sigmas=False)])
def test_skipping_every_other_step_is_the_sampler_on_the_sub_grid(cfg):
    """20-step DDIM / flow Euler with every other step skipped (reusing the last model output)
    = the folded plan (10 rows) stepping on the same computed timesteps, to 1e-5."""
    computed = [i % 2 == 0 for i in range(20)]
    full, folded = cfg.plan(20), cfg.plan(20, computed=computed)
    assert len(folded.timesteps) == 10
    np.testing.assert_array_equal(folded.timesteps, full.timesteps[::2])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    outputs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(20)]
    ref = _reuse_last_output(cfg, full, computed, x.clone(), outputs)
    ours = x.clone()
    for k in range(10):
        ours, _ = cfg.update(ours, outputs[2 * k], torch.from_numpy(folded.coefficients[k]), [])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # an uneven pattern too, ending on skipped steps
    uneven = [True, True, False, False, True] + [False] * 15
    ref = _reuse_last_output(cfg, full, uneven, x.clone(), outputs)
    plan, ours = cfg.plan(20, computed=uneven), x.clone()
    for k, i in enumerate(i for i, c in enumerate(uneven) if c):
        ours, _ = cfg.update(ours, outputs[i], torch.from_numpy(plan.coefficients[k]), [])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_computing_every_step_is_the_plain_plan(kind):
    cfg = SAMPLERS[kind]()
    seq = 256
    a, b = cfg.plan(12, image_seq_len=seq), cfg.plan(12, image_seq_len=seq, computed=[True] * 12)
    np.testing.assert_array_equal(a.timesteps, b.timesteps)
    np.testing.assert_array_equal(a.coefficients, b.coefficients)
    with pytest.raises(SamplerError, match="step 0 must be computed"):
        cfg.plan(4, image_seq_len=seq, computed=[False, True, True, True])
    with pytest.raises(SamplerError, match="3 entries for 4 steps"):
        cfg.plan(4, image_seq_len=seq, computed=[True] * 3)


def test_dpm_solver_on_a_sub_grid_matches_diffusers_on_those_timesteps():
    """DPM-Solver++ with skipped steps is the solver on the computed steps' sigmas: diffusers'
    scheduler given exactly those sigmas (its `sigmas` set by hand) takes the same steps."""
    cfg = DPMSolverSampler()
    computed = [i % 2 == 0 for i in range(20)]
    plan = cfg.plan(20, computed=computed)
    sched = cfg.scheduler()
    sched.set_timesteps(20)
    keep = [i for i, c in enumerate(computed) if c] + [20]
    sched.sigmas = sched.sigmas[keep]
    sched.timesteps = sched.timesteps[keep[:-1]]
    sched.num_inference_steps = len(sched.timesteps)
    np.testing.assert_array_equal(plan.timesteps, sched.timesteps.numpy().astype(np.float32))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ours, state = x.clone(), [torch.zeros(2, 4, 8, 8)]
    for i, t in enumerate(sched.timesteps):
        eps = torch.randn(2, 4, 8, 8, generator=g)
        x = sched.step(eps, t, x).prev_sample
        ours, state = cfg.update(ours, eps, torch.from_numpy(plan.coefficients[i]), state)
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def _forecast_on_the_grid(cfg, computed, x, outputs, num_steps):
    """The definition of a forecasting skip, step by step on the T-step grid: a computed step's x0
    from its model output, a skipped one's extrapolated linearly (in grid steps) from the last two
    computed steps' x0, and each step x' = p·x + q·x0 (`ForecastingSampler.fine_grid`)."""
    _, c0, c1, p, q = cfg.fine_grid(num_steps)
    history = []   # (grid index, x0) of the computed steps
    x = x.double()
    for j in range(num_steps):
        if computed[j]:
            history.append((j, (x - c1[j] * outputs[j].double()) / c0[j]))
            x0 = history[-1][1]
        elif len(history) == 1:
            x0 = history[-1][1]
        else:
            (i0, a0), (i1, a1) = history[-2:]
            x0 = a1 + (j - i1) / (i1 - i0) * (a1 - a0)
        x = p[j] * x + q[j] * x0
    return x


@pytest.mark.parametrize("cfg", [DDIMSampler(skip_forecast=True), FlowMatchSampler(skip_forecast=True),
                                 FlowMatchSampler(shift=3.0, schnell_sigmas=False, skip_forecast=True)])
def test_forecasting_skips_fold_into_the_computed_steps(cfg):
    """The folded plan (one 5-coefficient row per computed step, x0 carried as state) = the
    forecast stepped on the 20-step grid; with every step computed it is the plain sampler."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    outputs = [torch.randn(2, 4, 8, 8, generator=g) * 0.5 for _ in range(20)]
    assert cfg.state == ("prev_x0",) and cfg.num_coefficients == 5
    for computed in ([i % 5 == 0 for i in range(20)], [True, True, False, False, True] + [False] * 15,
                     [True] + [False] * 19):
        plan = cfg.plan(20, computed=computed)
        ours, state = x.clone(), [torch.zeros_like(x)]
        for k, i in enumerate(i for i, c in enumerate(computed) if c):
            ours, state = cfg.update(ours, outputs[i], torch.from_numpy(plan.coefficients[k]), state)
        ref = _forecast_on_the_grid(cfg, computed, x, outputs, 20)
        scale = float(ref.abs().max())
        assert (ours.double() - ref).abs().max() / scale < 1e-5
    plain = dataclasses.replace(cfg, skip_forecast=False)
    a, state = x.clone(), [torch.zeros_like(x)]
    b = x.clone()
    for row_f, row_p, out in zip(cfg.plan(20).coefficients, plain.plan(20).coefficients, outputs):
        a, state = cfg.update(a, out, torch.from_numpy(row_f), state)
        b, _ = plain.update(b, out, torch.from_numpy(row_p), [])
    assert (a - b).abs().max() / float(b.abs().max()) < 1e-5
    # reusing instead: only one computed step so far is a reuse either way
    one = [True] + [False] * 19
    reuse = _reuse_last_output(plain, plain.plan(20), one, x.clone(), outputs)
    f, _ = cfg.update(x.clone(), outputs[0], torch.from_numpy(cfg.plan(20, computed=one).coefficients[0]),
                      [torch.zeros_like(x)])
    assert (f - reuse).abs().max() / float(reuse.abs().max()) < 1e-5


def test_forecasting_is_a_setting_the_plan_records():
    cfg = DDIMSampler(skip_forecast=True)
    plan = cfg.plan(10, computed=[i % 2 == 0 for i in range(10)])
    again = SamplerPlan.from_dict(plan.to_dict(), num_steps=5)
    assert again.config["skip_forecast"] is True and again.coefficients.shape == (5, 5)
    data = plan.to_dict()
    data["config"] = {k: v for k, v in data["config"].items() if k != "skip_forecast"}   # a plan written before
    with pytest.raises(SamplerError, match="5 rows of 4 numbers"):
        SamplerPlan.from_dict(data, num_steps=5)
    assert "skip_forecast" not in DDIMSampler().scheduler_settings()
    with pytest.raises(SamplerError, match="not yet supported with DPM-Solver"):
        sampler_config("dpmpp_2m", {"skip_forecast": True})
