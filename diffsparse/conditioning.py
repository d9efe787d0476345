"""Hoisted step conditioning: the per-step modulation a partial step reads instead of computing.

A DiT block modulates its two layers with rows that depend on the step's conditioning alone
(adaLN-zero, per block b, timestep t, label y):

    c_b = e_b(t) + y_b(y),    [β1, γ1, α1, β2, γ2, α2]_b = W_b · SiLU(c_b) + w_b,

never on the tokens. A partial step that recomputes a few tokens still evaluates every block's
modulation, which reads all of W_b (6·D² per block, 0.9 GB of fp32 weights at DiT-XL/2) to produce
R rows: a memory-bound fixed part of the step that its MACs barely show.

The same holds for the keys and values of a cross-attention over fixed text (PixArt-α: the
caption projection and every block's `W_k·c`, `W_v·c` for M text tokens, ~6% of a dense step's
MACs at 256²): the same at every step. They are computed by each refresh step and kept in the
cache entries `textkey.<layer>` / `textvalue.<layer>` (R, M, D); partial steps attend over them.

So a *refresh* step (every layer recomputes all its tokens) computes the modulation of each
computed step it serves — itself and the partial steps up to the next refresh, a group of at
most G — in one pass over the weights (G·R rows), and writes them to the cache entry
`cond.modulation` of shape (G, R, M); every step of the group reads its own row. The partial
steps then hold only the token work. This is exact: the same rows, computed earlier.

Step graphs are shared between the steps with one sparsity pattern, so a graph finds its step
from its `timestep` input: the plan's timesteps are distinct, and two tables baked into the graph
give, per computed step k, its group's timesteps (`served`, what a refresh computes) and its row
in the group (`row`). A plan exists only where it helps and fits (`plan_conditioning`): a family
that can hoist (`ModelSpec.conditioning_width`), a schedule with partial steps whose first
computed step is a refresh, distinct timesteps, and not the universal graph (its K is an input).

MACs: per computed step, a refresh computes G·R rows of c MACs instead of R, a partial step none
(and no text keys and values, c_text per row):
    macs(k) = step_macs(K_k) + c·R·(G − 1)   (refresh),    step_macs(K_k) − (c + c_text)·R   (partial),
with c = `ModelSpec.conditioning_macs()` (the padding rows of a shorter group included: they are
computed) and c_text = `ModelSpec.context_macs()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: the owner part of the hoisted conditioning's cache entry name (`cond.modulation`)
CONDITIONING_OWNER = "modulation"


@dataclass(frozen=True)
class ConditioningPlan:
    """Which computed step computes whose conditioning rows (module docstring).

    timesteps  per computed step k, its model timestep (what the step graph is fed)
    groups     the computed steps by refresh: each group a refresh's index k, then the partial
               steps that follow it
    width      M, the conditioning values per row; None: no modulation table (text only)
    rows       R, the rows per step (samples × guidance halves)
    macs       c, MACs of one row's conditioning (0 without a table)
    context    whether refresh steps also compute the text keys and values partial steps read
    context_macs  c_text, MACs of one row's text keys and values and text projection (0 without)
    """

    timesteps: tuple[float, ...]
    groups: tuple[tuple[int, ...], ...]
    width: int | None
    rows: int
    macs: int
    context: bool = False
    context_macs: int = 0

    @property
    def group_size(self) -> int:
        """G: the rows-per-row-set of the cache entry (the largest group)."""
        return max(len(g) for g in self.groups)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The cache entry's shape (G, R, M)."""
        return (self.group_size, self.rows, self.width)

    def served(self) -> np.ndarray:
        """(T', G) float32: per computed step, the timesteps of its group in row order, padded
        with the group's last (a refresh computes all G rows; padding rows are never read)."""
        g = self.group_size
        out = np.zeros((len(self.timesteps), g), dtype=np.float32)
        for group in self.groups:
            ts = [self.timesteps[k] for k in group]
            ts += [ts[-1]] * (g - len(ts))
            for k in group:
                out[k] = ts
        return out

    def row(self) -> np.ndarray:
        """(T',) int64: per computed step, its row in its group's rows."""
        out = np.zeros(len(self.timesteps), dtype=np.int64)
        for group in self.groups:
            for i, k in enumerate(group):
                out[k] = i
        return out

    def step_macs_delta(self, k: int) -> int:
        """MACs computed step k spends on conditioning beyond what it would computing its own."""
        return self.graph_macs_delta(any(g[0] == k for g in self.groups))

    def graph_macs_delta(self, refresh: bool) -> int:
        """The same for a graph, by whether it is a refresh's (all graphs of one kind agree)."""
        if refresh:
            return self.rows * self.macs * (self.group_size - 1)
        return -self.rows * (self.macs + self.context_macs)


def plan_conditioning(timesteps: Sequence[float], refresh: Sequence[bool], width: int | None, rows: int,
                      macs: int, context: bool = False, context_macs: int = 0) -> ConditioningPlan | None:
    """The hoisting plan of a schedule's computed steps, or None where there is nothing to gain or
    it would not be exact: nothing hoistable (width None and no text context), no partial step, a
    first step that is not a refresh, or timesteps that are not distinct (a graph finds its step by
    timestep).

    timesteps: per computed step, the model timestep; refresh: per computed step, whether every
    layer recomputes all its tokens."""
    if (width is None and not context) or all(refresh) or not refresh or not refresh[0]:
        return None
    ts = [float(np.float32(t)) for t in timesteps]
    if len(set(ts)) != len(ts):
        return None
    groups: list[list[int]] = []
    for k, full in enumerate(refresh):
        if full:
            groups.append([k])
        else:
            groups[-1].append(k)
    return ConditioningPlan(timesteps=tuple(ts), groups=tuple(tuple(g) for g in groups),
                            width=None if width is None else int(width), rows=int(rows),
                            macs=0 if width is None else int(macs), context=bool(context),
                            context_macs=int(context_macs) if context else 0)
