import json

import pytest

from diffsparse.runtime.profile import ProfileConfig, markdown_summary, profile, write_report


def test_profile_report_compares_in_one_run(tiny_bundles, tmp_path):
    report = profile(tiny_bundles["toca"], tiny_bundles["dense"], ProfileConfig(runs=2, warmup=1))
    s, b = report["sparse"], report["baseline"]
    assert len(s["per_step_ms"]) == 6 and len(s["total_ms_runs"]) == 2
    assert report["speedup"] == b["total_ms"] / s["total_ms"]
    assert 0.3 < report["macs_ratio"] < 0.7 and b["macs_ratio"] == 1.0
    assert report["macs_speedup"] == b["macs_total"] / s["macs_total"]
    # measured in a fresh process each: the weights are mapped (file-backed), sessions are private
    for side in (s, b):
        mem = side["memory"]
        assert mem["graphs"] == side["graphs"] and mem["backend"] == "onnxruntime"
        assert mem["private_bytes"] > 0 and mem["run_private_bytes"] >= mem["private_bytes"] // 2
    assert report["peak_rss_bytes"] > 0
    mb = s["macs_breakdown"]
    assert mb["scheduled_total"] == s["macs_total"] and mb["dense_total"] == s["dense_macs_total"]
    assert {row["kind"] for row in mb["layers"]} == {"SA", "MLP"}
    assert report["host"]["onnxruntime"]
    paths = write_report(report, tmp_path / "rep")
    assert json.loads(paths["json"].read_text())["speedup"] == report["speedup"]
    for key in ("heatmap", "latency"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["md"].read_text()
    assert "Speed-up" in md and "k_heatmap.png" in md and "| SA | 2 |" in md
    assert "| memory after load: private (MB) |" in md


@pytest.mark.gpu
def test_memory_footprint_counts_device_memory_on_cuda(tiny_bundles):
    from diffsparse.runtime.profile import fresh_process, memory_footprint

    cfg = ProfileConfig(backend="torch", device="cuda")
    mem = fresh_process(memory_footprint, tiny_bundles["toca"], cfg)
    assert mem["device_bytes"] > 0 and mem["run_device_peak_bytes"] >= mem["device_bytes"]


def test_profile_without_memory_measurement(tiny_bundles):
    report = profile(tiny_bundles["toca"], tiny_bundles["dense"], ProfileConfig(runs=1, warmup=0, memory=False))
    assert report["sparse"]["memory"] is None
    assert "memory after load" not in markdown_summary(report)
