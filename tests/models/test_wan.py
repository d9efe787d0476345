"""The Wan2.1 adapter (wan-tiny: 2 blocks, 2 latent frames of 8x8 = 32 video tokens, 8 text tokens)
against diffusers' WanTransformer3DModel and a plain diffusers flow-matching loop."""

import numpy as np
import onnx
import pytest
import torch
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.export.trt_compat import tensorrt_problems
from diffsparse.runtime import Pipeline
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from diffsparse import tokencache as tc
from diffsparse.builtin_schedules import dense_schedule, toca_schedule
from diffsparse.manifest import Manifest
from diffsparse.models.base import StepCall
from diffsparse.models.cached import StepEntries
from diffsparse.models.wan import WanSpec
from diffsparse.models.zoo import load_model, make_spec
from diffsparse.sampler import initial_noise
from diffsparse.schedule import SelectorConfig

TINY = "wan-tiny"
STEPS = 10


@pytest.fixture(scope="module")
def spec():
    return make_spec(TINY, batch_size=1)


@pytest.fixture(scope="module")
def spec2():
    return make_spec(TINY, batch_size=2)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, spec):
    cfg = ExportConfig()  # includes the TensorRT-subset check
    root = tmp_path_factory.mktemp("wan")
    out = {}
    # full_every=3 keeps the dynamo exports to 4 graphs: dense, and in the ToCa bundle dense, all
    # K=0 and (8, 8, 8, 0, 0, 0) (block 0's SA, CA and MLP recompute 8 of the 32 tokens)
    toca = toca_schedule(spec, STEPS, full_every=3)
    for name, sched in (("dense", dense_schedule(spec, STEPS)), ("toca", toca)):
        out[name] = root / name
        export_bundle(spec, sched, out[name], source={"model": TINY, "seed": 0}, config=cfg)
    return out


def conditioning(spec, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, spec.text_len, spec.text_dim)
    return {"prompt_embeds": rng.standard_normal(shape, dtype=np.float32),
            "negative_prompt_embeds": rng.standard_normal(shape, dtype=np.float32)}


def run_step(spec, module, latent, t_index, cond, cache, guidance=5.0, plan=None):
    plan = plan or spec.sampler_plan(STEPS)
    feeds = spec.feeds(StepCall(float(plan.timesteps[t_index]), plan.coefficients[t_index]), cond, guidance)
    args = [torch.from_numpy(feeds[s.name]) for s in spec.step_inputs()[1:]]
    with torch.no_grad():
        out = module(latent, *args, *cache)
    return out[0], list(out[1:])


def test_shapes_layers_and_options(spec):
    assert spec.latent_shape == (4, 2, 8, 8)          # (5-1)/4+1 frames, 64/8
    assert spec.num_tokens == 32 and spec.grid == (2 * 4, 4)
    assert [l.name for l in spec.layers] == ["sa0", "ca0", "mlp0", "sa1", "ca1", "mlp1"]
    assert [t.name for t in spec.conditioning_inputs()] == ["prompt_embeds", "negative_prompt_embeds"]
    assert spec.sampler.shift == 3.0                   # Wan's 480p flow shift by default
    assert make_spec(TINY, sampler_overrides={"flow_shift": 5.0}).sampler.shift == 5.0
    full = make_spec(TINY, options={"num_frames": 9, "height": 96, "width": 128})
    assert full.latent_shape == (4, 3, 12, 16) and full.num_tokens == 3 * 6 * 8


