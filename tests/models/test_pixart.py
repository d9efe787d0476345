"""The PixArt-α adapter and its token-cached step against diffusers' own model and scheduler."""

import numpy as np
import pytest
import torch
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.runtime import Pipeline

from diffsparse.builtin_schedules import dense_schedule, toca_schedule
from diffsparse.manifest import Manifest
from diffsparse.models.base import StepCall
from diffsparse.models.cached import StepEntries
from diffsparse.models.pixart import PixArtSpec
from diffsparse.models.zoo import BUILTINS, make_spec
from diffsparse.sampler import initial_noise
from diffsparse.schedule import LayerRef, SelectorConfig

TINY = "pixart-tiny"
M = 8  # the built-in's text_len


@pytest.fixture(scope="module")
def spec():
    return make_spec(TINY, batch_size=2)


@pytest.fixture(scope="module")
def conditioning(spec):
    return spec.example_conditioning(np.random.default_rng(7))


def _rows(n: int, seed: int):
    """Latents, timesteps, text (n, M, 24) and masks with padding for n rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 16, 16, generator=g)
    t = torch.linspace(999.0, 1.0, n)
    text = torch.randn(n, M, 24, generator=g)
    lengths = torch.tensor([3, 8, 1, 5][:n])
    mask = (torch.arange(M)[None] < lengths[:, None]).float()
    return x, t, text, mask


def _dense_rows(spec, x, t, text, mask):
    sel = spec.default_selector()
    step = spec.build_step(spec.dense_keep(), sel)
    with torch.no_grad():
        return step.forward_rows(x, t, text, mask, dict(zip(step.cache_names, spec.cache_layout(sel).zeros())), StepEntries())


def test_dense_step_reproduces_diffusers_forward(spec):
    """Rows 0-1 conditional, 2-3 unconditional-like (a lone end token), all with text padding."""
    x, t, text, mask = _rows(4, 1)
    ours = _dense_rows(spec, x, t, text, mask)
    with torch.no_grad():
        ref = spec.model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask).sample
        unmasked = spec.model(x, encoder_hidden_states=text, timestep=t).sample
    assert ours.shape == (4, 8, 16, 16)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    assert (unmasked - ref).abs().max() > 1e-3, "the padding mask must matter for this test to mean anything"


def test_micro_conditions_of_1024_models_match_diffusers():
    """use_additional_conditions (PixArt-α 1024²): resolution and aspect ratio in pixels, as the pipeline passes."""
    torch.manual_seed(0)
    from diffusers import PixArtTransformer2DModel

    # width 48: diffusers' size embedding (D/3 each for height, width, aspect ratio) needs 3 | D
    config = {**BUILTINS[TINY].config, "attention_head_dim": 24, "cross_attention_dim": 48}
    model = PixArtTransformer2DModel(**{**config, "use_additional_conditions": True}).eval()
    spec = PixArtSpec(model, batch_size=2, options={"text_len": M})
    plain = PixArtSpec(PixArtTransformer2DModel(**config).eval(), options={"text_len": M})
    x, t, text, mask = _rows(4, 2)
    cond = {"resolution": torch.tensor([[128.0, 128.0]]).repeat(4, 1), "aspect_ratio": torch.ones(4, 1)}
    with torch.no_grad():
        ref = model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                    added_cond_kwargs=cond).sample
    assert torch.allclose(_dense_rows(spec, x, t, text, mask), ref, atol=1e-5)
    assert spec.fixed_macs() - plain.fixed_macs() == 3 * (256 * 16 + 16 * 16)


def _call(spec, module, latent, t_index, conditioning, cache, guidance=4.5, steps=6):
    plan = spec.sampler_plan(steps)
    feeds = spec.feeds(StepCall(float(plan.timesteps[t_index]), plan.coefficients[t_index]), conditioning, guidance)
    args = [torch.from_numpy(feeds[s.name]) for s in spec.step_inputs()[1:]]
    with torch.no_grad():
        out = module(latent, *args, *cache)
    return out[0], list(out[1:])


def _after_full_step(spec, sel, conditioning):
    x = torch.from_numpy(initial_noise(3, spec.batch_size, spec.latent_shape))
    return _call(spec, spec.build_step(spec.dense_keep(), sel), x, 0, conditioning, spec.cache_layout(sel).zeros())


def test_cache_buffers_follow_the_selector(spec):
    names = set(spec.cache_layout(spec.default_selector()).names)
    assert {"out.ca1", "reuse.ca1", "ent.ca0", "ent.ca1", "key.sa0", "value.sa1"} <= names
    assert not any(n.startswith(("recv.", "inp.")) for n in names), "λ1 = 0: no attention-received buffers"
    assert not any(n.startswith(("key.ca", "ent.sa", "ent.mlp")) for n in names)
    names = set(spec.cache_layout(SelectorConfig(lambdas=(1.0, 0.0, 0.1, 0.4), window=4)).names)
    assert "recv.sa0" in names and not any(n.startswith("ent.") for n in names)
    names = set(spec.cache_layout(SelectorConfig(score="cosine", lambdas=(1, 0, 0, 0))).names)
    assert {"inp.sa0", "inp.ca0", "inp.mlp1"} <= names
    assert spec.layers[:3] == [LayerRef(0, "SA"), LayerRef(0, "CA"), LayerRef(0, "MLP")]


def test_sparse_step_recomputes_k_tokens_and_tracks_entropy(spec, conditioning):
    sel = spec.default_selector()
    latent, cache = _after_full_step(spec, sel, conditioning)
    names = spec.cache_layout(sel).names
    full = dict(zip(names, cache))
    ent = full["ent.ca0"]
    assert ent.shape == (2, spec.num_tokens) and (ent > 0).all() and (ent <= 1).all()
    keep = [16, 32, 48, 16, 0, 64]  # sa0 ca0 mlp0 sa1 ca1 mlp1
    _, new = _call(spec, spec.build_step(keep, sel), latent, 1, conditioning, cache)
    after = dict(zip(names, new))
    for layer, k in zip(spec.layers, keep):
        changed = (full[f"out.{layer.name}"] != after[f"out.{layer.name}"]).any(-1)  # (rows, N)
        assert torch.equal(changed[:2], changed[2:]), "both guidance halves must recompute the same tokens"
        assert (changed[:2].sum(1) <= k).all() and (changed[:2].sum(1) >= k - 1).all()
        assert ((after[f"reuse.{layer.name}"] == 0).sum(1) == k).all()
    fresh = after["reuse.ca0"] == 0
    assert torch.equal(after["ent.ca0"] != full["ent.ca0"], fresh), "entropy is refreshed exactly where CA ran"
    assert torch.equal(after["ent.ca1"], full["ent.ca1"]), "K = 0 keeps the cached entropy"


@pytest.mark.parametrize("keep", [[64] * 6, [16, 32, 48, 0, 16, 64], [0] * 6])
def test_macs_count_what_is_computed(spec, conditioning, keep, count_macs):
    """The spec's MACs equal PyTorch's own FLOP count / 2 for the matmuls and convolutions run."""
    sel = spec.default_selector()
    latent, cache = _after_full_step(spec, sel, conditioning)
    step = spec.build_step(keep, sel)
    assert spec.step_macs(keep) == count_macs(_call, spec, step, latent, 1, conditioning, cache)


@pytest.fixture(scope="module")
def bundles(spec, tmp_path_factory):
    root = tmp_path_factory.mktemp("pixart")
    out = {}
    for name, sched in {"dense": dense_schedule(spec, 6), "toca": toca_schedule(spec, 10)}.items():
        out[name] = root / name
        export_bundle(spec, sched, out[name], source={"model": TINY, "seed": 0}, config=ExportConfig())
    return out


def test_sparse_toca_graphs_match_the_pytorch_step(bundles, spec):
    """export_bundle ran every graph on ONNX Runtime against the PyTorch step (verify) and kept the error."""
    m = Manifest.load(bundles["toca"])
    assert m.family == "pixart" and m.spec_options == {"text_len": M}
    assert any(0 < k < spec.num_tokens for g in m.graphs for k in g.keep), "the schedule must be sparse somewhere"
    assert any("TopK" in g.ops for g in m.graphs)
    assert all(g.parity_max_abs_err is not None and g.parity_max_abs_err < 1e-4 for g in m.graphs), \
        [g.parity_max_abs_err for g in m.graphs]


def test_dense_bundle_reproduces_diffusers_sampling(bundles, spec, conditioning):
    """Runtime (ORT) with the dense schedule == diffusers model + DPMSolverMultistepScheduler, CFG, same noise."""
    guidance, steps = 4.5, 6
    result = Pipeline.from_bundle(bundles["dense"]).generate(conditioning=conditioning, seed=1,
                                                            guidance_scale=guidance)
    c = {k: torch.from_numpy(v) for k, v in conditioning.items()}
    text = torch.cat([c["negative_prompt_embeds"], c["prompt_embeds"]])  # the pipeline's order
    mask = torch.cat([c["negative_prompt_attention_mask"], c["prompt_attention_mask"]])
    sched = spec.sampler.scheduler()
    sched.set_timesteps(steps)
    x = torch.from_numpy(initial_noise(1, 2, spec.latent_shape))
    for t in sched.timesteps:
        with torch.no_grad():
            out = spec.model(torch.cat([x, x]), encoder_hidden_states=text, encoder_attention_mask=mask,
                             timestep=t.expand(4)).sample
        uncond, cond = out.chunk(2)
        eps = (uncond + guidance * (cond - uncond)).chunk(2, dim=1)[0]  # learned sigma
        x = sched.step(eps, t, x).prev_sample
    scale = max(1.0, float(x.abs().max()))
    assert result.samples.shape == (2, 4, 16, 16)
    assert np.abs(result.samples - x.numpy()).max() / scale < 1e-4


def test_bad_conditioning_gives_clear_errors(spec, conditioning):
    bad = dict(conditioning)
    del bad["negative_prompt_attention_mask"]
    with pytest.raises(ValueError, match="'negative_prompt_attention_mask' is missing"):
        spec.check_conditioning(bad)
    with pytest.raises(ValueError, match=r"'prompt_embeds' must have shape \(2, 8, 24\)"):
        spec.check_conditioning({**conditioning, "prompt_embeds": np.zeros((2, 8, 32), np.float32)})
    with pytest.raises(ValueError, match="at least one text token"):
        spec.check_conditioning({**conditioning, "prompt_attention_mask": np.zeros((2, M), np.float32)})
    with pytest.raises(ValueError, match="only 0"):
        spec.check_conditioning({**conditioning, "prompt_attention_mask": np.full((2, M), 0.5, np.float32)})
    with pytest.raises(ValueError, match="text_len must be a positive integer"):
        make_spec(TINY, options={"text_len": 0})
    spec.check_conditioning(conditioning)
    assert all((conditioning[k].sum(1) >= 1).all() and (conditioning[k] == 0).any()
               for k in ("prompt_attention_mask", "negative_prompt_attention_mask"))


def test_pipeline_refuses_missing_conditioning(bundles, conditioning):
    pipe = Pipeline.from_bundle(bundles["dense"])
    with pytest.raises(ValueError, match="'negative_prompt_embeds' is missing"):
        pipe.generate(conditioning={k: v for k, v in conditioning.items() if not k.startswith("negative_prompt_embeds")})
