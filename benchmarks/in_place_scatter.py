"""Benchmark: token scatters written in place (the ONNX Runtime CPU default, `Bundle.in_place_writes`)
against scatters into a second buffer (a copy of the whole cache entry first), with the dense
bundle in the same run. Interleaved generations, medians; not a test.

    python benchmarks/in_place_scatter.py out/xl/bundle-sparse out/xl/bundle-dense --runs 5 --prepack off \
        --json benchmarks/results/in_place_scatter_dit_xl.json
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from diffsparse.runtime.backends.ort import PREPACK_MODES
from diffsparse.runtime.pipeline import Pipeline
from diffsparse.runtime.profile import host_info

from interleave import bundle_pair_parser, interleaved, summarize


def main() -> None:
    p = bundle_pair_parser(__doc__)
    p.add_argument("--prepack", default="off", choices=PREPACK_MODES)
    args = p.parse_args()
    pipes = {name: Pipeline.from_bundle(folder, backend="onnxruntime", threads=args.threads, prepack=args.prepack)
             for name, folder in (("sparse", args.sparse), ("dense", args.dense))}
    sparse_backend = pipes["sparse"].backend.prepare()
    pipes["dense"].backend.prepare()
    in_place = list(sparse_backend.in_place)
    variants = {"dense": (pipes["dense"], None), "sparse, in place": (pipes["sparse"], in_place),
                "sparse, copy": (pipes["sparse"], [frozenset()] * len(in_place))}
    conditioning = pipes["sparse"].spec.example_conditioning(np.random.default_rng(args.seed))

    def run(name: str) -> list[float]:
        pipe, scatter = variants[name]
        if scatter is not None:
            sparse_backend.in_place = scatter
        return pipe.generate(conditioning=conditioning, seed=args.seed).step_seconds

    steps = interleaved({name: functools.partial(run, name) for name in variants}, args.runs)
    result = {"host": host_info(), "prepack": args.prepack, "runs": args.runs, "bundles": [args.sparse, args.dense],
              "in_place_entries_per_graph": [len(s) for s in in_place], "variants": summarize(steps, "dense")}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
