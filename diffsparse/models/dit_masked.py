"""The differentiable DiT step the schedule trainer learns through (paper §3.2, STE).

Where the exported step gathers K tokens, computes them and scatters them into the cache, this step
computes every token and mixes fresh and cached values through a token mask:

    m = sum_s w[l, s] · m_s,        out = m ⊙ fresh + (1 - m) ⊙ cache,

where m_s marks the top-K_s tokens of the selector's score (the same score and tie-break as the
exported graph, so the sets are nested) and w[l] is the layer's row of candidate weights, one-hot
in the forward pass. The output is linear in each m and the gradient with respect to w is exact;
the straight-through estimator then carries it to the learned costs (train/costs.py). For a
one-hot w the result equals the exported step with K = K_s (tested), since a layer's fresh value
at a token depends only on that token's input (MLP; SA queries, keys and values) and the
self-attention keys/values are mixed the same way before attention.

Everything that decides *which* tokens (scores, reuse counts, attention received) is computed from
the hard mask, without gradient, as at inference.
"""

from __future__ import annotations

import torch

from diffsparse import tokencache as tc
from diffsparse.cache_layout import Role
from diffsparse.models.dit_step import DiTCachedStep
from diffsparse.schedule import LayerRef


class DiTMaskedStep(DiTCachedStep):
    """forward(latent, timestep, sampler_coef, class_labels[, guidance_scale], *cache, weights)."""

    def __init__(self, spec, token_counts: list[int], selector) -> None:
        super().__init__(spec, [spec.num_tokens] * len(spec.layers), selector)
        self.token_counts = token_counts
        self.weights: torch.Tensor | None = None

    def forward(self, *args, weights: torch.Tensor):
        return self._with_weights(weights, super().forward, *args)

    def run(self, *args, weights: torch.Tensor):
        """`CachedStep.run` (the guided model output too) under candidate weights."""
        return self._with_weights(weights, super().run, *args)

    def _with_weights(self, weights: torch.Tensor, fn, *args):
        if weights.shape != (len(self.spec.layers), len(self.token_counts)):
            raise ValueError(f"weights must have shape (L={len(self.spec.layers)}, |S|={len(self.token_counts)}), "
                             f"got {tuple(weights.shape)}")
        self.weights = weights
        try:
            return fn(*args)
        finally:
            self.weights = None

    # -- masks ---------------------------------------------------------------------------------
    def _mask(self, index: int, layer: LayerRef, sa: LayerRef, h, state, new) -> torch.Tensor:
        """Soft token mask (B, N) = sum_s w_s · [rank < K_s]."""
        w = self.weights[index]
        with torch.no_grad():
            score = self._score(layer, sa, h, state, new)
            rank = torch.argsort(torch.argsort(score, dim=1, descending=True), dim=1)
            nested = torch.stack([(rank < k).to(h.dtype) for k in self.token_counts])
        return torch.einsum("s,sbn->bn", w.to(h.dtype), nested)

    def _rows(self, m: torch.Tensor) -> torch.Tensor:
        return tc.rows_index(m, self.halves).unsqueeze(-1)

    def _bookkeep_mask(self, layer: LayerRef, h, hard, state, new) -> None:
        key = self.cache.name(Role.REUSE, layer)
        new[key] = (state[key] + 1.0) * (1.0 - hard)
        if self.cache.has(Role.INP, layer):
            key = self.cache.name(Role.INP, layer)
            hr = self._rows(hard)
            new[key] = hr * h.detach() + (1.0 - hr) * state[key]

    # -- layers --------------------------------------------------------------------------------
    def _self_attention(self, index, layer, attn, attn_in, h, state, new) -> torch.Tensor:
        cache = self.cache
        key_k, key_v, key_out = (cache.name(role, layer) for role in (Role.KEY, Role.VALUE, Role.OUT))
        m = self._mask(index, layer, layer, h, state, new)
        hard = (m.detach() > 0.5).to(h.dtype)
        mr = self._rows(m)
        x = attn_in(h)
        keys = mr * attn.to_k(x) + (1.0 - mr) * state[key_k]
        values = mr * attn.to_v(x) + (1.0 - mr) * state[key_v]
        # the same attention kernel as the exported step: explicit only when the score reads the map
        need_recv = cache.has(Role.RECV, layer)
        fresh, attention = self._attend(attn, attn.to_q(x), keys, values, need_probs=need_recv)
        out = mr * fresh + (1.0 - mr) * state[key_out]
        new[key_k], new[key_v], new[key_out] = keys, values, out
        if cache.has(Role.VALUE_NORM, layer):
            new[cache.name(Role.VALUE_NORM, layer)] = tc.value_norms(values.detach(), self.halves)
        if need_recv:
            key_recv = cache.name(Role.RECV, layer)
            new[key_recv] = self._received(attention.probs.detach(), hard, state[key_recv])
        self._bookkeep_mask(layer, h, hard, state, new)
        return out

    def _received(self, probs, hard, previous) -> torch.Tensor:
        """Attention received from the recomputed queries only (as the exported step computes it
        from its K queries); unchanged where a sample recomputed none."""
        n = probs.shape[-1]
        q = tc.rows_index(hard, self.halves)                         # (R, N) query weights
        per_query = probs.mean(dim=1)                                # (R, Nq, Nk)
        count = q.sum(dim=1, keepdim=True)
        recv = torch.einsum("rq,rqk->rk", q, per_query) / count.clamp_min(1.0)
        recv = tc.merge_halves(recv, self.halves) * n
        some = tc.merge_halves(count, self.halves) > 0
        return torch.where(some, recv, previous)

    def _mlp(self, index, layer, sa, ff, mlp_in, h, state, new) -> torch.Tensor:
        key = self.cache.name(Role.OUT, layer)
        m = self._mask(index, layer, sa, h, state, new)
        hard = (m.detach() > 0.5).to(h.dtype)
        mr = self._rows(m)
        out = mr * ff(mlp_in(h)) + (1.0 - mr) * state[key]
        new[key] = out
        self._bookkeep_mask(layer, h, hard, state, new)
        return out
