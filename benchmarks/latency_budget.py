"""Latency budgets on the demo model (issue 20): a schedule learned under a budget of measured
latency against one learned under a MACs budget, at the same measured latency.

    python benchmarks/latency_budget.py --out out/latency-budget --threads 2

1. `dscalibrate latency` for mnist-dit at the demo's shape (batch 10, guidance), unless --table
   names an existing table;
2. `dstrain --space joint --init best` at --ratio of the dense *latency* (`--budget latency`), and
   at each of --macs-ratios of the dense *MACs* (the MACs-budgeted schedule compared is the one
   whose measured latency is nearest the latency-budgeted one's);
3. every schedule exported (with the dense bundle) and profiled against dense on ONNX Runtime CPU,
   interleaved, median of --runs, with the table's predictions;
4. quality with dseval's metrics on --n-per-class × 10 samples (seed 0): accuracy, MNIST-FID,
   PSNR/SSIM against the dense bundle.

Writes OUT/results.json (one row per schedule), OUT/results.md, OUT/table.json (the latency table)
and OUT/schedules/*.json. Every stage keeps what it made (schedules, bundles, OUT/quality-*.json)
and a rerun reuses it: `--phase prepare` stops before the timed profiles, so the long untimed
part can run while the machine is busy and the timed part (`--phase all`) when it is quiet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from diffsparse.calibrate.evaluate import EvalConfig, evaluate_bundle, generate_set
from diffsparse.calibrate.latency import LatencyCalibration, calibrate_latency
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.runtime.profile import ProfileConfig, profile
from diffsparse.train.trainer import ScheduleTrainer, TrainConfig

from diffsparse.builtin_schedules import dense_schedule
from diffsparse.latency_table import LatencyTable
from diffsparse.mnist.metrics import require_classifier
from diffsparse.models.zoo import make_spec
from diffsparse.schedule import Schedule

log = logging.getLogger("latency_budget")


def learn(spec, cfg: TrainConfig, work: Path):
    t0 = time.perf_counter()
    trainer = ScheduleTrainer(spec, cfg, work)
    trainer.resume()
    sched = trainer.run(progress=False)
    sched.provenance["train_seconds"] = time.perf_counter() - t0
    return sched


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/latency-budget")
    p.add_argument("--model", default="mnist-dit")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=10, help="bundle batch (the demo's)")
    p.add_argument("--ratio", type=float, default=0.5, help="latency target, a ratio of the dense latency")
    p.add_argument("--macs-ratios", default="0.45,0.47,0.5", help="MACs budgets to learn the compared schedules at")
    p.add_argument("--table", default=None, help="an existing latency table (default: measure one)")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=6, help="joint-space training epochs (as the shipped joint schedule)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--phase", default="all", choices=["prepare", "all"],
                   help="prepare: table, schedules, bundles and quality only (no timing); all: everything")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    require_classifier()   # before minutes of work
    out = Path(args.out)
    (out / "schedules").mkdir(parents=True, exist_ok=True)
    table_path = out / "table.json"
    if args.table:
        LatencyTable.load(args.table).save(table_path)
    elif not table_path.exists():
        calibrate_latency(LatencyCalibration(model=args.model, batch_size=args.batch, runs=args.runs),
                          work=out).save(table_path)
    spec = make_spec(args.model, batch_size=4)   # the trainer's batch; the bundles use --batch
    base = TrainConfig(num_steps=args.steps, space="joint", init="best", stage2_epochs=args.epochs)
    schedules = {}
    runs = [("latency", args.ratio)] + [("macs", float(r)) for r in args.macs_ratios.split(",")]
    for budget, ratio in runs:
        name = f"joint-{budget}-{round(100 * ratio)}"
        path = out / "schedules" / f"{name}.json"
        if not path.exists():
            cfg = dataclasses.replace(base, ratio=ratio, budget=budget,
                                      latency_table=str(table_path) if budget == "latency" else None)
            learn(spec, cfg, out / f"work-{name}").save(path)
        schedules[name] = path
    bundle_spec = make_spec(args.model, batch_size=args.batch)
    dense_dir = out / "bundle-dense"
    if not dense_dir.exists():
        export_bundle(bundle_spec, dense_schedule(bundle_spec, args.steps), dense_dir, source={"model": args.model})
    ecfg = EvalConfig(n_per_class=args.n_per_class)
    dense_images = []

    def quality(name: str, bundle: Path) -> dict:
        path = out / f"quality-{name}.json"
        if not path.exists():
            if not dense_images:
                dense_images.append(generate_set(dense_dir, ecfg)[0])
            path.write_text(json.dumps(evaluate_bundle(bundle, cfg=ecfg, reference_images=dense_images[0])))
        return json.loads(path.read_text())

    rows = [{"method": "dense", "budget": None, "ratio_target": 1.0, "macs_ratio": 1.0, **quality("dense", dense_dir)}]
    for name, path in schedules.items():
        bundle = out / f"bundle-{name}"
        if not bundle.exists():
            export_bundle(bundle_spec, Schedule.load(path), bundle, source={"model": args.model}, config=ExportConfig())
        quality(name, bundle)
    if args.phase == "prepare":
        log.info("prepared in %s: run again with --phase all to time the bundles", out)
        return
    for name, path in schedules.items():
        bundle = out / f"bundle-{name}"
        sched = Schedule.load(path)
        report = profile(bundle, dense_dir, ProfileConfig(runs=args.runs, memory=False, latency_table=str(table_path)))
        prof = report.to_dict()
        q = quality(name, bundle)
        latency = sched.provenance.get("latency") or {}
        rows.append({"method": "diffsparse-joint", "schedule": name, "budget": name.split("-")[1],
                     "ratio_target": sched.macs_ratio["target"] or latency.get("target"),
                     "macs_ratio": sched.macs_ratio["achieved"],
                     "predicted_latency_ratio": prof["sparse"]["predicted_total_ms"] / prof["baseline"]["predicted_total_ms"],
                     "measured_latency_ratio": 1 / report.speedup, "measured_speedup": report.speedup,
                     "sparse_ms": report.sparse.total_ms, "dense_ms": report.baseline.total_ms,
                     "prediction_error_total": prof["sparse"]["prediction_error_total"],
                     "train_seconds": sched.provenance.get("train_seconds"),
                     "accuracy": q["accuracy"], "fid": q["fid"], "psnr": q.get("psnr"), "ssim": q.get("ssim")})
        log.info("%s", rows[-1])
    result = {"command": "python benchmarks/latency_budget.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "host": report.host, "table": LatencyTable.load(table_path).to_dict(), "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["| schedule | budget | target | MACs ratio | predicted latency ratio | measured latency ratio | speed-up "
             "| accuracy | MNIST-FID | PSNR (dB) | SSIM |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.get('schedule', 'dense')} | {r['budget'] or '-'} | {r['ratio_target']:.2f} | {r['macs_ratio']:.3f} "
                     f"| {r.get('predicted_latency_ratio', 1.0):.3f} | {r.get('measured_latency_ratio', 1.0):.3f} "
                     f"| {r.get('measured_speedup', 1.0):.2f}x | {100 * r['accuracy']:.1f}% | {r['fid']:.1f} "
                     f"| {r['psnr'] if r.get('psnr') is None else format(r['psnr'], '.2f')} "
                     f"| {r['ssim'] if r.get('ssim') is None else format(r['ssim'], '.3f')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
