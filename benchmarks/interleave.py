"""Interleaved timing for the benchmarks that compare variants of one run side by side: each
round runs every variant once, rotating which goes first, after one warm-up generation each;
results are per-step medians over the rounds (these machines are noisy: never compare totals
from separate runs)."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable


def interleave_parser(doc: str) -> argparse.ArgumentParser:
    """The options every interleaved benchmark takes: rounds, threads, seed and the result JSON."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="interleaved rounds (default %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    return p


def bundle_pair_parser(doc: str) -> argparse.ArgumentParser:
    """`interleave_parser` with the two bundle folders of a sparse-vs-dense benchmark."""
    p = interleave_parser(doc)
    p.add_argument("sparse")
    p.add_argument("dense")
    return p


def interleaved(variants: dict[str, Callable[[], list[float]]], runs: int) -> dict[str, list[list[float]]]:
    """Per variant, the per-step seconds (what the callable returns) of each of `runs` rounds."""
    order = list(variants)
    for name in order:   # warm-up
        variants[name]()
    steps: dict[str, list[list[float]]] = {name: [] for name in order}
    for i in range(runs):
        k = i % len(order)
        for name in order[k:] + order[:k]:   # rotate who goes first
            steps[name].append(variants[name]())
    return steps


def summarize(steps: dict[str, list[list[float]]], baseline: str) -> dict[str, dict]:
    """Per variant: median total and per-step milliseconds, every round's total, and the speed-up
    over `baseline`; printed one line each."""
    base_ms = statistics.median(sum(r) for r in steps[baseline]) * 1e3
    out = {}
    for name, runs in steps.items():
        total = statistics.median(sum(r) for r in runs) * 1e3
        per_step = [statistics.median(r[t] for r in runs) * 1e3 for t in range(len(runs[0]))]
        out[name] = {"total_ms": total, "total_ms_runs": [sum(r) * 1e3 for r in runs], "per_step_ms": per_step,
                     f"speedup_vs_{baseline}": base_ms / total}
        print(f"{name:28s} {total:9.1f} ms  {base_ms / total:5.2f}x {baseline}   per step "
              + " ".join(f"{x:.0f}" for x in per_step))
    return out
