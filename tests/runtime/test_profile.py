"""runtime/profile.py measures (a ProfileReport), runtime/report.py renders it; the rendering
tests below build a report by hand and measure nothing."""

import json
from dataclasses import asdict

import pytest
from diffsparse.runtime.bundle import Bundle
from diffsparse.runtime.profile import (BundleProfile, ProfileConfig, ProfileReport, fresh_process, memory_footprint,
                                        profile)
from diffsparse.runtime.report import markdown_summary, write_report

SIDE_KEYS = ["bundle", "backend", "device", "batch_size", "guidance", "steps", "graphs", "schedule_method",
             "per_step_ms", "total_ms", "total_ms_runs", "macs_per_step", "macs_total", "dense_macs_total",
             "macs_ratio", "load_seconds", "memory", "weights_bytes", "macs_breakdown"]
REPORT_KEYS = ["config", "host", "peak_rss_bytes", "sparse", "baseline", "speedup", "macs_speedup", "macs_ratio",
               "efficiency"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_profile_report_compares_in_one_run(tiny_bundles, tmp_path):
    report = profile(tiny_bundles["toca"], tiny_bundles["dense"], ProfileConfig(runs=2, warmup=1))
    assert isinstance(report, ProfileReport)
    assert report.sparse.manifest.schedule.provenance["method"] == "toca"
    d = report.to_dict()
    s, b = d["sparse"], d["baseline"]
    assert len(s["per_step_ms"]) == 6 and len(s["total_ms_runs"]) == 2
    assert d["speedup"] == b["total_ms"] / s["total_ms"]
    assert 0.3 < d["macs_ratio"] < 0.7 and b["macs_ratio"] == 1.0
    assert d["macs_speedup"] == b["macs_total"] / s["macs_total"]
    # measured in a fresh process each: the weights are mapped (file-backed), sessions are private
    for side in (s, b):
        mem = side["memory"]
        assert mem["graphs"] == side["graphs"] and mem["backend"] == "onnxruntime"
        assert mem["private_bytes"] > 0 and mem["run_private_bytes"] >= mem["private_bytes"] // 2
    assert d["peak_rss_bytes"] > 0
    mb = s["macs_breakdown"]
    assert mb["scheduled_total"] == s["macs_total"] and mb["dense_total"] == s["dense_macs_total"]
    assert {row["kind"] for row in mb["layers"]} == {"SA", "MLP"}
    assert d["host"]["onnxruntime"]
    paths = write_report(report, tmp_path / "rep")
    assert json.loads(paths["json"].read_text())["speedup"] == report.speedup
    for key in ("heatmap", "latency"):
        assert paths[key].read_bytes()[:8] == PNG
    md = paths["md"].read_text()
    assert "Speed-up" in md and "k_heatmap.png" in md and "| SA | 2 |" in md
    assert "| memory after load: private (MB) |" in md


def test_profile_takes_an_opened_bundle(tiny_bundles):
    """A Bundle from the caller is used as it is: its manifest ends up in the report."""
    bundle = Bundle(tiny_bundles["toca"])
    report = profile(bundle, tiny_bundles["dense"], ProfileConfig(runs=1, warmup=0, memory=False))
    assert report.sparse.manifest is bundle.manifest and report.sparse.folder == bundle.folder
    assert report.to_dict()["sparse"]["bundle"] == str(tiny_bundles["toca"])


@pytest.mark.gpu
def test_memory_footprint_counts_device_memory_on_cuda(tiny_bundles):
    cfg = ProfileConfig(backend="torch", device="cuda")
    mem = fresh_process(memory_footprint, tiny_bundles["toca"], cfg)
    assert mem["device_bytes"] > 0 and mem["run_device_peak_bytes"] >= mem["device_bytes"]


def test_profile_without_memory_measurement(tiny_bundles):
    report = profile(tiny_bundles["toca"], tiny_bundles["dense"], ProfileConfig(runs=1, warmup=0, memory=False))
    assert report.sparse.memory is None and report.to_dict()["sparse"]["memory"] is None
    assert "memory after load" not in markdown_summary(report)


# ---- rendering from a hand-built report: no pipeline, no timing, no process ------------------------

def _side(bundle: Bundle, step_ms: float, memory: dict | None) -> BundleProfile:
    m = bundle.manifest
    steps = m.schedule.num_steps
    breakdown = {"fixed": 10, "layers": [{"layer": "b0.SA", "kind": "SA", "dense": 400, "scheduled": 200},
                                         {"layer": "b0.MLP", "kind": "MLP", "dense": 600, "scheduled": 300}],
                 "dense_total": 1010, "scheduled_total": 510}
    return BundleProfile(folder=bundle.folder, manifest=m, backend="onnxruntime", device="cpu",
                         runs=[[step_ms / 1000] * steps, [2 * step_ms / 1000] * steps, [step_ms / 1000] * steps],
                         load_seconds=0.5, macs_breakdown=breakdown, memory=memory)


def _hand_built(tiny_bundles, memory: bool = True) -> ProfileReport:
    mem = {"backend": "onnxruntime", "graphs": 1, "load_seconds": 0.1, "weights_bytes": 2**20,
           "private_bytes": 3 * 2**20, "file_backed_bytes": 2**20, "run_private_bytes": 4 * 2**20,
           "run_file_backed_bytes": 2**20} if memory else None
    host = {"cpu": "Test CPU", "cores": 4, "python": "3.x", "onnxruntime": "1.0", "torch": "2.0", "platform": "test"}
    return ProfileReport(config=ProfileConfig(runs=3), host=host, peak_rss_bytes=100 * 2**20,
                         sparse=_side(Bundle(tiny_bundles["toca"], verify=False), 1.0, mem),
                         baseline=_side(Bundle(tiny_bundles["dense"], verify=False), 2.0, mem))


def test_report_to_dict_keys_and_derived_numbers(tiny_bundles):
    report = _hand_built(tiny_bundles)
    report.extra["note"] = "added by the caller"
    d = report.to_dict()
    assert list(d) == REPORT_KEYS + ["note"]
    assert list(d["sparse"]) == SIDE_KEYS and list(d["baseline"]) == SIDE_KEYS
    assert d["config"] == asdict(ProfileConfig(runs=3))
    s, b = d["sparse"], d["baseline"]
    steps = report.sparse.manifest.schedule.num_steps
    assert s["per_step_ms"] == pytest.approx([1.0] * steps) and s["total_ms_runs"] == pytest.approx([steps, 2 * steps, steps])
    assert s["total_ms"] == pytest.approx(steps) and b["total_ms"] == pytest.approx(2 * steps)
    assert d["speedup"] == pytest.approx(2.0) == report.speedup
    assert d["macs_speedup"] == b["macs_total"] / s["macs_total"] and d["macs_ratio"] == 1 / d["macs_speedup"]
    assert d["efficiency"] == d["speedup"] / d["macs_speedup"]
    assert s["schedule_method"] == "toca" and b["schedule_method"] == "dense"
    assert s["bundle"] == str(tiny_bundles["toca"]) and s["graphs"] == len(report.sparse.manifest.graphs)
    # what is written is exactly to_dict(), key order included
    assert json.loads(json.dumps(d)) == d and list(json.loads(json.dumps(d))["sparse"]) == SIDE_KEYS


def test_rendering_a_hand_built_report(tiny_bundles, tmp_path):
    report = _hand_built(tiny_bundles)
    md = markdown_summary(report)
    lines = md.splitlines()
    assert lines[0] == "# diffsparse latency profile"
    assert "(Test CPU, 4 cores); onnxruntime 1.0, torch 2.0. Median of 3 interleaved runs." in lines[2]
    assert "| schedule | toca | dense |" in lines
    assert f"| total latency (ms) | {report.sparse.total_ms:.1f} | {report.baseline.total_ms:.1f} |" in lines
    assert "| memory after load: private (MB) | 3.0 | 3.0 |" in lines
    assert "| device memory after load (MB)" not in md  # CPU figures only
    assert "**Speed-up 2.00x**" in md and "Process peak RSS 100 MB." in md
    assert "| SA | 1 | 0.00 | 0.00 | 0.500 |" in lines and "| **total** | 2 | 0.00 | 0.00 | 0.505 |" in lines
    paths = write_report(report, tmp_path / "rep")
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "k_heatmap.png", "profile.json", "profile.md", "step_latency.png"]
    assert json.loads(paths["json"].read_text()) == report.to_dict()
    assert paths["md"].read_text() == md
    for key in ("heatmap", "latency"):
        assert paths[key].read_bytes()[:8] == PNG
    assert "memory after load" not in markdown_summary(_hand_built(tiny_bundles, memory=False))


def test_rendering_measures_and_opens_nothing(tiny_bundles, tmp_path, monkeypatch):
    """The renderer draws the heatmap from the manifest the report holds: with the bundle folder
    gone and measurement disabled it still writes every file."""
    import diffsparse.runtime.profile as measuring

    report = _hand_built(tiny_bundles)
    report.sparse.folder = report.baseline.folder = tmp_path / "gone"
    for name in ("profile", "memory_footprint", "fresh_process", "host_info"):
        monkeypatch.setattr(measuring, name, lambda *a, **k: pytest.fail("rendering measured something"))
    monkeypatch.setattr(Bundle, "__init__", lambda *a, **k: pytest.fail("rendering opened a bundle"))
    paths = write_report(report, tmp_path / "rep")
    assert all(paths[key].read_bytes()[:8] == PNG for key in ("heatmap", "latency"))
