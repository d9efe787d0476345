"""The token-cached step shared by every family: input plumbing, guidance, sampler update, token
selection and the two kinds of cached layer.

A family's step subclasses `CachedStep` and implements `predict(inputs, state, new)`: the
transformer on the guidance rows, calling
  * `_self_attention` for a self-attention layer (fresh queries for the K selected tokens attend
    over all N keys/values: the selected tokens' keys/values are recomputed and scattered into the
    layer's key/value cache, the others come from when each was last computed), and
  * `_token_layer` for any layer whose output at a token depends only on that token (MLP; and
    cross-attention, whose keys are the fixed text tokens): gather K, compute, scatter.
Both return the layer's *ungated* output for every token (fresh or cached); the family applies the
current step's gate, so reused tokens still follow the current timestep's modulation.

MACs: a self-attention layer costs 4·K·D² + 2·K·N·D per row; a token layer its per-token cost × K.
K = N runs the plain dense computation; K = 0 reuses the whole cached output.

Parts: the step's own mechanics run inside four `Part` child modules (`PARTS`): token scoring and
selection (`part_score`), gathering the selected tokens (`part_gather`), writing the cache
(`part_scatter`: scatters and reuse-count bookkeeping) and the guidance combine + sampler update
(`part_sampler`). A part only calls what it is given, so the numbers are unchanged; what it adds is
a module scope, which the TorchScript exporter writes into node names (`/part_score/TopK`), the
dynamo exporter into node metadata, and which `dsprofile --ops` reads to measure where a step's
time goes (runtime/ops_profile.py). Everything outside the parts is the transformer's own work.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from diffsparse import tokencache as tc
from diffsparse.cache_layout import CARRIED_ROLES, Role
from diffsparse.conditioning import ConditioningPlan
from diffsparse.schedule import LayerRef, SelectorConfig


#: the step's part scopes, by child-module name `part_<name>`; time outside them is the transformer's
PARTS = ("score", "gather", "scatter", "sampler")


class Part(nn.Module):
    """A named scope and nothing else: forward(fn, *args) = fn(*args). Registered as a child module
    so that exporters and profilers see the scope (module docstring)."""

    def forward(self, fn: Callable, *args):
        return fn(*args)


class StepEntries(dict):
    """The cache entries one step writes, by name, and the constant tensors its layers share, made
    once per step instead of once per layer (each a kernel or two on a GPU, whatever K is; a
    DiT-XL/2 step has 56 layers): the reuse counts that every fully computed layer resets to 0
    (`zeros_like`), and the tie-break ramp of each token count (`tie_ramp`)."""

    def __init__(self) -> None:
        super().__init__()
        self._shared: dict[tuple, torch.Tensor] = {}

    def _once(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def zeros_like(self, like: torch.Tensor) -> torch.Tensor:
        return self._once(("zeros", tuple(like.shape), like.dtype, like.device), lambda: torch.zeros_like(like))

    def tie_ramp(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return self._once(("ramp", n, like.dtype, like.device), lambda: tc.tie_ramp(n, like))


class CachedStep(nn.Module):
    """One denoising step with a static sparsity pattern `keep` (K per cacheable layer).

    forward(*step_inputs, *cache) -> (next_latent, *cache'), in the order the spec lists them.
    """

    #: hooks for export verification (export/verify.py): when a dict, each partial layer's token
    #: scores are recorded in it by layer index / the selection given for a layer index is used
    #: instead of this step's own TopK
    record_scores: dict[int, torch.Tensor] | None = None
    #: with record_scores: each layer's spatial-bonus margins (tokencache.bonus_margin), for layers
    #: whose score has the bonus
    record_bonus_margins: dict[int, torch.Tensor] | None = None
    forced_selection: dict[int, torch.Tensor] | None = None
    #: universal step (export/universal.py): every layer's K is the length of a carrier input
    #: (`k.<layer>`) instead of a constant, and K = 0 and K = N take the general path
    dynamic_k: bool = False

    def __init__(self, spec, keep: list[int], selector: SelectorConfig, layer_cache: bool = True,
                 conditioning: ConditioningPlan | None = None) -> None:
        super().__init__()
        if len(keep) != len(spec.layers):
            raise ValueError(f"keep has {len(keep)} entries for {len(spec.layers)} layers")
        if not layer_cache and list(keep) != spec.dense_keep():
            raise ValueError("a step that reuses tokens needs the layer cache (layer_cache=True)")
        self.spec = spec
        self.model = spec.model
        self.keep = list(keep)
        self.selector = selector
        self.input_names = [t.name for t in spec.step_inputs()]
        #: which cache entries this step reads and writes (diffsparse/cache_layout.py): every
        #: entry name below comes from it, and whether an entry exists is asked of it
        self.cache = spec.cache_layout(selector, layer_cache, conditioning)
        self.cache_names = self.cache.names
        #: the hoisted conditioning (diffsparse/conditioning.py): whether this step computes its
        #: group's rows (a refresh) or reads its row, and the tables that find them by timestep
        self.conditioning = conditioning
        self.refreshes_conditioning = conditioning is None or spec.refreshes(keep)
        if conditioning is not None and conditioning.width is not None:
            # buffers, so that moving the step to a device moves them (the torch backend does)
            self.register_buffer("plan_timesteps", torch.tensor(conditioning.timesteps, dtype=torch.float32),
                                 persistent=False)
            self.register_buffer("served_timesteps", torch.from_numpy(conditioning.served()), persistent=False)
            self.register_buffer("conditioning_row", torch.from_numpy(conditioning.row().astype(np.int32)),
                                 persistent=False)
        self.sampler_names = self.cache.sampler_names
        self.halves = spec.halves
        self.layer_index = {layer: i for i, layer in enumerate(spec.layers)}
        self.part_score, self.part_gather, self.part_scatter, self.part_sampler = (Part() for _ in PARTS)
        self.eval()

    def train(self, mode: bool = True) -> CachedStep:
        # Always eval: in training mode diffusers drops class labels at random (CFG training), and
        # exporters restore the wrapper's mode recursively onto the shared diffusers model.
        return super().train(False)

    # -- the whole step ------------------------------------------------------------------------
    def forward(self, *args):
        next_latent, cache, _ = self._step(*args)
        return (next_latent, *cache)

    def run(self, *args) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """forward's computation -> (next latent, the new cache in layout order, the guided model
        output): the training rollout (train/student.py) reuses the model output in skipped steps."""
        return self._step(*args)

    def _step(self, *args):
        n_in, n_k = len(self.input_names), (len(self.keep) if self.dynamic_k else 0)
        if len(args) != n_in + n_k + len(self.cache_names):
            raise TypeError(f"step takes {n_in} inputs, {n_k} K carriers and {len(self.cache_names)} cache "
                            f"tensors, got {len(args)}")
        inputs = dict(zip(self.input_names, args[:n_in]))
        self._k_carriers = args[n_in:n_in + n_k]
        state = dict(zip(self.cache_names, args[n_in + n_k:]))
        new = StepEntries()
        latent = inputs["latent"]
        out = self.predict(inputs, state, new)
        next_latent, sampler_state, guided = self.part_sampler(self._sample, latent, out, inputs, state)
        new.update(zip(self.sampler_names, sampler_state))
        return next_latent, [new[n] for n in self.cache_names], guided

    def _sample(self, latent: torch.Tensor, out: torch.Tensor, inputs: dict[str, torch.Tensor],
                state: dict[str, torch.Tensor]):
        """Guidance combine and sampler update -> (next latent, new sampler state, guided output)."""
        if self.halves == 2:
            cond, uncond = out.chunk(2)
            out = uncond + inputs["guidance_scale"] * (cond - uncond)
        next_latent, sampler_state = self.spec.sampler.update(latent, out, inputs["sampler_coef"],
                                                              [state[n] for n in self.sampler_names])
        return next_latent, sampler_state, out

    def predict(self, inputs: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                new: StepEntries) -> torch.Tensor:
        """The transformer on the guidance rows -> model output (R, *latent_shape), conditional
        rows first; writes every layer's new cache entries into `new`."""
        raise NotImplementedError

    def conditioning_rows(self, timesteps: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Extension point of a family whose spec has a `conditioning_width` M: the conditioning
        of every guidance row at each of `timesteps` (G,) -> (G, R, M), from the step's inputs."""
        raise NotImplementedError(f"{type(self).__name__} does not hoist its conditioning")

    def hoisted_conditioning(self, inputs: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                             new: StepEntries) -> torch.Tensor | None:
        """This step's conditioning rows (R, M) under the plan, or None without one (the step
        computes its own inline). A refresh computes its group's rows (`conditioning_rows` over
        the group's timesteps) and writes them to the cache; a partial step carries them over.
        The step is found by its timestep among the plan's."""
        if self.conditioning is None or self.conditioning.width is None:
            return None
        name = self.cache.conditioning_name
        # int32 indices: TensorRT's subset (export/trt_compat.py) takes no int64 Gather indices
        k = (self.plan_timesteps == inputs["timestep"]).to(torch.int32).argmax().to(torch.int32).reshape(1)
        if self.refreshes_conditioning:
            table = self.conditioning_rows(self.served_timesteps.index_select(0, k).reshape(-1), inputs)
        else:
            table = state[name]
        new[name] = table
        return table.index_select(0, self.conditioning_row.index_select(0, k)).squeeze(0)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (R, ...): the same tensor for each guidance half."""
        return torch.cat([x] * self.halves, dim=0) if self.halves == 2 else x

    # -- token selection ---------------------------------------------------------------------
    def _select(self, index: int, layer: LayerRef, sa: LayerRef, h: torch.Tensor,
                state: dict[str, torch.Tensor], new: StepEntries) -> torch.Tensor:
        """Indices (B, K) of the tokens the layer recomputes (score part)."""
        return self.part_score(self._select_tokens, index, layer, sa, h, state, new)

    def _select_tokens(self, index, layer, sa, h, state, new) -> torch.Tensor:
        weighted = self._weighted_score(layer, sa, h, state, new)
        grid = self.spec.score_grid(layer)
        score = tc.finish_score(weighted, self.selector, grid, new.tie_ramp(weighted.shape[1], weighted))
        if self.record_scores is not None:
            self.record_scores[index] = score
            if self.record_bonus_margins is not None and tc.bonus_applies(self.selector, grid):
                self.record_bonus_margins[index] = tc.bonus_margin(weighted, grid, self.selector.window)
        if self.forced_selection is not None and index in self.forced_selection:
            return self.forced_selection[index]
        return tc.top_tokens(score, self._k(index))

    def _k(self, index: int) -> int:
        """The layer's K: a constant, or (universal step) the traced length of its carrier."""
        return self._k_carriers[index].shape[0] if self.dynamic_k else self.keep[index]

    def _k_count(self, index: int) -> torch.Tensor:
        """A universal step's K for the layer as a tensor read off its carrier (sizes of
        intermediate tensors must not be frozen into the graph as constants)."""
        return torch.ones_like(self._k_carriers[index]).sum()

    def _is(self, index: int, k: int) -> bool:
        """Whether the layer's K is statically k (never in a universal step)."""
        return not self.dynamic_k and self.keep[index] == k

    def _store(self, new: StepEntries, role: Role, layer: LayerRef, value: torch.Tensor) -> None:
        """Write the layer's new entry of `role`, if the cache keeps one (a dense step without the
        layer cache keeps none)."""
        if self.cache.has(role, layer):
            new[self.cache.name(role, layer)] = value

    def _latest(self, key: str, state, new) -> torch.Tensor:
        return new.get(key, state[key])

    def _score(self, layer: LayerRef, sa: LayerRef, h: torch.Tensor,
               state: dict[str, torch.Tensor], new: StepEntries) -> torch.Tensor:
        """The selector's score (B, N) of every token for this layer (higher = recompute first).
        `sa` is the self-attention layer whose signals (attention received, values) score it."""
        weighted = self._weighted_score(layer, sa, h, state, new)
        return tc.finish_score(weighted, self.selector, self.spec.score_grid(layer))

    def _weighted_score(self, layer: LayerRef, sa: LayerRef, h: torch.Tensor,
                        state: dict[str, torch.Tensor], new: StepEntries) -> torch.Tensor:
        """λ1 s1 + λ2 s2 + λ3 s3 of every token for this layer: the score before the spatial bonus."""
        sel, cache = self.selector, self.cache
        reuse = state[cache.name(Role.REUSE, layer)]
        if sel.lambdas[0] == 0.0:
            main = None
        elif sel.score == "attention":
            main = self._latest(cache.name(Role.RECV, sa), state, new)
        elif sel.score == "value_norm":
            main = tc.value_norm_score(self._latest(cache.name(Role.VALUE_NORM, sa), state, new))
        elif sel.score == "l2norm":
            main = tc.token_norm_score(h, self.halves)
        else:
            main = tc.token_change_score(h, state[cache.name(Role.INP, layer)], self.halves)
        entropy = None
        ent_layer = self._entropy_layer(layer)
        if sel.lambdas[1] != 0.0 and cache.has(Role.ENT, ent_layer):
            entropy = self._latest(cache.name(Role.ENT, ent_layer), state, new)
        return tc.weighted_score(main, reuse, sel, entropy=entropy)

    def _entropy_layer(self, layer: LayerRef) -> LayerRef:
        """The layer whose cross-attention entropy s2 scores this layer's tokens: by default the
        block's cross-attention layer (no score term where it keeps no entropy entry)."""
        return LayerRef(layer.block, "CA")

    def _gather(self, h: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ridx, the selected tokens of h): ridx (R, K) the per-row indices (gather part); the
        layer's scatters take `tc.scatter_index(ridx)`, built once."""
        return self.part_gather(self._gather_rows, h, idx)

    def _gather_rows(self, h, idx):
        ridx = tc.rows_index(idx, self.halves)
        # batch 1: every row (both guidance halves) takes the same tokens, so one index row gathers
        return ridx, tc.gather_tokens(h, idx if idx.shape[0] == 1 else ridx)

    def _scatter_index(self, ridx: torch.Tensor) -> tc.ScatterIndex:
        """`tc.scatter_index` in the scatter part."""
        return self.part_scatter(tc.scatter_index, ridx)

    def _scatter(self, cache: torch.Tensor, index: tc.ScatterIndex, fresh: torch.Tensor) -> torch.Tensor:
        """`tc.scatter_tokens` in the scatter part."""
        return self.part_scatter(tc.scatter_tokens, cache, index, fresh)

    def _bookkeep(self, layer: LayerRef, h: torch.Tensor, idx: torch.Tensor | None, full: bool,
                  state: dict[str, torch.Tensor], new: StepEntries) -> None:
        """Reuse counts and (for the cosine score) the cached layer input (scatter part)."""
        if not self.cache.has(Role.REUSE, layer):  # no layer cache: nothing to keep
            return
        self.part_scatter(self._bookkeep_entries, layer, h, idx, full, state, new)

    def _bookkeep_entries(self, layer, h, idx, full, state, new) -> None:
        key = self.cache.name(Role.REUSE, layer)
        new[key] = new.zeros_like(state[key]) if full else tc.next_reuse(state[key], idx)
        if self.cache.has(Role.INP, layer):
            key = self.cache.name(Role.INP, layer)
            if full:
                new[key] = h
            elif idx is None:
                new[key] = state[key]
            else:
                ridx, x = self._gather_rows(h, idx)
                new[key] = tc.scatter_tokens(state[key], tc.scatter_index(ridx), x)

    def _reuse_all(self, layer: LayerRef, h, state, new, roles=CARRIED_ROLES) -> torch.Tensor:
        """K = 0: the layer's cached entries of `roles` carry over unchanged."""
        for key in self.cache.layer_entries(layer, roles):
            new[key] = state[key]
        self._bookkeep(layer, h, None, False, state, new)
        return state[self.cache.name(Role.OUT, layer)]

    # -- layers ------------------------------------------------------------------------------
    def _qkv(self, attn, x: torch.Tensor, ridx: torch.Tensor | None):
        """Queries, keys and values of the tokens in x (R, K, D); ridx: their token indices (R, K)
        or None for all tokens (families with rotary embeddings need the positions)."""
        return attn.to_q(x), attn.to_k(x), attn.to_v(x)

    def _self_attention(self, index, layer, attn, attn_in: Callable, h, state, new) -> torch.Tensor:
        cache = self.cache
        if self._is(index, 0):
            return self._reuse_all(layer, h, state, new)
        q, keys, values, idx, where = self._fresh_qkv(index, layer, attn, attn_in, h, state, new)
        # the attention map is materialised only when the selector reads it (attention received);
        # otherwise the attention runs fused
        need_recv = cache.has(Role.RECV, layer)
        fresh, attention = self._attend(attn, q, keys, values, need_probs=need_recv)
        self._store(new, Role.KEY, layer, keys)
        self._store(new, Role.VALUE, layer, values)
        if need_recv:
            recv_key = cache.name(Role.RECV, layer)
            new[recv_key] = self.part_score(self._attention_received, index, attention.probs, state[recv_key])
        out = fresh if idx is None else self._scatter(state[cache.name(Role.OUT, layer)], where, fresh)
        self._store(new, Role.OUT, layer, out)
        self._bookkeep(layer, h, idx, idx is None, state, new)
        return out

    def _attention_received(self, index: int, probs: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Attention each token received (the score signal of later layers) from this layer's map."""
        if self.dynamic_k:  # K = 0 computes no queries: keep what was received before
            count = self._k_count(index)
            return torch.where(count > 0, tc.attention_received(probs, self.halves, count), previous)
        return tc.attention_received(probs, self.halves)

    def _fresh_qkv(self, index, layer, attn, attn_in: Callable, h, state, new):
        """Queries of the K selected tokens (all N when K = N) and every token's keys/values: the
        selected tokens' fresh ones scattered into the layer's key/value cache. Returns
        (q, keys, values, idx, where): where the `tc.ScatterIndex` of the fresh tokens, for the
        layer's other scatters; idx/where None when all tokens were computed."""
        if self._is(index, h.shape[1]):
            q, keys, values = self._qkv(attn, attn_in(h), None)
            self._store_value_norms(layer, values, None, state, new)
            return q, keys, values, None, None
        idx = self._select(index, layer, layer, h, state, new)
        ridx, x = self._gather(h, idx)
        q, fresh_k, fresh_v = self._qkv(attn, attn_in(x), ridx)
        where = self._scatter_index(ridx)
        keys = self._scatter(state[self.cache.name(Role.KEY, layer)], where, fresh_k)
        values = self._scatter(state[self.cache.name(Role.VALUE, layer)], where, fresh_v)
        self._store_value_norms(layer, fresh_v, idx, state, new)
        return q, keys, values, idx, where

    def _store_value_norms(self, layer: LayerRef, values: torch.Tensor, idx: torch.Tensor | None,
                           state: dict[str, torch.Tensor], new: StepEntries) -> None:
        """The layer's `vnorm` entry, where the cache keeps one (score "value_norm"): the norms of
        all N values (idx None), or of the K fresh ones (R, K, D) written at idx (B, K) over the
        cached norms, so no step takes the norms of all N values again (score part)."""
        if self.cache.has(Role.VALUE_NORM, layer):
            key = self.cache.name(Role.VALUE_NORM, layer)
            new[key] = self.part_score(self._value_norm_entry, values, idx, state[key])

    def _value_norm_entry(self, values, idx, previous) -> torch.Tensor:
        norms = tc.value_norms(values, self.halves).to(previous.dtype)  # autocast: the cache stays float32
        return norms if idx is None else previous.scatter(1, idx, norms)

    @staticmethod
    def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
        """(R, M, D) -> (R, heads, M, D/heads), the layout attention multiplies in."""
        # unflatten, not reshape(..., -1, ...): valid for zero tokens (K = 0 in a universal step)
        return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)

    def _attend(self, attn, q, keys, values, need_probs: bool = True, bias: torch.Tensor | None = None):
        """Multi-head attention of q (R, Q, D) over keys/values (R, M, D), or already split into
        heads (R, heads, M, D/heads) -> (output projected, the map (`tc.AttentionMap`, (R, heads,
        Q, M)) or None). Explicit softmax when the map feeds a score; otherwise
        scaled_dot_product_attention (fusable). bias: additive mask broadcast to (R, heads, Q, M)."""
        heads = attn.heads
        hd = q.shape[-1] // heads
        q = self.split_heads(q, heads)
        if keys.dim() == 3:
            keys, values = self.split_heads(keys, heads), self.split_heads(values, heads)
        if need_probs:
            logits = (q @ keys.transpose(-1, -2)) * (hd ** -0.5)
            if bias is not None:
                logits = logits + bias
            probs = torch.softmax(logits, dim=-1)
            attention = tc.AttentionMap(probs, logits)
            o = probs @ values
        else:
            attention = None
            o = nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
        o = o.transpose(1, 2)
        o = o.reshape(o.shape[0], o.shape[1], o.shape[2] * o.shape[3])  # no -1: valid for zero queries
        return attn.to_out[0](o), attention

    def _token_layer(self, index, layer, sa, fn: Callable, fn_in: Callable, h, state, new) -> torch.Tensor:
        """A layer computed per token: out = fn(fn_in(h)) at the selected tokens, cache elsewhere."""
        if self._is(index, 0):
            return self._reuse_all(layer, h, state, new)
        if self._is(index, h.shape[1]):
            out = fn(fn_in(h), None)
            idx = None
        else:
            idx = self._select(index, layer, sa, h, state, new)
            ridx, x = self._gather(h, idx)
            out = self._scatter(state[self.cache.name(Role.OUT, layer)], self._scatter_index(ridx), fn(fn_in(x), idx))
        self._store(new, Role.OUT, layer, out)
        self._bookkeep(layer, h, idx, idx is None, state, new)
        return out

    def _mlp(self, index, layer, sa, ff, mlp_in, h, state, new) -> torch.Tensor:
        return self._token_layer(index, layer, sa, lambda x, idx: ff(x), mlp_in, h, state, new)

    @property
    def computes_text(self) -> bool:
        """Whether this step computes its cross-attention text keys and values (else it reads
        them from the cache, and needs no text projection either)."""
        return self.refreshes_conditioning or not self.conditioning.context

    def _text_kv(self, layer, attn, context, state, new) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values of the text: computed here (R, M, D), or (under a plan that
        hoists them, diffsparse/conditioning.py) by refresh steps and read from the cache, split
        into heads (R, heads, M, D/heads) once, so that partial steps do not transpose them again."""
        if not self.cache.has(Role.TEXT_KEY, layer):
            return attn.to_k(context), attn.to_v(context)
        k_name, v_name = self.cache.name(Role.TEXT_KEY, layer), self.cache.name(Role.TEXT_VALUE, layer)
        if self.computes_text:
            keys, values = (self.split_heads(x, attn.heads) for x in (attn.to_k(context), attn.to_v(context)))
        else:
            keys, values = state[k_name], state[v_name]
        new[k_name], new[v_name] = keys, values
        return keys, values

    def _cross_attention(self, index, layer, sa, attn, ca_in, h, context, state, new,
                         context_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-attention of the image/video tokens (queries) over fixed text tokens `context`
        (R, M, D_ctx); context_bias (R, 1, 1, M) masks padded text (0 or -inf). The text keys and
        values are the same at every step: under a plan that hoists them, refresh steps compute
        them and partial steps read them from the cache (`_text_kv`)."""
        need_probs = self.cache.has(Role.ENT, layer)
        ent_key = self.cache.name(Role.ENT, layer) if need_probs else None
        keys, values = self._text_kv(layer, attn, context, state, new)
        entropy: list[torch.Tensor] = []

        def fn(x, idx):
            q = attn.to_q(x)
            out, attention = self._attend(attn, q, keys, values, need_probs, context_bias)
            if need_probs:
                ent = self.part_score(tc.attention_entropy, attention, self.halves)
                entropy.append(ent if idx is None else self._scatter(
                    state[ent_key].unsqueeze(-1), self._scatter_index(idx), ent.unsqueeze(-1)).squeeze(-1))
            return out

        out = self._token_layer(index, layer, sa, fn, ca_in, h, state, new)
        if need_probs:
            new[ent_key] = entropy[0] if entropy else state[ent_key]
        return out
