"""The token-cached DiT step: the transformer of `DiTTransformer2DModel` written over the cached
layers of models/cached.py (self-attention and MLP per block, adaLN-zero gates applied to the
ungated layer outputs, so reused tokens follow the current step's modulation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffsparse.models.cached import CachedStep, StepEntries
from diffsparse.schedule import LayerRef


class DiTCachedStep(CachedStep):
    """One denoising step of a DiT with a static sparsity pattern `keep` (K per cacheable layer).

    forward(latent, timestep, sampler_coef, class_labels[, guidance_scale], *cache)
        -> (next_latent, *cache')
    """

    def predict(self, inputs, state, new) -> torch.Tensor:
        """The transformer on the guidance rows -> predicted noise (R, C, H, W)."""
        labels = self.guidance_labels(inputs)
        x = self.rows(inputs["latent"])
        modulation = self.hoisted_conditioning(inputs, state, new)
        out = self.forward_rows(x, inputs["timestep"].expand(x.shape[0]), labels, state, new, modulation)
        # learned-sigma models output 2C channels: the first C are the noise
        return out[:, : self.spec.in_channels]

    def guidance_labels(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The class label of every guidance row (R,): the unconditional rows get the null class."""
        labels = inputs["class_labels"]
        if self.halves == 2:
            labels = torch.cat([labels, torch.full_like(labels, self.spec.null_class)])
        return labels

    def block_modulation(self, b: int, t: torch.Tensor, labels: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Block b's adaLN-zero rows (rows, 6·D) at per-row timesteps t and labels."""
        norm = self.model.transformer_blocks[b].norm1
        return norm.linear(norm.silu(norm.emb(t, labels, hidden_dtype=dtype)))

    def output_modulation(self, t: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The output layer's shift and scale rows (rows, 2·D) (diffusers reuses block 0's embedding)."""
        conditioning = self.model.transformer_blocks[0].norm1.emb(t, labels, hidden_dtype=dtype)
        return self.model.proj_out_1(F.silu(conditioning))

    def conditioning_rows(self, timesteps: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every block's modulation and the output layer's, at each of `timesteps` (G,) for every
        guidance row: (G, R, 6·D·blocks + 2·D), one matrix product per block over all G·R rows."""
        labels = self.guidance_labels(inputs)
        rows = labels.shape[0]
        t = timesteps.repeat_interleave(rows)
        labels = labels.repeat(timesteps.shape[0])
        parts = [self.block_modulation(b, t, labels) for b in range(len(self.model.transformer_blocks))]
        parts.append(self.output_modulation(t, labels))
        return torch.cat(parts, dim=1).reshape(timesteps.shape[0], rows, -1)

    def forward_rows(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                     state: dict[str, torch.Tensor], new: StepEntries,
                     modulation: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer on rows x (R, C, H, W), per-row timesteps t and labels -> raw output
        (R, C_out, H, W); the new cache goes into `new`. modulation: this step's conditioning rows
        (R, M) read from the hoisted table (`conditioning_rows`), or None to compute them here."""
        model = self.model
        h = model.pos_embed(x)
        width = 6 * self.spec.dim
        for b, block in enumerate(model.transformer_blocks):
            if modulation is None:
                mod = self.block_modulation(b, t, labels, h.dtype)
            else:
                mod = modulation[:, b * width:(b + 1) * width]
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
            sa, mlp = LayerRef(b, "SA"), LayerRef(b, "MLP")

            def attn_in(z, block=block, shift=shift_msa, scale=scale_msa):
                return block.norm1.norm(z) * (1 + scale[:, None]) + shift[:, None]

            def mlp_in(z, block=block, shift=shift_mlp, scale=scale_mlp):
                return block.norm3(z) * (1 + scale[:, None]) + shift[:, None]

            h = h + gate_msa[:, None] * self._self_attention(2 * b, sa, block.attn1, attn_in, h, state, new)
            h = h + gate_mlp[:, None] * self._mlp(2 * b + 1, mlp, sa, block.ff, mlp_in, h, state, new)

        if modulation is None:
            out_mod = self.output_modulation(t, labels, h.dtype)
        else:
            out_mod = modulation[:, len(model.transformer_blocks) * width:]
        shift, scale = out_mod.chunk(2, dim=1)
        h = model.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
        h = model.proj_out_2(h)
        p, c = self.spec.patch, self.spec.out_channels
        gh, gw = self.spec.grid
        h = h.reshape(-1, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(-1, c, gh * p, gw * p)
