"""Wan2.1 text-to-video (diffusers `WanTransformer3DModel`): spec and token-cached step.

Shapes. OPTIONS are in pixels/frames: `num_frames` F (4k+1), `height` H and `width` W (multiples
of 16 with patch (1, 2, 2)) and `text_len` M (T5 tokens). The VAE compresses time 4x and space 8x,
so the latent is (C, F', H/8, W/8) with F' = (F - 1)/4 + 1; patching (p_t, p_h, p_w) gives
N = F'/p_t · H/(8 p_h) · W/(8 p_w) video tokens (832x480x81: 21·30·52 = 32,760).

Cacheable layers per block: SA (attn1 over the video tokens, 3-D rotary positions (f, h, w)),
CA (attn2 of the video tokens over the text; cross_attn_norm on its input, output ungated) and
MLP (ffn). The layer mechanics are in models/cached.py; here: the rotary positions of the selected
tokens (`_qkv` gathers the rotary tables with the token indices; the key cache holds keys after
rotary), Wan's q/k RMSNorm across heads (on the text keys too), and its block math, the same
arithmetic as diffusers' `WanTransformerBlock` so that the dense step reproduces its forward.

Sampler: flow-matching Euler with Wan's time shift (`flow_shift`, 3.0 at 480p when the scheduler
config does not say) over the sigmas 1, 1 - 1/T, ..., 1/T that Wan's own flow solver uses.
diffusers' WanPipeline ships UniPC (a multistep solver); we sample with first-order Euler, which
runs in the step graph without multistep state.

Selector: DuCa's value-norm score (the paper's choice for Wan2.1): tokens whose self-attention
values have smaller norms are recomputed first. It needs no attention map, so with λ2 = 0 both
attentions run as fused scaled_dot_product_attention (`_attend(need_probs=False)`).

MACs per row (D model width, N video tokens, K recomputed tokens, M text tokens, d_ff ffn_dim):
    SA   4·K·D² + 2·K·N·D            q/k/v/out projections; QKᵀ and AV over all N keys
    CA   2·K·D² + 2·K·M·D            q/out projections; QKᵀ and AV over the M text tokens
    MLP  2·K·D·d_ff
    fixed: patch embed N·(C·p_t·p_h·p_w)·D; timestep embedding f·D + D² and projection 6·D²
           (f = freq_dim); text embedding M·D_text·D + M·D²; text keys/values 2·M·D² per block;
           output projection N·D·(C_out·p_t·p_h·p_w).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from diffsparse.conditioning import ConditioningPlan
from diffsparse.models.base import ModelSpec, SpecError, register
from diffsparse.tensors import TensorSpec
from diffsparse.models.cached import CachedStep, StepEntries
from diffsparse.schedule import LayerRef, SelectorConfig

VAE_TIME, VAE_SPACE = 4, 8
#: Wan2.1's flow shift at 480p (diffusers' WanPipeline docs: 3.0 for 480p, 5.0 for 720p)
DEFAULT_FLOW_SHIFT = 3.0
KINDS = ("SA", "CA", "MLP")


@register
class WanSpec(ModelSpec):
    family = "wan"
    diffusers_class = "WanTransformer3DModel"
    sampler_kind = "flow_euler"
    default_guidance_scale = 5.0  # WanPipeline's
    # TorchScript cannot export aten::rms_norm (Wan's q/k norms)
    onnx_exporter = "dynamo"
    OPTIONS: ClassVar[dict[str, Any]] = {"num_frames": 81, "height": 480, "width": 832, "text_len": 512}

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        """kwargs: as for ModelSpec (batch_size, guidance, sampler, options, guidance_scale)."""
        super().__init__(model, **kwargs)
        cfg = model.config
        if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
            raise NotImplementedError("Wan image-to-video (image_dim / added_kv_proj_dim) is not yet supported; "
                                      "text-to-video models only")
        self.patch = tuple(int(p) for p in cfg.patch_size)
        self.heads = cfg.num_attention_heads
        self.dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.text_dim = cfg.text_dim
        self.freq_dim = cfg.freq_dim
        self.ff_dim = cfg.ffn_dim
        self.num_blocks = cfg.num_layers
        frames, height, width, self.text_len = (self.int_option(k) for k in ("num_frames", "height", "width", "text_len"))
        pt, ph, pw = self.patch
        if (frames - 1) % VAE_TIME:
            raise SpecError(f"num_frames must be 4k+1 (the VAE compresses time 4x), got {frames}")
        for name, size, p in (("height", height, ph), ("width", width, pw)):
            if size % (VAE_SPACE * p):
                raise SpecError(f"{name} must be a multiple of {VAE_SPACE * p} (VAE 8x times patch {p}), got {size}")
        self.latent_frames = (frames - 1) // VAE_TIME + 1
        if self.latent_frames % pt:
            raise SpecError(f"{self.latent_frames} latent frames do not divide into temporal patches of {pt}")
        self.latent_hw = (height // VAE_SPACE, width // VAE_SPACE)
        self.video_grid = (self.latent_frames // pt, self.latent_hw[0] // ph, self.latent_hw[1] // pw)
        if max(self.video_grid) > cfg.rope_max_seq_len:
            raise SpecError(f"token grid {self.video_grid} (frames, rows, columns) exceeds the model's "
                             f"rope_max_seq_len {cfg.rope_max_seq_len}")
        f, gh, gw = self.video_grid
        # spatial-bonus tiles run over (frames x rows, columns): tiles stay in a frame when the
        # window divides the rows (checked per selector in build_step)
        self.grid = (f * gh, gw)

    @classmethod
    def make_sampler(cls, scheduler_config: dict[str, Any]):
        """Flow-matching Euler; Wan's `flow_shift` (or `shift`) from the scheduler config, else 3.0."""
        config = dict(scheduler_config)
        if "shift" not in config and "flow_shift" not in config:
            config["flow_shift"] = DEFAULT_FLOW_SHIFT
        return super().make_sampler(config)

    # ---- structure -------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        f, gh, gw = self.video_grid
        return f * gh * gw

    @property
    def layers(self) -> list[LayerRef]:
        return [LayerRef(b, kind) for b in range(self.num_blocks) for kind in KINDS]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.latent_frames, *self.latent_hw)

    def default_selector(self) -> SelectorConfig:
        return SelectorConfig(score="value_norm", lambdas=(1.0, 0.0, 0.25 / 3, 0.6), window=2)

    def model_config(self) -> dict[str, Any]:
        return {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}

    # ---- graph signature -------------------------------------------------------------------
    def conditioning_inputs(self) -> list[TensorSpec]:
        shape = (self.batch_size, self.text_len, self.text_dim)
        embeds = [TensorSpec("prompt_embeds", shape)]
        if self.guidance:
            embeds.append(TensorSpec("negative_prompt_embeds", shape))
        return embeds

    def build_step(self, keep: Sequence[int], selector: SelectorConfig, layer_cache: bool = True,
                   conditioning: ConditioningPlan | None = None) -> nn.Module:
        rows_per_frame, cols = self.video_grid[1:]
        if selector.lambdas[3] != 0.0 and selector.window > 1 and (rows_per_frame % selector.window
                                                                    or cols % selector.window):
            raise SpecError(f"the spatial-bonus window {selector.window} must divide each frame's token grid "
                             f"{rows_per_frame}x{cols} so that its tiles stay inside a frame")
        return WanCachedStep(self, list(keep), selector, layer_cache, conditioning)

    # ---- cost ------------------------------------------------------------------------------
    def layer_macs(self, layer: LayerRef, keep: int) -> int:
        d, n = self.dim, self.num_tokens
        if layer.kind == "SA":
            return 4 * keep * d * d + 2 * keep * n * d
        if layer.kind == "CA":
            return 2 * keep * d * d + 2 * keep * self.text_len * d
        return 2 * keep * d * self.ff_dim

    def fixed_macs(self) -> int:
        d, n, m = self.dim, self.num_tokens, self.text_len
        patch = int(np.prod(self.patch))
        patch_embed = n * self.in_channels * patch * d
        timestep = self.freq_dim * d + d * d + 6 * d * d
        text = m * self.text_dim * d + m * d * d + self.num_blocks * 2 * m * d * d
        head = n * d * self.out_channels * patch
        return patch_embed + timestep + text + head


