import json

import pytest

from diffsparse.builtin_schedules import dense_schedule, fewer_steps_schedule, resolve_schedule, toca_schedule
from diffsparse.schedule import LayerRef, Schedule, ScheduleError


def test_roundtrip(tmp_path, tiny_schedules):
    sched = tiny_schedules["toca"]
    path = sched.save(tmp_path / "s.json")
    loaded = Schedule.load(path)
    assert loaded.to_dict() == sched.to_dict()
    assert not (tmp_path / "s.json.tmp").exists()


def _write(tmp_path, data):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version=99), "version 99 is not supported"),
    (lambda d: d.update(format="other"), "'format' must be"),
    (lambda d: d["keep"][2].__setitem__(0, 999), "outside [0, N=64]"),
    (lambda d: d["keep"][2].__setitem__(0, 33), "not in the candidate set"),
    (lambda d: d["keep"][2].pop(), "keep[2] has 3 entries"),
    (lambda d: d["keep"][0].__setitem__(1, 32), "step 0 must recompute every token"),
    (lambda d: d["full_steps"].__setitem__(1, True), "step 1 is marked full"),
    (lambda d: d.pop("layers"), "missing field(s) ['layers']"),
    (lambda d: d["layers"][0].update(kind="XX"), "kind 'XX'"),
    (lambda d: d["selector"].update(score="magic"), "selector.score 'magic'"),
    (lambda d: d.update(num_steps=3), "num_steps=3 but keep has 6 rows"),
    (lambda d: d["skip"].__setitem__(0, True), "step 0 cannot be skipped"),
    (lambda d: d["skip"].__setitem__(1, True), "step 1 is skipped, so it computes no token"),
    (lambda d: d["skip"].__setitem__(1, 1), "skip must hold one true/false per step"),
    (lambda d: d["skip"].pop(), "skip must hold one true/false per step (6)"),
    (lambda d: d.update(version=1), "a version 1 schedule has no 'skip' field"),
])
def test_bad_files_name_the_problem(tmp_path, tiny_schedules, mutate, message):
    data = tiny_schedules["toca"].to_dict()
    mutate(data)
    with pytest.raises(ScheduleError, match=None) as err:
        Schedule.load(_write(tmp_path, data))
    assert message in str(err.value)


def test_malformed_and_missing_files(tmp_path):
    p = tmp_path / "s.json"
    p.write_text('{"format": "diffsparse-schedule", "vers')
    with pytest.raises(ScheduleError, match="not valid JSON"):
        Schedule.load(p)
    with pytest.raises(ScheduleError, match="does not exist"):
        Schedule.load(tmp_path / "nope.json")


def test_schedule_must_fit_the_model(tmp_path, tiny_spec, tiny_schedules):
    sched = tiny_schedules["toca"]
    path = sched.save(tmp_path / "s.json")
    with pytest.raises(ScheduleError, match="T=6 steps but 10 were asked for"):
        resolve_schedule(path, tiny_spec, 10)
    data = sched.to_dict()
    data["layers"] = data["layers"][:2]
    data["keep"] = [row[:2] for row in data["keep"]]
    with pytest.raises(ScheduleError, match="L=2 cacheable layers but the model has 4"):
        resolve_schedule(_write(tmp_path, data), tiny_spec, None)
    data = sched.to_dict()
    data["num_tokens"] = 256
    data["keep"] = [[4 * k for k in row] for row in data["keep"]]
    with pytest.raises(ScheduleError, match="N=256 tokens per layer but the model has 64"):
        resolve_schedule(_write(tmp_path, data), tiny_spec, None)
    data = sched.to_dict()
    data["family"] = "pixart"
    with pytest.raises(ScheduleError, match="model family 'pixart'"):
        resolve_schedule(_write(tmp_path, data), tiny_spec, None)


def test_dense_schedule(tiny_spec):
    sched = dense_schedule(tiny_spec, 5)
    assert all(sched.full_steps)
    assert sched.macs_ratio["achieved"] == pytest.approx(1.0)
    assert len(sched.distinct_signatures()) == 1


@pytest.mark.parametrize("target", [0.4, 0.5, 0.7])
def test_toca_schedule_hits_its_target(tiny_spec, target):
    sched = toca_schedule(tiny_spec, 20, target, full_every=5)
    assert abs(sched.macs_ratio["achieved"] - target) < 0.05
    assert sched.macs_ratio["achieved"] == pytest.approx(tiny_spec.macs_ratio(sched))
    assert [t for t, full in enumerate(sched.full_steps) if full] == [0, 5, 10, 15]
    allowed = set(sched.allowed_keep())
    assert all(k in allowed for row in sched.keep for k in row)
    # shaped by depth and kind: the first block's SA recomputes at least as much as the last block's MLP
    assert all(row[0] >= row[-1] for row in sched.keep)


def test_layer_names():
    assert LayerRef(3, "MLP").name == "mlp3"


def test_shipped_schedules_fit_their_model():
    """Every learned schedule shipped in diffsparse/schedules loads, validates and fits mnist-dit."""
    from diffsparse.builtin_schedules import resolve_schedule, shipped_schedules
    from diffsparse.models.zoo import make_spec

    names = shipped_schedules()
    if not names:
        pytest.skip("no learned schedules shipped")
    spec = make_spec("mnist-dit", batch_size=1)
    for name in names:
        sched = resolve_schedule(name, spec, None)
        assert sched.provenance["method"] == "diffsparse"
        assert abs(spec.macs_ratio(sched) - sched.macs_ratio["achieved"]) < 1e-9


