"""Selection-aware parity: rounding ties in TopK may be resolved differently by ONNX Runtime."""

import numpy as np
import pytest
import torch
from diffsparse.export.verify import SelectionMismatch, _run_torch, check_ties, graph_selection, reference_inputs

from diffsparse.cache_layout import Role, output_name
from diffsparse.manifest import Manifest


def _names(manifest):
    return ([s.name for s in manifest.inputs] + manifest.cache.names,
            [s.name for s in manifest.outputs] + manifest.cache.output_names)


def test_an_imposed_selection_is_what_the_step_computes(tiny_bundles, tiny_spec):
    """forced_selection drives the step, and graph_selection reads it back from the reuse counts."""
    m = Manifest.load(tiny_bundles["toca"])
    g = next(g for g in m.graphs if any(0 < k < tiny_spec.num_tokens for k in g.keep))
    feeds = reference_inputs(tiny_spec, m)
    in_names, out_names = _names(m)
    step = tiny_spec.build_step(g.keep, m.schedule.selector, True, tiny_spec.conditioning_plan(m.schedule))
    step.record_scores = {}
    own = graph_selection(tiny_spec, g.keep, _run_torch(step, feeds, in_names, out_names), m.cache)
    assert own and set(own) == set(step.record_scores)
    i = min(own)
    # swap the lowest-scoring selected token of sample 0 for the best unselected one
    scores = step.record_scores[i][0]
    chosen = own[i][0].tolist()
    out = max((t for t in range(tiny_spec.num_tokens) if t not in chosen), key=lambda t: float(scores[t]))
    worst = min(chosen, key=lambda t: float(scores[t]))
    swapped = {**own, i: own[i].copy()}
    swapped[i][0, chosen.index(worst)] = out
    step.forced_selection = {k: torch.from_numpy(v) for k, v in swapped.items()}
    outputs = _run_torch(step, feeds, in_names, out_names)
    back = graph_selection(tiny_spec, g.keep, outputs, m.cache)
    assert sorted(back[i][0].tolist()) == sorted(swapped[i][0].tolist())
    gap = float(scores[worst] - scores[out])
    assert gap > 0
    with pytest.raises(SelectionMismatch, match="more than a rounding tie"):
        check_ties(tiny_spec, g.keep, {i: step.record_scores[i]}, {i: swapped[i]})


def test_near_ties_are_accepted_and_counted(tiny_spec):
    layer = 0
    keep = [2] + [tiny_spec.num_tokens] * (len(tiny_spec.layers) - 1)
    scores = torch.zeros(1, tiny_spec.num_tokens, dtype=torch.float64)
    scores[0, :3] = torch.tensor([5.0, 3.0, 3.0 - 1e-7])
    # PyTorch picks {0, 1}; a graph that picked {0, 2} hit a rounding tie
    assert check_ties(tiny_spec, keep, {layer: scores}, {layer: np.array([[0, 2]], np.int32)}) == 1
    assert check_ties(tiny_spec, keep, {layer: scores}, {layer: np.array([[1, 0]], np.int32)}) == 0
    with pytest.raises(SelectionMismatch, match="tokens \\[3\\] instead of \\[1\\]"):
        check_ties(tiny_spec, keep, {layer: scores}, {layer: np.array([[0, 3]], np.int32)})


def test_reuse_counts_must_show_k_recomputed_tokens(tiny_spec):
    keep = [2] + [tiny_spec.num_tokens] * (len(tiny_spec.layers) - 1)
    reuse = np.ones((1, tiny_spec.num_tokens), np.float32)
    reuse[0, [4, 9]] = 0
    layout = tiny_spec.cache_layout(tiny_spec.default_selector())
    name = output_name(layout.name(Role.REUSE, tiny_spec.layers[0]))
    assert graph_selection(tiny_spec, keep, {name: reuse}, layout)[0].tolist() == [[4, 9]]
    reuse[0, 11] = 0
    with pytest.raises(SelectionMismatch, match="recomputed \\[3\\] tokens, not K=2"):
        graph_selection(tiny_spec, keep, {name: reuse}, layout)


def test_a_spatial_bonus_decided_at_rounding_level_is_a_tie(tiny_spec):
    """A token at its tile's bonus threshold up to rounding may get the bonus in one runtime and not
    in the other; its score then moves by the whole bonus: a tie, not a wrong graph."""
    layer = 0
    keep = [1] + [tiny_spec.num_tokens] * (len(tiny_spec.layers) - 1)
    scores = torch.zeros(1, tiny_spec.num_tokens, dtype=torch.float64)
    scores[0, :2] = torch.tensor([1.60, 1.58])   # token 0: 1.0 + bonus 0.6; token 1: 0.98 + bonus
    margins = torch.ones_like(scores)
    graph_picked = {layer: np.array([[1]], np.int32)}
    with pytest.raises(SelectionMismatch):
        check_ties(tiny_spec, keep, {layer: scores}, graph_picked, bonus_margins={layer: margins}, bonus=0.6)
    margins[0, 0] = 1e-7   # token 0 only just holds the bonus: ONNX Runtime may have denied it
    assert check_ties(tiny_spec, keep, {layer: scores}, graph_picked, bonus_margins={layer: margins}, bonus=0.6) == 1
    # token 1 (1.05, no bonus) only just misses its tile's bonus: ONNX Runtime may have given it
    margins[0, 0], margins[0, 1] = 1.0, -1e-7
    scores[0, 1] = 1.05
    assert check_ties(tiny_spec, keep, {layer: scores}, graph_picked, bonus_margins={layer: margins}, bonus=0.6) == 1
    margins[0, 1] = -1e-2   # far from the threshold: a real mismatch
    with pytest.raises(SelectionMismatch):
        check_ties(tiny_spec, keep, {layer: scores}, graph_picked, bonus_margins={layer: margins}, bonus=0.6)


def test_cosine_score_bundle_passes_parity_across_bonus_ties(tmp_path):
    """The cosine score on the trained mnist-dit puts tokens of a uniform background at the spatial
    bonus threshold up to rounding; before bonus ties counted as ties its export failed parity."""
    import dataclasses

    from diffsparse.builtin_schedules import toca_schedule
    from diffsparse.export.bundle import ExportConfig, export_bundle
    from diffsparse.models.zoo import make_spec

    spec = make_spec("mnist-dit", batch_size=1)
    selector = dataclasses.replace(spec.default_selector(), score="cosine")
    m = export_bundle(spec, toca_schedule(spec, 10, 0.5, full_every=3, selector=selector), tmp_path / "b",
                      source={"model": "mnist-dit", "seed": 0}, config=ExportConfig())
    assert max(g.parity_max_abs_err for g in m.graphs) < 1e-4
