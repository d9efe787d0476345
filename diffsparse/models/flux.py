"""FLUX.1 (diffusers `FluxTransformer2DModel`, FLUX.1-schnell): spec and token-cached step.

The user-facing latent is diffusers' unpacked noise (C/4, H/8, W/8) for an H x W image; the step
packs it into 2x2 patches (`FluxPipeline._pack_latents`), giving N = (H/16)·(W/16) image tokens,
and unpacks the velocity. T = `text_len` T5 tokens join them. The rotary position ids (text ids
zero, image ids (0, row, column)) are constants computed when the step is built. The runtime feeds
diffusers' timestep σ·1000; FluxPipeline passes it divided by 1000 and the model multiplies it
back, which the step repeats so the arithmetic is the same.

FLUX.1-schnell is guidance-distilled: no classifier-free guidance (one row per sample) and no
guidance embedding (FLUX.1-dev's `guidance_embeds=True` is not yet supported).

Cacheable layers (K counts *image* tokens except for TMLP):
  * double-stream block b: `SA b` the joint attention. The K selected image tokens get fresh
    queries/keys/values (keys/values scattered into the block's image key/value cache); the text
    tokens' queries/keys/values are computed in full every step; the K image queries and the T
    text queries attend over all T + N keys. The text attention output is always fresh; the image
    output of unselected tokens comes from the cache. `MLP b` the image MLP, `TMLP b` the text MLP
    (N_l = T, no spatial bonus).
  * single-stream block j: `MLP nd+j` its MLP branch for the image tokens. proj_out is linear, so
    proj_out(cat(attn, mlp)) = W_attn·attn + W_mlp·mlp + b: the W_mlp·act(proj_mlp(x)) term is
    cached per image token; the attention stays dense and the text tokens' MLP is always computed.
Layers cache their ungated output; the current step's gates are applied to fresh and reused tokens.

Selector (the paper's FLUX setting): λ = (0, 1, 0.25/3, 0.4), window 4. s2 is the entropy of each
image token's attention over the *text* keys (renormalised over them), taken from the K fresh
image queries of a double block's joint attention and kept per block (`ent.sa{b}`, cached for the
other tokens). The image layers of double block b use block b's entry; the single-stream MLPs use
the last double block's entry (their own attention stays fused, without an attention map; at
1024² that map would be 24 x 4352² floats per block). Text tokens have no s2 (and no spatial
bonus): the text MLP picks by reuse count (plus s1 when λ1 > 0). With score "attention" and
λ1 > 0, s1 is the attention the fresh queries give each image/text key (`recv.sa{b}`,
`recv.tmlp{b}`); the single-stream MLPs use the last double block's `recv`.

MACs per row (D width, N image and T text tokens, F = 4D the MLP width, J text width, P pooled
width, C packed channels), K fresh tokens of the layer:
    SA      4·K·D² + 4·T·D² + 2·(T + K)·(T + N)·D     (image q/k/v/out, text q/k/v/out, QKᵀ and PV)
    MLP     2·K·D·F                                   (double-stream image MLP)
    TMLP    2·K·D·F                                   (K text tokens)
    MLP of a single block:  2·(K + T)·D·F             (proj_mlp and W_mlp; text always computed)
    fixed   N·C·D + T·J·D + (256·D + D²) + (P·D + D²)        x/context embedders, time + pooled text
            + nd·12·D²                                        double-block modulation (image, text)
            + ns·(3·D² + 4·(T + N)·D² + 2·(T + N)²·D)          single: modulation, q/k/v, W_attn, attention
            + 2·D² + N·D·C                                    final norm modulation and projection
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from diffsparse import tokencache as tc
from diffsparse.cache_layout import Role
from diffsparse.conditioning import ConditioningPlan
from diffsparse.models.base import ModelSpec, SpecError, register
from diffsparse.tensors import TensorSpec
from diffsparse.models.cached import CachedStep, StepEntries
from diffsparse.schedule import LayerRef, SelectorConfig

VAE_SCALE = 8   # pixels per latent pixel
PACK = 2        # latent pixels per packed token side


@register
class FluxSpec(ModelSpec):
    family = "flux"
    diffusers_class = "FluxTransformer2DModel"
    sampler_kind = "flow_euler"
    # TorchScript fails on aten::rms_norm (the q/k norms)
    onnx_exporter = "dynamo"
    OPTIONS: ClassVar[dict[str, Any]] = {"height": 256, "width": 256, "text_len": 256}

    def __init__(self, model: nn.Module, guidance: bool = False, **kwargs: Any) -> None:
        """kwargs: as for ModelSpec (batch_size, sampler, options)."""
        cfg = model.config
        if cfg.guidance_embeds:
            raise NotImplementedError("FLUX models with guidance_embeds=True (FLUX.1-dev) are not yet supported; "
                                      "FLUX.1-schnell is")
        if guidance:
            raise SpecError("FLUX.1-schnell is guidance-distilled and has no classifier-free guidance: "
                             "export it with guidance off (dsexport --no-guidance)")
        super().__init__(model, guidance=guidance, **kwargs)
        if cfg.patch_size != 1:
            raise NotImplementedError(f"FLUX patch_size {cfg.patch_size} is not yet supported (1, as FluxPipeline)")
        if cfg.in_channels % (PACK * PACK) or model.out_channels != cfg.in_channels:
            raise NotImplementedError(f"FLUX needs in_channels divisible by 4 and out_channels == in_channels, got "
                                      f"{cfg.in_channels} -> {model.out_channels}")
        if cfg.num_layers < 1:
            raise NotImplementedError("FLUX models without double-stream blocks are not supported")
        height, width, text_len = (self.int_option(k) for k in ("height", "width", "text_len"))
        step = VAE_SCALE * PACK
        if height % step or width % step:
            raise SpecError(f"FLUX height and width must be positive multiples of {step} pixels, got {height}x{width}")
        self.grid = (height // step, width // step)
        self.text_len = text_len
        self.channels = cfg.in_channels // (PACK * PACK)  # unpacked latent channels
        self.dim = model.inner_dim
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim
        self.num_double = cfg.num_layers
        self.num_single = cfg.num_single_layers
        self.ff_dim = model.transformer_blocks[0].ff.net[-1].in_features
        self.single_mlp_dim = model.single_transformer_blocks[0].mlp_hidden_dim if self.num_single else 0

    def sliced_parameters(self) -> set[str]:
        # proj_out of a single-stream block splits into its attention and MLP columns (_single_block)
        return {f"single_transformer_blocks.{j}.proj_out.weight" for j in range(self.num_single)}

    # ---- structure -------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def layers(self) -> list[LayerRef]:
        double = [LayerRef(b, kind) for b in range(self.num_double) for kind in ("SA", "MLP", "TMLP")]
        return double + [LayerRef(self.num_double + j, "MLP") for j in range(self.num_single)]

    def layer_tokens(self, layer: LayerRef) -> int:
        return self.text_len if layer.kind == "TMLP" else self.num_tokens

    def score_grid(self, layer: LayerRef) -> tuple[int, int] | None:
        return None if layer.kind == "TMLP" else self.grid

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.channels, self.grid[0] * PACK, self.grid[1] * PACK)

    def default_selector(self) -> SelectorConfig:
        return SelectorConfig(score="attention", lambdas=(0.0, 1.0, 0.25 / 3, 0.4), window=4)

    def model_config(self) -> dict[str, Any]:
        return {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}

    # ---- graph signature -------------------------------------------------------------------
    def conditioning_inputs(self) -> list[TensorSpec]:
        cfg = self.model.config
        return [TensorSpec("prompt_embeds", (self.batch_size, self.text_len, cfg.joint_attention_dim)),
                TensorSpec("pooled_prompt_embeds", (self.batch_size, cfg.pooled_projection_dim))]

    def _check_selector(self, selector: SelectorConfig) -> None:
        if selector.score == "value_norm":
            raise NotImplementedError("the value_norm score is not yet supported for FLUX (its text MLP has no "
                                      "cached values); use attention, l2norm or cosine")

    def cache_roles(self, layer: LayerRef, selector: SelectorConfig) -> list[Role]:
        """FLUX's joint attention runs over text and image tokens at once: the self-attention layer
        keeps the image tokens' keys and values and the text-attention entropy (s2); it writes the
        attention received (s1) of both its image tokens and the text tokens (the text MLP's)."""
        self._check_selector(selector)
        roles = [Role.OUT, Role.REUSE]
        if layer.kind == "SA":
            roles += [Role.KEY, Role.VALUE]
            if selector.lambdas[1] != 0.0:
                roles.append(Role.ENT)
        if selector.score == "attention" and selector.lambdas[0] != 0.0 and layer.kind in ("SA", "TMLP"):
            roles.append(Role.RECV)
        if selector.score == "cosine":
            roles.append(Role.INP)
        return roles

    def build_step(self, keep: Sequence[int], selector: SelectorConfig, layer_cache: bool = True,
                   conditioning: ConditioningPlan | None = None) -> nn.Module:
        self._check_selector(selector)
        return FluxCachedStep(self, list(keep), selector, layer_cache, conditioning)

    # ---- cost ------------------------------------------------------------------------------
    def layer_macs(self, layer: LayerRef, keep: int) -> int:
        d, n, t = self.dim, self.num_tokens, self.text_len
        if layer.kind == "SA":
            return 4 * keep * d * d + 4 * t * d * d + 2 * (t + keep) * (t + n) * d
        if layer.block < self.num_double:  # MLP, TMLP
            return 2 * keep * d * self.ff_dim
        return 2 * (keep + t) * d * self.single_mlp_dim

    def fixed_macs(self) -> int:
        cfg = self.model.config
        d, n, t, c = self.dim, self.num_tokens, self.text_len, cfg.in_channels
        embed = (n * c * d + t * cfg.joint_attention_dim * d
                 + (256 * d + d * d) + (cfg.pooled_projection_dim * d + d * d))
        double = self.num_double * 12 * d * d
        m = t + n
        single = self.num_single * (3 * d * d + 4 * m * d * d + 2 * m * m * d)
        head = 2 * d * d + n * d * self.model.out_channels
        return embed + double + single + head


class _Unprojected:
    """What `CachedStep._attend` reads of an attention module (heads, to_out[0]), with an identity
    output projection: FLUX projects text and image outputs with different weights."""

    def __init__(self, heads: int) -> None:
        self.heads = heads
        self.to_out = (lambda o: o,)


def _rows_at(tables: tuple[torch.Tensor, ...], flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of each position table (rotary cos/sin) at the flat token indices (gather part)."""
    return tuple(torch.index_select(x, 0, flat) for x in tables)


def _text_entropy(attention: tc.AttentionMap, t: int, halves: int) -> torch.Tensor:
    """Entropy of each image query's attention over the t text keys (B, N): the score signal.
    Over every query, then the image rows: with K = 0 at run time (universal step) ONNX Runtime's
    reductions of an empty tensor keep the reduced axis. The map restricted to the text keys is
    the softmax of their logits alone."""
    to_text = attention.probs[..., :t]
    text_map = tc.AttentionMap(to_text / to_text.sum(-1, keepdim=True), attention.logits[..., :t])
    return tc.attention_entropy(text_map, halves)[:, t:]


class FluxCachedStep(CachedStep):
    """One denoising step of FLUX with a static sparsity pattern `keep` (K per cacheable layer).

    forward(latent, timestep, sampler_coef, prompt_embeds, pooled_prompt_embeds, *cache)
        -> (next_latent, *cache')
    """

    def __init__(self, spec: FluxSpec, keep: list[int], selector: SelectorConfig, layer_cache: bool = True,
                 conditioning: ConditioningPlan | None = None) -> None:
        super().__init__(spec, keep, selector, layer_cache, conditioning)
        self.heads = _Unprojected(spec.heads)
        gh, gw = spec.grid
        img_ids = torch.zeros(gh, gw, 3)
        img_ids[..., 1] = torch.arange(gh, dtype=torch.float32)[:, None]
        img_ids[..., 2] = torch.arange(gw, dtype=torch.float32)[None, :]
        ids = torch.cat([torch.zeros(spec.text_len, 3), img_ids.reshape(-1, 3)])
        cos, sin = spec.model.pos_embed(ids)  # (T + N, head_dim) each; no parameters
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # -- helpers -----------------------------------------------------------------------------
    def _entropy_layer(self, layer: LayerRef) -> LayerRef:
        if layer.kind == "TMLP":
            return layer  # keeps no entropy entry: text tokens have no text-attention entropy
        return LayerRef(min(layer.block, self.spec.num_double - 1), "SA")

    def _rotary_qkv(self, x, to_qkv, norms, cos, sin):
        """Projected q, k (per-head RMS-normed, rotated) and v (R, M, D) of the tokens x (R, M, D).
        cos/sin: (M, hd) shared by the rows, or (R·M, hd) per row (gathered positions)."""
        q, k, v = (proj(x) for proj in to_qkv)
        r, m, d = q.shape

        def rotate(z, norm):
            z = norm(z.unflatten(-1, (-1, self.spec.head_dim)))          # (R, M, H, hd)
            if cos.shape[0] != m:
                z = z.reshape(1, r * m, *z.shape[2:])
            return apply_rotary_emb(z, (cos, sin), sequence_dim=1).reshape(r, m, d)

        return rotate(q, norms[0]), rotate(k, norms[1]), v

    def _qkv(self, attn, x, ridx):
        """Image tokens of a double-stream block; ridx None = all N."""
        t = self.spec.text_len
        cos, sin = self.rope_cos[t:], self.rope_sin[t:]
        if ridx is not None:
            cos, sin = self.part_gather(_rows_at, (cos, sin), ridx.reshape(-1))
        return self._rotary_qkv(x, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k), cos, sin)

    # -- layers ------------------------------------------------------------------------------
    def _joint_attention(self, index, layer, attn, img_in, txt_in, h, c, state, new):
        """Double-stream attention -> (image output (R, N, D), text output (R, T, D)), both ungated."""
        t = c.shape[1]
        cache = self.cache
        tq, tk, tv = self._rotary_qkv(txt_in(c), (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                                      (attn.norm_added_q, attn.norm_added_k), self.rope_cos[:t], self.rope_sin[:t])
        idx = where = None
        # K = 0 (known here only in a per-step graph): text queries only, every image entry reused.
        # A universal step takes the general path, which with K = 0 at run time gives the same.
        reuse_all = self._is(index, 0)
        if reuse_all:
            # attention received is rewritten below from the text queries
            img_out = self._reuse_all(layer, h, state, new, roles=(Role.OUT, Role.KEY, Role.VALUE, Role.ENT))
            q, keys, values = tq, state[cache.name(Role.KEY, layer)], state[cache.name(Role.VALUE, layer)]
        else:
            iq, keys, values, idx, where = self._fresh_qkv(index, layer, attn, img_in, h, state, new)
            self._store(new, Role.KEY, layer, keys)
            self._store(new, Role.VALUE, layer, values)
            q = torch.cat([tq, iq], dim=1)
        has_ent, has_recv = cache.has(Role.ENT, layer), cache.has(Role.RECV, layer)
        need_probs = (not reuse_all and has_ent) or has_recv
        o, attention = self._attend(self.heads, q, torch.cat([tk, keys], 1), torch.cat([tv, values], 1), need_probs)
        txt_out = attn.to_add_out(o[:, :t])
        if not reuse_all:
            fresh = attn.to_out[0](o[:, t:])
            img_out = fresh if idx is None else self._scatter(state[cache.name(Role.OUT, layer)], where, fresh)
            self._store(new, Role.OUT, layer, img_out)
            if has_ent:
                ent_key = cache.name(Role.ENT, layer)
                ent = self.part_score(_text_entropy, attention, t, self.halves)
                new[ent_key] = ent if idx is None else self._scatter(
                    state[ent_key].unsqueeze(-1), self._scatter_index(idx), ent.unsqueeze(-1)).squeeze(-1)
            self._bookkeep(layer, h, idx, idx is None, state, new)
        if has_recv:
            # the query count as a tensor in a universal step (text queries + K read off the carrier)
            count = (self._k_count(index) + t) if self.dynamic_k else None
            received = self.part_score(tc.attention_received, attention.probs, self.halves, count)
            text_mlp = LayerRef(layer.block, "TMLP")
            new[cache.name(Role.RECV, layer)], new[cache.name(Role.RECV, text_mlp)] = received[:, t:], received[:, :t]
        return img_out, txt_out

    def _double_block(self, b, block, h, c, temb, state, new):
        i = 3 * b
        sa, mlp, tmlp = (LayerRef(b, kind) for kind in ("SA", "MLP", "TMLP"))
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = block.norm1.linear(block.norm1.silu(temb)).chunk(6, 1)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context.linear(
            block.norm1_context.silu(temb)).chunk(6, 1)

        def modulated(norm, shift, scale):
            return lambda z: norm(z) * (1 + scale[:, None]) + shift[:, None]

        img_attn, txt_attn = self._joint_attention(
            i, sa, block.attn, modulated(block.norm1.norm, shift, scale),
            modulated(block.norm1_context.norm, c_shift, c_scale), h, c, state, new)
        h = h + gate[:, None] * img_attn
        h = h + gate_mlp[:, None] * self._mlp(i + 1, mlp, sa, block.ff, modulated(block.norm2, shift_mlp, scale_mlp),
                                              h, state, new)
        c = c + c_gate[:, None] * txt_attn
        c = c + c_gate_mlp[:, None] * self._mlp(i + 2, tmlp, tmlp, block.ff_context,
                                                modulated(block.norm2_context, c_shift_mlp, c_scale_mlp), c, state, new)
        return h, c

    def _single_block(self, j, block, x, temb, state, new):
        spec = self.spec
        t, d = spec.text_len, spec.dim
        index = 3 * spec.num_double + j
        layer = LayerRef(spec.num_double + j, "MLP")
        shift, scale, gate = block.norm.linear(block.norm.silu(temb)).chunk(3, 1)
        nx = block.norm.norm(x) * (1 + scale[:, None]) + shift[:, None]
        attn = block.attn
        q, k, v = self._rotary_qkv(nx, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k),
                                   self.rope_cos, self.rope_sin)
        o, _ = self._attend(self.heads, q, k, v, need_probs=False)
        w_attn, w_mlp = block.proj_out.weight[:, :d], block.proj_out.weight[:, d:]

        def mlp(z, idx):
            return F.linear(block.act_mlp(block.proj_mlp(z)), w_mlp)

        # the MLP's input is the modulated norm the dense attention needs anyway
        img_mlp = self._token_layer(index, layer, LayerRef(spec.num_double - 1, "SA"), mlp, lambda z: z,
                                    nx[:, t:], state, new)
        branch = torch.cat([mlp(nx[:, :t], None), img_mlp], 1)
        return x + gate[:, None] * (F.linear(o, w_attn, block.proj_out.bias) + branch)

    # -- the step ----------------------------------------------------------------------------
    def pack(self, latent: torch.Tensor) -> torch.Tensor:
        """(R, C, H, W) -> (R, N, 4C), FluxPipeline._pack_latents."""
        r, ch, hh, ww = latent.shape
        x = latent.reshape(r, ch, hh // PACK, PACK, ww // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(r, (hh // PACK) * (ww // PACK), ch * PACK * PACK)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(R, N, 4C) -> (R, C, H, W), FluxPipeline._unpack_latents."""
        gh, gw = self.spec.grid
        ch = x.shape[-1] // (PACK * PACK)
        x = x.reshape(x.shape[0], gh, gw, ch, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(x.shape[0], ch, gh * PACK, gw * PACK)

    def predict(self, inputs, state, new) -> torch.Tensor:
        """The transformer -> predicted velocity (R, C, H, W)."""
        x = self.rows(inputs["latent"])
        pooled = self.rows(inputs["pooled_prompt_embeds"])
        # FluxPipeline passes timestep / 1000 and the model multiplies it by 1000 again
        timestep = (inputs["timestep"] / 1000).expand(x.shape[0])
        return self.unpack(self.forward_rows(self.pack(x), self.rows(inputs["prompt_embeds"]), pooled,
                                             timestep, state, new))

    def forward_rows(self, x: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
                     state: dict[str, torch.Tensor], new: StepEntries) -> torch.Tensor:
        """The transformer on packed rows x (R, N, 4C), text (R, T, J), pooled (R, P) and diffusers'
        model timestep (R,) in [0, 1] -> packed output (R, N, 4C); the new cache goes into `new`."""
        model = self.model
        h = model.x_embedder(x)
        temb = model.time_text_embed(timestep.to(h.dtype) * 1000, pooled)
        c = model.context_embedder(text)
        for b, block in enumerate(model.transformer_blocks):
            h, c = self._double_block(b, block, h, c, temb, state, new)
        t = c.shape[1]
        hc = torch.cat([c, h], 1)
        for j, block in enumerate(model.single_transformer_blocks):
            hc = self._single_block(j, block, hc, temb, state, new)
        return model.proj_out(model.norm_out(hc[:, t:], temb))
