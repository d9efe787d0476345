"""Benchmark: in the paper's space (tokens only, no skipped steps), is a low budget better spent on
fewer full steps with tokens recomputed between them than on ToCa's whole-layer reuse? ToCa-style
schedules at one MACs budget with a full step every P steps (the built-in picks the shortest P that
reaches the budget; longer P leaves MACs for tokens in the partial steps), each exported (parity
checked) and evaluated on 1,000 samples against the dense set of `benchmarks/mnist_schedules.py`.
Not a test.

    python benchmarks/mnist_schedules.py --out out/mnist-schedules-20 ... --steps 20   # the dense set
    python benchmarks/toca_periods.py --steps 20 --ratio 0.2 --periods 5 7 10 20 --json out/toca_periods_20_0.2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
from diffsparse.builtin_schedules import toca_schedule
from diffsparse.calibrate.evaluate import EvalConfig, evaluate_bundle
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.mnist.metrics import require_classifier
from diffsparse.models.zoo import make_spec

log = logging.getLogger("toca_periods")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--ratio", type=float, required=True)
    p.add_argument("--periods", type=int, nargs="+", required=True)
    p.add_argument("--dense-images", default=None,
                   help="the dense set (default out/mnist-schedules-STEPS/dense_images.npy)")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--score", default="attention",
                   help="token score s1 (default: attention, the one mnist_schedules.py's ToCa rows were run with)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="out/toca-periods")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    require_classifier()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    dense_path = Path(args.dense_images or f"out/mnist-schedules-{args.steps}/dense_images.npy")
    if not dense_path.exists():
        raise SystemExit(f"{dense_path} not found: run benchmarks/mnist_schedules.py --steps {args.steps} first "
                         "(it writes the dense set), or pass --dense-images")
    dense = np.load(dense_path)
    spec = make_spec("mnist-dit", batch_size=50)
    selector = dataclasses.replace(spec.default_selector(), score=args.score)
    rows = []
    for period in args.periods:
        sched = toca_schedule(spec, args.steps, args.ratio, full_every=period, selector=selector)
        folder = Path(args.out) / f"{args.steps}-{args.ratio}-every-{period}"
        export_bundle(spec, sched, folder, source={"model": "mnist-dit", "seed": 0}, config=ExportConfig(overwrite=True))
        res = evaluate_bundle(folder, cfg=EvalConfig(n_per_class=args.n_per_class), reference_images=dense)
        rows.append({"steps": args.steps, "ratio_target": args.ratio, "full_every": period, "score": args.score,
                     "macs_ratio": sched.macs_ratio["achieved"], "base": sched.provenance.get("base"),
                     "fid": res["fid"], "accuracy": res["accuracy"], "psnr": res.get("psnr")})
        log.info("every %d: MACs %.3f FID %.1f accuracy %.3f", period, rows[-1]["macs_ratio"], res["fid"], res["accuracy"])
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
