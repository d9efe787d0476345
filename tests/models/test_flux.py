"""The FLUX.1-schnell adapter and its token-cached step against diffusers' own model and scheduler.

FluxPipeline itself needs `transformers`; its latent packing and position ids are restated here
(`_pack`, `_image_ids`) from diffusers' pipeline_flux.py.
"""

import numpy as np
import onnx
import pytest
import torch
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.export.trt_compat import tensorrt_problems
from diffsparse.runtime import Pipeline

from diffsparse import tokencache as tc
from diffsparse.builtin_schedules import dense_schedule, fewer_steps_schedule, toca_schedule
from diffsparse.models.base import StepCall
from diffsparse.models.cached import StepEntries
from diffsparse.models.flux import FluxSpec
from diffsparse.models.zoo import BUILTINS, make_spec
from diffsparse.sampler import initial_noise
from diffsparse.schedule import SelectorConfig

TINY = "flux-tiny"
STEPS = 4
SPARSE = [32, 32, 4, 16]  # the sparse step of toca_schedule(spec, 4, 0.8, full_every=2), asserted below
LIMIT = 8


def _pack(latents):
    """FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(latents, h, w):
    """FluxPipeline._unpack_latents (h, w: latent pixels)."""
    b, _, c = latents.shape
    latents = latents.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, c // 4, h, w)


def _image_ids(h, w):
    """FluxPipeline._prepare_latent_image_ids (h, w: packed token grid)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _diffusers(spec, packed, text, pooled, t):
    """The diffusers transformer as FluxPipeline calls it; t: diffusers' timesteps (sigma * 1000)."""
    with torch.no_grad():
        return spec.model(packed, encoder_hidden_states=text, pooled_projections=pooled, timestep=t / 1000,
                          img_ids=_image_ids(*spec.grid), txt_ids=torch.zeros(spec.text_len, 3)).sample


@pytest.fixture(scope="module", autouse=True)
def small_topk_limit():
    """Every selection here runs with a TopK limit of 8 instead of TensorRT's 3840, so the tiny
    model's selections split into chunks the way FLUX's do at 1024² (N=4096, K > 3840): K=32 of 64
    tokens becomes 4 chunks of 16 tokens that pick 8 each; K <= 8 stays one TopK."""
    real = tc.top_tokens
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tc, "top_tokens", lambda score, k: real(score, k, limit=LIMIT))
        yield


@pytest.fixture(scope="module")
def spec():
    return make_spec(TINY, batch_size=2, guidance=False)


@pytest.fixture(scope="module")
def conditioning(spec):
    return spec.example_conditioning(np.random.default_rng(7))


def run_step(spec, module, latent, t_index, conditioning, cache, plan=None):
    plan = plan or spec.sampler_plan(STEPS)
    feeds = spec.feeds(StepCall(float(plan.timesteps[t_index]), plan.coefficients[t_index]), conditioning, 1.0)
    args = [torch.from_numpy(feeds[s.name]) for s in spec.step_inputs()[1:]]
    with torch.no_grad():
        out = module(latent, *args, *cache)
    return out[0], list(out[1:])


def _filled_cache(spec, conditioning, sel):
    """Latent and token cache after one dense step from fresh noise."""
    dense = spec.build_step(spec.dense_keep(), sel)
    x = torch.from_numpy(initial_noise(3, spec.batch_size, spec.latent_shape))
    return run_step(spec, dense, x, 0, conditioning, spec.cache_layout(sel).zeros())


def test_structure(spec):
    assert spec.latent_shape == (4, 16, 16) and spec.num_tokens == 64 and spec.grid == (8, 8)
    assert [(l.block, l.kind) for l in spec.layers] == [(0, "SA"), (0, "MLP"), (0, "TMLP"), (1, "MLP")]
    assert spec.dense_keep() == [64, 64, 8, 64]
    assert spec.score_grid(spec.layers[2]) is None and spec.score_grid(spec.layers[0]) == (8, 8)
    assert [t.name for t in spec.step_inputs()] == ["latent", "timestep", "sampler_coef", "prompt_embeds",
                                                    "pooled_prompt_embeds"]