def test_dense_step_reproduces_diffusers_forward(spec2):
    """Rows with different timesteps and text, as the cond/uncond rows of two samples."""
    sel = spec2.default_selector()
    step = spec2.build_step(spec2.dense_keep(), sel)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, *spec2.latent_shape, generator=g)
    t = torch.tensor([999.0, 600.0, 25.0, 1.0])
    ctx = torch.randn(4, spec2.text_len, spec2.text_dim, generator=g)
    with torch.no_grad():
        ours = step.forward_rows(x, t, ctx, dict(zip(step.cache_names, spec2.cache_layout(sel).zeros())), StepEntries())
        ref = spec2.model(x, timestep=t, encoder_hidden_states=ctx).sample
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_dense_step_guidance_and_update_match_diffusers(spec2):
    """The whole step: cond rows use prompt_embeds, uncond rows negative_prompt_embeds, CFG, Euler."""
    sel = spec2.default_selector()
    step = spec2.build_step(spec2.dense_keep(), sel)
    cond = conditioning(spec2, 2)
    x = torch.from_numpy(initial_noise(0, 2, spec2.latent_shape))
    plan = spec2.sampler_plan(STEPS)
    ours, _ = run_step(spec2, step, x, 2, cond, spec2.cache_layout(sel).zeros(), guidance=5.0)
    t = torch.tensor(plan.timesteps[2]).expand(2)
    with torch.no_grad():
        v_c = spec2.model(x, timestep=t, encoder_hidden_states=torch.from_numpy(cond["prompt_embeds"])).sample
        v_u = spec2.model(x, timestep=t, encoder_hidden_states=torch.from_numpy(cond["negative_prompt_embeds"])).sample
    ref = x + float(plan.coefficients[2, 1]) * (v_u + 5.0 * (v_c - v_u))
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_sparse_step_with_an_up_to_date_cache_equals_the_dense_step(spec2):
    """With a cache filled by a dense step on the same inputs, recomputing any K tokens must give
    the dense result: fails if selected tokens get another token's rotary position."""
    sel = spec2.default_selector()
    cond = conditioning(spec2, 2, seed=3)
    x = torch.from_numpy(initial_noise(3, 2, spec2.latent_shape))
    dense_out, cache = run_step(spec2, spec2.build_step(spec2.dense_keep(), sel), x, 1, cond, spec2.cache_layout(sel).zeros())
    keep = [8, 16, 24, 16, 8, 0]
    sparse_out, new = run_step(spec2, spec2.build_step(keep, sel), x, 1, cond, cache)
    assert torch.allclose(sparse_out, dense_out, atol=1e-5), (sparse_out - dense_out).abs().max()
    after = dict(zip(spec2.cache_layout(sel).names, new))
    for layer, k in zip(spec2.layers, keep):
        assert ((after[f"reuse.{layer.name}"] == 0).sum(1) == k).all()
    # and from a stale cache (a later step), the K-token steps differ from dense
    later_dense, _ = run_step(spec2, spec2.build_step(spec2.dense_keep(), sel), dense_out, 2, cond, cache)
    later_sparse, _ = run_step(spec2, spec2.build_step(keep, sel), dense_out, 2, cond, cache)
    assert not torch.allclose(later_sparse, later_dense, atol=1e-4)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("selector, maps", [
    (None, False),                                                     # value_norm, λ2 = 0: fused
    (SelectorConfig(score="attention"), True),                         # attention received
    (SelectorConfig(score="value_norm", lambdas=(1.0, 0.5, 0.1, 0.6)), True),  # CA entropy
])
def test_attention_maps_only_when_the_selector_reads_them(spec2, selector, maps):
    sel = selector or spec2.default_selector()
    cond = conditioning(spec2, 2)
    x = torch.from_numpy(initial_noise(0, 2, spec2.latent_shape))
    _, cache = run_step(spec2, spec2.build_step(spec2.dense_keep(), sel), x, 0, cond, spec2.cache_layout(sel).zeros())
    step = spec2.build_step([16] * len(spec2.layers), sel)
    with _Ops() as rec:
        run_step(spec2, step, x, 1, cond, cache)
    fused = {op for op in rec.ops if op.startswith("_scaled_dot_product")}
    assert ("_softmax" in rec.ops) == maps, sorted(rec.ops)
    if not maps:
        assert fused, "self- and cross-attention must run as scaled_dot_product_attention"


