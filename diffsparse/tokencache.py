"""Token-cache building blocks shared by every model family (paper eq. 3-5, A.5.1).

All functions are written with static shapes and ops that export to ONNX opset 18 and stay inside
what TensorRT supports: TopK with a constant K, Gather with int32 indices, ScatterND (int64
indices, as the ONNX spec requires for it), ReduceMax over reshaped windows for the spatial bonus.

Layout conventions:
    rows R = batch B x (2 when classifier-free guidance is on); the conditional half comes first.
    Token scores, reuse counts and indices are per *sample* (B, N): both guidance halves of a sample
    select the same tokens, so the halves' scores are averaged before TopK.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffsparse.schedule import SelectorConfig

# Tiny, index-proportional penalty so exact ties resolve to the lower token index the same way
# in PyTorch and in ONNX Runtime/TensorRT TopK (whose tie order is not specified identically).
TIE_BREAK = 1e-6
# A token "holds its tile's maximum" (spatial bonus) when within this relative margin of it. Tokens
# with identical inputs (a uniform background) get scores that differ in the last bits between
# PyTorch and ONNX Runtime; an exact comparison then gave the bonus (0.6 of score) to different
# tokens in the two, and the value-norm and cosine scores failed export parity on mnist-dit.
SPATIAL_TIE = 1e-5


def merge_halves(x: torch.Tensor, halves: int) -> torch.Tensor:
    """(R, ...) -> (B, ...): mean over the guidance halves of each sample."""
    if halves == 1:
        return x
    return x.reshape(halves, x.shape[0] // halves, *x.shape[1:]).mean(0)


def rows_index(idx: torch.Tensor, halves: int) -> torch.Tensor:
    """(B, K) per-sample indices -> (R, K): the same tokens for each guidance half."""
    return idx if halves == 1 else torch.cat([idx] * halves, dim=0)


def _tiles(score: torch.Tensor, grid: tuple[int, int], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """score (B, N) as (B, h/k, k, w/k, k) tiles, and each tile's threshold for the spatial bonus:
    its maximum less `SPATIAL_TIE` (relative)."""
    b, n = score.shape
    h, w = grid
    if h % window or w % window:
        raise ValueError(f"token grid {h}x{w} is not divisible by the spatial-bonus window {window}")
    tiles = score.reshape(b, h // window, window, w // window, window)
    tile_max = tiles.amax(dim=(2, 4), keepdim=True)
    return tiles, tile_max - SPATIAL_TIE * (1.0 + tile_max.abs())


def spatial_bonus(score: torch.Tensor, grid: tuple[int, int], window: int, bonus: float) -> torch.Tensor:
    """Add `bonus` to each token that holds the maximum score of its window x window tile (up to
    float rounding: `SPATIAL_TIE`).

    Tiles are non-overlapping, which keeps the op a reshape + ReduceMax (static shape)."""
    if bonus == 0.0 or window <= 1:
        return score
    tiles, threshold = _tiles(score, grid, window)
    # a select, not score + bonus * mask: one op fewer per layer and step, the same numbers
    return torch.where(tiles >= threshold, tiles + bonus, tiles).reshape(score.shape)


def bonus_margin(score: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """(B, N): how far each token's score lies above its tile's bonus threshold (>= 0: it gets the
    bonus). Where the margin is within float rounding of 0, another runtime may decide the bonus
    the other way: the score then moves by the whole bonus (export/verify.py counts that as a tie)."""
    tiles, threshold = _tiles(score, grid, window)
    return (tiles - threshold).reshape(score.shape)


def _weighted(weight: float, term: torch.Tensor) -> torch.Tensor:
    # x * 1.0 is x: no graph op for a weight of 1
    return term if weight == 1.0 else weight * term


def weighted_score(main: torch.Tensor | None, reuse: torch.Tensor, selector: SelectorConfig,
                   entropy: torch.Tensor | None = None) -> torch.Tensor:
    """λ1 s1 + λ2 s2 + λ3 s3 (paper eq. 10 before the spatial bonus); all terms (B, N). A term
    whose λ is 0 (or that is None) is left out of the graph, not multiplied by 0: the same
    number (0 + x is x), fewer small ops per layer and step."""
    l1, l2, l3, _ = selector.lambdas
    score = _weighted(l3, reuse)
    if main is not None and l1 != 0.0:
        score = _weighted(l1, main) + score
    if entropy is not None and l2 != 0.0:
        score = score + _weighted(l2, entropy)
    return score


def bonus_applies(selector: SelectorConfig, grid: tuple[int, int] | None) -> bool:
    """Whether the spatial bonus λ4 enters a layer's score (tokens with a grid, a window, λ4 ≠ 0)."""
    return grid is not None and selector.window > 1 and selector.lambdas[3] != 0.0