def test_dense_step_reproduces_diffusers_forward(spec):
    sel = spec.default_selector()
    step = spec.build_step(spec.dense_keep(), sel)
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(2, *spec.latent_shape, generator=g)
    text, pooled = torch.randn(2, 8, 32, generator=g), torch.randn(2, 24, generator=g)
    t = torch.tensor([937.5, 250.0])
    with torch.no_grad():
        packed = step.pack(latent)
        state = dict(zip(step.cache_names, spec.cache_layout(sel).zeros()))
        ours = step.forward_rows(packed, text, pooled, t / 1000, state, StepEntries())
    assert torch.equal(packed, _pack(latent)) and torch.equal(step.unpack(packed), latent)
    ref = _diffusers(spec, packed, text, pooled, t)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


SELECTORS = {"default": None, "recv": SelectorConfig("attention", (1.0, 1.0, 0.25 / 3, 0.4), 4),
             "cosine": SelectorConfig("cosine", (1.0, 0.0, 0.25 / 3, 0.4), 4)}


@pytest.mark.parametrize("selector", SELECTORS)
def test_sparse_step_recomputes_exactly_k_image_tokens(spec, conditioning, selector):
    sel = SELECTORS[selector] or spec.default_selector()
    latent, cache = _filled_cache(spec, conditioning, sel)
    names = spec.cache_layout(sel).names
    before = dict(zip(names, cache))
    for keep in (SPARSE, [0, 16, 8, 0]):
        _, new = run_step(spec, spec.build_step(keep, sel), latent, 1, conditioning, cache)
        after = dict(zip(names, new))
        for layer, k in zip(spec.layers, keep):
            changed = (before[f"out.{layer.name}"] != after[f"out.{layer.name}"]).any(-1)
            assert (changed.sum(1) == k).all(), (layer, k, changed.sum(1))
            assert ((after[f"reuse.{layer.name}"] == 0).sum(1) == k).all()
        if keep == SPARSE:  # K=32 > LIMIT: 8 from each quarter of the image (raster bands of 2 rows)
            per_chunk = (after["reuse.sa0"] == 0).reshape(2, 4, 16).sum(-1)
            assert (per_chunk == 8).all(), per_chunk
        k_sa = keep[0]
        for key in ("key.sa0", "value.sa0", "ent.sa0", "inp.sa0"):
            if key not in before:
                continue
            changed = before[key] != after[key]
            changed = changed.any(-1) if changed.ndim == 3 else changed
            assert (changed.sum(1) == k_sa).all(), (key, changed.sum(1))
        if "recv.sa0" in after:  # attention received by image and text keys, from this step's queries
            assert not torch.equal(after["recv.sa0"], before["recv.sa0"])
            assert after["recv.tmlp0"].shape == (2, spec.text_len)


@pytest.mark.parametrize("keep", [[64, 64, 8, 64], SPARSE, [0, 0, 0, 0], [16, 0, 8, 48]])
def test_macs_count_what_is_computed(spec, conditioning, keep, count_macs):
    """The spec's MACs equal PyTorch's FLOP count / 2 of the matmuls run."""
    sel = spec.default_selector()
    latent, cache = _filled_cache(spec, conditioning, sel)
    step = spec.build_step(keep, sel)
    assert spec.step_macs(keep) == count_macs(run_step, spec, step, latent, 1, conditioning, cache)


@pytest.fixture(scope="module")
def bundles(spec, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    toca = toca_schedule(spec, STEPS, 0.8, full_every=2)
    assert toca.keep[1] == SPARSE, "the tiny ToCa schedule must have partial layers of every kind"
    out = {}
    for name, sched in {"dense": dense_schedule(spec, STEPS), "toca": toca}.items():
        out[name] = root / name
        export_bundle(spec, sched, out[name], source={"model": TINY, "seed": 0}, config=ExportConfig())
    return out


def test_graphs_stay_in_tensorrt_subset(bundles):
    """(export_bundle checks this too) the dynamo exporter's Gathers keep int32 indices."""
    from diffsparse.manifest import Manifest

    m = Manifest.load(bundles["toca"])
    problems = [tensorrt_problems(onnx.load(str(bundles["toca"] / g.file), load_external_data=False))
                for g in m.graphs]
    assert len(problems) >= 2 and all(p == [] for p in problems), problems


def test_sparse_bundle_matches_pytorch(bundles, conditioning):
    from diffsparse.manifest import Manifest

    m = Manifest.load(bundles["toca"])
    # one graph per (K pattern, cache entries written): the full step before a sparse one writes the
    # cache, the last full step does not
    assert {tuple(g.keep) for g in m.graphs} == {(64, 64, 8, 64), tuple(SPARSE)}
    assert all(g.parity_max_abs_err < 1e-4 for g in m.graphs), [g.parity_max_abs_err for g in m.graphs]
    sparse = next(g for g in m.graphs if g.keep == SPARSE)
    assert "TopK" in sparse.ops and "ScatterND" in sparse.ops
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(bundles["toca"] / sparse.file)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.graph.value_info}
    topk = sorted(shapes[n.output[1]] for n in graph.graph.node if n.op_type == "TopK")
    # chunked selections (SA, MLP: 4 x 8 of 16; single MLP: 2 x 8 of 32) and a plain one (TMLP: 4 of 8)
    assert topk == [[2, 2, 8], [2, 4], [2, 4, 8], [2, 4, 8]], topk
    # the whole schedule, ONNX Runtime against the eager PyTorch reference
    a = Pipeline.from_bundle(bundles["toca"]).generate(conditioning=conditioning, seed=2, guidance_scale=1.0)
    b = Pipeline.from_bundle(bundles["toca"], backend="torch").generate(conditioning=conditioning, seed=2,
                                                                         guidance_scale=1.0)
    assert a.samples.shape == (2, 4, 16, 16)
    assert np.abs(a.samples - b.samples).max() < 1e-4


