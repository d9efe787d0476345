"""Benchmark: a full-size built-in model (random weights; DiT-XL/2 by default, or any --model such
as pixart-alpha-256) with a ToCa-style schedule at about half the dense MACs, exported (weights
stored once, every graph checked against PyTorch) and profiled against dense on ONNX Runtime CPU in
one run (interleaved). Not a test: prints the ratios and writes the report (with file sizes next to
the weights' size, loaded memory, and MACs per layer kind).

    python benchmarks/cpu_sparse_vs_dense.py --threads 1 --out out/bench-dit-xl
    python benchmarks/cpu_sparse_vs_dense.py --model pixart-alpha-256 --threads 1 --out out/bench-pixart

A model larger than memory (FLUX.1-schnell, 47.6 GB in fp32) is initialised straight into the
bundle's weights file and exported without a dense twin (--sparse-only; its dense MACs come from the
same formulas); --export-only then reports sizes, the memory taken by loading the bundle (in a fresh
process) and the MACs per layer, without timed runs:

    python benchmarks/cpu_sparse_vs_dense.py --model flux-schnell-256 --no-guidance --steps 4 \
        --sparse-only --export-only --out out/bench-flux
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.runtime.backends.ort import PREPACK_MODES
from diffsparse.runtime.bundle import Bundle
from diffsparse.runtime.profile import ProfileConfig, fresh_process, memory_footprint, profile
from diffsparse.runtime.report import macs_by_kind, write_report

from diffsparse.builtin_schedules import dense_schedule, toca_schedule
from diffsparse.models.zoo import make_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit-xl-2")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prepack", default=ProfileConfig.prepack, choices=PREPACK_MODES,
                   help="onnxruntime weight pre-packing of both bundles (runtime/backends/ort.py prepack_weights)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory footprints (fresh processes)")
    p.add_argument("--out", default="out/bench-dit-xl")
    p.add_argument("--reuse-bundles", action="store_true", help="profile bundles already in --out")
    p.add_argument("--no-guidance", action="store_true", help="export without CFG (FLUX.1-schnell)")
    p.add_argument("--export-only", action="store_true",
                   help="export and report sizes, load memory and MACs; no timed runs")
    p.add_argument("--sparse-only", action="store_true", help="export no dense bundle (implies --export-only)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    args.export_only = args.export_only or args.sparse_only
    sizes: dict[str, dict] = {}
    if not args.reuse_bundles:
        # streamed: a model marked too large for memory is initialised into the bundle itself
        spec = make_spec(args.model, batch_size=1, guidance=not args.no_guidance, streamed_weights=True)
        params = sum(t.numel() * t.element_size() for t in spec.model.parameters())
        # one full step (step 0, the cache is empty), then sparse steps
        sparse = toca_schedule(spec, args.steps, args.ratio, full_every=args.steps)
        jobs = [("sparse", sparse)] + ([] if args.sparse_only else [("dense", dense_schedule(spec, args.steps))])
        for name, sched in jobs:
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
        export_report(out, json.loads((out / "export_sizes.json").read_text()), args.threads)
        return
    report = profile(out / "bundle-sparse", out / "bundle-dense",
                     ProfileConfig(runs=args.runs, warmup=args.warmup, threads=args.threads, prepack=args.prepack,
                                   memory=not args.no_memory))
    sizes_file = out / "export_sizes.json"
    report.extra["export"] = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
             for k, v in vars(args).items() if v not in (None, False)]
    report.extra["command"] = "python benchmarks/cpu_sparse_vs_dense.py " + " ".join(flags)
    paths = write_report(report, out / "report")
    print(paths["md"].read_text())
    print(json.dumps({"speedup": report.speedup, "macs_speedup": report.macs_speedup,
                      "efficiency": report.efficiency}))


def export_report(out: Path, sizes: dict, threads: int | None) -> None:
    """Sizes, load memory (each bundle loaded in a fresh process) and MACs per layer, as
    out/report/export.json and export.md."""
    report = {"export": sizes, "load": {}, "macs": {}}
    for name in sizes:
        folder = out / f"bundle-{name}"
        # loading only: one generation of a full-size model is what the timed benchmark is for
        report["load"][name] = fresh_process(memory_footprint, folder, ProfileConfig(threads=threads), generate=False)
        bundle = Bundle(folder, verify=False)
        report["macs"][name] = bundle.spec.macs_breakdown(bundle.schedule, bundle.conditioning)
        report["macs"][name]["ratio"] = bundle.manifest.macs["ratio"]
    gib = 1 / 2**30
    lines = ["# Export report", ""]
    for name, size in sizes.items():
        load = report["load"][name]
        lines += [f"## {name} bundle", "",
                  "| | |", "|---|---:|",
                  f"| model parameters | {size['model_parameter_bytes'] * gib:.2f} GiB |",
                  f"| weights.bin | {size['weights_bytes'] * gib:.2f} GiB |",
                  f"| step graphs ({size['graphs']}) | {size['graph_bytes'] / 2**20:.1f} MiB |",
                  f"| export time | {size['export_seconds']:.0f} s |",
                  f"| parity vs PyTorch (max) | {size['parity_max_abs_err']:.2g} |",
                  f"| loaded: private memory | {load['private_bytes'] * gib:.2f} GiB |",
                  f"| loaded: file-backed (weights.bin mapped once, {load['graphs']} sessions) | "
                  f"{load['file_backed_bytes'] * gib:.2f} GiB |",
                  f"| MACs ratio vs dense | {report['macs'][name]['ratio']:.3f} |", "",
                  *macs_by_kind(report["macs"][name])]
    (out / "report").mkdir(parents=True, exist_ok=True)
    (out / "report" / "export.json").write_text(json.dumps(report, indent=1))
    (out / "report" / "export.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
