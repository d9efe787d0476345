"""Pareto plot of the schedule benchmark (benchmarks/mnist_schedules.py): MNIST-FID against the
MACs ratio, one line per method, one panel per number of sampling steps. Reads result JSONs
(rows with `method`, `steps`, `macs_ratio`, `fid`); where two files hold a row of the same
(method, steps, ratio_target), the later file on the command line wins.

    python benchmarks/pareto_plot.py benchmarks/results/mnist_schedules.json \
        benchmarks/results/mnist_schedules_10_heldout64.json benchmarks/results/mnist_schedules_20.json \
        benchmarks/results/mnist_schedules_50.json --out docs/pareto_mnist.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"dense": "dense", "fewer-steps": "fewer steps", "fora": "FORA-style", "toca": "ToCa-style",
          "random": "random search", "genetic": "GA", "diffsparse": "learned (tokens)",
          "diffsparse-joint": "learned (joint space)", "fewer-steps-forecast": "fewer steps, forecasting skips (ours)",
          "diffsparse-joint-forecast": "learned (joint space, forecasting skips)"}
STYLES = {"fewer-steps": "o-", "fora": "s--", "toca": "^--", "random": "x:", "genetic": "+:",
          "diffsparse": "v-", "diffsparse-joint": "D-", "fewer-steps-forecast": "*-", "diffsparse-joint-forecast": "p-"}
COLORS = {"fewer-steps": "tab:blue", "fora": "tab:orange", "toca": "tab:green", "random": "tab:gray",
          "genetic": "tab:brown", "diffsparse": "tab:red", "diffsparse-joint": "tab:purple",
          "fewer-steps-forecast": "tab:cyan", "diffsparse-joint-forecast": "black"}


def load_rows(paths: list[str]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            rows[(row["method"], row["steps"], row["ratio_target"])] = row
    return list(rows.values())


def plot(rows: list[dict], out: Path) -> None:
    steps = sorted({r["steps"] for r in rows})
    fig, axes = plt.subplots(1, len(steps), figsize=(5 * len(steps), 4), squeeze=False)
    for ax, t in zip(axes[0], steps):
        at = [r for r in rows if r["steps"] == t]
        for method in LABELS:
            pts = sorted((r["macs_ratio"], r["fid"]) for r in at if r["method"] == method)
            if not pts:
                continue
            if method == "dense":
                ax.axhline(pts[0][1], color="gray", lw=1, label=f"dense ({t} steps)")
                continue
            xs, ys = zip(*pts)
            # the joint line is drawn hollow and larger: where it kept a baseline, that one shows through
            hollow = {"markerfacecolor": "none", "markersize": 10} if method.startswith("diffsparse-joint") else {}
            ax.plot(xs, ys, STYLES[method], color=COLORS[method], label=LABELS[method], alpha=0.85, **hollow)
        ax.set_title(f"{t} DDIM steps")
        ax.set_xlabel("MACs ratio (of dense)")
        ax.set_yscale("log")   # random search reaches FID > 1000 where the others are 40-170
        ax.set_ylabel("MNIST-FID, log scale (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("mnist-dit, 1,000 samples: quality against cost by schedule method")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="result JSONs of benchmarks/mnist_schedules.py")
    p.add_argument("--out", default="docs/pareto_mnist.png")
    args = p.parse_args()
    plot(load_rows(args.results), Path(args.out))


if __name__ == "__main__":
    main()
