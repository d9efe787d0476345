"""Parity of exported step graphs against the PyTorch step they came from.

Inputs are realistic rather than zeros: a random latent runs one dense PyTorch step to fill the
token cache, then every graph and its PyTorch step get the same latent, constants and cache.

Token selection is discrete: where two tokens' scores are equal up to float rounding (common with
random weights, whose cross-attention entropies are nearly uniform), ONNX Runtime and PyTorch may
pick different ones, and everything downstream differs. So when the outputs differ, the selection
the graph made (read off its reuse-count outputs: 0 exactly where a token was recomputed) is
imposed on the PyTorch step and the outputs are compared again — and every token the two picked
differently must be a near tie of the PyTorch scores (within `TIE_TOLERANCE`), or the graph fails.
The spatial bonus is a threshold (a token within `SPATIAL_TIE` of its tile's maximum gets it), so a
token at that threshold up to rounding may get the bonus in one runtime and not in the other: its
score then differs by the whole bonus, and that too is a tie (`check_ties`).

Quantized graphs (int8) are compared with the same fp32 PyTorch step, but their token scores are
computed from int8 matmul outputs, so they may rank tokens differently beyond a tie: there the
graph's selection is imposed without the tie rule (the differently picked tokens are counted and
logged) and the error measures the numerics of the quantized computation, against the looser
tolerance the manifest records (export/quantize.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from diffsparse import tokencache as tc
from diffsparse.cache_layout import Role, output_name
from diffsparse.manifest import Manifest
from diffsparse.models.base import ModelSpec, StepCall
from diffsparse.runtime.backends.ort import OrtBackend
from diffsparse.runtime.bundle import Bundle, recorded_conditioning
from diffsparse.sampler import initial_noise

log = logging.getLogger(__name__)
# score gap (relative to max(1, |score|)) under which a different pick counts as a tie
TIE_TOLERANCE = 1e-4


class SelectionMismatch(ValueError):
    """The graph selected tokens the PyTorch step would not, beyond a tie in scores."""


def reference_inputs(spec: ModelSpec, manifest: Manifest, seed: int = 0) -> dict[str, np.ndarray]:
    """Latent, step constants, conditioning and a filled cache, keyed by graph input name."""
    plan = manifest.sampler
    selector = manifest.schedule.selector
    rng = np.random.default_rng(seed)
    conditioning = spec.example_conditioning(rng)
    latent = initial_noise(seed, spec.batch_size, spec.latent_shape)
    layer_cache = manifest.layer_cache
    # the spec's own layout for this selector: the universal-graph tests pass a manifest whose
    # recorded cache is another selector's
    hoisting = recorded_conditioning(spec, manifest)
    layout = spec.cache_layout(selector, layer_cache, hoisting)
    dense = spec.build_step(spec.dense_keep(), selector, layer_cache, hoisting)
    scale = spec.resolve_guidance_scale(None)
    feeds0 = spec.feeds(StepCall(float(plan.timesteps[0]), plan.coefficients[0]), conditioning, scale)
    specs = spec.step_inputs()
    with torch.inference_mode():
        args = [torch.from_numpy(latent)] + [torch.from_numpy(feeds0[s.name]) for s in specs[1:]]
        out = dense(*args, *layout.zeros())
    t = min(1, len(plan.timesteps) - 1)
    feeds = spec.feeds(StepCall(float(plan.timesteps[t]), plan.coefficients[t]), conditioning, scale)
    feeds[specs[0].name] = out[0].numpy()
    for name, value in zip(layout.names, out[1:]):
        feeds[name] = value.numpy()
    return feeds


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Max over outputs of max|a - b| / max(1, max|b|): absolute for O(1) tensors, relative for large."""
    worst = 0.0
    for name, ref in b.items():
        diff = np.abs(a[name].astype(np.float64) - ref.astype(np.float64)).max() if ref.size else 0.0
        worst = max(worst, float(diff / max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)))
    return worst


def _run_torch(module, feeds: dict[str, np.ndarray], in_names: list[str], out_names: list[str]):
    with torch.inference_mode():
        ref = module(*[torch.from_numpy(feeds[n]) for n in in_names])
    return {n: r.numpy() for n, r in zip(out_names, ref)}


