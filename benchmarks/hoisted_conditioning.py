"""Benchmark: a sparse bundle whose refresh steps compute the partial steps' conditioning
(diffsparse/conditioning.py, the export default) against the same schedule exported with every
step computing its own (`dsexport --no-hoist-conditioning`), with the plain dense bundle in the
same run. Interleaved generations, medians of `--runs` rounds. Not a test.

    dsexport --model dit-xl-2 --schedule toca --steps 5 --ratio 0.5 --full-every 5 --batch 1 \
        --out out/xl/bundle-sparse-hoisted
    dsexport --model dit-xl-2 --schedule toca --steps 5 --ratio 0.5 --full-every 5 --batch 1 \
        --no-hoist-conditioning --out out/xl/bundle-sparse
    python benchmarks/hoisted_conditioning.py out/xl/bundle-sparse-hoisted out/xl/bundle-dense \
        --inline out/xl/bundle-sparse --runs 5 --threads 2 --json benchmarks/results/hoisted_conditioning_dit_xl.json
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from diffsparse.runtime.pipeline import Pipeline
from diffsparse.runtime.profile import host_info

from interleave import bundle_pair_parser, interleaved, summarize


def main() -> None:
    p = bundle_pair_parser(__doc__)
    p.add_argument("--inline", required=True, help="the same schedule's bundle without hoisted conditioning")
    p.add_argument("--prepack", default="auto", help="ONNX Runtime weight pre-packing for every bundle (default auto)")
    args = p.parse_args()
    bundles = {"dense": args.dense, "sparse, hoisted": args.sparse, "sparse, inline": args.inline}
    pipes = {name: Pipeline.from_bundle(folder, backend="onnxruntime", threads=args.threads, prepack=args.prepack)
             for name, folder in bundles.items()}
    plans = {name: pipe.backend.bundle.conditioning for name, pipe in pipes.items()}
    if plans["sparse, hoisted"] is None or plans["sparse, inline"] is not None:
        raise SystemExit(f"{args.sparse} must hoist its conditioning and {args.inline} must not "
                         "(dsexport without / with --no-hoist-conditioning)")
    for pipe in pipes.values():
        pipe.backend.prepare()
    conditioning = pipes["dense"].spec.example_conditioning(np.random.default_rng(args.seed))
    hoisted, inline = (pipes[n].generate(conditioning=conditioning, seed=args.seed).samples
                       for n in ("sparse, hoisted", "sparse, inline"))
    max_abs_diff = float(np.abs(hoisted - inline).max())
    print(f"hoisted vs inline samples: max |diff| {max_abs_diff:.2e}")

    def run(name: str) -> list[float]:
        return pipes[name].generate(conditioning=conditioning, seed=args.seed).step_seconds

    steps = interleaved({name: functools.partial(run, name) for name in pipes}, args.runs)
    manifests = {name: pipe.backend.bundle.manifest for name, pipe in pipes.items()}
    result = {"host": host_info(), "runs": args.runs, "threads": args.threads, "prepack": args.prepack,
              "bundles": bundles, "samples_max_abs_diff": max_abs_diff,
              "groups": [list(g) for g in plans["sparse, hoisted"].groups],
              "macs_per_step": {name: m.macs["per_step"] for name, m in manifests.items()},
              "macs_ratio": {name: m.macs["ratio"] for name, m in manifests.items()},
              "variants": summarize(steps, "dense")}
    for name in ("sparse, hoisted", "sparse, inline"):
        v = result["variants"][name]
        v["efficiency"] = v["speedup_vs_dense"] * result["macs_ratio"][name]
        print(f"{name:28s} efficiency (speed-up / MACs speed-up) {v['efficiency']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
