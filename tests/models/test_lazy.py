"""Models larger than memory: module-by-module random init, streamed into the bundle's weights."""

import numpy as np
import pytest
import torch
from diffsparse.export.bundle import export_bundle
from diffsparse.export.verify import verify_graphs

from diffsparse.builtin_schedules import toca_schedule
from diffsparse.manifest import Manifest
from diffsparse.models import lazy
from diffsparse.models.zoo import BUILTINS, load_model, make_spec

CONFIG = BUILTINS["flux-tiny"].config


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel


def test_lazy_model_has_no_parameter_memory_until_materialised():
    model = lazy.build_lazy(_flux(), CONFIG, seed=3)
    assert lazy.is_lazy(model)
    assert all(p.device.type == "meta" for p in model.parameters())
    lazy.materialize(model)
    assert not lazy.is_lazy(model)
    params = dict(model.named_parameters())
    # norm scales start at one, linear layers at PyTorch's default init
    assert torch.equal(params["transformer_blocks.0.attn.norm_q.weight"], torch.ones(CONFIG["attention_head_dim"]))
    w = params["x_embedder.weight"]
    assert w.std() > 0 and w.abs().max() <= 1 / np.sqrt(CONFIG["in_channels"]) + 1e-6


def test_values_depend_on_the_seed_only_not_on_the_sink():
    kept = {}

    def sink(name, tensor):
        kept[name] = tensor.clone()
        return tensor.clone()

    a = lazy.materialize(lazy.build_lazy(_flux(), CONFIG, seed=1))
    b = lazy.materialize(lazy.build_lazy(_flux(), CONFIG, seed=1), sink)
    c = lazy.materialize(lazy.build_lazy(_flux(), CONFIG, seed=2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert set(kept) == {n for n, _ in a.named_parameters()}
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_materialise_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lazy.materialize(lazy.build_lazy(_flux(), CONFIG, seed=0))
    assert torch.equal(torch.rand(3), expected)


def _mapped_ranges(under: str) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of files under `under` (Linux)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith(under):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


@pytest.fixture
def streamed_builtin(monkeypatch):
    """flux-tiny marked as a model too large for memory."""
    from dataclasses import replace

    monkeypatch.setitem(BUILTINS, "flux-tiny", replace(BUILTINS["flux-tiny"], streamed=True))
    return "flux-tiny"


def test_streamed_builtin_is_lazy_only_when_asked(streamed_builtin):
    _, in_memory, _ = load_model(streamed_builtin)
    _, streamed, _ = load_model(streamed_builtin, streamed_weights=True)
    assert not lazy.is_lazy(in_memory) and lazy.is_lazy(streamed)
    lazy.materialize(streamed)
    assert all(torch.equal(a, b) for a, b in zip(in_memory.state_dict().values(), streamed.state_dict().values()))


def test_streamed_export_writes_each_weight_once_and_matches_pytorch(streamed_builtin, tmp_path):
    spec = make_spec(streamed_builtin, guidance=False, streamed_weights=True)
    reference = make_spec(streamed_builtin, guidance=False)  # the same weights, in memory
    schedule = toca_schedule(spec, 4, 0.8, full_every=2)
    export_bundle(spec, schedule, tmp_path / "b")
    # the model's parameters now live in the bundle's weights file, not in memory
    assert not lazy.is_lazy(spec.model)
    mapped = _mapped_ranges(str(tmp_path))
    in_memory = spec.sliced_parameters()
    for name, p in spec.model.named_parameters():
        in_file = any(lo <= p.data_ptr() < hi for lo, hi in mapped)
        assert in_file == (name not in in_memory and p.numel() * 4 >= 1024), name
    assert all(torch.equal(a, b) for a, b in zip(spec.model.state_dict().values(),
                                                  reference.model.state_dict().values()))
    m = Manifest.load(tmp_path / "b")
    params = sum(p.numel() * 4 for p in spec.model.parameters())
    # each weight once, plus (for the torch backend's parameter map) the whole of each parameter
    # the graphs read only in slices, and the small ones the graphs inline (alignment dominates
    # them in a model this tiny)
    sliced = sum(p.numel() * 4 for n, p in spec.model.named_parameters() if n in in_memory)
    assert m.weights["bytes"] < 1.15 * params + sliced
    errors = verify_graphs(tmp_path / "b", reference)
    assert max(errors) < 1e-4
