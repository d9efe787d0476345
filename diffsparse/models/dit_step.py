"""The token-cached DiT step: the transformer of `DiTTransformer2DModel` written over the cached
layers of models/cached.py (self-attention and MLP per block, adaLN-zero gates applied to the
ungated layer outputs, so reused tokens follow the current step's modulation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffsparse.models.cached import CachedStep
from diffsparse.schedule import LayerRef


class DiTCachedStep(CachedStep):
    """One denoising step of a DiT with a static sparsity pattern `keep` (K per cacheable layer).

    forward(latent, timestep, sampler_coef, class_labels[, guidance_scale], *cache)
        -> (next_latent, *cache')
    """

    def predict(self, inputs, state, new) -> torch.Tensor:
        """The transformer on the guidance rows -> predicted noise (R, C, H, W)."""
        labels = inputs["class_labels"]
        if self.halves == 2:
            labels = torch.cat([labels, torch.full_like(labels, self.spec.null_class)])
        x = self.rows(inputs["latent"])
        out = self.forward_rows(x, inputs["timestep"].expand(x.shape[0]), labels, state, new)
        # learned-sigma models output 2C channels: the first C are the noise
        return out[:, : self.spec.in_channels]

    def forward_rows(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                     state: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer on rows x (R, C, H, W), per-row timesteps t and labels -> raw output
        (R, C_out, H, W); the new cache goes into `new`."""
        model = self.model
        h = model.pos_embed(x)
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
        return h.reshape(-1, c, gh * p, gw * p)
