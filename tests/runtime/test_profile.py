"""runtime/profile.py measures (a ProfileReport), runtime/report.py renders it; the rendering
tests below build a report by hand and measure nothing."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from diffsparse.runtime.backends import ort_capi
from diffsparse.runtime.backends.ort import OrtBackend
from diffsparse.runtime.bundle import Bundle
from diffsparse.runtime.cli import profile_main
from diffsparse.runtime.ops_profile import (PARTS, OpsProfile, measure_ops, ort_ops, part_of, session_runs,
                                            steps_of_runs)
from diffsparse.runtime.pipeline import Pipeline
from diffsparse.runtime.profile import (BundleProfile, ProfileConfig, ProfileReport, fit_latency, fresh_process,
                                        host_speed, memory_footprint, profile)
from diffsparse.runtime.report import markdown_summary, write_report

SIDE_KEYS = ["bundle", "backend", "device", "batch_size", "guidance", "steps", "graphs", "schedule_method",
             "step_indices", "per_step_ms", "total_ms", "total_ms_runs", "macs_per_step", "macs_total", "dense_macs_total",
             "macs_ratio", "load_seconds", "prepacked", "memory", "weights_bytes", "macs_breakdown", "latency_fit", "ops"]
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
    packed = "shared" if ort_capi.available() else True
    assert s["prepacked"] == packed and b["prepacked"] == packed, "tiny bundles fit the auto budget"
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


def test_host_speed_is_measured_and_rendered(tiny_bundles):
    speed = host_speed(repeats=1)
    assert speed["gemm_gflops"] > 0 and speed["copy_gib_per_s"] > 0
    report = _hand_built(tiny_bundles)
    report.host["speed"] = {"gemm_gflops": 193.9, "copy_gib_per_s": 10.36}
    assert ("Host at profile time: fp32 matrix product 194 GFLOP/s, memory copy 10.4 GiB/s"
            in markdown_summary(report).splitlines()[2])


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


# ---- where the time goes (--ops) and the latency fit ------------------------------------------------

@pytest.mark.parametrize("name, op, part", [
    ("/part_score/TopK", "TopK", "score"),
    ("/part_scatter_10/ScatterND", "ScatterND", "scatter"),
    ("/part_gather_3/Gather", "Gather", "gather"),
    ("/part_sampler/Gather_4/GatherSliceToSplitFusion", "Split", "sampler"),   # fused: one node's name + suffix
    ("/part_score/node_topk__1", "TopK", "score"),                             # dynamo name, prefixed at export
    ("/ff/net.2/MatMul/MatMulScaleFusion/", "FusedMatMul", "compute"),         # exported outside the parts
    ("/Transpose_3", "Transpose", "compute"),
    ("/pos_embed/proj/Conv_output_0_nchwc", "Conv", "compute"),
    ("SkipLayerNormalization", "SkipLayerNormalization", "compute"),           # made by ORT, a transformer op
    ("BiasGelu_token_23", "BiasGelu", "compute"),
    ("ReorderOutput", "ReorderOutput", "other"),                               # made by ORT, not one
    ("Squeeze_token_2", "Squeeze", "other"),
    ("/departure_score/Add", "Add", "other"),                                  # not a part scope, not exported
    ("/part_scores/Add", "Add", "other"),
])
def test_part_naming_rule(name, op, part):
    exported = {"/ff/net.2/MatMul", "/Transpose_3", "/pos_embed/proj/Conv", "/part_score/TopK"}
    assert part_of(name, op, exported) == part


def _node(name, op, ts, dur, shapes=None):
    args = {"op_name": op}
    if shapes is not None:
        args["input_type_shape"] = [{"float": s} for s in shapes]
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "ph": "X", "args": args}


def _run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur, "ph": "X", "args": {}}


def test_trace_parser_maps_runs_to_steps_and_nodes_to_runs(tmp_path):
    """Schedule graphs [0, 1, 1] over a warm-up and one kept generation: session 0 runs steps
    0, 0 (generations 0, 1); session 1 runs steps 1, 2, 1, 2. Node events belong to the run whose
    span holds them, in whatever order the file lists them."""
    assert steps_of_runs([0, 1, 1], 2, 2) == [[(0, 0), (1, 0)], [(0, 1), (0, 2), (1, 1), (1, 2)]]
    session0 = [_run(1000, 100), _node("/part_sampler/Sub", "Sub", 1010, 5), _run(100, 100),   # the warm-up run first
                _node("/Add_1", "Add", 1020, 30), _node("/Add_1", "Add", 120, 70),
                {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 50},
                {"cat": "Node", "name": "/Add_1_fence_before", "ts": 1020, "dur": 0, "args": {"op_name": "Add"}}]
    session1 = [_run(10, 50), _run(100, 50), _run(200, 60), _run(300, 70),
                _node("/part_score/TopK", "TopK", 210, 10), _node("/part_gather/Gather", "Gather", 222, 3),
                _node("/to_q/MatMul", "MatMul", 230, 20), _node("/part_scatter_2/ScatterND", "ScatterND", 252, 4),
                _node("ReorderOutput", "ReorderOutput", 256, 1),
                _node("/part_score/TopK", "TopK", 310, 12), _node("/to_q/MatMul", "MatMul", 330, 21),
                _node("/to_q/MatMul", "MatMul", 380, 5)]   # ends after its run: in no run
    runs, outside = session_runs(session1, {"/to_q/MatMul"})
    assert [r.run_us for r in runs] == [50, 50, 60, 70] and outside == 5
    assert runs[2].parts == {"score": 10, "gather": 3, "compute": 20, "scatter": 4, "other": 1}
    assert runs[3].ops == {"TopK": 12, "MatMul": 21} and runs[0].parts == {}
    paths = []
    for g, events in enumerate((session0, session1)):
        paths.append(tmp_path / f"g{g}.json")
        paths[-1].write_text(json.dumps(events))
    ops = ort_ops(paths, [0, 1, 1], generations=1, skip=1, exported=[{"/Add_1"}, {"/to_q/MatMul"}])
    assert ops.generations == 1 and ops.per_step_run_ms == pytest.approx([0.1, 0.06, 0.07])
    assert ops.per_step[0] == pytest.approx({**dict.fromkeys(PARTS, 0.0), "compute": 0.03, "sampler": 0.005})
    assert ops.per_step[1]["scatter"] == pytest.approx(0.004) and ops.per_step[2]["score"] == pytest.approx(0.012)
    assert ops.total_by_part["compute"] == pytest.approx(0.03 + 0.02 + 0.021)
    assert ops.node_ms == pytest.approx(sum(ops.op_types.values())) and ops.outside_ms == pytest.approx(0.005)
    d = ops.to_dict()
    assert list(d["total_by_op_type"])[0] == "MatMul" and d["run_ms"] == pytest.approx(0.23)
    # two kept generations: each step's time is the mean per generation; without the exported
    # names an unscoped Add is not known to be the transformer's (rule 3: other)
    two = ort_ops(paths, [0, 1, 1], generations=2, skip=0)
    assert two.per_step[0]["other"] == pytest.approx((0.07 + 0.03) / 2) and two.per_step[0]["compute"] == 0
    with pytest.raises(ValueError, match="runs of graph 1"):
        ort_ops(paths, [0, 1], generations=2)


def test_trace_parser_keys_operator_calls_by_input_shapes(tmp_path):
    """The same operator at two shapes is two calls; a call without recorded shapes counts only
    by type. Times are ms per kept generation, heaviest first."""
    events = [_run(0, 100),
              _node("/a/MatMul", "MatMul", 1, 30, [[2, 256, 1152], [1152, 4608]]),
              _node("/b/MatMul", "MatMul", 40, 10, [[2, 64, 1152], [1152, 4608]]),
              _node("/c/MatMul", "MatMul", 60, 20, [[2, 64, 1152], [1152, 4608]]),
              _node("/s", "Mul", 85, 5, [[], [2, 64]]), _node("/t", "Add", 95, 2)]
    path = tmp_path / "g0.json"
    path.write_text(json.dumps(events))
    ops = ort_ops([path], [0], generations=1, exported=[{"/a/MatMul", "/b/MatMul", "/c/MatMul"}])
    assert ops.top_calls() == [("MatMul(2x256x1152, 1152x4608)", pytest.approx(0.03)),
                               ("MatMul(2x64x1152, 1152x4608)", pytest.approx(0.03)),
                               ("Mul((), 2x64)", pytest.approx(0.005))]
    assert ops.op_types["MatMul"] == pytest.approx(0.06) and ops.op_types["Add"] == pytest.approx(0.002)
    assert list(ops.to_dict()["top_op_calls"]) == [c for c, _ in ops.top_calls()]
    assert len(ops.top_calls(1)) == 1


def test_latency_fit_on_synthetic_numbers():
    macs = [1e9, 2e9, 4e9, 8e9]
    fit = fit_latency(macs, [2 + 3 * g for g in (1, 2, 4, 8)])
    assert fit["a_ms"] == pytest.approx(2) and fit["b_ms_per_gmac"] == pytest.approx(3)
    assert fit["r2"] == pytest.approx(1) and fit["steps"] == 4
    noisy = fit_latency(macs, [5.5, 7.5, 14.5, 25.5])
    x, y = np.array(macs) / 1e9, np.array([5.5, 7.5, 14.5, 25.5])
    b, a = np.polyfit(x, y, 1)
    assert noisy["a_ms"] == pytest.approx(a) and noisy["b_ms_per_gmac"] == pytest.approx(b)
    assert noisy["r2"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2) and noisy["r2"] < 1
    dense = fit_latency([5e9] * 3, [10.0, 11.0, 12.0])   # one MACs value: no slope to fit
    assert dense == {"a_ms": pytest.approx(11.0), "b_ms_per_gmac": None, "r2": None, "steps": 3}
    assert fit_latency(macs, [3.0] * 4)["r2"] is None
    with pytest.raises(ValueError):
        fit_latency(macs, [1.0])


def test_ops_parts_add_up_to_onnxruntime_kernel_total(tiny_bundles, monkeypatch):
    """Every kernel event in ONNX Runtime's own traces ends up in exactly one part (or, outside
    every run, in outside_ms): with no warm-up dropped the totals agree."""
    traces = []
    end = OrtBackend.end_profiling

    def keep(self):
        paths = end(self)
        traces.extend(json.loads(Path(p).read_text()) for p in paths)
        return paths

    monkeypatch.setattr(OrtBackend, "end_profiling", keep)
    bundle = Bundle(tiny_bundles["toca"])
    pipe = Pipeline.from_bundle(bundle.folder, backend="onnxruntime", verify=False)
    cond = pipe.spec.example_conditioning(np.random.default_rng(0))
    ops = measure_ops(bundle, pipe, lambda p: p.generate(conditioning=cond, seed=0), generations=1, warmup=0)
    kernel_us = sum(e["dur"] for t in traces for e in t if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))
    assert len(traces) == len(bundle.manifest.graphs)
    assert ops.node_ms + ops.outside_ms == pytest.approx(kernel_us / 1000)
    assert ops.node_ms == pytest.approx(sum(ops.op_types.values())) and 0 < ops.node_ms <= ops.run_ms


def _check_ops_sides(sparse: dict, base: dict, steps: int) -> None:
    for side in (sparse, base):
        ops = side["ops"]
        assert ops["generations"] == 1 and len(ops["per_step"]) == steps == len(ops["per_step_run_ms"])
        total = ops["total_by_part"]
        assert list(total) == list(PARTS)
        # parts add up to the operator total, which the by-type view splits the other way
        assert sum(total.values()) == pytest.approx(ops["node_ms"]) == pytest.approx(sum(ops["total_by_op_type"].values()))
        assert [sum(step.values()) for step in ops["per_step"]] == pytest.approx(
            [sum(s[p] for p in PARTS) for s in ops["per_step"]])
        assert 0 < ops["node_ms"] <= ops["run_ms"] and total["compute"] > 0 and total["sampler"] > 0
        # calls by input shape: real shapes, a share of the by-type total
        calls = ops["top_op_calls"]
        assert calls and all("(" in c for c in calls) and sum(calls.values()) <= ops["node_ms"] * (1 + 1e-9)
    for part in ("score", "gather", "scatter"):
        assert sparse["ops"]["total_by_part"][part] > 0, part
        assert base["ops"]["total_by_part"][part] == 0, part


def test_dsprofile_ops_end_to_end(tiny_bundles, tmp_path, capsys):
    out = tmp_path / "rep"
    assert profile_main([str(tiny_bundles["toca"]), "--baseline", str(tiny_bundles["dense"]), "--out", str(out),
                         "--ops", "--ops-runs", "1", "--runs", "1", "--warmup", "0", "--no-memory"]) == 0
    d = json.loads((out / "profile.json").read_text())
    assert d["config"]["ops"] is True and d["sparse"]["ops"]["source"] == "onnxruntime profiler"
    _check_ops_sides(d["sparse"], d["baseline"], 6)
    fit = d["sparse"]["latency_fit"]
    assert fit["steps"] == 6 and fit["b_ms_per_gmac"] is not None and d["baseline"]["latency_fit"]["b_ms_per_gmac"] is None
    assert (out / "step_parts.png").read_bytes()[:8] == PNG
    md = (out / "profile.md").read_text()
    assert "| score |" in md and "| operator type |" in md and "step_parts.png" in md and "a + b·GMACs" in md
    assert "heaviest operator calls" in md
    assert "| part |" in capsys.readouterr().out


def test_ops_on_the_torch_backend(tiny_bundles):
    """torch.profiler: the same parts, from the Part scopes of the modules the backend runs."""
    report = profile(tiny_bundles["toca"], tiny_bundles["dense"],
                     ProfileConfig(backend="torch", runs=1, warmup=0, memory=False, ops=True, ops_runs=1))
    d = report.to_dict()
    assert d["sparse"]["ops"]["source"] == "torch.profiler"
    _check_ops_sides(d["sparse"], d["baseline"], 6)
    assert any(op.startswith("aten::") for op in d["sparse"]["ops"]["total_by_op_type"])


def test_rendering_a_hand_built_ops_report(tiny_bundles, tmp_path):
    report = _hand_built(tiny_bundles, memory=False)
    steps = report.sparse.manifest.schedule.num_steps
    for side, score in ((report.sparse, 0.5), (report.baseline, 0.0)):
        per_step = [{**dict.fromkeys(PARTS, 0.0), "compute": 2.0, "score": score} for _ in range(steps)]
        side.ops = OpsProfile(source="onnxruntime profiler", generations=2, per_step=per_step,
                              per_step_run_ms=[3.0] * steps, op_types={"MatMul": 1.5 * steps, "TopK": score * steps})
    md = markdown_summary(report)
    assert f"| score | {0.5 * steps:.2f} | 20.0% | 0.00 | 0.0% |" in md.splitlines()
    assert f"| **operators, total** | {2.5 * steps:.2f} | | {2.0 * steps:.2f} | |" in md
    assert "| MatMul |" in md and "| TopK |" in md
    paths = write_report(report, tmp_path / "rep")
    assert paths["parts"].name == "step_parts.png" and paths["parts"].read_bytes()[:8] == PNG
    assert json.loads(paths["json"].read_text())["sparse"]["ops"]["total_by_part"]["score"] == pytest.approx(0.5 * steps)
