"""The cache layout: one home for every cache entry's name, shape, dtype and role."""

import pytest

from diffsparse.cache_layout import CacheLayout, CacheLayoutError, Role, carrier_name, output_name
from diffsparse.models.zoo import make_spec
from diffsparse.schedule import LayerRef, SelectorConfig
from diffsparse.tensors import TensorSpec


def test_dit_layout_names_shapes_and_roles():
    spec = make_spec("dit-tiny", batch_size=3)
    layout = spec.cache_layout(SelectorConfig(score="attention", lambdas=(1.0, 0.0, 0.1, 0.6), window=2))
    sa, mlp = LayerRef(0, "SA"), LayerRef(0, "MLP")
    assert layout.name(Role.OUT, sa) == "out.sa0" and output_name(layout.name(Role.OUT, sa)) == "next.out.sa0"
    assert carrier_name(mlp) == "k.mlp0"
    rows, n, d = 6, spec.num_tokens, spec.dim
    assert layout.entry(layout.name(Role.KEY, sa)).shape == (rows, n, d)
    assert layout.entry(layout.name(Role.RECV, sa)).shape == (3, n)
    assert layout.has(Role.RECV, sa) and not layout.has(Role.RECV, mlp) and not layout.has(Role.INP, sa)
    assert layout.layer_entries(mlp) == ["out.mlp0", "reuse.mlp0"]
    with pytest.raises(CacheLayoutError, match="no 'ent' entry for 'sa0'"):
        layout.name(Role.ENT, sa)
    # λ1 = 0: the score never reads attention received, so nothing keeps it
    no_recv = spec.cache_layout(SelectorConfig(score="attention", lambdas=(0.0, 0.0, 0.1, 0.6), window=2))
    assert not any(e.role is Role.RECV for e in no_recv)
    assert spec.cache_layout(SelectorConfig(score="cosine")).has(Role.INP, mlp)


def test_dense_layout_keeps_only_the_sampler_state():
    pixart = make_spec("pixart-tiny")  # DPM-Solver++ 2M carries the previous x0
    layout = pixart.cache_layout(pixart.default_selector(), layer_cache=False)
    assert not layout.has_layer_cache and layout.sampler_names == ["sampler.prev_x0"]
    assert pixart.cache_layout(pixart.default_selector()).has_layer_cache


def test_flux_text_tokens_have_their_own_widths_and_roles():
    spec = make_spec("flux-tiny", guidance=False)
    layout = spec.cache_layout(SelectorConfig(score="attention", lambdas=(1.0, 1.0, 0.1, 0.4), window=4))
    tmlp, sa = LayerRef(0, "TMLP"), LayerRef(0, "SA")
    assert layout.entry(layout.name(Role.OUT, tmlp)).shape[1] == spec.text_len
    assert layout.has(Role.RECV, tmlp) and layout.has(Role.ENT, sa) and not layout.has(Role.ENT, tmlp)


def test_a_recorded_layout_round_trips_and_unknown_names_are_refused():
    spec = make_spec("wan-tiny")
    layout = spec.cache_layout(spec.default_selector())
    back = CacheLayout.from_tensors([TensorSpec.from_dict(d) for d in layout.to_list()])
    assert back == layout and back.names == layout.names
    with pytest.raises(CacheLayoutError, match="not a cache entry name"):
        CacheLayout.from_tensors([TensorSpec("weights.sa0", (1, 2))])
    with pytest.raises(CacheLayoutError, match="unique"):
        CacheLayout.from_tensors([TensorSpec("out.sa0", (1, 2)), TensorSpec("out.sa0", (1, 2))])
