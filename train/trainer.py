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
from diffsparse.schedule import Schedule, provenance

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The schedule trainer's settings. Learning rates and δ are the paper's; the epoch is ours:
    `samples` training samples (noise + conditioning) make an epoch, split into batches of
    `batch_size` per process."""

    ratio: float = 0.5                # target MACs ratio R (fixed MACs included)
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
    score: str | None = None          # token score s1 the schedule selects with (None: the model's default)
    seed: int = 0
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SPACES = ("tokens", "joint")
#: the schedules a run may start from (warm start); each (spec, T, ratio, selector) -> Schedule
INITS = {
    "toca": lambda spec, t, ratio, sel: toca_schedule(spec, t, ratio, selector=sel),
    "dense": lambda spec, t, ratio, sel: dense_schedule(spec, t, selector=sel),
    "fora": lambda spec, t, ratio, sel: fora_schedule(spec, t, ratio, selector=sel),
    "fewer-steps": lambda spec, t, ratio, sel: fewer_steps_schedule(spec, t, ratio, selector=sel),
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
        self.init_schedule = INITS[cfg.init](spec, cfg.num_steps, cfg.ratio, selector)
        self.selector = self.init_schedule.selector
        self.candidates = self.init_schedule.candidates
        self.budget = Budget.for_spec(spec, self.init_schedule.allowed_keep())
        if cfg.space == "joint":   # the learned schedule costs what its start does, fixed parts included
            self.units = joint_units(self.budget, self.init_schedule.keep, self.init_schedule.skip)
        elif cfg.init != "dense":   # the learned schedule costs exactly what the one it starts from does
            self.units = self.budget.units_of(self.init_schedule.keep)
        else:
            self.units = self.budget.units_for_ratio(spec, cfg.num_steps, cfg.ratio)
        self.num_full = cfg.num_full_steps or sum(self.init_schedule.full_steps)
        self.rollout = ScheduleRollout(spec, spec.sampler_plan(cfg.num_steps), self.budget.token_counts, self.selector)
        self.device = torch.device(device)
        spec.model.to(self.device)
        self.loss_fn = DistillLoss(cfg.loss).to(self.device)
        t, n_layers, n_cand = cfg.num_steps, len(spec.layers), len(self.budget.token_counts)
        self.costs = CostPredictor(t, n_layers, n_cand)
        self.costs.init_from_schedule(self.init_schedule, self.budget.token_counts)
        self.unified: torch.nn.Parameter | None = None
        self.step_kind: torch.nn.Parameter | None = None   # joint space: (T, 2) skip / compute costs
        self.state = TrainState()
        if cfg.space == "joint":
            self.unified = torch.nn.Parameter(self.costs.layer_cost.detach().clone())
            self.step_kind = torch.nn.Parameter(init_step_cost(self.init_schedule.skip))
            self.state.stage = 2
        self._teacher: dict[int, torch.Tensor] = {}
        self._make_optimizer()

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
        self._make_optimizer()

    # ---- data -------------------------------------------------------------------------------
    def _batch(self, index: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Training sample block `index` (batch_size per rank): noise and conditioning from seeds."""
        b = self.spec.batch_size
        start = (index * self.world_size + self.rank) * b
        noise = torch.from_numpy(initial_noise(self.cfg.seed, start + b, self.spec.latent_shape)[start:])
        noise = noise.to(self.device)
        # conditioning per sample too, so a batch split across ranks sees the same samples
        conds = [self.spec.example_conditioning(np.random.default_rng([self.cfg.seed, 7, j]))
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
        student = self.rollout.sample(noise, cond, self.cfg.guidance_scale, alloc.weights,
                                      getattr(alloc, "step_weights", None))
        loss, terms = self.loss_fn(student, teacher)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._average_gradients()
        self.opt.step()
        rec = {"stage": self.state.stage, "iteration": self.state.iteration, "loss": float(loss.detach()),
               **terms, "units": alloc.units, "full_steps": int(sum(alloc.full_steps)),
               "skipped_steps": int(sum(getattr(alloc, "skip", [])))}
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
        while True:
            if self.state.stage == 1 and self.state.iteration >= self.stage_iterations(1):
                self.enter_stage2()
            if self.state.stage == 2 and self.state.iteration >= self.stage_iterations(2):
                break
            rec = self.train_step()
            rec["seconds"] = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(stage=rec["stage"], loss=f"{rec['loss']:.4g}")
            log.info("stage %d iteration %d loss %.5g", rec["stage"], rec["iteration"], rec["loss"])
            if checkpoint_every and self.state.iteration % checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        return self.schedule()

    def schedule(self) -> Schedule:
        alloc = self.allocation()
        sched = Schedule(family=self.spec.family, num_tokens=self.spec.num_tokens, layers=self.spec.layers,
                         keep=alloc.keep, candidates=self.candidates, selector=self.selector,
                         skip=list(getattr(alloc, "skip", [False] * len(alloc.keep))),
                         provenance=provenance("diffsparse", init=self.cfg.init, space=self.cfg.space, stage=self.state.stage,
                                               iterations=len(self.state.history), train_config=self.cfg.to_dict(),
                                               final_loss=self.state.history[-1]["loss"] if self.state.history else None))
        sched.macs_ratio = {"target": self.cfg.ratio, "achieved": self.spec.macs_ratio(sched)}
        return sched

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
        self._make_optimizer()
        self.opt.load_state_dict(ck["optimizer"])
        return True


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
