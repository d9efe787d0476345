"""Two-stage training of the sparsity costs (paper §3.2, Algorithm 1, A.5.3).

Stage 1: the step cost C_f picks |T_f| full steps by DP and the layer cost C_l spreads the rest of
the budget over the partial steps; both learn through the straight-through masks, with their own
learning rates. Between the stages the selected full steps get -δ on the full candidate
(eq. 9). Stage 2 fine-tunes the unified cost with one DP over every (step, layer) under the
global budget.

Each iteration: draw a batch of (noise, conditioning) from the training stream, sample it with the
dense teacher (no gradient) and with the student under the current hard allocation, take the
distillation loss, backpropagate into the costs, step the optimiser. The teacher's samples are
kept for the whole run (they depend only on the noise), so each training sample is sampled
densely once.

The joint space (`space="joint"`, train/joint.py): each step is skipped or computed, a computed
step picks K per layer; one stage, one exact DP over both, the layer cost and the (skip, compute)
step cost learning together through the straight-through weights.

Several processes (torchrun): each takes its own slice of every batch and the cost gradients are
averaged with all_reduce before the step, which equals one process on the whole batch; rank 0
writes checkpoints and the schedule.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffsparse.train.costs import (
    Budget,
    CostPredictor,
    allocate_stage1,
    allocate_unified,
)
from diffsparse.train.joint import init_step_cost, joint_allocation, joint_units
from diffsparse.train.losses import DistillLoss, DistillLossConfig
from diffsparse.train.student import ScheduleRollout

from diffsparse.builtin_schedules import dense_schedule, fewer_steps_schedule, fora_schedule, toca_schedule
from diffsparse.models.base import ModelSpec
from diffsparse.sampler import initial_noise
from diffsparse.step_costs import LatencyCosts, make_costs, record_costs
from diffsparse.schedule import Schedule, provenance

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The schedule trainer's settings. Learning rates and δ are the paper's; the epoch is ours:
    `samples` training samples (noise + conditioning) make an epoch, split into batches of
    `batch_size` per process."""

    ratio: float = 0.5                # target ratio R of dense, in the budget's unit (fixed parts included)
    # "macs": R of the dense MACs (the paper); "latency": R of the dense latency predicted by the
    # latency table at `latency_table` (dscalibrate latency), warm starts scaled to it too
    budget: str = "macs"
    latency_table: str | None = None
    num_steps: int = 20
    guidance_scale: float | None = None  # None: the model's default (spec.default_guidance_scale)
    batch_size: int = 4
    samples: int = 64                 # training samples per epoch
    stage1_epochs: int = 1
    stage2_epochs: int = 1
    # The paper's rates are 1.0 / 0.01 / 0.1. With AdamW on our cost scale (init costs in [0, 1])
    # 1.0 moves every layer cost by ~1 per iteration, past δ = 10 within the epoch, and the stage-2
    # allocation then drops the selected full steps: on mnist-dit at 40% MACs it gave 17.2 dB
    # held-out PSNR vs 24.8 dB with the rates below (22.8 dB for the ToCa schedule).
    lr_layer: float = 0.1             # stage 1, layer cost (paper: 1.0)
    lr_step: float = 0.01             # stage 1, step cost (paper)
    lr_unified: float = 0.02          # stage 2 (paper: 0.1)
    delta: float = 10.0               # eq. 9
    num_full_steps: int | None = None  # |T_f|; default: as many as the initial schedule has
    temperature: float = 1.0          # of the STE's softmax surrogate
    init: str = "toca"                # initial schedule: toca (paper) or dense
    # "tokens": the paper's space (K per step and layer, two stages); "joint": steps may also be
    # skipped (train/joint.py), one stage of `stage2_epochs` at lr_unified / lr_step
    space: str = "tokens"
    # joint space: skipped steps run on x0 forecast from the last two computed steps (the schedule's
    # skip_forecast, diffsparse/sampler.py ForecastingSampler) instead of the last model output;
    # every warm start is evaluated and learned that way
    skip_forecast: bool = False
    # held-out validation (never trained on: draws of their own seeds): the run returns the
    # schedule with the best held-out loss seen, the warm start included, so it never loses to
    # its start; it stops once `patience` validations in a row did not improve on the best
    # 64: with 8 draws the held-out loss ranked FORA above fewer steps at 20 steps / 30% MACs, the
    # opposite of MNIST-FID on 1,000 samples (46.2 vs 67.1); with 64 it picks fewer steps at every
    # budget where FID does (20 steps: 50/30/20%, 10 steps: 50%), at ~0.3 s per draw and validation
    heldout_samples: int = 64
    validate_every: int = 4           # iterations between validations (0: none, return the last schedule)
    patience: int = 4                 # 0: run every epoch
    score: str | None = None          # token score s1 the schedule selects with (None: the model's default)
    seed: int = 0
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SPACES = ("tokens", "joint")
#: init "best": the baselines each space holds, one of which the run starts from (held-out loss)
BEST_OF = {"tokens": ("toca", "fora"), "joint": ("toca", "fora", "fewer-steps")}
#: the held-out draws' seed stream is the training seed plus this (never the training stream)
HELDOUT_SEED_OFFSET = 1_000_003
#: the schedules a run may start from (warm start); each (spec, T, ratio, selector, costs) -> Schedule,
#: scaled to `ratio` of dense in the costs' unit
INITS = {
    "toca": lambda spec, t, ratio, sel, costs: toca_schedule(spec, t, ratio, full_every=None, selector=sel, costs=costs),
    "dense": lambda spec, t, ratio, sel, costs: dense_schedule(spec, t, selector=sel),
    "fora": lambda spec, t, ratio, sel, costs: fora_schedule(spec, t, ratio, selector=sel, costs=costs),
    "fewer-steps": lambda spec, t, ratio, sel, costs: fewer_steps_schedule(spec, t, ratio, selector=sel, costs=costs),
    "best": None,   # the best of BEST_OF[space] on the held-out draws
}


