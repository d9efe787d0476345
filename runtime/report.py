"""Latency profiling, the rendering half: a measured `ProfileReport` (runtime/profile.py, which
measures) as profile.json (its `to_dict()`), a Markdown summary, and PNG plots (the K(t, l) heatmap
as in the paper's Fig. 3, and per-step latency). Nothing here measures or opens a bundle: all it
draws comes from the report (the schedule from the manifest it holds), so a hand-built report
renders the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from diffsparse.runtime.profile import ProfileReport

from diffsparse.schedule import Schedule

def write_report(report: ProfileReport, out: str | Path) -> dict[str, Path]:
    """profile.json, profile.md, k_heatmap.png and step_latency.png in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "profile.json", "md": out / "profile.md",
             "heatmap": out / "k_heatmap.png", "latency": out / "step_latency.png"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=1))
    plot_k_heatmap(report.sparse.manifest.schedule, paths["heatmap"])
    plot_step_latency(report, paths["latency"])
    paths["md"].write_text(markdown_summary(report))
    return paths


def markdown_summary(report: ProfileReport) -> str:
    s, b, h = report.sparse, report.baseline, report.host
    sm, bm = s.manifest, b.manifest
    mb = 1 / 2**20
    lines = [
        "# diffsparse latency profile", "",
        f"Backend **{s.backend}** on **{s.device}** ({h['cpu']}, {h['cores']} cores); "
        f"onnxruntime {h['onnxruntime']}, torch {h['torch']}. Median of {report.config.runs} interleaved runs.", "",
        "| | sparse | baseline |", "|---|---:|---:|",
        f"| schedule | {s.schedule_method} | {b.schedule_method} |",
        f"| steps / distinct graphs | {sm.schedule.num_steps} / {len(sm.graphs)} | {bm.schedule.num_steps} / {len(bm.graphs)} |",
        f"| batch (x2 with guidance) | {sm.batch_size} | {bm.batch_size} |",
        f"| total latency (ms) | {s.total_ms:.1f} | {b.total_ms:.1f} |",
        f"| GMACs | {s.macs_total / 1e9:.2f} | {b.macs_total / 1e9:.2f} |",
        f"| MACs ratio vs dense | {sm.macs['ratio']:.3f} | {bm.macs['ratio']:.3f} |",
        f"| weights on disk (MB) | {sm.weights['bytes'] * mb:.1f} | {bm.weights['bytes'] * mb:.1f} |",
        *_memory_rows(s.memory, b.memory), "",
        f"**Speed-up {report.speedup:.2f}x** wall-clock for **{report.macs_speedup:.2f}x** fewer MACs "
        f"(efficiency {report.efficiency:.2f} = speed-up / MACs speed-up). "
        f"Process peak RSS {report.peak_rss_bytes * mb:.0f} MB.", "",
        "![K(t,l)](k_heatmap.png) ![per-step latency](step_latency.png)", "",
        *macs_by_kind(s.macs_breakdown),
    ]
    return "\n".join(lines)


def _memory_rows(sparse: dict | None, base: dict | None) -> list[str]:
    if not sparse or not base:
        return []
    mb = 1 / 2**20
    rows = [("memory after load: private (MB)", "private_bytes"),
            ("memory after load: file-backed (MB)", "file_backed_bytes"),
            ("memory after one generation: private (MB)", "run_private_bytes"),
            ("memory after one generation: file-backed (MB)", "run_file_backed_bytes"),
            ("device memory after load (MB)", "device_bytes"),
            ("device memory, peak of one generation (MB)", "run_device_peak_bytes")]
    return [f"| {label} | {sparse[key] * mb:.1f} | {base[key] * mb:.1f} |" for label, key in rows if key in sparse]


def macs_by_kind(breakdown: dict[str, Any]) -> list[str]:
    """Markdown table of GMACs per layer kind, dense vs scheduled (profile.json has every layer)."""
    kinds: dict[str, list[int]] = {}
    for row in breakdown["layers"]:
        acc = kinds.setdefault(row["kind"], [0, 0, 0])
        acc[0] += 1
        acc[1] += row["dense"]
        acc[2] += row["scheduled"]
    g = 1e-9
    lines = ["| MACs of the run by part | layers | dense GMACs | scheduled GMACs | ratio |", "|---|---:|---:|---:|---:|",
             f"| fixed (embeddings, modulation, head) | | {breakdown['fixed'] * g:.2f} | {breakdown['fixed'] * g:.2f} | 1.000 |"]
    for kind, (n, dense, sched) in kinds.items():
        lines.append(f"| {kind} | {n} | {dense * g:.2f} | {sched * g:.2f} | {sched / max(dense, 1):.3f} |")
    d, s = breakdown["dense_total"], breakdown["scheduled_total"]
    lines += [f"| **total** | {len(breakdown['layers'])} | {d * g:.2f} | {s * g:.2f} | {s / max(d, 1):.3f} |", ""]
    return lines


def plot_k_heatmap(schedule: Schedule, path: Path) -> None:
    # matplotlib is imported on first plot only: it is slow to import and nothing else needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = np.asarray(schedule.keep, dtype=float) / schedule.num_tokens
    fig, ax = plt.subplots(figsize=(max(4, 0.18 * keep.shape[1] + 2), max(3, 0.22 * keep.shape[0] + 1.5)))
    im = ax.imshow(keep, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("cacheable layer (block·kind)")
    ax.set_ylabel("denoising step")
    ticks = list(range(0, keep.shape[1], max(1, keep.shape[1] // 12)))
    ax.set_xticks(ticks, [schedule.layers[i].name for i in ticks], rotation=90, fontsize=7)
    ax.set_title(f"K(t,l)/N — {schedule.provenance.get('method', '')}, "
                 f"MACs ratio {schedule.macs_ratio.get('achieved') or 0:.2f}")
    fig.colorbar(im, ax=ax, label="fraction of tokens recomputed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_step_latency(report: ProfileReport, path: Path) -> None:
    import matplotlib  # lazily, as in plot_k_heatmap

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, b = np.asarray(report.sparse.per_step_ms), np.asarray(report.baseline.per_step_ms)
    x = np.arange(len(s))
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(s) + 2), 3))
    ax.bar(x - 0.2, b, 0.4, label="baseline")
    ax.bar(x + 0.2, s, 0.4, label="sparse")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"per-step latency, speed-up {report.speedup:.2f}x (MACs {report.macs_speedup:.2f}x)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
