"""Built-in models: the committed MNIST DiT weights load and match their checksums."""

import hashlib

import pytest

from diffsparse.models.base import SpecError
from diffsparse.models.zoo import WEIGHTS_DIR, ModelSourceError, load_model, make_spec


def test_committed_mnist_weights_match_their_checksums():
    folder = WEIGHTS_DIR / "mnist-dit"
    lines = (folder / "SHA256SUMS.txt").read_text().split("\n")
    entries = [line.split("  ", 1) for line in lines if line.strip()]
    assert {name for _, name in entries} >= {"transformer/diffusion_pytorch_model.safetensors",
                                            "transformer/config.json", "scheduler/scheduler_config.json"}
    for digest, name in entries:
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert (folder / "transformer/diffusion_pytorch_model.safetensors").stat().st_size <= 25 * 2**20


def test_mnist_dit_builtin_loads_as_a_dit_with_its_sampler():
    family, model, sched = load_model("mnist-dit")
    assert family == "dit" and not model.training
    assert model.config.in_channels == 1 and model.config.sample_size == 32 and model.config.patch_size == 2
    spec = make_spec("mnist-dit", batch_size=10)
    assert spec.num_tokens == 256 and len(spec.layers) == 2 * model.config.num_layers
    assert spec.null_class == 10
    assert not spec.sampler.clip_sample and spec.sampler.timestep_spacing == "trailing"
    assert not spec.sampler.set_alpha_to_one
    # the scale it samples best at (README's sweep), not DiTPipeline's 4.0
    assert spec.default_guidance_scale == 1.75
    assert make_spec("mnist-dit", guidance_scale=2.0).default_guidance_scale == 2.0


def test_default_guidance_scale_is_the_family_pipelines():
    assert make_spec("dit-tiny").default_guidance_scale == 4.0
    assert make_spec("pixart-tiny").default_guidance_scale == 4.5
    assert make_spec("wan-tiny").default_guidance_scale == 5.0
    with pytest.raises(SpecError, match="finite"):
        make_spec("dit-tiny", guidance_scale=float("nan"))


def test_missing_model_sources_are_named(tmp_path):
    with pytest.raises(ModelSourceError, match="neither a built-in"):
        load_model("nonexistent-model")
    with pytest.raises(ModelSourceError, match="has no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ModelSourceError, match="not supported yet"):
        load_model(tmp_path)
