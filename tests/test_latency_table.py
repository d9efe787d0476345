"""The latency table file and its cost model (diffsparse/latency_table.py, diffsparse/step_costs.py)."""

from __future__ import annotations

import json

import pytest

from diffsparse.builtin_schedules import dense_schedule, fewer_steps_schedule, fora_schedule, toca_schedule
from diffsparse.latency_table import LatencyTable, LatencyTableError, model_fingerprint
from diffsparse.step_costs import LatencyCosts, MacsCosts, make_costs

STEPS = 8


def test_round_trip(tmp_path, tiny_spec, synthetic_table):
    table = synthetic_table(tiny_spec, backend="onnxruntime")
    path = table.save(tmp_path / "t.json")
    back = LatencyTable.load(path)
    assert back.to_dict() == table.to_dict()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(format="other"), "not a latency table"),
    (lambda d: d["kinds"]["SA"].update(ms=[0, 1, -2, 3, 4]), "finite non-negative"),
    (lambda d: d["kinds"]["SA"].update(tokens=[16, 0, 32, 48, 64]), "ascend strictly from 0"),
    (lambda d: d["kinds"]["SA"].update(tokens=[0, 16]), "one length"),
    (lambda d: d["kinds"].update(XX=d["kinds"]["SA"]), "unknown layer kind"),
    (lambda d: d.pop("refresh_ms"), "malformed field"),
    (lambda d: d.update(dense_step_ms=float("nan")), "dense_step_ms"),
    (lambda d: d["fingerprint"].pop("batch_size"), "fingerprint lacks"),
])
def test_bad_tables_are_refused_by_name(tmp_path, tiny_spec, edit, message, synthetic_table):
    data = synthetic_table(tiny_spec).to_dict()
    edit(data)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LatencyTableError, match=message):
        LatencyTable.load(path)


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(LatencyTableError, match="does not exist; write one with dscalibrate latency"):
        LatencyTable.load(tmp_path / "none.json")
    (tmp_path / "half.json").write_text('{"format": "diffsparse-latency-table", "vers')
    with pytest.raises(LatencyTableError, match="truncated"):
        LatencyTable.load(tmp_path / "half.json")


def test_cost_model_per_step_kind(tiny_spec, synthetic_table):
    table = synthetic_table(tiny_spec)
    n, layers = tiny_spec.num_tokens, tiny_spec.layers
    dense = tiny_spec.dense_keep()
    assert table.step_ms(layers, dense, dense) == 14.0                       # a refresh step
    assert table.step_ms(layers, dense, dense, reuses_tokens=False) == 12.0  # the plain model
    half = [n // 2] * len(layers)
    per_layer = {"SA": 2.0, "MLP": 1.0}
    assert table.step_ms(layers, dense, half) == pytest.approx(1.0 + sum(per_layer[layer.kind] for layer in layers))
    assert table.step_ms(layers, dense, [0] * len(layers)) == 1.0
    with pytest.raises(LatencyTableError, match="K=3"):
        table.step_ms(layers, dense, [3] * len(layers))


def test_schedule_predictions_follow_the_graphs_a_bundle_runs(tiny_spec, synthetic_table):
    table = synthetic_table(tiny_spec)
    fewer = fewer_steps_schedule(tiny_spec, STEPS, 0.5)   # no token reuse: plain model steps, skipped ones free
    assert table.schedule_step_ms(tiny_spec, fewer) == [12.0] * len(fewer.computed_steps)
    fora = fora_schedule(tiny_spec, STEPS, 0.5)           # refresh steps and K = 0 steps
    expected = [14.0 if full else 1.0 for full in fora.full_steps]
    assert table.schedule_step_ms(tiny_spec, fora) == expected


def test_macs_costs_are_the_specs_macs_ratio(tiny_spec):
    costs = MacsCosts(tiny_spec)
    for sched in (toca_schedule(tiny_spec, STEPS, 0.4), fora_schedule(tiny_spec, STEPS, 0.5),
                  fewer_steps_schedule(tiny_spec, STEPS, 0.5), dense_schedule(tiny_spec, STEPS)):
        assert costs.ratio(sched.keep, sched.skip) == pytest.approx(tiny_spec.macs_ratio(sched))


def test_baselines_scale_to_a_latency_budget(tiny_spec, synthetic_table):
    # a table where partial steps cost much more than their MACs say: at the same target, the
    # latency-scaled ToCa schedule recomputes fewer tokens than the MACs-scaled one
    table = synthetic_table(tiny_spec, fixed=6.0)
    costs = LatencyCosts(tiny_spec, table, source="t.json")
    by_macs = toca_schedule(tiny_spec, STEPS, 0.6, full_every=None)
    by_latency = toca_schedule(tiny_spec, STEPS, 0.6, full_every=None, costs=costs)
    assert costs.ratio(by_latency.keep) == pytest.approx(0.6, abs=0.05)
    assert abs(costs.ratio(by_latency.keep) - 0.6) <= abs(costs.ratio(by_macs.keep) - 0.6)
    record = by_latency.provenance["latency"]
    assert record["budget"] == "latency" and record["table"] == "t.json"
    assert record["predicted_ms"] == pytest.approx(sum(table.schedule_step_ms(tiny_spec, by_latency)))
    assert record["dense_ms"] == STEPS * 12.0
    assert by_latency.macs_ratio["target"] is None and by_latency.macs_ratio["achieved"] == tiny_spec.macs_ratio(by_latency)
    assert "latency" not in by_macs.provenance


def test_a_table_for_another_model_is_refused_and_another_shape_is_warned(tiny_spec, caplog, synthetic_table):
    with pytest.raises(LatencyTableError, match="re-run dscalibrate latency"):
        LatencyCosts(tiny_spec, LatencyTable(fingerprint={**model_fingerprint(tiny_spec), "num_layers": 99},
                                             kinds=synthetic_table(tiny_spec).kinds, partial_fixed_ms=1, refresh_ms=2,
                                             dense_step_ms=2))
    other = synthetic_table(tiny_spec, batch_size=tiny_spec.batch_size + 1)
    with caplog.at_level("WARNING"):
        LatencyCosts(tiny_spec, other)
    assert "batch_size: table 3, here 2" in caplog.text
    assert other.mismatches({"backend": "torch"}) == []     # keys the table does not record are not compared


def test_make_costs_needs_a_table_for_latency(tiny_spec):
    with pytest.raises(LatencyTableError, match="--latency-table"):
        make_costs(tiny_spec, "latency")
    with pytest.raises(ValueError, match="budget must be one of"):
        make_costs(tiny_spec, "flops")