def graph_selection(spec: ModelSpec, keep: list[int], outputs: dict[str, np.ndarray],
                    layout) -> dict[int, np.ndarray]:
    """Per partial layer index, the tokens (B, K) a step recomputed, from its reuse-count outputs."""
    chosen = {}
    for i, (layer, k) in enumerate(zip(spec.layers, keep)):
        if not layout.has(Role.REUSE, layer) or not 0 < k < spec.layer_tokens(layer):
            continue
        reuse = outputs.get(output_name(layout.name(Role.REUSE, layer)))
        if reuse is None:
            continue
        hit = reuse == 0
        if (hit.sum(axis=1) != k).any():
            raise SelectionMismatch(f"layer {layer.name}: the graph recomputed {hit.sum(axis=1).tolist()} tokens, not K={k}")
        chosen[i] = np.stack([np.flatnonzero(row) for row in hit]).astype(np.int32)
    return chosen


def check_ties(spec: ModelSpec, keep: list[int], scores: dict[int, torch.Tensor],
               imposed: dict[int, np.ndarray], tolerance: float = TIE_TOLERANCE,
               bonus_margins: dict[int, torch.Tensor] | None = None, bonus: float = 0.0) -> int:
    """Tokens picked differently from the PyTorch step's own TopK; raises unless each is a near tie
    (within `tolerance` relative to the scores; inf: only count them).

    A tie is also one in the spatial-bonus decision: a token whose bonus margin
    (`bonus_margins`, tokencache.bonus_margin) is within the tolerance of 0 may have its score
    moved by the whole `bonus` in another runtime (up if PyTorch gave it none, down if it did)."""
    flips = 0
    for i, idx in imposed.items():
        s = scores[i].double().numpy()
        own = tc.top_tokens(scores[i], keep[i]).numpy()
        for b in range(s.shape[0]):
            mine, theirs = set(own[b].tolist()), set(idx[b].tolist())
            if mine == theirs:
                continue
            only_mine, only_theirs = sorted(mine - theirs), sorted(theirs - mine)
            scale = max(1.0, float(np.abs(s[b]).max()))
            low, high = s[b].copy(), s[b].copy()
            if bonus_margins is not None and i in bonus_margins:
                margin = bonus_margins[i][b].double().numpy()
                at_tie = np.abs(margin) <= tolerance * scale
                low[at_tie & (margin >= 0)] -= bonus
                high[at_tie & (margin < 0)] += bonus
            gap = low[only_mine].min() - high[only_theirs].max()
            if gap > tolerance * scale:
                raise SelectionMismatch(
                    f"layer {spec.layers[i].name}: the graph selected tokens {only_theirs[:5]} instead of "
                    f"{only_mine[:5]}, whose scores differ by {gap:.3g} (more than a rounding tie)")
            flips += len(only_mine)
    return flips


def verify_graphs(folder: str | Path, spec: ModelSpec, quantized: bool = False) -> list[float]:
    """Per graph, the parity error of ONNX Runtime against the PyTorch step (see `compare`), with
    rounding ties in token selection resolved the graph's way (module docstring). quantized: the
    graphs are int8, so any differently selected token is imposed and counted, not refused."""
    folder = Path(folder)
    # the runtime's own sessions: weights shared from one memory map of weights.bin, as served
    # (and a model larger than memory still loads)
    backend = OrtBackend(Bundle(folder, verify=False))
    backend.load()
    manifest = backend.bundle.manifest
    feeds = reference_inputs(spec, manifest)
    selector = manifest.schedule.selector
    in_names = [s.name for s in manifest.inputs] + manifest.cache.names
    out_names = [s.name for s in manifest.outputs] + manifest.cache.output_names
    hoisting = backend.bundle.conditioning
    errors = []
    for i, g in enumerate(manifest.graphs):
        module = spec.build_step(g.keep, selector, manifest.layer_cache, hoisting)
        # the exporter drops inputs a graph does not read (e.g. reuse counts of a full step), and a
        # finished bundle's graphs output only the cache entries a later step reads (export/prune.py)
        got = backend.run_once(i, {n: feeds[n] for n in in_names})
        graph_outs = list(got)

        def reference():
            ref = _run_torch(module, feeds, in_names, out_names)
            return {n: ref[n] for n in graph_outs}

        err = compare(got, reference())
        if err > 1e-4:
            imposed = graph_selection(spec, g.keep, got, manifest.cache)
            module.forced_selection = {i: torch.from_numpy(v) for i, v in imposed.items()}
            module.record_scores, module.record_bonus_margins = {}, {}
            ref = reference()
            flips = check_ties(spec, g.keep, module.record_scores, imposed,
                               tolerance=float("inf") if quantized else TIE_TOLERANCE,
                               bonus_margins=module.record_bonus_margins, bonus=selector.lambdas[3])
            err = compare(got, ref)
            log.info("graph %s: %d token(s) selected differently at score ties; parity with the graph's "
                     "selection %.3g", g.file, flips, err)
        errors.append(err)
    return errors
