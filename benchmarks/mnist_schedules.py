"""Learned schedules against the baselines on the built-in MNIST DiT, at equal MACs (issue 4).

For each target ratio: the ToCa-style hand schedule; the DiffSparse schedule trained from it with
dstrain's defaults (two stages, distillation loss = classifier features + L2) at exactly the ToCa
schedule's MACs, in the paper's space (tokens only); the schedule learned in the joint space
(steps may be skipped: `dstrain --space joint --init best`, warm-started from the best baseline on
held-out draws, at exactly its MACs); FORA-style whole-layer reuse and fewer steps (skipped steps
of the T-step grid) at the nearest MACs; optionally random search and a GA (--search). Ours, not
baselines: `fewer-steps-forecast` (the fewer-steps schedule, its skipped steps forecasting x0 from
the last two computed steps: `Schedule.forecasting`) and `diffsparse-joint-forecast` (the joint
space learned with forecasting skips, `dstrain --space joint --skip-forecast`). Both
learned schedules are the best of their run on held-out draws (never worse than the start).
Every schedule is exported to a bundle and scored
with dseval's metrics on ONNX Runtime CPU (n per class, seed 0, the model's default guidance): accuracy, MNIST-FID
against the 10,000 real test images, PSNR/SSIM against the dense bundle.

    python benchmarks/mnist_schedules.py --out out/mnist-schedules --threads 2

Writes OUT/results.json, OUT/results.md, OUT/schedules/*.json and OUT/k_heatmap_*.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from diffsparse.train.trainer import TrainConfig

from diffsparse.mnist.metrics import require_classifier

log = logging.getLogger("mnist_schedules")


def build_schedules(ratio: float, args, out: Path) -> dict:
    from diffsparse.builtin_schedules import fewer_steps_schedule, fora_schedule, toca_schedule
    from diffsparse.models.zoo import make_spec
    from diffsparse.train.trainer import ScheduleTrainer, TrainConfig, plot_history

    spec = make_spec(args.model, batch_size=args.batch_size)
    cfg = TrainConfig(ratio=ratio, num_steps=args.steps, batch_size=args.batch_size, samples=args.samples,
                      lr_layer=args.lr_layer, lr_unified=args.lr_unified)
    scheds = {"toca": toca_schedule(spec, args.steps, ratio, full_every=None), "fora": fora_schedule(spec, args.steps, ratio),
              "fewer-steps": fewer_steps_schedule(spec, args.steps, ratio)}
    scheds["fewer-steps-forecast"] = scheds["fewer-steps"].forecasting()
    joint = dataclasses.replace(cfg, space="joint", init="best", stage2_epochs=args.joint_epochs)
    forecast = dataclasses.replace(joint, skip_forecast=True)
    for method, space_cfg in (("diffsparse", cfg), ("diffsparse-joint", joint), ("diffsparse-joint-forecast", forecast)):
        if args.methods and method not in args.methods:
            continue
        t0 = time.perf_counter()
        work = out / f"work-{method}-{args.steps}-{ratio}"
        trainer = ScheduleTrainer(spec, space_cfg, work)
        trainer.resume()
        scheds[method] = trainer.run(progress=True)
        scheds[method].provenance["train_seconds"] = time.perf_counter() - t0
        plot_history(trainer.state.history, work / "loss_curve.png")
    if args.search:
        from diffsparse.train.search import genetic_search, loss_fitness, random_search

        trainer = ScheduleTrainer(spec, cfg, None)   # the paper's space: what random search and the GA search
        noise, cond = trainer._batch(0)
        fit = loss_fitness(trainer.rollout, trainer.loss_fn, noise, cond, trainer.cfg.guidance_scale)
        shape = tuple(trainer.costs.layer_cost.shape)
        keep, _, _ = random_search(trainer.budget, trainer.units, shape, fit, args.search_iterations)
        scheds["random"] = _like(scheds["toca"], keep, "random", spec)
        keep, _, _ = genetic_search(trainer.budget, trainer.units, shape, fit, args.population, args.generations,
                                    initial=[scheds["toca"].keep])
        scheds["genetic"] = _like(scheds["toca"], keep, "genetic", spec)
    return scheds


def _like(base, keep, method, spec):
    from diffsparse.schedule import Schedule, provenance

    s = Schedule(family=base.family, num_tokens=base.num_tokens, layers=base.layers, keep=keep,
                 candidates=base.candidates, selector=base.selector, provenance=provenance(method))
    s.macs_ratio = {"target": base.macs_ratio["target"], "achieved": spec.macs_ratio(s)}
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mnist-dit")
    p.add_argument("--out", default="out/mnist-schedules")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.4])
    p.add_argument("--steps", type=int, default=10)  # the shipped model's sampling steps
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--samples", type=int, default=64, help="training samples per epoch (dstrain default)")
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--search", action="store_true", help="also random search and GA (slow)")
    p.add_argument("--search-iterations", type=int, default=16)
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--joint-epochs", type=int, default=6,
                   help="epochs of the joint-space run at most (it stops earlier once held-out loss stalls)")
    p.add_argument("--lr-layer", type=float, default=TrainConfig.lr_layer)
    p.add_argument("--lr-unified", type=float, default=TrainConfig.lr_unified)
    p.add_argument("--methods", nargs="+", default=None,
                   help="recompute only these methods and keep the other rows of OUT/results.json")
    args = p.parse_args()
    require_classifier()  # dseval's metrics and the distillation loss need it: fail before hours of work
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("diffsparse.train.trainer").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    from diffsparse.builtin_schedules import dense_schedule
    from diffsparse.calibrate.evaluate import EvalConfig, evaluate_bundle, generate_set
    from diffsparse.export.bundle import ExportConfig, export_bundle
    from diffsparse.models.zoo import make_spec
    from diffsparse.runtime.report import plot_k_heatmap

    out = Path(args.out)
    (out / "schedules").mkdir(parents=True, exist_ok=True)
    ecfg = EvalConfig(n_per_class=args.n_per_class)
    espec = make_spec(args.model, batch_size=50)
    source = {"model": args.model, "seed": 0}
    dense_dir = out / "bundles" / "dense"
    cached = out / "dense_images.npy"
    if args.methods and (out / "results.json").exists():
        if not cached.exists():
            if not dense_dir.exists():   # rows kept from an earlier run on another machine
                export_bundle(espec, dense_schedule(espec, args.steps), dense_dir, source=source,
                              config=ExportConfig(overwrite=True))
            np.save(cached, generate_set(dense_dir, ecfg)[0])
        dense_images = np.load(cached)
        rows = [r for r in json.loads((out / "results.json").read_text())
                if r["method"] == "dense" or r["method"] not in args.methods]
    else:
        export_bundle(espec, dense_schedule(espec, args.steps), dense_dir, source=source,
                      config=ExportConfig(overwrite=True))
        dense_images = generate_set(dense_dir, ecfg)[0]
        np.save(cached, dense_images)
        rows = [{"ratio_target": 1.0, "method": "dense", "steps": args.steps, "macs_ratio": 1.0,
                 **evaluate_bundle(dense_dir, cfg=ecfg)}]
    for ratio in args.ratios:
        for method, sched in build_schedules(ratio, args, out).items():
            if args.methods and method not in args.methods:
                continue
            name = f"{method}-{int(round(100 * ratio))}"
            sched.save(out / "schedules" / f"{name}.json")
            if method == "diffsparse":
                plot_k_heatmap(sched, out / f"k_heatmap_{name}.png")
            t0 = time.perf_counter()
            bundle = out / "bundles" / name
            export_bundle(espec, sched, bundle, source=source, config=ExportConfig(overwrite=True))
            export_s = time.perf_counter() - t0
            res = evaluate_bundle(bundle, cfg=ecfg, reference_images=dense_images)
            res.update(ratio_target=ratio, method=method, steps=args.steps, macs_ratio=sched.macs_ratio["achieved"],
                       export_seconds=export_s, train_seconds=sched.provenance.get("train_seconds"))
            rows.append(res)
            log.info("%s: acc %.3f fid %.1f psnr %s", name, res["accuracy"], res["fid"], res.get("psnr"))
            (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["| target | method | MACs ratio | accuracy | MNIST-FID | PSNR vs dense (dB) | SSIM vs dense |",
             "|---|---|---|---|---|---|---|"]
    order = ["dense", "toca", "fora", "fewer-steps", "random", "genetic", "diffsparse", "diffsparse-joint",
             "fewer-steps-forecast", "diffsparse-joint-forecast"]
    rows.sort(key=lambda r: (-r["ratio_target"], order.index(r["method"])))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        psnr = f"{r['psnr']:.2f}" if r.get("psnr") is not None and r["method"] != "dense" else "—"
        ssim = f"{r['ssim']:.3f}" if r.get("ssim") is not None and r["method"] != "dense" else "—"
        lines.append(f"| {r['ratio_target']:.2f} | {r['method']} | {r['macs_ratio']:.3f} | {100 * r['accuracy']:.1f}% "
                     f"| {r['fid']:.1f} | {psnr} | {ssim} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