@dataclass
class TrainState:
    stage: int = 1
    iteration: int = 0                # within the stage
    history: list[dict] = field(default_factory=list)


class ScheduleTrainer:
    def __init__(self, spec: ModelSpec, cfg: TrainConfig, out_dir: str | os.PathLike | None = None,
                 world: tuple[int, int] = (0, 1), device: str = "cpu") -> None:
        if spec.batch_size != cfg.batch_size:
            raise ValueError(f"the model spec has batch size {spec.batch_size} but the config asks for "
                             f"{cfg.batch_size}; build the spec with batch_size=cfg.batch_size")
        if cfg.guidance_scale is None:
            cfg = dataclasses.replace(cfg, guidance_scale=spec.resolve_guidance_scale(None))
        self.spec, self.cfg = spec, cfg
        self.rank, self.world_size = world
        self.out_dir = Path(out_dir) if out_dir else None
        selector = spec.default_selector()
        if cfg.score is not None:
            selector = dataclasses.replace(selector, score=cfg.score)
        if cfg.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {cfg.space!r}")
        if cfg.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {cfg.init!r}")
        if cfg.init == "fewer-steps" and cfg.space != "joint":
            raise ValueError("init 'fewer-steps' skips steps: it needs space='joint'")
        if cfg.skip_forecast and cfg.space != "joint":
            raise ValueError("skip_forecast forecasts skipped steps: it needs space='joint'")
        if cfg.init == "best" and not cfg.validate_every:
            raise ValueError("init 'best' picks the warm start by held-out loss: it needs validate_every > 0")
        if cfg.budget == "latency" and cfg.init == "dense":
            raise ValueError("a latency budget takes its units from the warm start: use init toca, fora, "
                             "fewer-steps or best, not dense")
        self.costs_model = make_costs(spec, cfg.budget, cfg.latency_table, same_batch=False)   # trains at its own batch
        names = BEST_OF[cfg.space] if cfg.init == "best" else (cfg.init,)
        starts = {name: self._skipping(INITS[name](spec, cfg.num_steps, cfg.ratio, selector, self.costs_model))
                  for name in names}
        spec = self.spec = spec.with_skip_forecast(cfg.skip_forecast)
        self.init_schedule = starts[names[0]]
        self.selector = self.init_schedule.selector
        self.candidates = self.init_schedule.candidates
        if isinstance(self.costs_model, LatencyCosts):
            self.budget = Budget.for_latency(spec, self.init_schedule.allowed_keep(), self.costs_model.table)
        else:
            self.budget = Budget.for_spec(spec, self.init_schedule.allowed_keep())
        self.num_full = cfg.num_full_steps or sum(self.init_schedule.full_steps)
        self.units = self._units_of(self.init_schedule)
        self.rollout = ScheduleRollout(spec, spec.sampler_plan(cfg.num_steps), self.budget.token_counts, self.selector)
        self.device = torch.device(device)
        spec.model.to(self.device)
        self.loss_fn = DistillLoss(cfg.loss).to(self.device)
        self._heldout_data: list | None = None
        #: the warm start's candidates by held-out loss (init "best"): the best is the start
        self.warm_start = {name: self.schedule_heldout_loss(s) for name, s in starts.items()} if len(starts) > 1 else {}
        if self.warm_start:
            self.init_schedule = starts[min(self.warm_start, key=self.warm_start.get)]
            self.num_full = cfg.num_full_steps or sum(self.init_schedule.full_steps)
            self.units = self._units_of(self.init_schedule)
            log.info("warm start by held-out loss: %s -> %s", self.warm_start, self.init_schedule.provenance["method"])
        t, n_layers, n_cand = cfg.num_steps, len(spec.layers), len(self.budget.token_counts)
        self.costs = CostPredictor(t, n_layers, n_cand)
        self.costs.init_from_schedule(self.init_schedule, self.budget.token_counts)
        self.unified: torch.nn.Parameter | None = None
        self.step_kind: torch.nn.Parameter | None = None   # joint space: (T, 2) skip / compute costs
        self.state = TrainState()
        self.best: dict | None = None      # {"loss", "iteration", "schedule"}: the best held-out schedule so far
        self.stale = 0                     # validations since the best improved
        self.stopped_early = False
        if cfg.space == "joint":
            self.unified = torch.nn.Parameter(self.costs.layer_cost.detach().clone())
            self.step_kind = torch.nn.Parameter(init_step_cost(self.init_schedule.skip))
            self.state.stage = 2
        self._teacher: dict[int, torch.Tensor] = {}
        self._make_optimizer()
        if cfg.budget == "latency":   # the start must meet the budget too: its DP projection onto it
            start = self.init_schedule
            self.init_schedule = dataclasses.replace(self.schedule(), provenance=provenance(
                start.provenance["method"], projected_to="the latency budget", scaled=start.provenance.get("latency")))
            self._record_costs(self.init_schedule)

    def _skipping(self, schedule: Schedule) -> Schedule:
        """`schedule` with its skipped steps run the way this run's are (`TrainConfig.skip_forecast`)."""
        return dataclasses.replace(schedule, skip_forecast=self.cfg.skip_forecast and any(schedule.skip))

    def _units_of(self, schedule: Schedule) -> int:
        """The budget a run starting from `schedule` meets: exactly what that schedule costs
        (fixed parts included in the joint space); from dense, the configured ratio. Under a latency
        budget, the target itself in the table's units (a baseline only comes near it: its step
        and layer choices are coarse), the refresh steps' surcharge included in the paper's space."""
        if self.cfg.budget == "latency":
            total = self.cfg.ratio * self.cfg.num_steps * self.budget.dense_step_units
            if self.cfg.space == "joint":
                return int(round(total))
            layers = self.budget.units_for_ratio(self.cfg.num_steps, self.cfg.ratio)
            return layers - self.num_full * self.budget.refresh_extra_units
        if self.cfg.space == "joint":
            return joint_units(self.budget, schedule.keep, schedule.skip)
        if schedule.provenance.get("method") != "dense":
            return self.budget.units_of(schedule.keep)
        return self.budget.units_for_ratio(self.cfg.num_steps, self.cfg.ratio)

    # ---- held-out validation ----------------------------------------------------------------
    def _heldout(self) -> list:
        """(noise, conditioning, teacher) of the held-out draws, sampled densely once. Their seeds
        are not the training stream's; every rank uses all of them (same decisions everywhere)."""
        if self._heldout_data is None:
            b = self.spec.batch_size
            self._heldout_data = []
            for index in range(max(1, self.cfg.heldout_samples // b)):
                noise, cond = self._draw(self.cfg.seed + HELDOUT_SEED_OFFSET, index * b)
                self._heldout_data.append((noise, cond, self.rollout.teacher(noise, cond, self.cfg.guidance_scale)))
        return self._heldout_data

    @torch.no_grad()
    def _heldout_loss(self, weights: torch.Tensor, step_weights: torch.Tensor | None) -> float:
        losses = [float(self.loss_fn(self.rollout.sample(noise, cond, self.cfg.guidance_scale, weights, step_weights),
                                     teacher)[0]) for noise, cond, teacher in self._heldout()]
        return float(np.mean(losses))

    def schedule_heldout_loss(self, schedule: Schedule) -> float:
        """The distillation loss of a schedule on the held-out draws."""
        return self._heldout_loss(self.rollout.weights_for(schedule.keep), self.rollout.step_weights_for(schedule.skip))

    def validate(self) -> dict:
        """Held-out loss of the current allocation; keeps the best schedule (module docstring)."""
        alloc = self.allocation()
        steps = alloc.step_weights
        loss = self._heldout_loss(alloc.weights.detach(), None if steps is None else steps.detach())
        rec = {"stage": self.state.stage, "iteration": self.state.iteration, "heldout": loss}
        if self.best is None or loss < self.best["loss"]:
            self.best = {"loss": loss, "iteration": len(self._training_records()), "schedule": self.schedule()}
            self.stale = 0
        else:
            self.stale += 1
        rec["best"] = self.best["loss"]
        self.state.history.append(rec)
        return rec

    def _training_records(self) -> list[dict]:
        return [h for h in self.state.history if "loss" in h]

    # ---- optimisation -----------------------------------------------------------------------
    def _make_optimizer(self) -> None:
        c = self.cfg
        if self.state.stage == 1:
            groups = [{"params": [self.costs.layer_cost], "lr": c.lr_layer},
                      {"params": [self.costs.step_cost], "lr": c.lr_step}]
        else:
            groups = [{"params": [self.unified], "lr": c.lr_unified}]
            if self.step_kind is not None:
                groups.append({"params": [self.step_kind], "lr": c.lr_step})
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0)

    def allocation(self):
        if self.step_kind is not None:
            return joint_allocation(self.unified, self.step_kind, self.budget, self.units, self.cfg.temperature)
        if self.state.stage == 1:
            return allocate_stage1(self.costs, self.budget, self.units, self.num_full, self.cfg.temperature)
        return allocate_unified(self.unified, self.budget, self.units, self.cfg.temperature)

    def enter_stage2(self) -> None:
        """Eq. 9: C_l(t, l, N) -= δ for the full steps the step cost selects, then one unified cost."""
        alloc = allocate_stage1(self.costs, self.budget, self.units, self.num_full, self.cfg.temperature)
        unified = self.costs.layer_cost.detach().clone()
        for t, full in enumerate(alloc.full_steps):
            if full:
                unified[t, :, -1] -= self.cfg.delta
        self.unified = torch.nn.Parameter(unified)
        self.state.stage, self.state.iteration = 2, 0
        self.stale = 0   # patience counts in stage 2
        self._make_optimizer()

    # ---- data -------------------------------------------------------------------------------
    def _batch(self, index: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Training sample block `index` (batch_size per rank): noise and conditioning from seeds."""
        return self._draw(self.cfg.seed, (index * self.world_size + self.rank) * self.spec.batch_size)

    def _draw(self, seed: int, start: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Draws start .. start + batch_size of the stream `seed`: noise and conditioning."""
        b = self.spec.batch_size
        noise = torch.from_numpy(initial_noise(seed, start + b, self.spec.latent_shape)[start:])
        noise = noise.to(self.device)
        # conditioning per sample too, so a batch split across ranks sees the same samples
        conds = [self.spec.example_conditioning(np.random.default_rng([seed, 7, j]))
                 for j in range(start, start + b)]
        return noise, {k: np.concatenate([c[k][:1] for c in conds]) for k in conds[0]}

    def _teacher_for(self, index: int, noise, cond) -> torch.Tensor:
        if index not in self._teacher:
            self._teacher[index] = self.rollout.teacher(noise, cond, self.cfg.guidance_scale)
        return self._teacher[index]

    def batches_per_epoch(self) -> int:
        return max(1, self.cfg.samples // (self.cfg.batch_size * self.world_size))

    # ---- one iteration ----------------------------------------------------------------------
    def train_step(self) -> dict:
        index = self.state.iteration % self.batches_per_epoch()
        noise, cond = self._batch(index)
        teacher = self._teacher_for(index, noise, cond)
        alloc = self.allocation()
        student = self.rollout.sample(noise, cond, self.cfg.guidance_scale, alloc.weights, alloc.step_weights)
        loss, terms = self.loss_fn(student, teacher)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._average_gradients()
        self.opt.step()
        rec = {"stage": self.state.stage, "iteration": self.state.iteration, "loss": float(loss.detach()),
               **terms, "units": alloc.units, "full_steps": int(sum(alloc.full_steps)),
               "skipped_steps": int(sum(alloc.skip))}
        self.state.iteration += 1
        self.state.history.append(rec)
        return rec

    def _average_gradients(self) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for p in self._params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.world_size

    def _params(self) -> list[torch.nn.Parameter]:
        if self.state.stage == 1:
            return [self.costs.layer_cost, self.costs.step_cost]
        return [self.unified] + ([self.step_kind] if self.step_kind is not None else [])

    # ---- the whole run ----------------------------------------------------------------------
    def stage_iterations(self, stage: int) -> int:
        if stage == 1 and self.cfg.space == "joint":
            return 0
        epochs = self.cfg.stage1_epochs if stage == 1 else self.cfg.stage2_epochs
        return epochs * self.batches_per_epoch()

    def run(self, progress: bool = False, checkpoint_every: int = 10) -> Schedule:
        total = self.stage_iterations(1) + self.stage_iterations(2)
        done = self.state.iteration if self.state.stage == 1 else self.stage_iterations(1) + self.state.iteration
        bar = _progress(total, done, enabled=progress and self.rank == 0)
        t0 = time.perf_counter()
        every = self.cfg.validate_every
        if every and self.best is None:   # the warm start is the first candidate: never returned worse
            loss = self.schedule_heldout_loss(self.init_schedule)
            self.best = {"loss": loss, "iteration": 0, "schedule": self.init_schedule}
            self.state.history.append({"stage": self.state.stage, "iteration": 0, "heldout": loss, "best": loss,
                                       "warm_start": self.init_schedule.provenance.get("method")})
        while True:
            if self.state.stage == 1 and self.state.iteration >= self.stage_iterations(1):
                self.enter_stage2()
            if self.state.stage == 2 and self.state.iteration >= self.stage_iterations(2):
                break
            rec = self.train_step()
            rec["seconds"] = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(stage=rec["stage"], loss=f"{rec['loss']:.4g}",
                            best=f"{self.best['loss']:.4g}" if self.best else "-")
            log.info("stage %d iteration %d loss %.5g", rec["stage"], rec["iteration"], rec["loss"])
            if every and len(self._training_records()) % every == 0:
                v = self.validate()
                log.info("held-out loss %.5g (best %.5g)", v["heldout"], v["best"])
                if self.cfg.patience and self.state.stage == 2 and self.stale >= self.cfg.patience:
                    log.info("held-out loss did not improve in %d validations: stopping", self.stale)
                    self.stopped_early = True
                    break
            if checkpoint_every and self.state.iteration % checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        return self.result()

    def result(self) -> Schedule:
        """The run's schedule: with validation, the best on the held-out draws (possibly the warm
        start itself, then said so in its provenance); without, the last allocation."""
        if self.best is None:
            return self.schedule()
        best: Schedule = self.best["schedule"]
        records = self._training_records()
        sched = dataclasses.replace(best, provenance=provenance(
            "diffsparse", init=self.cfg.init, space=self.cfg.space, train_config=self.cfg.to_dict(),
            kept="warm start" if self.best["iteration"] == 0 else "learned",
            warm_start=self.init_schedule.provenance.get("method"), warm_start_candidates=self.warm_start,
            heldout_loss=self.best["loss"], best_iteration=self.best["iteration"], iterations=len(records),
            stopped_early=self.stopped_early, final_loss=records[-1]["loss"] if records else None))
        return self._record_costs(sched)

    def schedule(self) -> Schedule:
        alloc = self.allocation()
        sched = Schedule(family=self.spec.family, num_tokens=self.spec.num_tokens, layers=self.spec.layers,
                         keep=alloc.keep, candidates=self.candidates, selector=self.selector,
                         skip=list(alloc.skip),
                         provenance=provenance("diffsparse", init=self.cfg.init, space=self.cfg.space, stage=self.state.stage,
                                               iterations=len(self._training_records()), train_config=self.cfg.to_dict(),
                                               final_loss=(self._training_records() or [{"loss": None}])[-1]["loss"]))
        return self._record_costs(self._skipping(sched))

    def _record_costs(self, sched: Schedule) -> Schedule:
        return record_costs(sched, self.costs_model, self.cfg.ratio)

    # ---- checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir else None

    def save_checkpoint(self) -> None:
        path = self.checkpoint_path()
        if path is None or self.rank != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"config": self.cfg.to_dict(), "stage": self.state.stage, "iteration": self.state.iteration,
                 "history": self.state.history, "costs": self.costs.state_dict(),
                 "unified": None if self.unified is None else self.unified.detach(),
                 "step_kind": None if self.step_kind is None else self.step_kind.detach(),
                 "best": None if self.best is None else {**self.best, "schedule": self.best["schedule"].to_dict()},
                 "stale": self.stale,
                 "optimizer": self.opt.state_dict()}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        (self.out_dir / "history.json").write_text(json.dumps(self.state.history))

    def resume(self) -> bool:
        path = self.checkpoint_path()
        if path is None or not path.exists():
            return False
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if ck["config"] != self.cfg.to_dict():
            raise ValueError(f"checkpoint {path} was written with another configuration; "
                             "use the same options to resume, or another --work-dir to start afresh")
        self.costs.load_state_dict(ck["costs"])
        self.state = TrainState(ck["stage"], ck["iteration"], ck["history"])
        if ck["unified"] is not None:
            self.unified = torch.nn.Parameter(ck["unified"].clone())
        if ck.get("step_kind") is not None:
            self.step_kind = torch.nn.Parameter(ck["step_kind"].clone())
        if ck.get("best") is not None:
            self.best = {**ck["best"], "schedule": Schedule.from_dict(ck["best"]["schedule"])}
        self.stale = ck.get("stale", 0)
        self._make_optimizer()
        self.opt.load_state_dict(ck["optimizer"])
        return True


def plot_history(history: list[dict], path: str | os.PathLike) -> Path:
    """The run's loss curve: the training loss per iteration and the held-out loss at each
    validation (its best so far dashed), as a PNG."""
    import matplotlib   # on first plot only: slow to import, nothing else here needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [h["loss"] for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(train) + 1), train, lw=1, alpha=0.6, label="training batch")
    done, xs, held, best = 0, [], [], []
    for h in history:
        done += "loss" in h
        if "heldout" in h:
            xs.append(done)
            held.append(h["heldout"])
            best.append(h["best"])
    if xs:
        ax.plot(xs, held, "o-", ms=3, label="held-out")
        ax.plot(xs, best, "--", lw=1, label="held-out, best so far")
    ax.set_xlabel("iteration")
    ax.set_ylabel("distillation loss")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="dstrain", unit="it")
