"""dscalibrate precision: fp16/bf16 emulation, per-step and per-layer report, layers that must stay fp32."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffsparse.calibrate.cli import main
from diffsparse.calibrate.precision import PrecisionConfig, analyse, float_values, lowered, round_to
from diffsparse.export.calibration import CalibrationConfig
from diffsparse.runtime.backends.ort import session_options
from onnx import TensorProto, helper


def test_rounding_matches_the_formats():
    x = np.array([1.0001, 3.14159265, -2.5e-3, 7e4, 1e5, 3e38, np.nan], np.float32)
    assert np.array_equal(round_to(x, "bf16")[:-1], torch.from_numpy(x[:-1]).bfloat16().float().numpy())
    assert np.isnan(round_to(x, "bf16")[-1])
    fp16 = round_to(x, "fp16")
    assert np.isinf(fp16[4]) and fp16[1] == np.float32(np.float16(3.14159265))


def _scaled_graph(scale: float) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["y"], name="/mul"),
                           helper.make_node("Add", ["y", "x"], ["z"], name="/add")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])],
                          [helper.make_tensor("s", TensorProto.FLOAT, [], [scale])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_lowering_rounds_every_activation_and_overflows_like_the_format(dtype):
    model = _scaled_graph(1e5)
    groups = {"/mul": "sa0", "/add": "sa0"}
    low = lowered(model, dtype, {"sa0"}, groups, float_values(model))
    x = np.array([1.0, 0.7, -1.0], np.float32)
    out = ort.InferenceSession(low.SerializeToString(), session_options()).run(None, {"x": x})[0]
    if dtype == "fp16":   # 1e5 is beyond fp16's 65504
        assert np.isinf(out).all()
    else:
        assert np.isfinite(out).all() and not np.array_equal(out, x * 1e5 + x)
        assert np.array_equal(out, round_to(round_to(x * np.float32(1e5), "bf16") + x, "bf16"))
    # a group left out is not touched
    same = lowered(model, dtype, set(), groups, float_values(model))
    plain = ort.InferenceSession(same.SerializeToString(), session_options()).run(None, {"x": x})[0]
    assert np.array_equal(plain, x * np.float32(1e5) + x)


@pytest.fixture(scope="module")
def fp16_report(tiny_bundles):
    return analyse(tiny_bundles["toca"], PrecisionConfig(dtype="fp16", calibration=CalibrationConfig(batches=1)))


def test_report_covers_every_step_and_layer(fp16_report, tiny_bundles):
    from diffsparse.manifest import Manifest

    m = Manifest.load(tiny_bundles["toca"])
    assert [r["step"] for r in fp16_report["steps"]] == m.schedule.computed_steps
    assert {"sa0", "mlp0", "sa1", "mlp1"} <= set(fp16_report["layers"])
    for r in fp16_report["steps"]:
        # lowering happened (non-zero error) and fp16 is close on this model
        assert 0 < r["step_err"] < 1e-2 and r["nonfinite_outputs"] == 0
    for name, layer in fp16_report["layers"].items():
        assert layer["fp32_min"] <= layer["fp32_max"] and layer["nonfinite"] == 0
    assert any(layer["isolated_step_err"] > 0 for layer in fp16_report["layers"].values())
    assert fp16_report["keep_fp32"] == []
    assert fp16_report["max_step_err_with_fp32_layers"] == pytest.approx(
        max(r["step_err_with_fp32_layers"] for r in fp16_report["steps"]))


def test_layers_beyond_the_tolerance_must_stay_fp32(tiny_bundles):
    report = analyse(tiny_bundles["dense"], PrecisionConfig(dtype="bf16", tolerance=1e-9,
                                                           calibration=CalibrationConfig(batches=1)))
    isolated = {k for k, v in report["layers"].items() if v["isolated_step_err"] > 1e-9}
    assert isolated and set(report["keep_fp32"]) == isolated
    # keeping them fp32 leaves less error than lowering everything
    assert report["max_step_err_with_fp32_layers"] < report["max_step_err"]


def test_cli_writes_json_and_markdown(tiny_bundles, tmp_path):
    out = tmp_path / "report"
    assert main(["precision", str(tiny_bundles["dense"]), "--dtype", "bf16", "--out", str(out), "--no-isolate"]) == 0
    data = json.loads((out / "precision.json").read_text())
    assert data["dtype"] == "bf16" and data["steps"]
    assert "must stay fp32" in (out / "precision.md").read_text()
    assert main(["precision", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2


def test_lowered_steps_recompute_the_fp32_selection(tmp_path, tiny_spec):
    """On the tiny DiT, fp16 lowering moves value-norm scores past each other at near ties; the
    lowered step is pinned to the fp32 step's tokens, so the error is the rounding's (not a
    recomputed other token's: 1.0 in a reuse count), and the flips are counted apart."""
    import dataclasses

    from diffsparse.builtin_schedules import toca_schedule
    from diffsparse.export.bundle import ExportConfig, export_bundle

    selector = dataclasses.replace(tiny_spec.default_selector(), score="value_norm")
    folder = tmp_path / "value-norm"
    export_bundle(tiny_spec, toca_schedule(tiny_spec, 6, 0.5, full_every=3, selector=selector), folder,
                  source={"model": "dit-tiny", "seed": 0}, config=ExportConfig())
    report = analyse(folder, PrecisionConfig(dtype="fp16", calibration=CalibrationConfig(batches=1)))
    assert sum(r["selection_flips"] for r in report["steps"]) > 0
    assert all(0 <= r["step_err"] < 1e-2 for r in report["steps"])
    assert report["keep_fp32"] == []
