"""int8 bundles (export/quantize.py): per-timestep calibration, consistent QDQ graphs, weights once, parity recorded."""

import json
import shutil

import numpy as np
import onnx
import pytest
from diffsparse.export.bundle import ExportConfig, ExportError, export_bundle
from diffsparse.export.calibration import CalibrationConfig, collect_step_inputs
from diffsparse.export.cli import build_parser, quantize_config
from diffsparse.export.quantize import (DEFAULT_TOLERANCE, QuantizeConfig, layer_groups, node_part, parameter_group,
                                        quantized_group)
from diffsparse.runtime.bundle import Bundle
from diffsparse.runtime.pipeline import Pipeline

from diffsparse.manifest import BundleError, Manifest


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, tiny_spec, tiny_schedules):
    out = tmp_path_factory.mktemp("int8") / "toca-int8"
    export_bundle(tiny_spec, tiny_schedules["toca"], out, source={"model": "dit-tiny", "seed": 0},
                  config=ExportConfig(precision="int8", quantize=QuantizeConfig(calibration=CalibrationConfig(batches=1))))
    return out


def test_parameter_groups_follow_the_schedule_layers():
    assert parameter_group("transformer_blocks.3.attn1.to_q.weight") == "sa3"
    assert parameter_group("transformer_blocks.3.attn2.to_k.weight") == "ca3"
    assert parameter_group("transformer_blocks.12.ff.net.2.weight") == "mlp12"
    assert parameter_group("transformer_blocks.2.ff_context.net.0.proj.weight") == "tmlp2"
    assert parameter_group("transformer_blocks.3.norm1.linear.weight") == "block3"
    assert parameter_group("single_transformer_blocks.4.proj_mlp.weight") == "single4"
    assert parameter_group("proj_out_2.weight") == "fixed"
    cfg = QuantizeConfig(keep_fp32=("mlp5",))
    assert quantized_group("sa3", cfg) and not quantized_group("sa0", cfg) and not quantized_group("mlp5", cfg)
    assert not quantized_group("block3", cfg) and not quantized_group("fixed", cfg) and not quantized_group("score", cfg)


def test_calibration_records_every_computed_step_at_its_timestep(tiny_bundles):
    bundle = Bundle(tiny_bundles["toca"])
    steps = collect_step_inputs(bundle, CalibrationConfig(batches=2))
    m = bundle.manifest
    assert [s.index for s in steps] == m.schedule.computed_steps
    assert [s.graph for s in steps] == m.step_graphs
    assert all(len(s.feeds) == 2 for s in steps)
    latent = m.inputs[0].name
    # the sampler's own latents: each step starts where the previous one ended, so they differ by step
    assert not np.allclose(steps[0].feeds[0][latent], steps[1].feeds[0][latent])
    assert all(np.isfinite(s.feeds[0][latent]).all() for s in steps)
    # timesteps as the sampler plans them, and a filled cache after step 0
    assert [s.feeds[0]["timestep"][0] for s in steps] == pytest.approx(list(m.sampler.timesteps))
    cached = [n for n in m.cache.names if n in steps[1].feeds[0]]
    assert cached and any(np.abs(steps[1].feeds[0][n]).max() > 0 for n in cached)


def test_int8_bundle_is_quantized_consistently_with_weights_once(int8_bundle):
    m = Manifest.load(int8_bundle)
    assert m.precision["dtype"] == "int8"
    assert m.precision["parity_tolerance"] == DEFAULT_TOLERANCE["int8"]
    assert all(g.parity_max_abs_err is not None and 0 < g.parity_max_abs_err <= m.precision["parity_tolerance"]
               for g in m.graphs)
    int8 = {name for name, entry in m.weights["index"].items() if entry[2] == "|i1"}
    assert int8, "no int8 weight stored"
    per_graph = []
    for g in m.graphs:
        model = onnx.load(str(int8_bundle / g.file), load_external_data=False)
        names = {i.name for i in model.graph.initializer}
        per_graph.append(names & int8)
        producers = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:
            # the mechanics (scores, TopK, gather/scatter, sampler) read no dequantized value
            if node_part(node) is not None:
                assert not any(producers.get(x) is not None and producers[x].op_type == "DequantizeLinear"
                               for x in node.input), node.name
        assert "TopK" not in {producers[x].op_type for n in model.graph.node if n.op_type == "QuantizeLinear"
                              for x in n.input if x in producers}
    # a weight used by several graphs has the same int8 bytes in each: the graphs share one stored copy
    full = per_graph[0]
    assert all(names <= full for names in per_graph[1:])
    assert len(per_graph) > 1 and any(names & full for names in per_graph[1:])
    # the fp32 parameters stay (torch backend), the int8 copies are added once
    assert sum(e[1] for n, e in m.weights["index"].items() if n in int8) == m.precision["quantization"]["int8_weight_bytes"]


def test_int8_bundle_generates_close_to_fp32_but_not_equal(int8_bundle, tiny_bundles):
    a = Pipeline.from_bundle(tiny_bundles["toca"]).generate([0, 1], seed=3).samples
    b = Pipeline.from_bundle(int8_bundle).generate([0, 1], seed=3).samples
    err = np.abs(a - b).max() / np.abs(a).max()
    assert 0 < err < 0.25