class _CrossAttention:
    """attn2 seen through the interface `CachedStep._cross_attention` uses (to_q/to_k/to_v,
    to_out, heads), with Wan's RMSNorm across heads on the queries and the text keys."""

    is_cross_attention = True

    def __init__(self, attn) -> None:
        self.attn, self.heads, self.to_out, self.to_v = attn, attn.heads, attn.to_out, attn.to_v

    def to_q(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.norm_q(self.attn.to_q(x))

    def to_k(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.norm_k(self.attn.to_k(x))


def _rows_at(tables: tuple[torch.Tensor, ...], ridx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of each position table (rotary cos/sin) at the token indices ridx (R, K) ->
    (R, K, ...) each (gather part)."""
    flat = ridx.reshape(-1)
    return tuple(torch.index_select(x, 0, flat).reshape(*ridx.shape, -1) for x in tables)


class WanCachedStep(CachedStep):
    """One denoising step of Wan2.1 with a static sparsity pattern `keep` (K per cacheable layer).

    forward(latent, timestep, sampler_coef, prompt_embeds[, negative_prompt_embeds, guidance_scale],
            *cache) -> (next_latent, *cache')
    """

    def __init__(self, spec: WanSpec, keep: list[int], selector: SelectorConfig, layer_cache: bool = True,
                 conditioning: ConditioningPlan | None = None) -> None:
        super().__init__(spec, keep, selector, layer_cache, conditioning)
        # the rotary tables of every video token (N, head_dim/2), in float32 for the graph;
        # diffusers keeps (N, head_dim) float64 tables with each frequency repeated twice
        cos, sin = self.model.rope(torch.empty((1, *spec.latent_shape), device="meta"))
        self.register_buffer("rope_cos", cos[0, :, 0, 0::2].float(), persistent=False)
        self.register_buffer("rope_sin", sin[0, :, 0, 1::2].float(), persistent=False)

    def predict(self, inputs, state, new) -> torch.Tensor:
        """The transformer on the guidance rows -> predicted velocity (R, C, F', H', W')."""
        context = inputs["prompt_embeds"]
        if self.halves == 2:
            context = torch.cat([context, inputs["negative_prompt_embeds"]])
        x = self.rows(inputs["latent"])
        return self.forward_rows(x, inputs["timestep"].expand(x.shape[0]), context, state, new)

    def forward_rows(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                     state: dict[str, torch.Tensor], new: StepEntries) -> torch.Tensor:
        """The transformer on rows x (R, C, F', H', W'), per-row timesteps t (R,) and text
        context (R, M, D_text) -> raw output (R, C_out, F', H', W'); the new cache goes into `new`."""
        model = self.model
        h = model.patch_embedding(x).flatten(2).transpose(1, 2)
        temb, tproj, context, _ = model.condition_embedder(t, context)
        tproj = tproj.unflatten(1, (6, -1))
        for b, block in enumerate(model.blocks):
            shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + tproj).chunk(6, dim=1)
            sa, ca, mlp = (LayerRef(b, kind) for kind in KINDS)

            def attn_in(z, block=block, shift=shift, scale=scale):
                return block.norm1(z) * (1 + scale) + shift

            def mlp_in(z, block=block, shift=c_shift, scale=c_scale):
                return block.norm3(z) * (1 + scale) + shift

            h = h + self._self_attention(3 * b, sa, block.attn1, attn_in, h, state, new) * gate
            h = h + self._cross_attention(3 * b + 1, ca, sa, _CrossAttention(block.attn2), block.norm2, h,
                                          context, state, new)
            h = h + self._mlp(3 * b + 2, mlp, sa, block.ffn, mlp_in, h, state, new) * c_gate

        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        h = model.proj_out(model.norm_out(h) * (1 + scale) + shift)
        (pt, ph, pw), c = self.spec.patch, self.spec.out_channels
        f, gh, gw = self.spec.video_grid
        h = h.reshape(-1, f, gh, gw, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return h.reshape(-1, c, f * pt, gh * ph, gw * pw)

    # -- Wan's attention ---------------------------------------------------------------------
    def _qkv(self, attn, x: torch.Tensor, ridx: torch.Tensor | None):
        """RMSNorm'd queries and keys with the rotary of each token's own (f, h, w) position."""
        if ridx is None:
            cos, sin = self.rope_cos.unsqueeze(0), self.rope_sin.unsqueeze(0)
        else:
            cos, sin = self.part_gather(_rows_at, (self.rope_cos, self.rope_sin), ridx)
        q = self._rotary(attn.norm_q(attn.to_q(x)), cos, sin, attn.heads)
        k = self._rotary(attn.norm_k(attn.to_k(x)), cos, sin, attn.heads)
        return q, k, attn.to_v(x)

    @staticmethod
    def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
        """x (R, K, heads·hd) rotated pairwise (2i, 2i+1) by cos/sin (R or 1, K, hd/2), as diffusers'
        `apply_rotary_emb` of WanAttnProcessor."""
        r, k, d = x.shape
        x1, x2 = x.reshape(r, k, heads, -1, 2).unbind(-1)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).reshape(r, k, d)

