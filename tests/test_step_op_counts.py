"""benchmarks/step_op_counts.py on the tiny DiT: the counts it reports, and a budget on how many
small ops a partial layer adds over a full one (the fixed cost of a partial step is mostly such
ops), and on how many a refresh step adds over a plain dense step (on a GPU each is a kernel of a
few µs). On 2026-12-04 dit-tiny's partial layer went from 29.75 to 22.75 ONNX Runtime nodes and
from 22.25 to 13.25 torch ops over a full one, and later that night to 10.5 (one scatter index per
layer, one tie-break ramp per step); its refresh step from 35 torch ops over a dense step to 17
(the cache writes as grouped foreach copies, one zeros tensor for every layer's reuse counts).
The budgets are set between the last two readings."""

import json


def test_partial_layers_stay_within_their_small_op_budget(tmp_path, benchmark_script):
    result = benchmark_script("step_op_counts").main(["--model", "dit-tiny", "--json", str(tmp_path / "counts.json")])
    assert json.loads((tmp_path / "counts.json").read_text()) == result
    full, partial = result["full_steps"], result["partial_layers_per_step"]
    assert full[0] and not any(full[1:]) and partial[0] == 0 and min(partial[1:]) > 0
    nodes = [result["onnxruntime_nodes_per_graph"][g] for g in result["graph_of_step"]]
    ops = result["torch_aten_ops_per_step"]
    assert nodes[0] > 0 and ops[0] > 0
    assert 0 < ops[0] - result["torch_aten_ops_dense_step"] <= 24, (ops[0], result["torch_aten_ops_dense_step"])
    for step in range(1, len(full)):
        # per partial layer, over the refresh step (which runs every layer on all tokens)
        assert (nodes[step] - nodes[0]) / partial[step] <= 26, nodes
        assert (ops[step] - ops[0]) / partial[step] <= 12, ops
