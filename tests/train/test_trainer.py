"""The schedule trainer: budget, resume, DDP equivalence, and the dstrain command."""

import json
import subprocess
import sys

import pytest
import torch
from diffsparse.train.costs import Budget
from diffsparse.train.losses import DistillLossConfig
from diffsparse.train.trainer import ScheduleTrainer, TrainConfig

from diffsparse.models.zoo import make_spec
from diffsparse.schedule import Schedule

L2 = DistillLossConfig(features=0.0, l2=1.0)


def config(**kw):
    base = dict(ratio=0.5, num_steps=6, batch_size=2, samples=4, stage1_epochs=1, stage2_epochs=1, loss=L2,
                validate_every=0)
    base.update(kw)
    return TrainConfig(**base)


def test_learned_schedule_costs_exactly_what_the_toca_schedule_costs(tiny_spec):
    trainer = ScheduleTrainer(tiny_spec, config())
    sched = trainer.run()
    assert sched.provenance["method"] == "diffsparse"
    assert len(trainer.state.history) == 4 and {h["stage"] for h in trainer.state.history} == {1, 2}
    assert tiny_spec.schedule_macs(sched) == tiny_spec.schedule_macs(trainer.init_schedule)
    assert sched.keep[0] == [tiny_spec.num_tokens] * len(tiny_spec.layers)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.history)


def test_a_schedule_is_learned_for_the_token_score_asked(tiny_spec):
    trainer = ScheduleTrainer(tiny_spec, config(score="l2norm"))
    assert trainer.selector.score == "l2norm" and trainer.init_schedule.selector.score == "l2norm"
    assert trainer.selector.lambdas == tiny_spec.default_selector().lambdas
    assert ScheduleTrainer(tiny_spec, config()).selector == tiny_spec.default_selector()


def test_costs_move_and_the_loss_is_differentiated(tiny_spec):
    trainer = ScheduleTrainer(tiny_spec, config())
    before = trainer.costs.layer_cost.detach().clone()
    trainer.train_step()
    assert trainer.costs.layer_cost.grad is not None and trainer.costs.layer_cost.grad.abs().sum() > 0
    assert not torch.equal(before, trainer.costs.layer_cost.detach())


def test_resume_continues_exactly(tiny_spec, tmp_path):
    whole = ScheduleTrainer(tiny_spec, config(), tmp_path / "a").run()
    first = ScheduleTrainer(tiny_spec, config(), tmp_path / "b")
    first.train_step()
    first.save_checkpoint()
    second = ScheduleTrainer(tiny_spec, config(), tmp_path / "b")
    assert second.resume() and second.state.iteration == 1
    assert second.run().keep == whole.keep
    with pytest.raises(ValueError, match="another configuration"):
        ScheduleTrainer(tiny_spec, config(ratio=0.4), tmp_path / "b").resume()
    # with validation: the best so far comes back with the checkpoint
    checked = config(validate_every=1, patience=0)
    whole = ScheduleTrainer(tiny_spec, checked, tmp_path / "c").run()
    first = ScheduleTrainer(tiny_spec, checked, tmp_path / "d")
    first.best = {"loss": first.schedule_heldout_loss(first.init_schedule), "iteration": 0, "schedule": first.init_schedule}
    first.train_step()
    first.validate()
    first.save_checkpoint()
    second = ScheduleTrainer(tiny_spec, checked, tmp_path / "d")
    assert second.resume() and second.best["loss"] == first.best["loss"]
    resumed = second.run()
    assert resumed.keep == whole.keep and resumed.provenance["heldout_loss"] == pytest.approx(whole.provenance["heldout_loss"])


def test_batch_size_must_match_the_spec(tiny_spec):
    with pytest.raises(ValueError, match="batch size"):
        ScheduleTrainer(tiny_spec, config(batch_size=3))


