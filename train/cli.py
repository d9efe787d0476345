"""`dstrain`: learn a sparsity schedule (or build a baseline) for a model and write the schedule file.

    dstrain --model mnist-dit --ratio 0.5 --out schedules/learned-50.json
    torchrun --nproc-per-node 2 -m diffsparse.train.cli --model mnist-dit --ratio 0.5 --out s.json

Methods: diffsparse (two-stage training, the default), random and genetic (search, scored by the
distillation loss on a fixed batch), fora, fewer-steps and toca (hand schedules, no training).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from diffsparse.builtin_schedules import fewer_steps_schedule, fora_schedule, toca_schedule
from diffsparse.models.zoo import make_spec
from diffsparse.schedule import SCORES, Schedule, ScheduleError, provenance
from diffsparse.step_costs import BUDGETS, make_costs, record_costs
from diffsparse.train.losses import DistillLossConfig
from diffsparse.train.search import genetic_search, loss_fitness, random_search
from diffsparse.train.trainer import INITS, SPACES, ScheduleTrainer, TrainConfig, plot_history

log = logging.getLogger("dstrain")
METHODS = ("diffsparse", "random", "genetic", "fora", "fewer-steps", "toca")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dstrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    p.add_argument("--model", default="mnist-dit", help="built-in name or local diffusers folder (default mnist-dit)")
    p.add_argument("--out", required=True, help="schedule JSON to write")
    p.add_argument("--method", default="diffsparse", choices=METHODS)
    p.add_argument("--ratio", type=float, default=d.ratio,
                   help="target ratio R of dense, in the --budget unit (default %(default)s)")
    p.add_argument("--budget", default=d.budget, choices=BUDGETS,
                   help="what R is a ratio of: dense MACs, or dense latency predicted by --latency-table (default %(default)s)")
    p.add_argument("--latency-table", default=None, help="latency table (dscalibrate latency) for --budget latency")
    p.add_argument("--steps", type=int, default=d.num_steps, help="sampling steps T (default %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale,
                   help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per process per iteration")
    p.add_argument("--samples", type=int, default=d.samples, help="training samples per epoch")
    p.add_argument("--stage1-epochs", type=int, default=d.stage1_epochs)
    p.add_argument("--stage2-epochs", type=int, default=d.stage2_epochs)
    p.add_argument("--lr-layer", type=float, default=d.lr_layer)
    p.add_argument("--lr-step", type=float, default=d.lr_step)
    p.add_argument("--lr-unified", type=float, default=d.lr_unified)
    p.add_argument("--delta", type=float, default=d.delta)
    p.add_argument("--full-steps", type=int, default=None, help="|T_f| (default: as in the ToCa schedule)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--init", default=d.init, choices=sorted(INITS),
                   help="schedule the costs start from (fewer-steps needs --space joint)")
    p.add_argument("--space", default=d.space, choices=SPACES,
                   help="tokens: K per step and layer (the paper); joint: steps may also be skipped")
    p.add_argument("--skip-forecast", action="store_true",
                   help="joint space: skipped steps run on x0 forecast from the last two computed steps")
    p.add_argument("--heldout-samples", type=int, default=d.heldout_samples,
                   help="held-out draws the run validates on (default %(default)s)")
    p.add_argument("--validate-every", type=int, default=d.validate_every,
                   help="iterations between held-out validations; the best schedule seen is returned (0: off)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many validations without improvement (0: run every epoch)")
    p.add_argument("--score", default=None, choices=SCORES,
                   help="token score the schedule selects with (default: the model's, e.g. DiT's)")
    p.add_argument("--seed", type=int, default=d.seed)
    dl = DistillLossConfig()
    for name in ("features", "l2", "ssim", "lpips"):
        p.add_argument(f"--loss-{name}", type=float, default=getattr(dl, name), help="weight (default %(default)s)")
    p.add_argument("--lpips-weights", default=None, help="local LPIPS checkpoint (needed for --loss-lpips)")
    p.add_argument("--population", type=int, default=50, help="GA population (paper: 50)")
    p.add_argument("--generations", type=int, default=10, help="GA generations")
    p.add_argument("--search-iterations", type=int, default=50, help="random-search candidates")
    p.add_argument("--work-dir", default=None, help="checkpoints and history (default: OUT without .json + '.work')")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args) -> TrainConfig:
    loss = DistillLossConfig(features=args.loss_features, l2=args.loss_l2, ssim=args.loss_ssim,
                             lpips=args.loss_lpips, lpips_weights=args.lpips_weights)
    return TrainConfig(ratio=args.ratio, num_steps=args.steps, guidance_scale=args.guidance_scale,
                       batch_size=args.batch_size, samples=args.samples, stage1_epochs=args.stage1_epochs,
                       stage2_epochs=args.stage2_epochs, lr_layer=args.lr_layer, lr_step=args.lr_step,
                       lr_unified=args.lr_unified, delta=args.delta, num_full_steps=args.full_steps,
                       temperature=args.temperature, init=args.init, space=args.space, score=args.score,
                       seed=args.seed, loss=loss, heldout_samples=args.heldout_samples,
                       validate_every=args.validate_every, patience=args.patience, budget=args.budget,
                       latency_table=args.latency_table, skip_forecast=args.skip_forecast)


def _world() -> tuple[int, int]:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def run(args) -> Path:
    cfg = config_from_args(args)
    rank, world = _world()
    device = args.device
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    spec = make_spec(args.model, batch_size=cfg.batch_size)
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.stem + ".work")
    # baselines do not depend on the batch: the table's may differ from the trainer's
    costs = make_costs(spec, cfg.budget, cfg.latency_table, same_batch=False)
    if args.method == "toca":
        sched = toca_schedule(spec, cfg.num_steps, cfg.ratio, costs=costs)
    elif args.method in ("fora", "fewer-steps"):
        make = fora_schedule if args.method == "fora" else fewer_steps_schedule
        sched = make(spec, cfg.num_steps, cfg.ratio, costs=costs)
    elif args.method == "diffsparse":
        trainer = ScheduleTrainer(spec, cfg, work, world=(rank, world), device=device)
        if args.resume and trainer.resume():
            log.info("resumed from %s: stage %d, iteration %d", trainer.checkpoint_path(), trainer.state.stage,
                     trainer.state.iteration)
        sched = trainer.run(progress=not args.no_progress and sys.stderr.isatty())
        if rank == 0:
            work.mkdir(parents=True, exist_ok=True)
            log.info("loss curve: %s", plot_history(trainer.state.history, work / "loss_curve.png"))
    else:
        sched = _search(spec, cfg, args, device)
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        sched.save(out)
        latency = sched.provenance.get("latency")
        log.info("wrote %s (%s, MACs ratio %.4f%s)", out, args.method, sched.macs_ratio["achieved"],
                 f", predicted latency ratio {latency['predicted_ratio']:.4f}" if latency else "")
    return out


def _search(spec, cfg: TrainConfig, args, device: str):
    trainer = ScheduleTrainer(spec, cfg, None, device=device)
    noise, cond = trainer._batch(0)
    fitness = loss_fitness(trainer.rollout, trainer.loss_fn, noise, cond, trainer.cfg.guidance_scale)
    shape = tuple(trainer.costs.layer_cost.shape)
    if args.method == "random":
        keep, best, trace = random_search(trainer.budget, trainer.units, shape, fitness, args.search_iterations, cfg.seed)
    else:
        keep, best, trace = genetic_search(trainer.budget, trainer.units, shape, fitness, args.population,
                                           args.generations, seed=cfg.seed, initial=[trainer.init_schedule.keep])
    sched = Schedule(family=spec.family, num_tokens=spec.num_tokens, layers=spec.layers, keep=keep,
                     candidates=trainer.candidates, selector=trainer.selector,
                     provenance=provenance(args.method, fitness="distillation loss on one batch",
                                           best_fitness=best, trace=trace, train_config=cfg.to_dict()))
    return record_costs(sched, trainer.costs_model, cfg.ratio)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(args)
    except (ScheduleError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dstrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
