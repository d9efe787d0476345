"""Benchmark: token scatters written in place (the ONNX Runtime CPU default, `Bundle.in_place_writes`)
against scatters into a second buffer (a copy of the whole cache entry first), with the dense
bundle in the same run. Interleaved generations, medians; not a test.

    python benchmarks/in_place_scatter.py out/xl/bundle-sparse out/xl/bundle-dense --runs 5 --prepack off \
        --json benchmarks/results/in_place_scatter_dit_xl.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from diffsparse.runtime.backends.ort import PREPACK_MODES
from diffsparse.runtime.pipeline import Pipeline
from diffsparse.runtime.profile import host_info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sparse")
    p.add_argument("dense")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prepack", default="off", choices=PREPACK_MODES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    pipes = {name: Pipeline.from_bundle(folder, backend="onnxruntime", threads=args.threads, prepack=args.prepack)
             for name, folder in (("sparse", args.sparse), ("dense", args.dense))}
    sparse_backend = pipes["sparse"].backend.prepare()
    pipes["dense"].backend.prepare()
    in_place = list(sparse_backend.in_place)
    variants = {"dense": (pipes["dense"], None), "sparse, in place": (pipes["sparse"], in_place),
                "sparse, copy": (pipes["sparse"], [frozenset()] * len(in_place))}
    conditioning = pipes["sparse"].spec.example_conditioning(np.random.default_rng(args.seed))
    steps: dict[str, list[list[float]]] = {name: [] for name in variants}

    def run(name: str) -> list[float]:
        pipe, scatter = variants[name]
        if scatter is not None:
            sparse_backend.in_place = scatter
        return pipe.generate(conditioning=conditioning, seed=args.seed).step_seconds

    order = list(variants)
    for name in order:   # warm-up
        run(name)
    for i in range(args.runs):
        for name in order[i % 3:] + order[: i % 3]:   # rotate who goes first
            steps[name].append(run(name))
    result = {"host": host_info(), "prepack": args.prepack, "runs": args.runs, "bundles": [args.sparse, args.dense],
              "in_place_entries_per_graph": [len(s) for s in in_place], "variants": {}}
    dense_ms = statistics.median(sum(r) for r in steps["dense"]) * 1e3
    for name, runs in steps.items():
        total = statistics.median(sum(r) for r in runs) * 1e3
        per_step = [statistics.median(r[t] for r in runs) * 1e3 for t in range(len(runs[0]))]
        result["variants"][name] = {"total_ms": total, "total_ms_runs": [sum(r) * 1e3 for r in runs],
                                    "per_step_ms": per_step, "speedup_vs_dense": dense_ms / total}
        print(f"{name:18s} {total:9.1f} ms  {dense_ms / total:5.2f}x dense   per step "
              + " ".join(f"{x:.0f}" for x in per_step))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
