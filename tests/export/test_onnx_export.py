"""The dynamo export path: weights read in place (Gemm, no transposed copies), weight slices folded."""

import onnx
import onnxscript.optimizer._optimizer as onnxscript_optimizer
import pytest
from diffsparse.export.bundle import export_bundle
from diffsparse.export.onnx_export import export_step
from diffsparse.export.verify import verify_graphs

from diffsparse.builtin_schedules import toca_schedule
from diffsparse.models.zoo import make_spec

SPARSE = [32, 32, 4, 16]

@pytest.fixture(scope="module")
def flux():
    return make_spec("flux-tiny", guidance=False)

@pytest.fixture
def full_size_folding(monkeypatch):
    """The optimizer as it treats full-size weights: inputs this large are never folded."""
    monkeypatch.setitem(onnxscript_optimizer.optimize_ir.__kwdefaults__, "input_size_limit", 16)

def test_linear_layers_read_the_weights_as_stored(flux):
    model = export_step(flux, SPARSE, flux.default_selector())
    weights = {i.name: i for i in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert gemms and all(next(a.i for a in n.attribute if a.name == "transB") == 1 for n in gemms)
    assert not any(n.op_type == "Transpose" and n.input[0] in weights for n in model.graph.node)
    # every parameter that reaches a Gemm is the parameter itself, not a transposed copy
    params = {tuple(p.shape) for p in flux.model.parameters() if p.dim() == 2}
    for n in gemms:
        if n.input[1] in weights:
            assert tuple(weights[n.input[1]].dims) in params

def test_weight_slices_are_folded_when_the_optimizer_leaves_them(flux, full_size_folding, tmp_path):
    model = export_step(flux, SPARSE, flux.default_selector())
    inits = {i.name for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Slice" and n.input[0] in inits]
    assert any(name.endswith(".folded") for name in inits)
    schedule = toca_schedule(flux, 4, 0.8, full_every=2)
    export_bundle(flux, schedule, tmp_path / "b")
    assert max(verify_graphs(tmp_path / "b", flux)) < 1e-4
    for g in (tmp_path / "b").glob("step_*.onnx"):
        m = onnx.load(str(g), load_external_data=False)
        inits = {i.name for i in m.graph.initializer}
        assert not [n for n in m.graph.node if n.op_type == "Slice" and n.input[0] in inits]
