"""Rules shared by the exporter and the runtime (diffsparse/bundle_format.py): which cache writes
may reuse their input's buffer."""

from onnx import TensorProto, helper

from diffsparse.bundle_format import in_place_writes


def _graph(nodes, inputs=("cache", "idx", "fresh"), outputs=("next.cache",)):
    shapes = {"cache": [2, 4, 3], "idx": [2, 1, 2], "fresh": [2, 1, 3], "other": [2, 4, 3]}
    types = {"idx": TensorProto.INT64}
    return helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), shapes[n]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])


def test_a_scatter_that_alone_reads_its_input_writes_in_place():
    g = _graph([helper.make_node("Shape", ["cache"], ["s"]),   # reads no values
                helper.make_node("ScatterND", ["cache", "idx", "fresh"], ["next.cache"])])
    assert in_place_writes(g, ["cache"]) == {"cache"}


def test_a_reader_that_the_scatter_waits_for_is_safe():
    # the score reads the cache, picks the tokens, and only then is the cache scattered into
    g = _graph([helper.make_node("ReduceL2", ["cache"], ["norms"]),
                helper.make_node("Cast", ["norms"], ["idx2"], to=TensorProto.INT64),
                helper.make_node("Add", ["idx", "idx2"], ["idx3"]),
                helper.make_node("ScatterND", ["cache", "idx3", "fresh"], ["next.cache"])])
    assert in_place_writes(g, ["cache"]) == {"cache"}


def test_a_reader_that_may_run_after_the_scatter_forbids_it():
    g = _graph([helper.make_node("ScatterND", ["cache", "idx", "fresh"], ["next.cache"]),
                helper.make_node("Mul", ["cache", "cache"], ["sq"])], outputs=("next.cache", "sq"))
    assert in_place_writes(g, ["cache"]) == frozenset()


def test_only_a_scatter_from_the_same_entry_counts():
    copied = _graph([helper.make_node("Add", ["cache", "cache"], ["next.cache"])])
    other = _graph([helper.make_node("ScatterND", ["other", "idx", "fresh"], ["next.cache"])],
                   inputs=("cache", "other", "idx", "fresh"))
    scattered_into_itself = _graph([helper.make_node("ScatterND", ["cache", "idx", "cache"], ["next.cache"])])
    assert in_place_writes(copied, ["cache"]) == frozenset()
    assert in_place_writes(other, ["cache"]) == frozenset()
    assert in_place_writes(scattered_into_itself, ["cache"]) == frozenset()
    assert in_place_writes(_graph([]), ["cache"]) == frozenset()   # not written at all
    # the scattered tensor is used inside the step but is no graph output (pruned: nobody reads it later)
    internal = _graph([helper.make_node("ScatterND", ["cache", "idx", "fresh"], ["next.cache"]),
                       helper.make_node("Relu", ["next.cache"], ["y"])], outputs=("y",))
    assert in_place_writes(internal, ["cache"]) == frozenset()
