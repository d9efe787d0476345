"""Cache writes: a backward liveness pass over the schedule, and graph pruning."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from diffsparse.bundle_format import step_cache_writes
from diffsparse.cache_layout import CacheLayout, output_name
from diffsparse.export.prune import graph_cache_io, prune_outputs
from diffsparse.tensors import TensorSpec
from diffsparse.runtime.backends.ort import session_options


def test_an_entry_is_written_only_when_a_later_step_reads_it_first():
    # graph 0 changes a and b, graph 1 reads a and changes b, graph 2 reads nothing, changes a
    reads = [set(), {"a"}, set()]
    changes = [{"a", "b"}, {"b"}, {"a"}]
    # steps: 0 1 0 2 1
    writes = step_cache_writes([0, 1, 0, 2, 1], reads, changes)
    # step 0's a is read by step 1; its b is changed by step 1 before anyone reads it
    assert writes[0] == {"a"}
    assert writes[1] == set()              # nobody reads b
    assert writes[2] == set()              # step 3 changes a before step 4 reads it
    assert writes[3] == {"a"}              # read by step 4
    assert writes[4] == set()              # the last step writes nothing
    # an entry carried over unchanged (read, not changed) stays live through the step
    assert step_cache_writes([0, 2, 1], [set(), {"a"}, {"a"}], [{"a"}, set(), set()])[0] == {"a"}


def _model():
    """next.out.sa0 = out.sa0 (carried), next.reuse.sa0 = reuse.sa0 + 1, y = x * 2."""
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Identity", ["out.sa0"], [output_name("out.sa0")]),
         helper.make_node("Add", ["reuse.sa0", "one"], [output_name("reuse.sa0")]),
         helper.make_node("Mul", ["x", "two"], ["y"])], "g",
        [helper.make_tensor_value_info(n, f, [2]) for n in ("x", "out.sa0", "reuse.sa0")],
        [helper.make_tensor_value_info(n, f, [2]) for n in ("y", output_name("out.sa0"), output_name("reuse.sa0"))],
        [helper.make_tensor("one", f, [1], [1.0]), helper.make_tensor("two", f, [1], [2.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_graph_io_and_pruning():
    layout = CacheLayout.from_tensors([TensorSpec("out.sa0", (2,)), TensorSpec("reuse.sa0", (2,))])
    model = _model()
    reads, changes = graph_cache_io(model, layout)
    assert reads == {"out.sa0", "reuse.sa0"} and changes == {"reuse.sa0"}
    prune_outputs(model, {"y"})
    assert [o.name for o in model.graph.output] == ["y"]
    assert [n.op_type for n in model.graph.node] == ["Mul"] and [i.name for i in model.graph.initializer] == ["two"]
    sess = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    x = np.array([1.0, 3.0], np.float32)
    feeds = {i.name: x for i in sess.get_inputs()}
    np.testing.assert_array_equal(sess.run(None, feeds)[0], 2 * x)
    onnx.checker.check_model(model)