def test_precision_field_is_validated_and_old_manifests_read_as_fp32(tiny_bundles, int8_bundle, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(tiny_bundles["toca"], copy)
    path = copy / "manifest.json"
    data = json.loads(path.read_text())
    assert data["precision"] == {"dtype": "fp32", "parity_tolerance": 1e-3}
    del data["precision"]
    path.write_text(json.dumps(data))
    assert Manifest.load(copy).precision == {"dtype": "fp32", "parity_tolerance": 1e-3}
    for bad, match in (({"dtype": "int4", "parity_tolerance": 0.1}, "precision.dtype"),
                       ({"dtype": "int8", "parity_tolerance": 0}, "precision.parity_tolerance"),
                       ({"dtype": "int8"}, "precision")):
        path.write_text(json.dumps({**data, "precision": bad}))
        with pytest.raises(BundleError, match=match):
            Manifest.load(copy)
    # a manifest whose dtype does not say what its graphs are is refused when the graphs are opened
    path.write_text(json.dumps({**data, "precision": {"dtype": "int8", "parity_tolerance": 0.5}}))
    with pytest.raises(BundleError, match="no graph is quantized"):
        Bundle(copy)
    q = tmp_path / "q"
    shutil.copytree(int8_bundle, q)
    qdata = json.loads((q / "manifest.json").read_text())
    (q / "manifest.json").write_text(json.dumps({**qdata, "precision": {"dtype": "fp32", "parity_tolerance": 1e-3}}))
    with pytest.raises(BundleError, match="quantized"):
        Bundle(q)


def test_layer_groups_name_every_node(tiny_bundles):
    bundle = Bundle(tiny_bundles["toca"])
    model = bundle.graph_model(0)
    groups = layer_groups(model, bundle.manifest)
    assert len(groups) == len(model.graph.node)
    assert {"sa0", "mlp0", "sa1", "mlp1", "fixed", "sampler"} <= set(groups.values())


def test_fp16_graphs_are_refused_with_the_way_to_get_them():
    with pytest.raises(ExportError, match="--tensorrt fp16"):
        ExportConfig(precision="fp16")


def test_cli_maps_int8_options():
    args = build_parser().parse_args(["--out", "x", "--precision", "int8", "--keep-fp32", "sa1, mlp1",
                                      "--calibration-batches", "3", "--parity-tolerance", "0.2"])
    cfg = quantize_config(args)
    assert cfg.keep_fp32 == ("sa1", "mlp1") and cfg.calibration.batches == 3 and cfg.tolerance == 0.2
    assert quantize_config(build_parser().parse_args(["--out", "x"])) is None


def test_a_step_reusing_every_layer_stays_fp32_and_a_bundle_with_nothing_to_quantize_is_refused(tiny_spec, tmp_path):
    from diffsparse.builtin_schedules import fora_schedule

    sched = fora_schedule(tiny_spec, 6, 0.5)
    assert any(not any(row) for row in sched.distinct_signatures()), "the test needs a step with K = 0 in every layer"
    quantize = QuantizeConfig(calibration=CalibrationConfig(batches=1))
    m = export_bundle(tiny_spec, sched, tmp_path / "fora", config=ExportConfig(precision="int8", quantize=quantize))
    counts = {c["graph"]: c["quantized_matmuls"] for c in m.precision["quantization"]["graphs"]}
    assert min(counts.values()) == 0 < max(counts.values())
    keep_all = QuantizeConfig(calibration=CalibrationConfig(batches=1), keep_fp32=("sa1", "mlp1"))
    with pytest.raises(ExportError, match="no step graph has a matmul left to quantize"):
        export_bundle(tiny_spec, sched, tmp_path / "none", config=ExportConfig(precision="int8", quantize=keep_all))
    assert not (tmp_path / "none").exists()


def test_graph_runner_sessions_compute_what_the_bundle_computes(tiny_bundles):
    """GraphRunner runs graphs over a zero-filled stand-in of weights.bin plus the real tensors
    given to the session; no optimisation may read the stand-in (ORT_ENABLE_ALL's layout passes
    did, silently zeroing Conv/Gemm weights): its outputs equal the bundle's own session's."""
    from diffsparse.export.calibration import GraphRunner
    from diffsparse.runtime.backends.ort import OrtBackend

    bundle = Bundle(tiny_bundles["toca"])
    backend = OrtBackend(bundle)
    backend.load()
    steps = collect_step_inputs(bundle, CalibrationConfig(batches=1), backend=backend)
    with GraphRunner(bundle) as runner:
        for step in steps[:2]:
            model = bundle.graph_model(step.graph)
            names = [o.name for o in model.graph.output]
            ours = runner.session(model).run(names, step.feeds[0])
            theirs = backend.run_once(step.graph, step.feeds[0])
            for name, a in zip(names, ours):
                np.testing.assert_allclose(a, theirs[name], rtol=1e-5, atol=1e-5)