def tie_ramp(n: int, like: torch.Tensor) -> torch.Tensor:
    """(N,): i · TIE_BREAK / N, subtracted from the scores of N tokens so that ties go to the lower index."""
    return torch.arange(n, dtype=like.dtype, device=like.device) * (TIE_BREAK / n)


def finish_score(weighted: torch.Tensor, selector: SelectorConfig, grid: tuple[int, int] | None,
                 ramp: torch.Tensor | None = None) -> torch.Tensor:
    """S = B(weighted) less the tie-break ramp: the score TopK ranks (paper eq. 10). ramp: the
    `tie_ramp` of this token count, where the caller shares one between layers."""
    score = weighted
    if bonus_applies(selector, grid):
        score = spatial_bonus(score, grid, selector.window, selector.lambdas[3])
    return score - (tie_ramp(score.shape[1], score) if ramp is None else ramp)


def composite_score(main: torch.Tensor | None, reuse: torch.Tensor, selector: SelectorConfig,
                    grid: tuple[int, int] | None, entropy: torch.Tensor | None = None) -> torch.Tensor:
    """S = B(λ1 s1 + λ2 s2 + λ3 s3) (paper eq. 10); all terms (B, N). grid None: tokens without a
    spatial layout (text), no spatial bonus."""
    return finish_score(weighted_score(main, reuse, selector, entropy), selector, grid)


# TensorRT's TopK takes K <= 3840 (ITopKLayer). Larger selections are split (top_tokens).
TOPK_LIMIT = 3840