@pytest.mark.parametrize("keep", [[32] * 6, [8, 16, 24, 16, 8, 0], [0] * 6])
def test_macs_count_what_is_computed(spec2, keep):
    """The spec's MACs equal PyTorch's FLOP count / 2 (CPU fused attention counted like SDPA)."""
    sel = spec2.default_selector()
    cond = conditioning(spec2, 2)
    x = torch.from_numpy(initial_noise(0, 2, spec2.latent_shape))
    _, cache = run_step(spec2, spec2.build_step(spec2.dense_keep(), sel), x, 0, cond, spec2.cache_layout(sel).zeros())
    step = spec2.build_step(keep, sel)
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def sdpa_flops(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    with FlopCounterMode(display=False, custom_mapping={cpu_sdpa: sdpa_flops}) as counter:
        run_step(spec2, step, x, 1, cond, cache)
    assert spec2.step_macs(keep) == counter.get_total_flops() // 2


def test_sparse_toca_bundle_matches_pytorch(bundles, spec):
    m = Manifest.load(bundles["toca"])
    assert len(m.graphs) > 1 and any(0 < k < spec.num_tokens for g in m.graphs for k in g.keep)
    assert all(g.parity_max_abs_err is not None and g.parity_max_abs_err < 1e-4 for g in m.graphs)
    assert m.family == "wan" and m.schedule.selector.score == "value_norm"


def test_graphs_stay_in_tensorrt_subset(bundles):
    folder = bundles["toca"]
    for g in Manifest.load(folder).graphs:
        assert tensorrt_problems(onnx.load(str(folder / g.file), load_external_data=False)) == []


def test_dense_bundle_reproduces_diffusers_sampling(bundles, spec):
    """ONNX Runtime, dense schedule == diffusers model + FlowMatchEulerDiscreteScheduler + CFG."""
    guidance, n = 5.0, 2
    cond = conditioning(spec, n, seed=4)
    result = Pipeline.from_bundle(bundles["dense"]).generate(conditioning=cond, seed=7, guidance_scale=guidance)
    assert result.samples.shape == (n, *spec.latent_shape)
    sched = spec.sampler.scheduler()
    sched.set_timesteps(STEPS, sigmas=np.linspace(1.0, 1.0 / STEPS, STEPS))
    x = torch.from_numpy(initial_noise(7, n, spec.latent_shape))
    text = torch.cat([torch.from_numpy(cond["prompt_embeds"]), torch.from_numpy(cond["negative_prompt_embeds"])])
    for t in sched.timesteps:
        with torch.no_grad():
            out = spec.model(torch.cat([x, x]), timestep=t.expand(2 * n), encoder_hidden_states=text).sample
        v_c, v_u = out.chunk(2)
        x = sched.step(v_u + guidance * (v_c - v_u), t, x).prev_sample
    scale = max(1.0, float(x.abs().max()))
    assert np.abs(result.samples - x.numpy()).max() / scale < 1e-4


def test_bad_options_and_conditioning_give_clear_errors(spec, bundles):
    with pytest.raises(ValueError, match="height must be a multiple of 16"):
        make_spec(TINY, options={"height": 72})
    with pytest.raises(ValueError, match="width must be a multiple of 16"):
        make_spec(TINY, options={"width": 40})
    with pytest.raises(ValueError, match=r"num_frames must be 4k\+1"):
        make_spec(TINY, options={"num_frames": 8})
    with pytest.raises(ValueError, match="text_len must be a positive integer"):
        make_spec(TINY, options={"text_len": 0})
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        make_spec(TINY, options={"width": 16 * 33})
    with pytest.raises(ValueError, match="unknown option"):
        make_spec(TINY, options={"fps": 16})
    with pytest.raises(ValueError, match="stay inside a frame"):
        spec.build_step(spec.dense_keep(), SelectorConfig(score="value_norm", window=3))
    pipe = Pipeline.from_bundle(bundles["dense"])
    good = conditioning(spec, 1)
    with pytest.raises(ValueError, match=r"'prompt_embeds' must have shape \(1, 8, 32\)"):
        pipe.generate(conditioning={**good, "prompt_embeds": np.zeros((1, 7, 32), np.float32)})
    with pytest.raises(ValueError, match="'negative_prompt_embeds' is missing"):
        pipe.generate(conditioning={"prompt_embeds": good["prompt_embeds"]})


def test_local_folder_round_trip(tmp_path, spec):
    """save_pretrained -> our loader (no accelerate: diffusers refuses low_cpu_mem_usage=False for
    Wan's fp32-kept modules, so the zoo falls back to config + state dict) -> same model."""
    spec.model.save_pretrained(tmp_path / "transformer")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        '{"_class_name": "UniPCMultistepScheduler", "flow_shift": 5.0, "prediction_type": "flow_prediction"}')
    loaded = make_spec(tmp_path, options={"num_frames": 5, "height": 64, "width": 64, "text_len": 8})
    assert isinstance(loaded, WanSpec) and loaded.sampler.shift == 5.0
    for (name, a), b in zip(spec.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_model(tmp_path / "transformer")[0] == "wan"


def test_full_size_spec_on_meta():
    """Wan2.1-1.3B at 832x480x81 without weights: token count, layers and TopK split."""
    from diffusers import WanTransformer3DModel

    from diffsparse.models.zoo import BUILTINS

    b = BUILTINS["wan2.1-1.3b"]
    with torch.device("meta"):
        model = WanTransformer3DModel(**b.config)
    spec = WanSpec(model, batch_size=1, options=b.options)
    assert spec.num_tokens == 21 * 30 * 52 == 32760 and spec.grid == (21 * 30, 52)
    assert len(spec.layers) == 90
    assert tc.topk_chunks(spec.num_tokens, spec.num_tokens // 2) == 5
