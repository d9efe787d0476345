"""Benchmark: DiT-XL/2-sized model (random weights, 32x32x4 latent = 256 tokens, 28 blocks, CFG),
a ToCa-style schedule at about half the dense MACs, profiled against dense on ONNX Runtime CPU in
one run (interleaved). Not a test: prints the ratios and writes the report.

    python benchmarks/dit_xl_cpu.py --out out/bench-dit-xl
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.runtime.profile import ProfileConfig, profile, write_report

from diffsparse.builtin_schedules import dense_schedule, toca_schedule
from diffsparse.models.zoo import make_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit-xl-2")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="out/bench-dit-xl")
    p.add_argument("--reuse-bundles", action="store_true", help="profile bundles already in --out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    if not args.reuse_bundles:
        spec = make_spec(args.model, batch_size=1)
        # one full step (step 0, the cache is empty), then sparse steps
        sparse = toca_schedule(spec, args.steps, args.ratio, full_every=args.steps)
        for name, sched in (("sparse", sparse), ("dense", dense_schedule(spec, args.steps))):
            t0 = time.perf_counter()
            m = export_bundle(spec, sched, out / f"bundle-{name}", source={"model": args.model, "seed": 0},
                              config=ExportConfig(overwrite=True))
            logging.info("exported %s in %.0fs: %d graphs, parity %s", name, time.perf_counter() - t0,
                         len(m.graphs), [f"{g.parity_max_abs_err:.1e}" for g in m.graphs])
        del spec
    report = profile(out / "bundle-sparse", out / "bundle-dense",
                     ProfileConfig(runs=args.runs, warmup=args.warmup, threads=args.threads))
    report["command"] = "python benchmarks/dit_xl_cpu.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False))
    paths = write_report(report, out / "report")
    print(paths["md"].read_text())
    print(json.dumps({"speedup": report["speedup"], "macs_speedup": report["macs_speedup"],
                      "efficiency": report["efficiency"], "target_efficiency": 0.85}))


if __name__ == "__main__":
    main()