def topk_chunks(n: int, k: int, limit: int = TOPK_LIMIT) -> int:
    """How many equal contiguous chunks a K-of-N selection is split into so each TopK stays
    within `limit`: 1 when k <= limit, else the smallest c >= ceil(k / limit) dividing both N and K."""
    if k <= limit:
        return 1
    for c in range(-(-k // limit), n + 1):
        if n % c == 0 and k % c == 0:
            return c
    raise ValueError(f"cannot split a TopK of K={k} over N={n} tokens into chunks of at most {limit}")


def top_tokens(score: torch.Tensor, k: int, limit: int = TOPK_LIMIT) -> torch.Tensor:
    """Indices (B, k) of the k highest-scoring tokens, int32 as TensorRT requires.

    Where K exceeds TensorRT's TopK limit (FLUX at 1024² with 4096 tokens and K > 3840, video
    models), the tokens are split into c contiguous chunks (raster order: bands of rows or frames)
    and each chunk selects its K/c best: a stratified top-K, computed the same way in PyTorch and
    in every exported graph, so parity holds; it differs from a global top-K only in forcing an
    even spread over the chunks, which the spatial bonus already encourages."""
    b, n = score.shape
    c = topk_chunks(n, k, limit)
    if c == 1:
        return torch.topk(score, k, dim=1, largest=True, sorted=False).indices.to(torch.int32)
    local = torch.topk(score.reshape(b, c, n // c), k // c, dim=2, largest=True, sorted=False).indices
    offsets = torch.arange(c, dtype=local.dtype, device=local.device).reshape(1, c, 1) * (n // c)
    return (local + offsets).reshape(b, k).to(torch.int32)


def _flat_rows(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(R, K) token indices -> (R*K,) indices into the rows-flattened (R*N, D) tensor."""
    rows = torch.arange(idx.shape[0], dtype=idx.dtype, device=idx.device).unsqueeze(1) * n
    # the explicit cast keeps the exported Gather's indices int32 (the exporter promotes the Add);
    # explicit sizes instead of -1 keep the reshape valid for K = 0 (universal step)
    return (idx + rows).reshape(idx.shape[0] * idx.shape[1]).to(torch.int32)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (R, N, D), idx (R, K) int32, or (1, K): the same tokens of every row -> (R, K, D).

    Whole D-vectors are copied (much faster than an element-wise GatherElements): one Gather
    along the token axis when every row takes the same tokens (batch 1, both guidance halves),
    else a row Gather on the rows-flattened tensor, whose indices take a few ops more to build."""
    r, n, d = x.shape
    if idx.shape[0] == 1:
        return torch.index_select(x, 1, idx.reshape(idx.shape[1]))
    return torch.index_select(x.reshape(r * n, d), 0, _flat_rows(idx, n)).reshape(r, idx.shape[1], d)


class ScatterIndex(NamedTuple):
    """Where a layer's K fresh tokens go in its (R, N, ...) caches: the (row, token) pair of each,
    both (R, K) int64 (ONNX defines ScatterND indices as int64). Built once per layer
    (`scatter_index`) for all the layer's scatters: keys, values and outputs share it."""
    rows: torch.Tensor
    tokens: torch.Tensor


def scatter_index(idx: torch.Tensor) -> ScatterIndex:
    """(R, K) token indices of each row -> their `ScatterIndex`."""
    rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand(idx.shape)
    return ScatterIndex(rows, idx.to(torch.int64))


def scatter_tokens(cache: torch.Tensor, index: ScatterIndex, fresh: torch.Tensor) -> torch.Tensor:
    """Write fresh (R, K, ...) into a copy of cache (R, N, ...) at `index`: paper eq. 4.

    Exported as one ScatterND over (row, token) pairs on the cache: whole D-vectors are copied (7x
    faster than ScatterElements on ONNX Runtime CPU) and the cache input is not reshaped (a
    reshape of a graph input costs ORT a copy)."""
    return cache.index_put(tuple(index), fresh.to(cache.dtype))


def next_reuse(reuse: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Reuse counts n_i: reset to 0 where recomputed, +1 elsewhere. idx None means none recomputed."""
    if idx is None:
        return reuse + 1.0
    # n_i + 1 with the recomputed tokens overwritten by 0: two ops (a mask and a product took five;
    # a scalar 0, not a zeros tensor, which would be one more kernel per layer on a GPU)
    return (reuse + 1.0).scatter(1, idx, 0.0)


def attention_received(probs: torch.Tensor, halves: int, count: torch.Tensor | None = None) -> torch.Tensor:
    """probs (R, heads, Q, N) -> (B, N): attention each key token receives, mean over heads and
    queries, scaled by N so that a uniform map scores 1 per token (s1 of A.5.1)."""
    n = probs.shape[-1]
    if count is None:
        return merge_halves(probs.mean(dim=(1, 2)), halves) * n
    # a universal step passes the query count as a tensor read off a graph input (sizes of
    # intermediate tensors get frozen into the traced graph); clamped: with no queries (K = 0)
    # the caller discards the result
    return merge_halves(probs.sum(dim=2).mean(dim=1), halves) * n / count.clamp_min(1.0)


def token_norm_score(x: torch.Tensor, halves: int) -> torch.Tensor:
    """ℓ2 norm of each input token, normalised to mean 1 over tokens (Table 5 'norm')."""
    norms = merge_halves(torch.linalg.vector_norm(x, dim=-1), halves)
    return norms / norms.mean(dim=1, keepdim=True)


def value_norms(values: torch.Tensor, halves: int) -> torch.Tensor:
    """values (R, K, D) -> (B, K): ‖v_i‖ of each token, mean over the guidance halves (what the
    `vnorm` cache entry holds for every token, diffsparse/cache_layout.py)."""
    return merge_halves(torch.linalg.vector_norm(values, dim=-1), halves)


def value_norm_score(norms: torch.Tensor) -> torch.Tensor:
    """DuCa's value-norm score for Wan2.1 (A.5.1) from the value norms (B, N) (`value_norms`):
    tokens whose self-attention values have *smaller* norms score higher. 2 - |v| / mean|v|, so
    the mean is 1 like the other scores."""
    return 2.0 - norms / norms.mean(dim=1, keepdim=True)


class AttentionMap(NamedTuple):
    """An explicit attention map, both (R, heads, Q, M): probs = softmax(logits) over the M keys,
    logits as the softmax saw them (scaled, any additive mask included)."""
    probs: torch.Tensor
    logits: torch.Tensor


def attention_entropy(attention: AttentionMap, halves: int) -> torch.Tensor:
    """(R, heads, Q, M) map -> (B, Q): entropy of each query's attention over the M keys (s2 of
    A.5.1 for cross-attention), mean over heads, normalised by log M to [0, 1].

        H = -Σ_j p_j log p_j = lse - Σ_j p_j l_j,   lse = log Σ_j e^{l_j} = l_max - log p_max,

    since the largest probability is p_max = e^{l_max - lse}. So no logarithm is taken per element
    of the map (ONNX Runtime's Log over it cost 8x a Clip of the same size: 44 ms per generation of
    PixArt-α at 256², 5 steps), only per query."""
    probs, logits = attention
    m = probs.shape[-1]
    ent = (logits.amax(-1) - (probs * logits).sum(-1) - torch.log(probs.amax(-1))).mean(1)
    return merge_halves(ent, halves) / max(1.0, math.log(m))


def token_change_score(x: torch.Tensor, previous: torch.Tensor, halves: int) -> torch.Tensor:
    """1 - cosine similarity of each input token to its value when last computed (Table 5 'similarity')."""
    cos = torch.nn.functional.cosine_similarity(x, previous, dim=-1, eps=1e-6)
    return merge_halves(1.0 - cos, halves)
