"""dscalibrate latency (calibrate/latency.py) and what reads its table: dsprofile's predictions,
dsexport's and dstrain's latency budgets."""

from __future__ import annotations

import json

import pytest
from diffsparse.calibrate import cli as calibrate_cli
from diffsparse.calibrate.latency import LatencyCalibration, calibrate_latency, calibration_schedule, table_from_medians
from diffsparse.export import cli as export_cli
from diffsparse.runtime.profile import ProfileConfig, profile
from diffsparse.train import cli as train_cli

from diffsparse.latency_table import LatencyTable
from diffsparse.schedule import DEFAULT_CANDIDATES, Schedule


@pytest.fixture(scope="module")
def measured(tiny_spec, tmp_path_factory):
    """A real table of the tiny model (batch 2 with guidance, as the shared tiny bundles)."""
    folder = tmp_path_factory.mktemp("latency")
    table = calibrate_latency(CALIBRATION, bundles=folder / "bundles")
    return table, table.save(folder / "table.json")


CALIBRATION = LatencyCalibration(model="dit-tiny", batch_size=2, runs=2, warmup=0, dense_steps=2)


def test_kept_bundles_are_reused_and_a_temporary_folder_is_removed(measured, tmp_path, caplog):
    _, path = measured
    kept = path.parent / "bundles"
    stamp = (kept / "calibration" / "manifest.json").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        calibrate_latency(CALIBRATION, bundles=kept)
    assert "reusing the calibration bundle" in caplog.text and "reusing the dense bundle" in caplog.text
    assert (kept / "calibration" / "manifest.json").stat().st_mtime_ns == stamp
    calibrate_latency(CALIBRATION, work=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_calibration_steps_cover_every_kind_and_candidate(tiny_spec):
    sched, labels = calibration_schedule(tiny_spec, DEFAULT_CANDIDATES)
    n = tiny_spec.num_tokens
    assert labels[0] == labels[-1] == ("refresh", n) and sched.keep[0] == sched.keep[-1] == tiny_spec.dense_keep()
    assert labels[1] == ("fixed", 0) and sched.keep[1] == [0] * len(tiny_spec.layers)
    for kind in {layer.kind for layer in tiny_spec.layers}:
        assert sorted(k for what, k in labels if what == kind) == [n // 4, n // 2, 3 * n // 4, n]
    for (what, k), row in zip(labels[2:-1], sched.keep[2:-1]):
        assert row == [k if layer.kind == what else 0 for layer in tiny_spec.layers]
    assert len(sched.distinct_signatures()) == len(labels) - 1   # every measured step is its own graph


def test_the_table_recovers_known_costs(tiny_spec, synthetic_table):
    truth = synthetic_table(tiny_spec, sa=(0.0, 1.5, 2.0, 3.5, 4.0), mlp=(0.0, 0.25, 0.5, 0.75, 1.0), fixed=3.0,
                            refresh=20.0, dense=18.0)
    sched, labels = calibration_schedule(tiny_spec, DEFAULT_CANDIDATES)
    step_ms = truth.schedule_step_ms(tiny_spec, sched)
    got = table_from_medians(tiny_spec, labels, step_ms, [18.0, 17.0, 19.0], DEFAULT_CANDIDATES, truth.fingerprint)
    assert got.kinds["SA"].ms == pytest.approx(truth.kinds["SA"].ms)
    assert got.kinds["MLP"].ms == pytest.approx(truth.kinds["MLP"].ms)
    assert (got.partial_fixed_ms, got.refresh_ms, got.dense_step_ms) == (3.0, 20.0, 18.0)
    # and so it predicts every step of any schedule the way the truth does
    assert got.schedule_step_ms(tiny_spec, sched) == pytest.approx(step_ms)


def test_a_measured_table_is_complete_and_fingerprinted(measured, tiny_spec):
    table, path = measured
    assert LatencyTable.load(path).to_dict() == table.to_dict()
    fp = table.fingerprint
    assert (fp["family"], fp["batch_size"], fp["guidance"], fp["backend"], fp["device"]) == ("dit", 2, True,
                                                                                            "onnxruntime", "cpu")
    assert fp["prepacked"] in (True, False, "shared") and fp["onnxruntime"] and fp["cpu"]
    assert table.dense_step_ms > 0 and table.refresh_ms > 0 and table.partial_fixed_ms > 0
    assert set(table.kinds) == {layer.kind for layer in tiny_spec.layers}
    assert len(table.samples["steps"]) == len(calibration_schedule(tiny_spec, DEFAULT_CANDIDATES)[1])


def test_dsprofile_reports_predicted_against_measured(measured, tiny_bundles, tmp_path, caplog):
    table, path = measured
    report = profile(tiny_bundles["toca"], tiny_bundles["dense"],
                     ProfileConfig(runs=1, warmup=0, memory=False, latency_table=str(path)))
    sparse = report.to_dict()["sparse"]
    sched = report.sparse.manifest.schedule
    assert len(sparse["predicted_per_step_ms"]) == len(sched.computed_steps)
    assert sparse["predicted_total_ms"] == pytest.approx(sum(sparse["predicted_per_step_ms"]))
    assert report.extra["latency_table"]["mismatches"] == []
    # a table of another run shape is reported by name, not silently used
    other = LatencyTable.from_dict({**table.to_dict(), "fingerprint": {**table.fingerprint, "batch_size": 7,
                                                                     "backend": "torch"}})
    other_path = other.save(tmp_path / "other.json")
    with caplog.at_level("WARNING"):
        report = profile(tiny_bundles["toca"], tiny_bundles["dense"],
                         ProfileConfig(runs=1, warmup=0, memory=False, latency_table=str(other_path)))
    mismatches = report.extra["latency_table"]["mismatches"]
    assert any(m.startswith("batch_size: table 7, here 2") for m in mismatches)
    assert any(m.startswith("backend: table 'torch'") for m in mismatches)
    assert "another target or run shape" in caplog.text


def test_dsexport_scales_a_baseline_to_a_latency_budget(measured, tmp_path, capsys):
    _, path = measured
    out = tmp_path / "sched.json"
    rc = export_cli.main(["--model", "dit-tiny", "--batch", "2", "--schedule", "toca", "--steps", "6", "--ratio", "0.6",
                          "--budget", "latency", "--latency-table", str(path), "--out", str(tmp_path / "b"),
                          "--no-verify", "--write-schedule", str(out), "-q"])
    assert rc == 0
    sched = Schedule.load(out)
    latency = sched.provenance["latency"]
    assert latency["budget"] == "latency" and latency["target"] == 0.6 and latency["table"] == str(path)
    assert latency["predicted_ratio"] == pytest.approx(latency["predicted_ms"] / latency["dense_ms"])
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["schedule"]["provenance"]["latency"] == latency
    rc = export_cli.main(["--model", "dit-tiny", "--schedule", "toca", "--budget", "latency", "--out", str(tmp_path / "c")])
    assert rc == 2 and "--latency-table" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_dstrain_meets_a_latency_budget(measured, tmp_path):
    _, path = measured
    out = tmp_path / "joint.json"
    rc = train_cli.main(["--model", "dit-tiny", "--batch-size", "2", "--steps", "6", "--ratio", "0.6", "--space", "joint",
                         "--init", "toca", "--samples", "2", "--stage2-epochs", "1", "--validate-every", "0",
                         "--budget", "latency", "--latency-table", str(path), "--loss-features", "0", "--out", str(out),
                         "--no-progress"])
    assert rc == 0
    sched = Schedule.load(out)
    latency = sched.provenance["latency"]
    assert latency["budget"] == "latency" and latency["target"] == 0.6
    # the DP meets the target in the table's units: off only by each entry's rounding to the unit
    assert latency["predicted_ratio"] == pytest.approx(0.6, abs=0.02)
    assert sched.macs_ratio["target"] is None and 0 < sched.macs_ratio["achieved"] <= 1


def test_dscalibrate_latency_refuses_bad_input(tmp_path, capsys):
    assert calibrate_cli.main(["latency", "--candidates", "0,half,1", "--out", str(tmp_path / "t.json")]) == 2
    assert "--candidates must be comma-separated" in capsys.readouterr().err
    assert calibrate_cli.main(["latency", "--candidates", "0.5,1", "--out", str(tmp_path / "t.json")]) == 2
    assert "include 0 and 1" in capsys.readouterr().err
    assert calibrate_cli.main(["latency", "--out", str(tmp_path / "no" / "t.json")]) == 2
    assert "create it first" in capsys.readouterr().err
    assert calibrate_cli.main(["latency", "--model", "no-such-model", "--out", str(tmp_path / "t.json")]) == 2
    assert not (tmp_path / "t.json").exists()