def _dstrain(args, tmp_path, nproc=1):
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
              "--master-port", "29531"] if nproc > 1 else [sys.executable]
    cmd = [*runner, "-m", "diffsparse.train.cli", "--model", "dit-tiny", "--steps", "6", "--samples", "4",
           "--loss-features", "0", "--threads", "1", "--no-progress", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path):
    """DDP: 2 ranks x batch 1 == 1 process x batch 2 (gradients averaged with all_reduce)."""
    _dstrain(["--batch-size", "2", "--out", "one.json"], tmp_path)
    _dstrain(["--batch-size", "1", "--out", "two.json"], tmp_path, nproc=2)
    one, two = Schedule.load(tmp_path / "one.json"), Schedule.load(tmp_path / "two.json")
    assert one.keep == two.keep
    assert (tmp_path / "one.work" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    ca = torch.load(tmp_path / "one.work" / "checkpoint.pt", weights_only=False)
    cb = torch.load(tmp_path / "two.work" / "checkpoint.pt", weights_only=False)
    assert torch.allclose(ca["unified"], cb["unified"], atol=1e-4)
    la = [h for h in json.loads((tmp_path / "one.work" / "history.json").read_text()) if "loss" in h]
    lb = [h for h in json.loads((tmp_path / "two.work" / "history.json").read_text()) if "loss" in h]
    assert len(la) == len(lb)
    # held-out validation: every rank scores all held-out draws, so both runs keep the same best
    assert one.provenance["heldout_loss"] == pytest.approx(two.provenance["heldout_loss"], rel=1e-4)


@pytest.mark.parametrize("method", ["toca", "fora", "fewer-steps", "random", "genetic"])
def test_dstrain_baselines_write_valid_schedules(tmp_path, method):
    _dstrain(["--method", method, "--batch-size", "2", "--out", "s.json", "--population", "4",
              "--generations", "1", "--search-iterations", "3"], tmp_path)
    sched = Schedule.load(tmp_path / "s.json")
    assert sched.provenance["method"] == method
    spec = make_spec("dit-tiny", batch_size=2)
    spec.check_schedule(sched, 6)
    if method == "fewer-steps":   # 3 of the 6 steps computed, the others skipped
        assert sched.computed_steps == [0, 2, 4]
    if method in ("random", "genetic"):
        budget = Budget.for_spec(spec, sched.allowed_keep())
        from diffsparse.builtin_schedules import toca_schedule

        assert budget.units_of(sched.keep) == budget.units_of(toca_schedule(spec, 6, 0.5).keep)


def test_dstrain_reports_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffsparse.train.cli", "--model", "dit-tiny", "--steps", "6",
                           "--out", "s.json", "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "feature loss" in proc.stderr


def test_the_run_returns_its_best_held_out_schedule_and_never_loses_to_its_start(tiny_spec):
    trainer = ScheduleTrainer(tiny_spec, config(validate_every=1, patience=0, heldout_samples=4))
    sched = trainer.run()
    checks = [h for h in trainer.state.history if "heldout" in h]
    assert checks[0]["warm_start"] == "toca" and len(checks) == 1 + 4, "the start, then every iteration"
    best = min(h["heldout"] for h in checks)
    assert sched.provenance["heldout_loss"] == best <= checks[0]["heldout"]
    assert trainer.schedule_heldout_loss(sched) == pytest.approx(best)
    assert tiny_spec.schedule_macs(sched) == tiny_spec.schedule_macs(trainer.init_schedule)
    assert sched.provenance["kept"] in ("warm start", "learned") and sched.provenance["method"] == "diffsparse"


def test_patience_stops_the_run(tiny_spec, monkeypatch):
    trainer = ScheduleTrainer(tiny_spec, config(validate_every=1, patience=2, stage2_epochs=10))
    monkeypatch.setattr(trainer, "_heldout_loss", lambda w, s: 1.0)   # never improves on the start
    sched = trainer.run()
    assert trainer.stopped_early and sched.provenance["kept"] == "warm start"
    assert sched.keep == trainer.init_schedule.keep
    assert len(trainer._training_records()) == 2 + 2, "stage 1 runs in full, stage 2 stops after 2 validations"


def test_init_best_starts_from_the_best_baseline_on_held_out_draws(tiny_spec):
    trainer = ScheduleTrainer(tiny_spec, config(validate_every=2, init="best", space="joint"))
    losses = trainer.warm_start
    assert set(losses) == {"toca", "fora", "fewer-steps"}
    assert trainer.init_schedule.provenance["method"] == min(losses, key=losses.get)
    assert trainer.schedule_heldout_loss(trainer.init_schedule) == pytest.approx(min(losses.values()))
