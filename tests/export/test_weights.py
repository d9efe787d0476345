"""The weight store: large initializers once in weights.bin, constant outputs kept in the graph."""

import numpy as np
import onnx
import onnxruntime as ort
from diffsparse.export.weights import MIN_SHARED_BYTES, WeightStore
from onnx import TensorProto, helper, numpy_helper
from diffsparse.runtime.backends.ort import session_options


def _model(big: np.ndarray) -> onnx.ModelProto:
    """y = x + w, and a constant output c (as the reuse counts of a step that recomputes all)."""
    w = numpy_helper.from_array(big, "w")
    c = numpy_helper.from_array(np.zeros(big.size, np.int32), "c")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(big.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(big.shape)),
         helper.make_tensor_value_info("c", TensorProto.INT32, [big.size])], [w, c])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_constant_outputs_stay_inline_and_weights_are_shared(tmp_path):
    big = np.arange(MIN_SHARED_BYTES, dtype=np.float32).reshape(4, -1)
    store = WeightStore(tmp_path / "weights.bin")
    first, second = _model(big), _model(big)
    store.externalize(first)
    store.externalize(second)
    info = store.close()
    assert info["tensors"] == 1 and info["bytes"] == big.nbytes
    for model in (first, second):
        inits = {i.name: i for i in model.graph.initializer}
        assert inits["c"].data_location != TensorProto.EXTERNAL
        assert [i for i in inits.values() if i.data_location == TensorProto.EXTERNAL]
    onnx.save(first, str(tmp_path / "m.onnx"))
    x = np.ones_like(big)
    y, c = ort.InferenceSession(str(tmp_path / "m.onnx"), session_options()).run(None, {"x": x})
    np.testing.assert_array_equal(y, x + big)
    assert not c.any()
