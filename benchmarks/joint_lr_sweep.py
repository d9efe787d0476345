"""Learning-rate sweep of the joint-space schedule trainer (issue 19 item 3): for each (lr_unified,
lr_step) pair, a `dstrain --space joint --init best` run at one (steps, ratio), and whether the
held-out loss left its warm start. Prints one row per pair and writes them as JSON. Not a test.

    python benchmarks/joint_lr_sweep.py --steps 20 --ratio 0.3 --lrs 0.02:0.01 0.1:0.05 0.5:0.25 \
        --json benchmarks/results/joint_lr_sweep_20_30.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from diffsparse.models.zoo import make_spec
from diffsparse.train.trainer import ScheduleTrainer, TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mnist-dit")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--lrs", nargs="+", default=["0.02:0.01", "0.1:0.05", "0.5:0.25"],
                   help="lr_unified:lr_step pairs")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = make_spec(args.model, batch_size=4)
    base = TrainConfig(ratio=args.ratio, num_steps=args.steps, batch_size=4, space="joint", init="best",
                       stage2_epochs=args.epochs)
    rows = []
    for pair in args.lrs:
        lr_unified, lr_step = (float(x) for x in pair.split(":"))
        t0 = time.perf_counter()
        trainer = ScheduleTrainer(spec, dataclasses.replace(base, lr_unified=lr_unified, lr_step=lr_step))
        schedule = trainer.run()
        heldout = [h["heldout"] for h in trainer.state.history if "heldout" in h]
        row = {"lr_unified": lr_unified, "lr_step": lr_step, "warm_start": trainer.warm_start,
               "start": schedule.provenance["warm_start"], "kept": schedule.provenance["kept"],
               "heldout_start": heldout[0], "heldout_best": min(heldout), "heldout_curve": heldout,
               "iterations": schedule.provenance["iterations"], "seconds": time.perf_counter() - t0,
               "skip": schedule.skip, "macs_ratio": schedule.macs_ratio["achieved"]}
        rows.append(row)
        print(f"lr_unified {lr_unified} lr_step {lr_step}: start {row['start']} {row['heldout_start']:.5f} -> best "
              f"{row['heldout_best']:.5f} ({row['kept']}, {row['iterations']} iterations, {row['seconds']:.0f} s)",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "ratio": args.ratio, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
