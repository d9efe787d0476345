"""The GPU benchmark scripts, run on the CPU with a tiny model: every mode computes the same samples,
the JSON has what the README table needs, and the table renders from it."""

import json
from dataclasses import replace

import pytest

from diffsparse.builtin_schedules import dense_schedule
from diffsparse.models.zoo import make_spec

def test_benchmark_runs_every_mode_and_writes_the_table(tmp_path, capsys, benchmark_script):
    bench = benchmark_script("gpu_sparse_vs_dense")
    assert bench.main(["--device", "cpu", "--dtype", "float32", "--models", "dit-tiny", "--steps", "3",
                       "--modes", "eager", "static", "graphed",
                       "--runs", "1", "--warmup", "0", "--step-runs", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (model,) = results["models"]
    assert set(model["modes"]) == {"eager", "static"}, "no graphed mode without CUDA"
    assert model["max_abs_diff_between_modes_sparse"] < 1e-5 and model["max_abs_diff_between_modes_dense"] < 1e-5
    assert model["macs_speedup"] > 1.5
    for v in model["modes"].values():
        assert v["sparse_ms"] > 0 and v["dense_ms"] > 0
        assert v["first_run_ms"]["sparse"] > 0 and v["first_run_ms"]["dense"] > 0
        assert v["refresh_steps"][0] == 0, "ToCa-style schedules refresh at step 0 (the cache is empty)"
        assert len(v["step_ms"]["sparse"]) == len(v["step_ms"]["dense"]) == 3
        assert v["refresh_vs_dense"] > 0 and len(v["refresh_vs_dense_per_step"]) == len(v["refresh_steps"])
    assert results["host"]["device"] == "cpu" and "--models dit-tiny" in results["command"]
    capsys.readouterr()
    assert bench.main(["--markdown", str(tmp_path / "results.json")]) == 0
    table = capsys.readouterr().out
    assert "| dit-tiny | 3 |" in table and "eager" in table and "static" in table


def test_refresh_rule_compares_each_refresh_step_with_the_dense_step_at_its_index(benchmark_script):
    bench = benchmark_script("gpu_sparse_vs_dense")
    spec = make_spec("dit-tiny", batch_size=1)
    dense = dense_schedule(spec, 4)
    full, none = dense.keep[0], [0] * len(dense.keep[0])
    # steps 0, 2, 3 computed: 0 and 2 refreshes, 3 partial (half the tokens of each layer)
    sparse = replace(dense, keep=[full, none, full, [n // 2 for n in full]], skip=[False, True, False, False], full_steps=None)
    assert sparse.full_steps == [True, False, True, False]
    # two runs each: medians sparse (computed steps 0, 2, 3) = 3, 4, 1; dense = 1, 9, 2, 9
    rule = bench.refresh_rule({"sparse": sparse, "dense": dense}, [[3, 4, 1], [3, 4, 1]], [[1, 9, 2, 9], [1, 9, 2, 9]])
    assert rule["refresh_steps"] == [0, 2]
    assert rule["refresh_vs_dense_per_step"] == [3.0, 2.0] and rule["refresh_vs_dense"] == 2.5


def test_mode_agreement_script_compares_every_step_with_eager(tmp_path, benchmark_script):
    """benchmarks/gpu_mode_agreement.py on the CPU: under bfloat16 autocast static and eager agree
    at every step (both keep the latent and cache in float32)."""
    agreement = benchmark_script("gpu_mode_agreement")
    assert agreement.main(["--model", "dit-tiny", "--device", "cpu", "--steps", "4", "--dtypes", "bfloat16",
                           "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for which in ("sparse", "dense"):
        static = results["agreement"][f"{which}/bfloat16"]["static"]
        assert len(static["max_abs_diff_per_step"]) == 4
        assert static["first_step_over_tolerance"] is None and max(static["max_abs_diff_per_step"]) == 0.0


def test_mode_agreement_kernel_count_needs_cuda(benchmark_script):
    with pytest.raises(SystemExit):
        benchmark_script("gpu_mode_agreement").main(["--model", "dit-tiny", "--device", "cpu", "--kernels-only"])
