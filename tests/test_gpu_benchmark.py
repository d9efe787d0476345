"""The GPU benchmark script, run on the CPU with a tiny model: every mode computes the same samples,
the JSON has what the README table needs, and the table renders from it."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_sparse_vs_dense.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_sparse_vs_dense", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_every_mode_and_writes_the_table(tmp_path, capsys):
    bench = _load()
    assert bench.main(["--device", "cpu", "--dtype", "float32", "--models", "dit-tiny", "--steps", "3",
                       "--runs", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (model,) = results["models"]
    assert set(model["modes"]) == {"eager", "static"}, "no graphed mode without CUDA"
    assert model["max_abs_diff_between_modes_sparse"] < 1e-5 and model["max_abs_diff_between_modes_dense"] < 1e-5
    assert model["macs_speedup"] > 1.5
    for v in model["modes"].values():
        assert v["sparse_ms"] > 0 and v["dense_ms"] > 0
    assert results["host"]["device"] == "cpu" and "--models dit-tiny" in results["command"]
    capsys.readouterr()
    assert bench.main(["--markdown", str(tmp_path / "results.json")]) == 0
    table = capsys.readouterr().out
    assert "| dit-tiny | 3 |" in table and "eager" in table and "static" in table