def test_dense_bundle_reproduces_diffusers_sampling(bundles, spec, conditioning):
    """Runtime (ORT), dense schedule == diffusers transformer + FlowMatchEulerDiscreteScheduler with
    FluxPipeline's sigmas, from the same noise."""
    result = Pipeline.from_bundle(bundles["dense"]).generate(conditioning=conditioning, seed=1)
    sched = spec.sampler.scheduler()
    sched.set_timesteps(STEPS, sigmas=np.linspace(1.0, 1 / STEPS, STEPS))
    x = _pack(torch.from_numpy(initial_noise(1, 2, spec.latent_shape)))
    text = torch.from_numpy(conditioning["prompt_embeds"])
    pooled = torch.from_numpy(conditioning["pooled_prompt_embeds"])
    for t in sched.timesteps:
        x = sched.step(_diffusers(spec, x, text, pooled, t.expand(2)), t, x).prev_sample
    ref = _unpack(x, 16, 16).numpy()
    assert np.abs(result.samples - ref).max() < 1e-4
    assert not np.allclose(ref, initial_noise(1, 2, spec.latent_shape), atol=0.1)


def test_clear_errors(spec, bundles):
    with pytest.raises(ValueError, match="guidance-distilled.*--no-guidance"):
        make_spec(TINY)
    from diffusers import FluxTransformer2DModel

    dev = FluxTransformer2DModel(**{**BUILTINS[TINY].config, "guidance_embeds": True})
    with pytest.raises(NotImplementedError, match="not yet supported"):
        FluxSpec(dev, guidance=False, options=BUILTINS[TINY].options)
    with pytest.raises(ValueError, match="multiples of 16"):
        make_spec(TINY, guidance=False, options={"height": 120})
    with pytest.raises(NotImplementedError, match="value_norm"):
        spec.build_step(spec.dense_keep(), SelectorConfig("value_norm", (1.0, 0.0, 0.0, 0.0), 4))
    pipe = Pipeline.from_bundle(bundles["dense"])
    good = spec.example_conditioning(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"'prompt_embeds' must have shape \(2, 8, 32\)"):
        pipe.generate(conditioning={**good, "prompt_embeds": np.zeros((2, 16, 32), np.float32)})
    with pytest.raises(ValueError, match="'pooled_prompt_embeds' is missing"):
        pipe.generate(conditioning={"prompt_embeds": good["prompt_embeds"]})


def test_forecasting_skips_on_flow_matching(spec, conditioning, tmp_path):
    """Flow-matching Euler with forecasting skips: the bundle (5-coefficient rows, x0 as sampler
    state) runs the same on ONNX Runtime, the bundle's torch module and the model's own pipeline."""
    sched = fewer_steps_schedule(spec, STEPS, 0.5).forecasting()
    export_bundle(spec, sched, tmp_path / "b", config=ExportConfig())
    ort = Pipeline.from_bundle(tmp_path / "b").generate(seed=3, conditioning=conditioning)
    torch_bundle = Pipeline.from_bundle(tmp_path / "b", backend="torch").generate(seed=3, conditioning=conditioning)
    reference = Pipeline.from_spec(spec, sched).generate(seed=3, conditioning=conditioning)
    assert reference.samples.shape == ort.samples.shape
    for other in (torch_bundle, reference):
        assert np.abs(ort.samples - other.samples).max() < 1e-3
