"""Concurrent generation check: `threads` threads each make `calls` generate() calls (distinct
labels and seeds) on one Pipeline at the same time; every result must be bit-identical to the
same call made alone. Run once per pool size in `concurrency` (1: the calls are serialised; more:
that many generations run at once on their own buffers over shared sessions).

    python benchmarks/concurrency_check.py out/bundle --threads 4 --calls 3 --concurrency 1 2

`run()` returns the counts (calls checked, mismatches, max abs diff, wall seconds per pool size);
benchmarks/reliability.py imports it by file path.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from diffsparse.runtime import Pipeline


def call_args(k: int, labels_per_call: int = 3, num_classes: int = 10) -> dict:
    """The k-th call's arguments: labels and seed differ from call to call (3 labels per call
    with the tiny bundles' batch of 2 also runs a padded last batch)."""
    return {"class_labels": [(5 * k + 3 * j) % num_classes for j in range(labels_per_call)], "seed": 1000 + k}


def _threaded(pipe: Pipeline, threads: int, calls: int, labels_per_call: int, num_classes: int) -> tuple[list, float]:
    """Results of threads x calls generate() calls started together (a barrier), and the wall time."""
    results: list = [None] * (threads * calls)
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for m in range(calls):
                k = t * calls + m
                results[k] = pipe.generate(**call_args(k, labels_per_call, num_classes)).samples
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    workers = [threading.Thread(target=worker, args=(t,), name=f"concurrency-check-{t}") for t in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return results, wall


def run(bundle_folder: str | Path, threads: int = 4, calls: int = 3, concurrency=(1, 2), backend: str = "onnxruntime",
        device: str = "cpu", labels_per_call: int = 3) -> dict:
    """threads x calls concurrent generate() calls per pool size against the sequential results.

    One backend is loaded once; the reference pipeline (pool of 1, calls one after another) and a
    pipeline per pool size share it (each with contexts of its own). Returns calls_checked,
    mismatches (results not bit-identical to the sequential ones), max_abs_diff, and per pool size
    the wall seconds of the concurrent calls and the contexts it made; sequential_seconds is the
    same calls one after another."""
    ref = Pipeline.from_bundle(bundle_folder, backend=backend, device=device)
    num_classes = getattr(ref.spec, "num_classes", None)
    if num_classes is None:
        raise ValueError(f"{bundle_folder}: the concurrency check needs a class-conditional bundle")
    n = threads * calls
    ref.generate(**call_args(0, labels_per_call, num_classes))  # load and warm up
    t0 = time.perf_counter()
    expected = [ref.generate(**call_args(k, labels_per_call, num_classes)).samples for k in range(n)]
    sequential = time.perf_counter() - t0
    runs = []
    for size in concurrency:
        pipe = Pipeline(ref.backend, ref.spec, ref.plan, ref.step_graphs, concurrency=size)
        got, wall = _threaded(pipe, threads, calls, labels_per_call, num_classes)
        diffs = [float(np.abs(g - e).max()) for g, e in zip(got, expected)]
        runs.append({"concurrency": size, "calls": n, "mismatches": sum(not np.array_equal(g, e) for g, e in zip(got, expected)),
                     "max_abs_diff": max(diffs), "wall_seconds": wall, "contexts_made": pipe._pool.made})
    return {"bundle": str(bundle_folder), "backend": ref.backend.name, "device": ref.backend.device, "threads": threads,
            "calls_per_thread": calls, "calls_checked": sum(r["calls"] for r in runs),
            "mismatches": sum(r["mismatches"] for r in runs), "max_abs_diff": max(r["max_abs_diff"] for r in runs),
            "sequential_seconds": sequential, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--calls", type=int, default=3, help="generate() calls per thread")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2], help="pool sizes to check")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args(argv)
    result = run(args.bundle, threads=args.threads, calls=args.calls, concurrency=tuple(args.concurrency),
                 backend=args.backend)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0 if result["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
