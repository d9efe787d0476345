"""Benchmark: variants of one sparse bundle — the same schedule exported differently — against
the plain dense bundle, all interleaved in one process (median of `--runs` rounds). Each variant's
samples are compared with the first one's (the variants must compute the same thing), and each
gets its speed-up over dense and its efficiency (speed-up / MACs speed-up). Not a test.

Hoisted conditioning (the export default) against every step computing its own, DiT-XL/2:

    dsexport --model dit-xl-2 --schedule toca --steps 5 --ratio 0.5 --full-every 5 --batch 1 \\
        --out out/xl/bundle-sparse-hoisted
    dsexport --model dit-xl-2 --schedule toca --steps 5 --ratio 0.5 --full-every 5 --batch 1 \\
        --no-hoist-conditioning --out out/xl/bundle-sparse
    python benchmarks/sparse_variants.py out/xl/bundle-dense hoisted=out/xl/bundle-sparse-hoisted \\
        inline=out/xl/bundle-sparse --runs 5 --threads 2 --json benchmarks/results/hoisted_conditioning_dit_xl.json
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
from diffsparse.runtime.pipeline import Pipeline
from diffsparse.runtime.profile import host_info

from interleave import interleave_parser, interleaved, summarize


def variant(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: give a variant as NAME=BUNDLE_FOLDER")
    return name, folder


def main() -> None:
    p = interleave_parser(__doc__)
    p.add_argument("dense", help="the plain dense bundle")
    p.add_argument("variants", nargs="+", type=variant, metavar="NAME=BUNDLE", help="sparse bundles to compare")
    p.add_argument("--prepack", default="auto", help="ONNX Runtime weight pre-packing for every bundle (default auto)")
    args = p.parse_args()
    bundles = {"dense": args.dense, **dict(args.variants)}
    if len(bundles) != len(args.variants) + 1:
        raise SystemExit("variant names must be distinct and not 'dense'")
    pipes = {name: Pipeline.from_bundle(folder, backend="onnxruntime", threads=args.threads, prepack=args.prepack)
             for name, folder in bundles.items()}
    for pipe in pipes.values():
        pipe.backend.prepare()
    conditioning = pipes["dense"].spec.example_conditioning(np.random.default_rng(args.seed))
    names = [name for name, _ in args.variants]
    samples = {n: pipes[n].generate(conditioning=conditioning, seed=args.seed).samples for n in names}
    diffs = {n: float(np.abs(samples[n] - samples[names[0]]).max()) for n in names[1:]}
    for n, d in diffs.items():
        print(f"{n} vs {names[0]} samples: max |diff| {d:.2e}")

    def run(name: str) -> list[float]:
        return pipes[name].generate(conditioning=conditioning, seed=args.seed).step_seconds

    steps = interleaved({name: functools.partial(run, name) for name in pipes}, args.runs)
    manifests = {name: pipe.backend.bundle.manifest for name, pipe in pipes.items()}
    result = {"host": host_info(), "runs": args.runs, "threads": args.threads, "prepack": args.prepack,
              "bundles": bundles, "samples_max_abs_diff": diffs,
              "hoisted_conditioning": {n: pipes[n].backend.bundle.conditioning is not None for n in names},
              "macs_per_step": {name: m.macs["per_step"] for name, m in manifests.items()},
              "macs_ratio": {name: m.macs["ratio"] for name, m in manifests.items()},
              "variants": summarize(steps, "dense")}
    for name in names:
        v = result["variants"][name]
        v["efficiency"] = v["speedup_vs_dense"] * result["macs_ratio"][name]
        print(f"{name:28s} efficiency (speed-up / MACs speed-up) {v['efficiency']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
