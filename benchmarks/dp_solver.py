"""Benchmark: the exact DP sparsity solver at the paper's size (T=20, L=84, |S|=5, R=50%).

    python benchmarks/dp_solver.py
"""

import time

import numpy as np
from diffsparse.train.dp_solver import solve


def main(steps: int = 20, layers: int = 84, candidates: int = 5, ratio: float = 0.5, repeats: int = 5) -> None:
    cost = np.random.default_rng(0).normal(size=(steps * layers, candidates))
    budget = int(round(ratio * (candidates - 1) * steps * layers))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        alloc = solve(cost, np.arange(candidates), budget)
        times.append(time.perf_counter() - t0)
    assert alloc.weight == budget
    print(f"T={steps} L={layers} |S|={candidates} budget={budget}: median {1000 * np.median(times):.0f} ms "
          f"over {repeats} runs (one core)")


if __name__ == "__main__":
    main()
