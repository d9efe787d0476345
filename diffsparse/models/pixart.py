"""PixArt-α (diffusers `PixArtTransformer2DModel`, T5-text-conditional, adaLN-single): spec and
token-cached step.

Cacheable layers per block: self-attention (SA), cross-attention over the text (CA) and MLP. The
block is diffusers' `BasicTransformerBlock` with norm_type "ada_norm_single": one timestep
embedding t6 = adaln_single(t) (R, 6D) is shared by every block, each block adds its own table,
    shift/scale/gate_{msa,mlp} = block.scale_shift_table + t6.reshape(R, 6, D)
    h += gate_msa · attn1(norm1(h)·(1 + scale_msa) + shift_msa)         SA
    h += attn2(h, text)                                                  CA: no norm, no modulation, no gate
    h += gate_mlp · ff(norm2(h)·(1 + scale_mlp) + shift_mlp)             MLP
and the head modulates with the model's own table and the *unprojected* timestep embedding:
    shift, scale = model.scale_shift_table + embedded_t;  proj_out(norm_out(h)·(1 + scale) + shift).
The text is caption_projection(prompt_embeds) (two linears, tanh-GELU); the padding mask becomes
the additive bias (1 - mask)·(-10000) on the cross-attention logits, exactly as diffusers does.

MACs per row (D width, N image tokens, M text tokens, K recomputed tokens, p patch, F the MLP's
hidden width, C_in/C_out latent/output channels, C_cap caption channels, D_ctx cross_attention_dim,
L blocks, S = D/3 the micro-condition width):
    SA   4·K·D² + 2·K·N·D                   q, k, v, out projections; attention over N tokens
    CA   2·K·D² + 2·K·M·D                   q and out projections; attention over M text tokens
    MLP  2·K·D·F
    fixed  patch embed            N·p²·C_in·D
           timestep embedding     256·D + D²  and adaLN-single D·6D (once per step, shared by blocks)
           micro-conditions       3·(256·S + S²)  (only models with use_additional_conditions, 1024²)
           caption projection     M·(C_cap·D + D²)          ┐ the same text every step: under a
           text keys/values       L·2·M·D_ctx·D             ┘ plan only refresh steps compute them
           head                   N·D·p²·C_out                (diffsparse/conditioning.py)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from diffsparse.conditioning import ConditioningPlan
from diffsparse.models.base import ModelSpec, register
from diffsparse.tensors import TensorSpec
from diffsparse.models.cached import CachedStep, StepEntries
from diffsparse.schedule import LayerRef, SelectorConfig

KINDS = ("SA", "CA", "MLP")
#: diffusers' additive bias for a padded text token (PixArtTransformer2DModel.forward)
MASKED_BIAS = -10000.0
#: pixels per latent pixel of PixArt-α's VAE: the 1024² models' micro-conditions are in pixels
VAE_SCALE = 8


def text_bias(mask: torch.Tensor) -> torch.Tensor:
    """(R, M) mask, 1 = real token, 0 = padding -> additive bias (R, 1, 1, M) broadcast over heads
    and queries: the same arithmetic as diffusers, so softmax weights match bit for bit."""
    return ((1.0 - mask) * MASKED_BIAS)[:, None, None, :]


@register
class PixArtSpec(ModelSpec):
    family = "pixart"
    diffusers_class = "PixArtTransformer2DModel"
    sampler_kind = "dpmpp_2m"
    default_guidance_scale = 4.5  # PixArtAlphaPipeline's
    # the dynamo exporter's PixArt graph is rejected by ONNX Runtime
    onnx_exporter = "torchscript"
    OPTIONS: ClassVar[dict[str, Any]] = {"text_len": 120}

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        """kwargs: as for ModelSpec (batch_size, guidance, sampler, options, guidance_scale)."""
        super().__init__(model, **kwargs)
        cfg = model.config
        if cfg.norm_type != "ada_norm_single":
            raise NotImplementedError(f"PixArt norm_type {cfg.norm_type!r} is not supported (ada_norm_single only)")
        if cfg.cross_attention_dim is None:
            raise NotImplementedError("PixArt models without cross-attention are not supported")
        self.text_len = self.int_option("text_len")
        self.patch = cfg.patch_size
        self.grid = (cfg.sample_size // self.patch, cfg.sample_size // self.patch)
        self.dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.in_channels = cfg.in_channels
        self.out_channels = model.out_channels
        self.context_dim = cfg.cross_attention_dim
        # without a caption projection the text goes straight into the cross-attention
        self.caption_channels = cfg.caption_channels if cfg.caption_channels is not None else self.context_dim
        self.micro_conditions = bool(model.use_additional_conditions)
        self.ff_dim = model.transformer_blocks[0].ff.net[-1].in_features

    # ---- structure -------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def layers(self) -> list[LayerRef]:
        return [LayerRef(b, kind) for b in range(len(self.model.transformer_blocks)) for kind in KINDS]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        size = self.model.config.sample_size
        return (self.in_channels, size, size)

    def default_selector(self) -> SelectorConfig:
        # the paper's PixArt-α setting: no attention-received score, cross-attention entropy, k = 4
        return SelectorConfig(score="attention", lambdas=(0.0, 1.0, 0.25 / 3, 0.4), window=4)

    def model_config(self) -> dict[str, Any]:
        return {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}

    # ---- graph signature -------------------------------------------------------------------
    def text_inputs(self) -> list[tuple[str, str]]:
        """(embeddings, mask) input names per guidance half, conditional first."""
        pairs = [("prompt_embeds", "prompt_attention_mask")]
        if self.guidance:
            pairs.append(("negative_prompt_embeds", "negative_prompt_attention_mask"))
        return pairs

    def conditioning_inputs(self) -> list[TensorSpec]:
        b, m = self.batch_size, self.text_len
        out = []
        for embeds, mask in self.text_inputs():
            out += [TensorSpec(embeds, (b, m, self.caption_channels)), TensorSpec(mask, (b, m))]
        return out

    def build_step(self, keep: Sequence[int], selector: SelectorConfig, layer_cache: bool = True,
                   conditioning: ConditioningPlan | None = None) -> nn.Module:
        return PixArtCachedStep(self, list(keep), selector, layer_cache, conditioning)

    def check_conditioning(self, conditioning: dict[str, np.ndarray]) -> None:
        super().check_conditioning(conditioning)
        for _, name in self.text_inputs():
            mask = np.asarray(conditioning[name])
            if not np.isin(mask, (0, 1)).all():
                raise ValueError(f"{name!r} must hold only 0 (padding) and 1 (text token)")
            if (mask.sum(axis=1) < 1).any():
                raise ValueError(f"every row of {name!r} needs at least one text token (a 1); "
                                 "encode an empty prompt as the T5 tokenizer does (its end-of-text token)")

    def example_conditioning(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        b, m = self.batch_size, self.text_len
        out: dict[str, np.ndarray] = {}
        for embeds, mask in self.text_inputs():
            out[embeds] = rng.standard_normal((b, m, self.caption_channels)).astype(np.float32)
            lengths = rng.integers(1, max(2, m), b)  # 1 .. M-1 real tokens: some padding when M > 1
            out[mask] = (np.arange(m)[None] < lengths[:, None]).astype(np.float32)
        return out

    # ---- cost ------------------------------------------------------------------------------
    def layer_macs(self, layer: LayerRef, keep: int) -> int:
        d, n, m = self.dim, self.num_tokens, self.text_len
        if layer.kind == "SA":
            return 4 * keep * d * d + 2 * keep * n * d
        if layer.kind == "CA":
            return 2 * keep * d * d + 2 * keep * m * d
        return 2 * keep * d * self.ff_dim

    def fixed_macs(self) -> int:
        d, n, p = self.dim, self.num_tokens, self.patch
        patch_embed = n * p * p * self.in_channels * d
        timestep = 256 * d + d * d + 6 * d * d
        if self.micro_conditions:
            s = self.model.adaln_single.emb.outdim
            timestep += 3 * (256 * s + s * s)
        head = n * d * p * p * self.out_channels
        return patch_embed + timestep + self.context_macs() + head

    def context_kv_shape(self, layer: LayerRef) -> tuple[int, int, int] | None:
        """Every cross-attention layer's text keys and values are step-invariant (the text is)."""
        cfg = self.model.config
        return (cfg.num_attention_heads, self.text_len, cfg.attention_head_dim) if layer.kind == "CA" else None

    def context_macs(self) -> int:
        d, m, blocks = self.dim, self.text_len, len(self.model.transformer_blocks)
        # the caption projection (a 2-layer MLP over the M text tokens) and each block's W_k, W_v
        caption = m * (self.caption_channels * d + d * d) if self.model.caption_projection is not None else 0
        return caption + blocks * 2 * m * self.context_dim * d