def test_demo_picks_the_best_shipped_schedule_for_its_steps():
    """dsdemo's auto choice: joint space with forecasting first, and only a schedule for the
    requested number of steps (the 10-step 50% schedule never runs a 50-step job)."""
    from diffsparse.demo import best_shipped

    assert best_shipped("mnist-dit", 10, 0.5) == "mnist-dit-joint-forecast-50"
    assert best_shipped("mnist-dit", 20, 0.3) == "mnist-dit-t20-joint-forecast-30"
    assert best_shipped("mnist-dit", 50, 0.1) == "mnist-dit-t50-joint-forecast-10"
    assert best_shipped("mnist-dit", 50, 0.5) is None
    assert best_shipped("dit-small", 10, 0.5) is None


def test_per_layer_token_counts():
    layers = [LayerRef(0, "SA"), LayerRef(0, "MLP"), LayerRef(0, "TMLP")]
    dense = [64, 64, 8]
    sched = Schedule(family="flux", num_tokens=64, layers=layers, layer_tokens=dense,
                     keep=[dense, [32, 16, 4], [0, 64, 2]])
    assert sched.dense_keep() == dense and sched.full_steps == [True, False, False]
    assert sched.allowed_keep(8) == [0, 2, 4, 6, 8]
    assert Schedule.from_dict(sched.to_dict()).to_dict() == sched.to_dict()
    with pytest.raises(ScheduleError, match="outside"):
        Schedule(family="flux", num_tokens=64, layers=layers, layer_tokens=dense, keep=[dense, [32, 16, 16]])
    with pytest.raises(ScheduleError, match="one positive integer per layer"):
        Schedule(family="flux", num_tokens=64, layers=layers, layer_tokens=[64, 8], keep=[dense])
    with pytest.raises(ScheduleError, match="per-layer token counts"):
        sched.check_fits("flux", layers, 64, layer_tokens=[64, 64, 16])
    # uniform counts are stored as num_tokens alone, so older files and readers see no change
    uniform = Schedule(family="dit", num_tokens=64, layers=layers[:2], layer_tokens=[64, 64], keep=[[64, 64]])
    assert uniform.layer_tokens is None and "layer_tokens" not in uniform.to_dict()


def test_version_1_files_read_as_schedules_without_skips(tmp_path, tiny_schedules):
    data = tiny_schedules["toca"].to_dict()
    data.pop("skip")
    data.pop("skip_forecast")
    data["version"] = 1
    old = Schedule.load(_write(tmp_path, data))
    assert old.skip == [False] * old.num_steps and old.computed_steps == list(range(old.num_steps))
    assert old.to_dict()["version"] == 3 and old.keep == tiny_schedules["toca"].keep


def test_skip_forecast_is_version_3(tmp_path, tiny_spec):
    """Version 2 files read as reusing skips; a version 2 file naming skip_forecast is refused (a
    version 2 reader would have run it the other way), as is a forecast with nothing skipped."""
    sched = fewer_steps_schedule(tiny_spec, 6, 0.5)
    data = sched.to_dict()
    data["version"] = 2
    with pytest.raises(ScheduleError, match="version 2 schedule has no 'skip_forecast'"):
        Schedule.load(_write(tmp_path, data))
    data.pop("skip_forecast")
    assert Schedule.load(_write(tmp_path, data)).skip_forecast is False
    forecast = sched.forecasting()
    assert Schedule.load(forecast.save(tmp_path / "f.json")).skip_forecast is True
    data = forecast.to_dict()
    data["skip_forecast"] = "yes"
    with pytest.raises(ScheduleError, match="skip_forecast must be true or false"):
        Schedule.load(_write(tmp_path, data))
    with pytest.raises(ScheduleError, match="skips no step"):
        toca_schedule(tiny_spec, 6, 0.5).forecasting()


def test_skipped_steps_are_not_computed_steps(tiny_spec, tmp_path):
    dense = tiny_spec.dense_keep()
    zero = [0] * len(dense)
    sched = Schedule(family=tiny_spec.family, num_tokens=tiny_spec.num_tokens, layers=tiny_spec.layers,
                     keep=[dense, zero, dense, zero], skip=[False, True, False, False])
    assert sched.computed_steps == [0, 2, 3] and sched.computed == [True, False, True, True]
    assert sched.full_steps == [True, False, True, False], "a skipped step is not a full step"
    # the skipped step runs no graph; the FORA-style step 3 (K = 0 everywhere) does
    assert sched.distinct_signatures() == [tuple(dense), tuple(zero)] and sched.reuses_tokens
    assert Schedule.load(sched.save(tmp_path / "s.json")).skip == sched.skip
    assert tiny_spec.schedule_step_macs(sched) == [tiny_spec.step_macs(r) for r in (dense, dense, zero)]


def test_toca_picks_a_full_step_period_that_reaches_low_budgets(tiny_spec):
    """A full step every 3 of 12 steps alone costs a third; full_every=None lengthens the period
    until the target is met."""
    fixed = toca_schedule(tiny_spec, 12, 0.2, full_every=3)
    auto = toca_schedule(tiny_spec, 12, 0.2, full_every=None)
    assert fixed.macs_ratio["achieved"] > 0.3
    assert abs(auto.macs_ratio["achieved"] - 0.2) <= 0.01 + 1e-9 and auto.provenance["full_every"] > 3
    assert toca_schedule(tiny_spec, 12, 0.5, full_every=None).provenance["full_every"] == 3
