"""`dsdemo`: the main job on built-in defaults.

Exports the built-in MNIST DiT (trained weights shipped in the package) with its best shipped
learned schedule at about half the dense MACs (`mnist-dit-joint-forecast-50`: learned in the
joint space, where steps may also be skipped and skipped steps forecast x0; then
`mnist-dit-joint-50`, `mnist-dit-learned-50`; other --steps/--ratio pick the shipped schedule made
for them, e.g. `mnist-dit-t20-joint-forecast-30`) (the ToCa-style one where none is shipped)
and with the dense schedule, generates the digits 0-9 from
both on ONNX Runtime (CPU), and profiles sparse against dense in one run. Outputs go to --out
(default out/demo):
    bundle-sparse/, bundle-dense/, digits.png (top row sparse, bottom row dense),
    report/ (profile.json, profile.md, k_heatmap.png, step_latency.png)
`--model dit-small` runs the same job on a random-weight DiT (noise-like samples).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np

from diffsparse.builtin_schedules import dense_schedule, resolve_schedule, shipped_schedule, shipped_schedules
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.models.zoo import make_spec
from diffsparse.runtime.pipeline import Pipeline
from diffsparse.runtime.profile import ProfileConfig, profile
from diffsparse.runtime.report import write_report

log = logging.getLogger("diffsparse.demo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsdemo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mnist-dit")
    # 10 DDIM steps: the shipped mnist-dit is as good there as at 20 or 50 (sweep in the README)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--schedule", default="auto",
                   help="sparse schedule: a built-in or file; auto = the best shipped learned schedule for the "
                        "model at --steps and --ratio if there is one (joint space first), else toca")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--runs", type=int, default=5,
                   help="timed generations per bundle, sparse and dense interleaved; medians are reported")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's own, recorded in its bundle)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    labels = list(range(10))
    spec = make_spec(args.model, batch_size=len(labels))
    schedules = {"sparse": _sparse_schedule(args, spec), "dense": dense_schedule(spec, args.steps)}
    log.info("sparse schedule: %s (MACs ratio %.3f)", schedules["sparse"].provenance.get("method"),
             schedules["sparse"].macs_ratio["achieved"])
    for name, schedule in schedules.items():
        m = export_bundle(spec, schedule, out / f"bundle-{name}", source={"model": args.model, "seed": 0},
                          config=ExportConfig(overwrite=True))
        log.info("exported %s: %d graphs, MACs ratio %.3f, parity max err %.2e", name, len(m.graphs),
                 m.macs["ratio"], max(g.parity_max_abs_err for g in m.graphs))
    results = {}
    for name in schedules:
        pipe = Pipeline.from_bundle(out / f"bundle-{name}")
        results[name] = pipe.generate(labels, seed=0, guidance_scale=args.guidance_scale)
    sparse, dense = results["sparse"], results["dense"]
    both = dataclasses.replace(sparse, samples=np.concatenate([sparse.samples, dense.samples]))
    both.grid(columns=len(labels), scale=4).save(out / "digits.png")
    diff = float(np.abs(sparse.samples - dense.samples).max())
    report = profile(out / "bundle-sparse", out / "bundle-dense",
                     ProfileConfig(runs=args.runs, warmup=0, guidance_scale=args.guidance_scale))
    report.extra["sparse_vs_dense_max_abs_diff"] = diff
    paths = write_report(report, out / "report")
    print(paths["md"].read_text())
    print(f"digits: {out / 'digits.png'} (top: sparse, bottom: dense); report: {paths['md']} "
          f"({time.perf_counter() - t0:.0f}s in all)")
    return 0


def _sparse_schedule(args, spec):
    name = args.schedule
    if name == "auto":
        name = best_shipped(args.model, args.steps, args.ratio) or "toca"
    return resolve_schedule(name, spec, args.steps, args.ratio)


def best_shipped(model: str, steps: int, ratio: float) -> str | None:
    """The best shipped schedule for `model` at `steps` sampling steps and `ratio` of the dense MACs
    (README "Learning a schedule"): joint space with forecasting skips, then joint, then the paper's
    space. Names carry the step count (`-t20-`) except the demo's own 10-step ones."""
    pct = int(round(100 * ratio))
    shipped = set(shipped_schedules())
    for kind in ("joint-forecast", "joint", "learned"):
        for name in (f"{model}-t{steps}-{kind}-{pct}", f"{model}-{kind}-{pct}"):
            if name in shipped and shipped_schedule(name).num_steps == steps:
                return name
    return None

if __name__ == "__main__":
    sys.exit(main())
