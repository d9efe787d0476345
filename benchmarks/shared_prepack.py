"""Benchmark: one pre-packed weight copy shared by every step session (`prepack="shared"`, ONNX
Runtime's C API) against a packed copy per session where they fit (`auto` where the C library
does not load: runtime/backends/ort.py `prepack_weights`), with the dense bundle (shared) in the
same run. Interleaved generations, medians; then each variant's memory after load and after one
generation, each in a fresh process. Not a test.

    python benchmarks/shared_prepack.py out/xl/bundle-sparse out/xl/bundle-dense --runs 5 --threads 2 \
        --json benchmarks/results/shared_prepack_dit_xl.json
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from unittest import mock

import numpy as np
from diffsparse.runtime.backends import ort_capi
from diffsparse.runtime.pipeline import Pipeline
from diffsparse.runtime.profile import ProfileConfig, fresh_process, host_info, memory_footprint

from interleave import bundle_pair_parser, interleaved, summarize


def per_session_pipeline(folder: str, threads: int | None) -> Pipeline:
    """The bundle with `auto` as it resolves where the C library is missing: per-session copies."""
    with mock.patch.object(ort_capi, "available", lambda: False):
        return Pipeline.from_bundle(folder, backend="onnxruntime", threads=threads, prepack="auto")


def shared_footprint(folder: str, threads: int | None) -> dict:
    return memory_footprint(folder, ProfileConfig(threads=threads, prepack="shared"))


def per_session_footprint(folder: str, threads: int | None) -> dict:
    with mock.patch.object(ort_capi, "available", lambda: False):
        return memory_footprint(folder, ProfileConfig(threads=threads, prepack="auto"))


def main() -> None:
    p = bundle_pair_parser(__doc__)
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurements")
    args = p.parse_args()
    if not ort_capi.available():
        raise SystemExit("onnxruntime's C library does not load here: shared pre-packing cannot run")
    pipes = {"dense, shared": Pipeline.from_bundle(args.dense, backend="onnxruntime", threads=args.threads,
                                                   prepack="shared"),
             "sparse, shared": Pipeline.from_bundle(args.sparse, backend="onnxruntime", threads=args.threads,
                                                    prepack="shared"),
             "sparse, per-session copies": per_session_pipeline(args.sparse, args.threads)}
    for pipe in pipes.values():
        pipe.backend.prepare()
    conditioning = pipes["dense, shared"].spec.example_conditioning(np.random.default_rng(args.seed))

    def run(name: str) -> list[float]:
        return pipes[name].generate(conditioning=conditioning, seed=args.seed).step_seconds

    steps = interleaved({name: functools.partial(run, name) for name in pipes}, args.runs)
    result = {"host": host_info(), "runs": args.runs, "bundles": [args.sparse, args.dense],
              "prepacked": {name: pipe.backend.prepacked for name, pipe in pipes.items()},
              "variants": summarize(steps, "dense, shared")}
    if not args.no_memory:
        del pipes
        for name, footprint in (("sparse, shared", shared_footprint), ("sparse, per-session copies", per_session_footprint)):
            mem = fresh_process(footprint, args.sparse, args.threads)
            result["variants"][name]["memory"] = mem
            print(f"{name:28s} private after load {mem['private_bytes'] / 2**30:.2f} GiB, after a generation "
                  f"{mem['run_private_bytes'] / 2**30:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
