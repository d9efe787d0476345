"""DiT (diffusers `DiTTransformer2DModel`, class-conditional, adaLN-zero): spec and token-cached step.

Cacheable layers per block: self-attention (SA) and MLP; DiT has no cross-attention. The layer
mechanics (partial self-attention over a key/value cache, gathered MLP) are in models/cached.py,
the DiT step in models/dit_step.py, its differentiable training twin in models/dit_masked.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from diffsparse.conditioning import ConditioningPlan
from diffsparse.models.base import ModelSpec, register
from diffsparse.models.dit_masked import DiTMaskedStep
from diffsparse.models.dit_step import DiTCachedStep
from diffsparse.schedule import LayerRef, SelectorConfig
from diffsparse.tensors import TensorSpec


@register
class DiTSpec(ModelSpec):
    family = "dit"
    diffusers_class = "DiTTransformer2DModel"
    sampler_kind = "ddim"

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        """kwargs: as for ModelSpec (batch_size, guidance, sampler, options, guidance_scale)."""
        super().__init__(model, **kwargs)
        cfg = model.config
        if cfg.norm_type != "ada_norm_zero":
            raise NotImplementedError(f"DiT norm_type {cfg.norm_type!r} is not yet supported (ada_norm_zero only)")
        self.patch = cfg.patch_size
        self.grid = (cfg.sample_size // self.patch, cfg.sample_size // self.patch)
        self.dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        self.in_channels = cfg.in_channels
        self.out_channels = model.out_channels
        self.num_classes = cfg.num_embeds_ada_norm
        ff = model.transformer_blocks[0].ff
        self.ff_dim = ff.net[-1].in_features

    # ---- structure -------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def layers(self) -> list[LayerRef]:
        return [LayerRef(b, kind) for b in range(len(self.model.transformer_blocks)) for kind in ("SA", "MLP")]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        size = self.model.config.sample_size
        return (self.in_channels, size, size)

    @property
    def null_class(self) -> int:
        """diffusers' LabelEmbedding appends one row after the classes for the unconditional label."""
        return self.num_classes

    def default_selector(self) -> SelectorConfig:
        # the value norm (DuCa), not the paper's attention received: by issue 17's rule, the fastest
        # score within 0.5 point accuracy and 5% FID of attention received on mnist-dit (README
        # "Token scores"); at DiT-XL/2 size the two cost the same and both pass export parity
        return SelectorConfig(score="value_norm", lambdas=(1.0, 0.0, 0.25 / 3, 0.6), window=2)

    def model_config(self) -> dict[str, Any]:
        return {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}

    # ---- graph signature -------------------------------------------------------------------
    def conditioning_inputs(self) -> list[TensorSpec]:
        return [TensorSpec("class_labels", (self.batch_size,), "int32")]

    def build_step(self, keep: Sequence[int], selector: SelectorConfig, layer_cache: bool = True,
                   conditioning: ConditioningPlan | None = None) -> nn.Module:
        return DiTCachedStep(self, list(keep), selector, layer_cache, conditioning)

    def conditioning_width(self) -> int:
        """Every block's adaLN-zero modulation (6·D) and the output layer's shift and scale (2·D)."""
        return len(self.model.transformer_blocks) * 6 * self.dim + 2 * self.dim

    def build_masked_step(self, token_counts: Sequence[int], selector: SelectorConfig) -> nn.Module:
        return DiTMaskedStep(self, list(token_counts), selector)

    def check_conditioning(self, conditioning: dict[str, np.ndarray]) -> None:
        super().check_conditioning(conditioning)
        labels = np.asarray(conditioning["class_labels"])
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must be in [0, {self.num_classes - 1}], got {labels.tolist()}")

    def example_conditioning(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"class_labels": rng.integers(0, self.num_classes, self.batch_size).astype(np.int64)}

    # ---- cost ------------------------------------------------------------------------------
    def layer_macs(self, layer: LayerRef, keep: int) -> int:
        d, n = self.dim, self.num_tokens
        if layer.kind == "SA":
            return 4 * keep * d * d + 2 * keep * n * d
        return 2 * keep * d * self.ff_dim

    def fixed_macs(self) -> int:
        d, n, p = self.dim, self.num_tokens, self.patch
        patch_embed = n * p * p * self.in_channels * d
        head = n * d * p * p * self.out_channels
        return patch_embed + self.conditioning_macs() + head

    def conditioning_macs(self) -> int:
        d, blocks = self.dim, len(self.model.transformer_blocks)
        # per block: timestep MLP (256·D + D·D) and adaLN modulation (D·6D); the output layer's
        # timestep MLP (block 0's, again) and modulation (D·2D)
        return blocks * (256 * d + d * d + 6 * d * d) + (256 * d + d * d) + 2 * d * d
