"""DiT (diffusers `DiTTransformer2DModel`, class-conditional, adaLN-zero): spec and token-cached step.

Cacheable layers per block: self-attention (SA) and MLP; DiT has no cross-attention.

How a partial self-attention is computed (K of N tokens selected):
  * the K selected tokens are gathered from the block input, modulated (adaLN) and projected to
    fresh queries, keys and values;
  * the fresh keys/values are scattered into the layer's key/value cache, so the K fresh queries
    attend over all N tokens: fresh keys/values for the selected tokens, and for the others the
    keys/values from when each was last computed in this layer;
  * the attention output of the K tokens is projected and scattered into the layer's output cache;
    every token then adds gate * cached-or-fresh output to its residual stream.
  This makes every matmul proportional to K (MACs: 4·K·D² + 2·K·N·D per row), at the memory
  cost of a key and a value cache per SA layer.
MLP layers gather the K tokens, run the (per-token) feed-forward on them only and scatter.
A layer with K = N runs the plain dense computation; K = 0 reuses the whole cached output.

The cache holds each layer's *ungated* output; the current step's adaLN gate is applied to it, so
reused tokens still follow the current timestep's modulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffsparse import tokencache as tc
from diffsparse.models.base import ModelSpec, StepCall, TensorSpec, register
from diffsparse.sampler import DDIMConfig, SamplerPlan, ddim_plan, ddim_update
from diffsparse.schedule import LayerRef, SelectorConfig


@register
class DiTSpec(ModelSpec):
    family = "dit"

    def __init__(self, model: nn.Module, batch_size: int = 1, guidance: bool = True,
                 sampler: DDIMConfig | None = None) -> None:
        super().__init__(model, batch_size, guidance)
        cfg = model.config
        if cfg.norm_type != "ada_norm_zero":
            raise NotImplementedError(f"DiT norm_type {cfg.norm_type!r} is not yet supported (ada_norm_zero only)")
        self.sampler = sampler or DDIMConfig()
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
        return SelectorConfig(score="attention", lambdas=(1.0, 0.0, 0.25 / 3, 0.6), window=2)

    def model_config(self) -> dict[str, Any]:
        return {k: v for k, v in dict(self.model.config).items() if not k.startswith("_")}

    # ---- graph signature -------------------------------------------------------------------
    def step_inputs(self) -> list[TensorSpec]:
        b = self.batch_size
        inputs = [TensorSpec("latent", (b, *self.latent_shape)),
                  TensorSpec("timestep", (1,)),
                  TensorSpec("sampler_coef", (4,)),
                  TensorSpec("class_labels", (b,), "int32")]
        if self.guidance:
            inputs.append(TensorSpec("guidance_scale", (1,)))
        return inputs

    def cache_buffers(self, selector: SelectorConfig) -> list[TensorSpec]:
        r, b, n, d = self.rows, self.batch_size, self.num_tokens, self.dim
        bufs: list[TensorSpec] = []
        for layer in self.layers:
            bufs.append(TensorSpec(f"out.{layer.name}", (r, n, d)))
            bufs.append(TensorSpec(f"reuse.{layer.name}", (b, n)))
            if layer.kind == "SA":
                bufs.append(TensorSpec(f"key.{layer.name}", (r, n, d)))
                bufs.append(TensorSpec(f"value.{layer.name}", (r, n, d)))
                if selector.score == "attention":
                    bufs.append(TensorSpec(f"recv.{layer.name}", (b, n)))
            if selector.score == "cosine":
                bufs.append(TensorSpec(f"inp.{layer.name}", (r, n, d)))
        return bufs

    def build_step(self, keep: Sequence[int], selector: SelectorConfig) -> nn.Module:
        if len(keep) != len(self.layers):
            raise ValueError(f"keep has {len(keep)} entries for {len(self.layers)} layers")
        return DiTCachedStep(self, list(keep), selector)

    def build_masked_step(self, token_counts: Sequence[int], selector: SelectorConfig) -> nn.Module:
        from diffsparse.models.dit_masked import DiTMaskedStep

        return DiTMaskedStep(self, list(token_counts), selector)

    def feeds(self, call: StepCall, conditioning: dict[str, np.ndarray],
              guidance_scale: float) -> dict[str, np.ndarray]:
        out = {"timestep": np.asarray([call.timestep], dtype=np.float32),
               "sampler_coef": np.asarray(call.coefficients, dtype=np.float32),
               "class_labels": np.asarray(conditioning["class_labels"], dtype=np.int32)}
        if self.guidance:
            out["guidance_scale"] = np.asarray([guidance_scale], dtype=np.float32)
        return out

    def check_conditioning(self, conditioning: dict[str, np.ndarray]) -> None:
        labels = np.asarray(conditioning.get("class_labels", []))
        if labels.shape != (self.batch_size,):
            raise ValueError(f"class_labels must have shape ({self.batch_size},), got {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must be in [0, {self.num_classes - 1}], got {labels.tolist()}")

    def example_conditioning(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"class_labels": rng.integers(0, self.num_classes, self.batch_size).astype(np.int64)}

    def sampler_plan(self, num_steps: int) -> SamplerPlan:
        return ddim_plan(self.sampler, num_steps)

    # ---- cost ------------------------------------------------------------------------------
    def layer_macs(self, layer: LayerRef, keep: int) -> int:
        d, n = self.dim, self.num_tokens
        if layer.kind == "SA":
            return 4 * keep * d * d + 2 * keep * n * d
        return 2 * keep * d * self.ff_dim

    def fixed_macs(self) -> int:
        d, n, p = self.dim, self.num_tokens, self.patch
        blocks = len(self.model.transformer_blocks)
        patch_embed = n * p * p * self.in_channels * d
        # per block: timestep MLP (256·D + D·D) and adaLN modulation (D·6D)
        conditioning = blocks * (256 * d + d * d + 6 * d * d)
        head = (256 * d + d * d) + 2 * d * d + n * d * p * p * self.out_channels
        return patch_embed + conditioning + head


class DiTCachedStep(nn.Module):
    """One denoising step of a DiT with a static sparsity pattern `keep` (K per cacheable layer).

    forward(latent, timestep, sampler_coef, class_labels[, guidance_scale], *cache)
        -> (next_latent, *cache')
    """

    def __init__(self, spec: DiTSpec, keep: list[int], selector: SelectorConfig) -> None:
        super().__init__()
        self.spec = spec
        self.model = spec.model
        self.keep = keep
        self.selector = selector
        self.cache_names = [b.name for b in spec.cache_buffers(selector)]
        self.halves = spec.halves
        self.eval()

    def train(self, mode: bool = True) -> DiTCachedStep:
        # Always eval: in training mode diffusers drops class labels at random (CFG training), and
        # exporters restore the wrapper's mode recursively onto the shared diffusers model.
        return super().train(False)

    # -- the whole step ------------------------------------------------------------------------
    def forward(self, latent, timestep, sampler_coef, class_labels, *rest):
        if self.spec.guidance:
            guidance_scale, cache = rest[0], rest[1:]
        else:
            guidance_scale, cache = None, rest
        state = dict(zip(self.cache_names, cache))
        rows_latent = torch.cat([latent] * self.halves, dim=0)
        labels = class_labels
        if self.halves == 2:
            labels = torch.cat([class_labels, torch.full_like(class_labels, self.spec.null_class)])
        t = timestep.expand(rows_latent.shape[0])
        out, new_state = self.predict(rows_latent, t, labels, state)
        eps = out[:, : self.spec.in_channels]
        if self.halves == 2:
            cond, uncond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        plan_clip = self.spec.sampler.clip_sample_range if self.spec.sampler.clip_sample else None
        next_latent = ddim_update(latent, eps, sampler_coef, plan_clip)
        return (next_latent, *[new_state[n] for n in self.cache_names])

    def predict(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The transformer on rows (R, C, H, W) -> raw model output (R, C_out, H, W) and the new cache."""
        model = self.model
        h = model.pos_embed(x)
        new: dict[str, torch.Tensor] = {}
        for b, block in enumerate(model.transformer_blocks):
            emb = block.norm1.emb(t, labels, hidden_dtype=h.dtype)
            mod = block.norm1.linear(block.norm1.silu(emb))
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
            sa, mlp = LayerRef(b, "SA"), LayerRef(b, "MLP")

            def attn_in(z, block=block, shift=shift_msa, scale=scale_msa):
                return block.norm1.norm(z) * (1 + scale[:, None]) + shift[:, None]

            def mlp_in(z, block=block, shift=shift_mlp, scale=scale_mlp):
                return block.norm3(z) * (1 + scale[:, None]) + shift[:, None]

            h = h + gate_msa[:, None] * self._self_attention(2 * b, sa, block.attn1, attn_in, h, state, new)
            h = h + gate_mlp[:, None] * self._mlp(2 * b + 1, mlp, sa, block.ff, mlp_in, h, state, new)

        conditioning = model.transformer_blocks[0].norm1.emb(t, labels, hidden_dtype=h.dtype)
        shift, scale = model.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        h = model.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
        h = model.proj_out_2(h)
        p, c = self.spec.patch, self.spec.out_channels
        gh, gw = self.spec.grid
        h = h.reshape(-1, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(-1, c, gh * p, gw * p), new

    # -- token selection ---------------------------------------------------------------------
    def _select(self, index: int, layer: LayerRef, sa: LayerRef, h: torch.Tensor,
                state: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> torch.Tensor:
        return tc.top_tokens(self._score(layer, sa, h, state, new), self.keep[index])

    def _score(self, layer: LayerRef, sa: LayerRef, h: torch.Tensor,
               state: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> torch.Tensor:
        """The selector's score (B, N) of every token for this layer (higher = recompute first)."""
        sel = self.selector
        if sel.score == "attention":
            key = f"recv.{sa.name}"
            main = new.get(key, state[key])
        elif sel.score == "l2norm":
            main = tc.token_norm_score(h, self.halves)
        else:
            main = tc.token_change_score(h, state[f"inp.{layer.name}"], self.halves)
        return tc.composite_score(main, state[f"reuse.{layer.name}"], sel, self.spec.grid)

    def _bookkeep(self, layer: LayerRef, h: torch.Tensor, idx: torch.Tensor | None, full: bool,
                  state: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
        """Reuse counts and (for the cosine score) the cached layer input."""
        reuse = state[f"reuse.{layer.name}"]
        new[f"reuse.{layer.name}"] = torch.zeros_like(reuse) if full else tc.next_reuse(reuse, idx)
        if self.selector.score == "cosine":
            key = f"inp.{layer.name}"
            if full:
                new[key] = h
            elif idx is None:
                new[key] = state[key]
            else:
                ridx = tc.rows_index(idx, self.halves)
                new[key] = tc.scatter_tokens(state[key], ridx, tc.gather_tokens(h, ridx))

    # -- layers ------------------------------------------------------------------------------
    def _self_attention(self, index, layer, attn, attn_in, h, state, new) -> torch.Tensor:
        k, n = self.keep[index], self.spec.num_tokens
        name = layer.name
        if k == 0:
            for key in ("out", "key", "value", "recv"):
                if f"{key}.{name}" in state:
                    new[f"{key}.{name}"] = state[f"{key}.{name}"]
            self._bookkeep(layer, h, None, False, state, new)
            return state[f"out.{name}"]
        if k == n:
            x = attn_in(h)
            q, keys, values = attn.to_q(x), attn.to_k(x), attn.to_v(x)
            idx = None
        else:
            idx = self._select(index, layer, layer, h, state, new)
            ridx = tc.rows_index(idx, self.halves)
            x = attn_in(tc.gather_tokens(h, ridx))
            q = attn.to_q(x)
            keys = tc.scatter_tokens(state[f"key.{name}"], ridx, attn.to_k(x))
            values = tc.scatter_tokens(state[f"value.{name}"], ridx, attn.to_v(x))
        fresh, probs = self._attend(attn, q, keys, values)
        new[f"key.{name}"], new[f"value.{name}"] = keys, values
        if self.selector.score == "attention":
            new[f"recv.{name}"] = tc.attention_received(probs, self.halves)
        out = fresh if idx is None else tc.scatter_tokens(state[f"out.{name}"], ridx, fresh)
        new[f"out.{name}"] = out
        self._bookkeep(layer, h, idx, idx is None, state, new)
        return out

    def _attend(self, attn, q, keys, values):
        """Explicit softmax attention (the map feeds the attention-received score)."""
        r, kq, d = q.shape
        heads = self.spec.heads
        hd = d // heads
        q = q.reshape(r, kq, heads, hd).transpose(1, 2)
        keys = keys.reshape(r, -1, heads, hd).transpose(1, 2)
        values = values.reshape(r, -1, heads, hd).transpose(1, 2)
        probs = torch.softmax((q @ keys.transpose(-1, -2)) * (hd ** -0.5), dim=-1)
        o = (probs @ values).transpose(1, 2).reshape(r, kq, d)
        return attn.to_out[0](o), probs

    def _mlp(self, index, layer, sa, ff, mlp_in, h, state, new) -> torch.Tensor:
        k, n = self.keep[index], self.spec.num_tokens
        key = f"out.{layer.name}"
        if k == 0:
            new[key] = state[key]
            self._bookkeep(layer, h, None, False, state, new)
            return state[key]
        if k == n:
            out = ff(mlp_in(h))
            idx = None
        else:
            idx = self._select(index, layer, sa, h, state, new)
            ridx = tc.rows_index(idx, self.halves)
            out = tc.scatter_tokens(state[key], ridx, ff(mlp_in(tc.gather_tokens(h, ridx))))
        new[key] = out
        self._bookkeep(layer, h, idx, idx is None, state, new)
        return out
