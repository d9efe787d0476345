"""`dsexport --tensorrt int8|fp8`: everything around TensorRT's documented API that runs without it —
the explicitly quantized universal graph, its calibration, the build settings, the manifest entry.
TensorRT itself is replaced by a recorder here (it cannot be installed on these machines)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from diffsparse.export import bundle as bundle_module
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.export.calibration import CalibrationConfig
from diffsparse.export.quantize import QuantizeConfig
from diffsparse.export.tensorrt import PRECISIONS, build_settings

from diffsparse.bundle_format import UNIVERSAL_FILE, engine_file
from diffsparse.manifest import Manifest

KEY = "trt-10.9-test-gpu-sm90"


def test_build_settings_per_precision():
    assert build_settings("fp16") == ({"fp16": True, "bf16": False}, False)
    assert build_settings("bf16") == ({"fp16": False, "bf16": True}, False)
    assert build_settings("fp32") == ({"fp16": False, "bf16": False}, False)
    # explicit quantization: strongly typed, no precision flag (the Q/DQ pairs decide)
    assert build_settings("int8") == ({}, True) and build_settings("fp8") == ({}, True)
    assert set(PRECISIONS) == {"fp32", "fp16", "bf16", "int8", "fp8"}
    with pytest.raises(ValueError, match="precision must be one of"):
        build_settings("int4")


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """TensorRT present as far as export is concerned; build_engine records the graph it is given."""
    built = []

    def build_engine(graph, profiles, out_path, precision, timing_cache=None):
        model = onnx.load(str(graph), load_external_data=False)
        built.append({"graph": Path(graph), "precision": precision, "profiles": profiles, "model": model,
                      "graph_exists": Path(graph).exists()})
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(b"engine")
        return 6

    monkeypatch.setattr(bundle_module, "check_available", lambda: None)
    monkeypatch.setattr(bundle_module, "current_engine_key", lambda: KEY)
    monkeypatch.setattr(bundle_module, "build_engine", build_engine)
    return built


def _qdq(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], dict[str, onnx.TensorProto]]:
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear"], inits


@pytest.mark.parametrize("precision, zero_type", [("int8", onnx.TensorProto.INT8),
                                                  ("fp8", onnx.TensorProto.FLOAT8E4M3FN)])
def test_an_explicitly_quantized_engine_is_built_from_a_calibrated_symmetric_qdq_universal_graph(
        precision, zero_type, fake_tensorrt, tiny_spec, tiny_schedules, tmp_path):
    sched = tiny_schedules["toca"]
    out = tmp_path / "b"
    export_bundle(tiny_spec, sched, out, config=ExportConfig(
        tensorrt=precision, quantize=QuantizeConfig(calibration=CalibrationConfig(batches=1))))
    (call,) = fake_tensorrt
    assert call["precision"] == precision and call["graph_exists"]
    assert call["graph"].parent.name == ".tensorrt-quantize"   # the Q/DQ copy, not the bundle's fp32 graph
    assert len(call["profiles"]) == len(sched.distinct_signatures())
    quantize, inits = _qdq(call["model"])
    assert quantize, "no Q/DQ pair in the graph the engine was built from"
    for node in quantize:   # TensorRT's quantization is symmetric: every zero point 0, of the engine's type
        zp = inits[node.input[2]]
        assert zp.data_type == zero_type
        assert not np.any(onnx.numpy_helper.to_array(zp).astype(np.float32))
    # the mechanics stay fp32: no Q/DQ inside the score/gather/scatter/sampler scopes
    assert not any("/part_" in n.name for n in quantize)

    m = Manifest.load(out)   # validated on load, with its optional quantization record
    (engine,) = m.engines
    assert engine["precision"] == precision and engine["file"] == engine_file(KEY)
    q = engine["quantization"]
    assert q["type"] == precision and q["quantized_matmuls"] > 0
    assert q["calibration_inputs"] == len(sched.computed_steps)   # one batch: one input per computed step
    # ONNX Runtime runs the Q/DQ pairs on the CPU (fp8 as fake quantization): parity against the fp32 universal graph
    parity = q["cpu_parity_vs_fp32_universal"]
    assert 0 < parity["output_max_error"] < {"int8": 0.05, "fp8": 0.2}[precision]
    assert parity["inputs"] == len(sched.computed_steps)
    assert 0 <= parity["inputs_with_other_token_selection"] <= parity["inputs"]
    assert m.universal["file"] == UNIVERSAL_FILE   # the fp32 universal graph stays for rebuilds
    assert not (out / ".tensorrt-quantize").exists() and not list(out.glob("*.data"))


def test_fp16_engines_are_still_built_from_the_fp32_universal_graph(fake_tensorrt, tiny_spec, tiny_schedules, tmp_path):
    export_bundle(tiny_spec, tiny_schedules["toca"], tmp_path / "b", config=ExportConfig(tensorrt="fp16", verify=False))
    (call,) = fake_tensorrt
    assert call["precision"] == "fp16" and call["graph"].name == UNIVERSAL_FILE
    assert call["graph"].parent.name != ".tensorrt-quantize"
    assert not _qdq(call["model"])[0]
    assert "quantization" not in Manifest.load(tmp_path / "b").engines[0]


def test_nothing_left_to_quantize_is_a_clear_export_error(fake_tensorrt, tiny_spec, tiny_schedules, tmp_path):
    from diffsparse.export.bundle import ExportError

    keep_all = QuantizeConfig(calibration=CalibrationConfig(batches=1), keep_fp32=("sa1", "mlp1"))
    with pytest.raises(ExportError, match="no matmul left to quantize"):
        export_bundle(tiny_spec, tiny_schedules["toca"], tmp_path / "b",
                      config=ExportConfig(tensorrt="int8", verify=False, quantize=keep_all))
    assert not fake_tensorrt and not (tmp_path / "b").exists()
