"""Benchmark: a full-size built-in model (random weights; DiT-XL/2 by default, or any --model such
as pixart-alpha-256) with a ToCa-style schedule at about half the dense MACs, exported (weights
stored once, every graph checked against PyTorch) and profiled against dense on ONNX Runtime CPU in
one run (interleaved). Not a test: prints the ratios and writes the report (with file sizes next to
the weights' size, loaded memory, and MACs per layer kind).

    python benchmarks/cpu_sparse_vs_dense.py --threads 1 --out out/bench-dit-xl
    python benchmarks/cpu_sparse_vs_dense.py --model pixart-alpha-256 --threads 1 --out out/bench-pixart
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
    p.add_argument("--no-guidance", action="store_true", help="export without CFG (FLUX.1-schnell)")
    p.add_argument("--export-only", action="store_true", help="export and report sizes; no timed runs")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    sizes: dict[str, dict] = {}
    if not args.reuse_bundles:
        spec = make_spec(args.model, batch_size=1, guidance=not args.no_guidance)
        params = sum(t.numel() * t.element_size() for t in spec.model.parameters())
        # one full step (step 0, the cache is empty), then sparse steps
        sparse = toca_schedule(spec, args.steps, args.ratio, full_every=args.steps)
        for name, sched in (("sparse", sparse), ("dense", dense_schedule(spec, args.steps))):
            t0 = time.perf_counter()
            m = export_bundle(spec, sched, out / f"bundle-{name}", source={"model": args.model, "seed": 0},
                              config=ExportConfig(overwrite=True))
            sizes[name] = {"export_seconds": time.perf_counter() - t0, "graphs": len(m.graphs),
                           "graph_bytes": sum(g.bytes for g in m.graphs), "weights_bytes": m.weights["bytes"],
                           "model_parameter_bytes": params,
                           "parity_max_abs_err": max(g.parity_max_abs_err or 0.0 for g in m.graphs)}
            logging.info("exported %s: %s", name, sizes[name])
        del spec
        (out / "export_sizes.json").write_text(json.dumps(sizes, indent=1))
    if args.export_only:
        print(json.dumps(json.loads((out / "export_sizes.json").read_text()), indent=1))
        return
    report = profile(out / "bundle-sparse", out / "bundle-dense",
                     ProfileConfig(runs=args.runs, warmup=args.warmup, threads=args.threads))
    sizes_file = out / "export_sizes.json"
    report["export"] = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
             for k, v in vars(args).items() if v not in (None, False)]
    report["command"] = "python benchmarks/cpu_sparse_vs_dense.py " + " ".join(flags)
    paths = write_report(report, out / "report")
    print(paths["md"].read_text())
    print(json.dumps({"speedup": report["speedup"], "macs_speedup": report["macs_speedup"],
                      "efficiency": report["efficiency"], "target_efficiency": 0.85}))


if __name__ == "__main__":
    main()