class PixArtCachedStep(CachedStep):
    """One denoising step of PixArt-α with a static sparsity pattern `keep` (K per cacheable layer).

    forward(latent, timestep, sampler_coef, prompt_embeds, prompt_attention_mask
            [, negative_prompt_embeds, negative_prompt_attention_mask, guidance_scale], *cache)
        -> (next_latent, *cache')
    """

    def predict(self, inputs, state, new) -> torch.Tensor:
        """The transformer on the guidance rows (unconditional second) -> predicted noise (R, C, H, W)."""
        pairs = self.spec.text_inputs()
        context = torch.cat([inputs[embeds] for embeds, _ in pairs])
        mask = torch.cat([inputs[m] for _, m in pairs])
        x = self.rows(inputs["latent"])
        out = self.forward_rows(x, inputs["timestep"].expand(x.shape[0]), context, mask, state, new)
        # learned sigma: 2C output channels, the first C are the noise
        return out[:, : self.spec.in_channels]

    def forward_rows(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor,
                     state: dict[str, torch.Tensor], new: StepEntries) -> torch.Tensor:
        """The transformer on rows x (R, C, H, W), per-row timesteps t (R,), text (R, M, C_cap) and
        its mask (R, M) -> raw output (R, C_out, H, W); the new cache goes into `new`."""
        model = self.model
        rows = x.shape[0]
        h = model.pos_embed(x)
        t6, embedded_t = model.adaln_single(t, self._micro_conditions(rows, x), batch_size=rows,
                                            hidden_dtype=h.dtype)
        if model.caption_projection is not None and self.computes_text:
            context = model.caption_projection(context)
        bias = text_bias(mask.to(h.dtype))
        for b, block in enumerate(model.transformer_blocks):
            h = self._block(b, block, h, t6, context, bias, state, new)
        shift, scale = (model.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
        h = model.proj_out(model.norm_out(h) * (1 + scale) + shift)
        p, c = self.spec.patch, self.spec.out_channels
        gh, gw = self.spec.grid
        h = h.reshape(-1, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(-1, c, gh * p, gw * p)

    def _micro_conditions(self, rows: int, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The 1024² models' resolution / aspect-ratio conditions: fixed by the latent size, so
        graph constants (PixArtAlphaPipeline passes the image size in pixels)."""
        if not self.spec.micro_conditions:
            return {"resolution": None, "aspect_ratio": None}
        height, width = x.shape[-2] * VAE_SCALE, x.shape[-1] * VAE_SCALE
        resolution = torch.tensor([[float(height), float(width)]], dtype=x.dtype).repeat(rows, 1)
        aspect = torch.tensor([[float(height / width)]], dtype=x.dtype).repeat(rows, 1)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def _block(self, b: int, block: nn.Module, h: torch.Tensor, t6: torch.Tensor, context: torch.Tensor,
               bias: torch.Tensor, state: dict[str, torch.Tensor], new: StepEntries) -> torch.Tensor:
        """One BasicTransformerBlock (ada_norm_single); the three layers go through the token cache."""
        mod = block.scale_shift_table[None] + t6.reshape(t6.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        sa, ca, mlp = (LayerRef(b, kind) for kind in KINDS)
        index = self.layer_index

        def attn_in(z: torch.Tensor) -> torch.Tensor:
            return block.norm1(z) * (1 + scale_msa) + shift_msa

        def mlp_in(z: torch.Tensor) -> torch.Tensor:
            return block.norm2(z) * (1 + scale_mlp) + shift_mlp

        h = h + gate_msa * self._self_attention(index[sa], sa, block.attn1, attn_in, h, state, new)
        # diffusers feeds attn2 the raw hidden states under ada_norm_single and does not gate it
        h = h + self._cross_attention(index[ca], ca, sa, block.attn2, _identity, h, context, state, new, bias)
        return h + gate_mlp * self._mlp(index[mlp], mlp, sa, block.ff, mlp_in, h, state, new)


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z
