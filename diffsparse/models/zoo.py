"""Where models come from: a local diffusers folder, or a built-in config (random weights).

Weights are always read from local disk; nothing is fetched from a hub at run time.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffsparse.models import lazy
from diffsparse.models import registered_families, spec_class
from diffsparse.models.base import ModelSpec

log = logging.getLogger(__name__)

def families() -> dict[str, str]:
    """diffusers class name -> our family name, from the registered specs."""
    return {cls.diffusers_class: family for family, cls in registered_families().items()}


@dataclass(frozen=True)
class BuiltinModel:
    """A named model shipped with diffsparse: trained weights in a package folder (`folder`, a
    diffusers pipeline layout with transformer/ and scheduler/), or a config built with seeded
    random weights (`folder` None)."""

    family: str
    diffusers_class: str
    config: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    folder: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the spec's OPTIONS for this model
    # larger than a build machine's RAM: weights initialised module by module (models/lazy.py),
    # streamed into the bundle by the exporter when asked (make_spec(streamed_weights=True))
    streamed: bool = False
    # the guidance scale this model samples best at (None: its family's pipeline default)
    guidance_scale: float | None = None


WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"

BUILTINS: dict[str, BuiltinModel] = {
    "mnist-dit": BuiltinModel(
        "dit", "DiTTransformer2DModel", folder="mnist-dit", guidance_scale=1.75,  # lowest FID of the README's sweep
        description="class-conditional pixel-space DiT trained on MNIST (32x32, patch 2 = 256 tokens, "
                    "6 blocks, width 96); trained by diffsparse.mnist.recipe"),
    "dit-tiny": BuiltinModel(
        "dit", "DiTTransformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
             sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero"),
        description="2-block DiT on a 16x16x4 latent (64 tokens), random weights: for tests"),
    "dit-small": BuiltinModel(
        "dit", "DiTTransformer2DModel",
        dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, num_layers=6,
             sample_size=32, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero"),
        description="6-block, width-128 DiT on a 32x32x4 latent (256 tokens), random weights"),
    "dit-xl-2": BuiltinModel(
        "dit", "DiTTransformer2DModel",
        dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
             sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero"),
        description="DiT-XL/2 at 256x256 (32x32x4 latent, 256 tokens, 28 blocks), random weights: for benchmarks"),
    # ---- PixArt-α ----
    "pixart-tiny": BuiltinModel(
        "pixart", "PixArtTransformer2DModel",
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
             sample_size=16, patch_size=2, cross_attention_dim=32, caption_channels=24,
             norm_type="ada_norm_single", use_additional_conditions=False),
        options={"text_len": 8},
        description="2-block PixArt on a 16x16x4 latent (64 tokens), 8 text tokens, random weights: for tests"),
    "pixart-alpha-256": BuiltinModel(
        "pixart", "PixArtTransformer2DModel",
        dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
             sample_size=32, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
             norm_type="ada_norm_single", use_additional_conditions=False),
        options={"text_len": 120},
        description="PixArt-α XL/2 at 256x256 (256 tokens, 28 blocks, T5 text of 120 tokens), random weights"),
    # ---- FLUX.1 ----
    "flux-tiny": BuiltinModel(
        "flux", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=False,
             axes_dims_rope=(4, 6, 6)),
        options={"height": 128, "width": 128, "text_len": 8},
        description="1+1-block FLUX at 128x128 (4-channel latent, 64 image + 8 text tokens), random weights: for tests"),
    "flux-schnell-256": BuiltinModel(
        "flux", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
             axes_dims_rope=(16, 56, 56)),
        options={"height": 256, "width": 256, "text_len": 256}, streamed=True,
        description="FLUX.1-schnell (19 double + 38 single blocks, 12B params) at 256x256, random weights "
                    "(initialised module by module; dsexport streams them to disk)"),
    # ---- Wan2.1 ----
    "wan-tiny": BuiltinModel(
        "wan", "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
             text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        options={"num_frames": 5, "height": 64, "width": 64, "text_len": 8},
        description="2-block Wan on 5 frames of 64x64 (2x4x4 = 32 video tokens), random weights: for tests"),
    "wan2.1-1.3b": BuiltinModel(
        "wan", "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
             out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        options={"num_frames": 81, "height": 480, "width": 832, "text_len": 512},
        description="Wan2.1-T2V-1.3B (30 blocks) at 832x480, 81 frames (32,760 video tokens), random weights"),
}


class ModelSourceError(ValueError):
    pass


def _diffusers_class(name: str):
    import diffusers

    if name not in families():
        raise ModelSourceError(f"diffusers class {name!r} is not supported yet; supported: {sorted(families())}")
    return getattr(diffusers, name)


def load_model(source: str | Path, seed: int = 0,
               streamed_weights: bool = False) -> tuple[str, torch.nn.Module, dict[str, Any]]:
    """Return (family, model, scheduler config) for a built-in name or a local diffusers folder.

    A built-in marked `streamed` is initialised module by module (`models/lazy.py`); with
    `streamed_weights` its parameters stay on the meta device until the exporter streams them
    into a bundle, otherwise they are materialised in memory (the same values either way).

    A folder may be a transformer folder (config.json + weights) or a pipeline folder with
    `transformer/` and optionally `scheduler/scheduler_config.json`.
    """
    if str(source) in BUILTINS and BUILTINS[str(source)].folder:
        path = WEIGHTS_DIR / BUILTINS[str(source)].folder
        if not (path / "transformer" / "config.json").is_file():
            raise ModelSourceError(f"the weights of built-in model {source!r} are missing from {path}; "
                                   "reinstall diffsparse from a complete checkout")
        return load_model(path, seed)
    if str(source) in BUILTINS:
        b = BUILTINS[str(source)]
        cls = _diffusers_class(b.diffusers_class)
        if b.streamed:
            model = lazy.build_lazy(cls, b.config, seed)
            return b.family, (model if streamed_weights else lazy.materialize(model)), dict(b.sampler)
        torch.manual_seed(seed)
        model = cls(**b.config).eval()
        log.info("built %s with random weights (seed %d)", source, seed)
        return b.family, model, dict(b.sampler)
    path = Path(source)
    if not path.exists():
        raise ModelSourceError(
            f"model {source!r} is neither a built-in ({', '.join(sorted(BUILTINS))}) nor an existing folder")
    sched_cfg: dict[str, Any] = {}
    if (path / "transformer" / "config.json").is_file():
        sched_file = path / "scheduler" / "scheduler_config.json"
        if sched_file.is_file():
            sched_cfg = json.loads(sched_file.read_text())
        path = path / "transformer"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{path} has no config.json: expected a diffusers model or pipeline folder")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise ModelSourceError(f"{config_file} is not valid JSON: {e}") from None
    cls = _diffusers_class(class_name)
    return families()[class_name], _from_folder(cls, path), sched_cfg


def _from_folder(cls, path: Path) -> torch.nn.Module:
    """diffusers' from_pretrained (low_cpu_mem_usage=False works without `accelerate`), falling
    back to config + state dict for classes diffusers will not load that way without it (Wan's
    fp32-kept modules)."""
    try:
        return cls.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False).eval()
    except (ImportError, ValueError) as e:
        if "accelerate" not in str(e) and "keep_in_fp32_modules" not in str(e):
            raise
    from diffusers.models.model_loading_utils import load_state_dict

    model = cls.from_config(cls.load_config(str(path)))
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in path.glob("diffusion_pytorch_model*.safetensors")]
    if not files:
        raise ModelSourceError(f"{path} has no diffusion_pytorch_model*.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_state_dict(str(path / name)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelSourceError(f"weights in {path} do not fit its config: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    log.info("loaded %s from %s without accelerate (config + state dict)", cls.__name__, path)
    return model.eval()


def make_spec(source: str | Path, batch_size: int = 1, guidance: bool = True, seed: int = 0,
              sampler_overrides: dict[str, Any] | None = None, options: dict[str, Any] | None = None,
              streamed_weights: bool = False, guidance_scale: float | None = None) -> ModelSpec:
    """Load a model and wrap it in its family's spec (options: the family's OPTIONS, over a
    built-in model's own; streamed_weights: see `load_model`; guidance_scale: the default scale,
    over a built-in model's own and its family's)."""
    family, model, sched_cfg = load_model(source, seed, streamed_weights)
    cls = spec_class(family)
    sampler = cls.make_sampler({**sched_cfg, **(sampler_overrides or {})})
    builtin = BUILTINS.get(str(source), BuiltinModel(family, type(model).__name__))
    return cls(model, batch_size=batch_size, guidance=guidance, sampler=sampler,
               options={**builtin.options, **(options or {})},
               guidance_scale=guidance_scale if guidance_scale is not None else builtin.guidance_scale)


def spec_from_config(family: str, diffusers_class: str, config: dict[str, Any], batch_size: int,
                     guidance: bool, sampler: dict[str, Any], options: dict[str, Any] | None = None,
                     guidance_scale: float | None = None) -> ModelSpec:
    """Rebuild a spec from what a bundle manifest records. The model is built on the meta device
    (no memory, no init time): the runtime needs its structure, not its weights."""
    cls = _diffusers_class(diffusers_class)
    with torch.device("meta"):
        model = cls(**config).eval()
    spec_cls = spec_class(family)
    return spec_cls(model, batch_size=batch_size, guidance=guidance, sampler=spec_cls.make_sampler(sampler),
                    options=options, guidance_scale=guidance_scale)
