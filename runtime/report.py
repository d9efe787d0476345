"""Latency profiling, the rendering half: a measured `ProfileReport` (runtime/profile.py, which
measures) as profile.json (its `to_dict()`), a Markdown summary, and PNG plots (the K(t, l) heatmap
as in the paper's Fig. 3, per-step latency and, when the report has the ops profile, per-step time
by part). Nothing here measures or opens a bundle: all it draws comes from the report (the
schedule from the manifest it holds), so a hand-built report renders the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from diffsparse.runtime.ops_profile import PARTS, OpsProfile
from diffsparse.runtime.profile import BundleProfile, ProfileReport

from diffsparse.schedule import Schedule

def write_report(report: ProfileReport, out: str | Path) -> dict[str, Path]:
    """profile.json, profile.md, k_heatmap.png and step_latency.png in `out`; step_parts.png too
    when both bundles were profiled by part (`ProfileConfig.ops`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "profile.json", "md": out / "profile.md",
             "heatmap": out / "k_heatmap.png", "latency": out / "step_latency.png"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=1))
    plot_k_heatmap(report.sparse.manifest.schedule, paths["heatmap"])
    plot_step_latency(report, paths["latency"])
    if _has_ops(report):
        paths["parts"] = out / "step_parts.png"
        plot_step_parts(report, paths["parts"])
    paths["md"].write_text(markdown_summary(report))
    return paths


def _speed(host: dict) -> str:
    """The host's speed readings (`host_speed`), where the report has them (older ones do not)."""
    speed = host.get("speed")
    if not speed:
        return ""
    return (f" Host at profile time: fp32 matrix product {speed['gemm_gflops']:.0f} GFLOP/s, memory copy "
            f"{speed['copy_gib_per_s']:.1f} GiB/s (the sparse/dense ratio moves with their balance).")


def markdown_summary(report: ProfileReport) -> str:
    s, b, h = report.sparse, report.baseline, report.host
    sm, bm = s.manifest, b.manifest
    mb = 1 / 2**20
    lines = [
        "# diffsparse latency profile", "",
        f"Backend **{s.backend}** on **{s.device}** ({h['cpu']}, {h['cores']} cores); "
        f"onnxruntime {h['onnxruntime']}, torch {h['torch']}. Median of {report.config.runs} interleaved runs.{_speed(h)}", "",
        "| | sparse | baseline |", "|---|---:|---:|",
        f"| schedule | {s.schedule_method} | {b.schedule_method} |",
        f"| steps (computed) / distinct graphs | {_steps(sm)} / {len(sm.graphs)} | {_steps(bm)} / {len(bm.graphs)} |",
        f"| batch (x2 with guidance) | {sm.batch_size} | {bm.batch_size} |",
        f"| total latency (ms) | {s.total_ms:.1f} | {b.total_ms:.1f} |",
        f"| GMACs | {s.macs_total / 1e9:.2f} | {b.macs_total / 1e9:.2f} |",
        f"| MACs ratio vs dense | {sm.macs['ratio']:.3f} | {bm.macs['ratio']:.3f} |",
        f"| weights on disk (MB) | {sm.weights['bytes'] * mb:.1f} | {bm.weights['bytes'] * mb:.1f} |",
        *([f"| weights pre-packed per session (onnxruntime) | {_yes(s.prepacked)} | {_yes(b.prepacked)} |"]
          if s.prepacked is not None or b.prepacked is not None else []),
        *_memory_rows(s.memory, b.memory), "",
        f"**Speed-up {report.speedup:.2f}x** wall-clock for **{report.macs_speedup:.2f}x** fewer MACs "
        f"(efficiency {report.efficiency:.2f} = speed-up / MACs speed-up). "
        f"Process peak RSS {report.peak_rss_bytes * mb:.0f} MB.", "",
        "![K(t,l)](k_heatmap.png) ![per-step latency](step_latency.png)", "",
        *macs_by_kind(s.macs_breakdown),
        *latency_fit_rows(s, b),
        *(prediction_rows(report) if s.predicted_ms is not None else []),
        *(ops_tables(s.ops, b.ops) if _has_ops(report) else []),
    ]
    return "\n".join(lines)


def _steps(m) -> str:
    computed = len(m.schedule.computed_steps)
    return str(m.schedule.num_steps) + (f" ({computed})" if computed != m.schedule.num_steps else "")


def _yes(flag: bool | str | None) -> str:
    """A yes/no flag, or a partial answer as it is ("3 of 5 graphs")."""
    if isinstance(flag, str):
        return flag
    return "-" if flag is None else ("yes" if flag else "no")


def _has_ops(report: ProfileReport) -> bool:
    return report.sparse.ops is not None and report.baseline.ops is not None


def latency_fit_rows(sparse: BundleProfile, base: BundleProfile) -> list[str]:
    """The per-step fit latency ≈ a + b·GMACs of each bundle (`profile.fit_latency`)."""
    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = ["| per-step latency ≈ a + b·GMACs (median latencies) | a (ms) | b (ms/GMAC) | R² | steps |",
             "|---|---:|---:|---:|---:|"]
    fits = [(label, side.latency_fit) for label, side in (("sparse", sparse), ("baseline", base))]
    for label, f in fits:
        lines.append(f"| {label} | {f['a_ms']:.2f} | {fmt(f['b_ms_per_gmac'], '.2f')} | {fmt(f['r2'], '.3f')} "
                     f"| {f['steps']} |")
    if any(f["r2"] is None for _, f in fits):
        lines += ["", "n/a: every step of the bundle has the same MACs (b is then not separable from a), "
                  "or the same latency (no variance to explain)."]
    return lines + [""]


def prediction_rows(report: ProfileReport) -> list[str]:
    """Predicted (the latency table's cost model) against measured latency, in total and per step."""
    s, b = report.sparse, report.baseline
    table = report.extra.get("latency_table", {})
    ps, pb = s.prediction(), b.prediction()
    lines = [f"Predicted by the latency table `{table.get('path')}` against measured (median per step):", "",
             "| | predicted (ms) | measured (ms) | error |", "|---|---:|---:|---:|",
             f"| sparse, total | {ps['predicted_total_ms']:.1f} | {sum(s.per_step_ms):.1f} | "
             f"{100 * ps['prediction_error_total']:+.1f}% |",
             f"| baseline, total | {pb['predicted_total_ms']:.1f} | {sum(b.per_step_ms):.1f} | "
             f"{100 * pb['prediction_error_total']:+.1f}% |",
             f"| speed-up | {pb['predicted_total_ms'] / ps['predicted_total_ms']:.2f}x | "
             f"{sum(b.per_step_ms) / sum(s.per_step_ms):.2f}x | |"]
    lines += [f"| sparse step {t} | {p:.1f} | {m:.1f} | {100 * e:+.1f}% |"
              for t, p, m, e in zip(s.step_indices, ps["predicted_per_step_ms"], s.per_step_ms,
                                    ps["prediction_error_per_step"])]
    if table.get("mismatches"):
        lines += ["", "**The table was measured on another target or run shape:** " + "; ".join(table["mismatches"])]
    return lines + [""]


def ops_tables(sparse: OpsProfile, base: OpsProfile, top: int = 10) -> list[str]:
    """Where the time goes: ms per generation by part and by operator type, both bundles."""
    sp, bp = sparse.total_by_part, base.total_by_part
    lines = [f"Where the time goes ({sparse.source}, mean of {sparse.generations} profiled generations per "
             "bundle, after the timed ones; profiling slows runs, so compare shares, not these totals with "
             "the latencies above). Parts come from the exported graph's part scopes "
             "(runtime/ops_profile.py).", "",
             "| part | sparse (ms/generation) | share | baseline (ms/generation) | share |", "|---|---:|---:|---:|---:|"]
    for part in PARTS:
        lines.append(f"| {part} | {sp[part]:.2f} | {_share(sp[part], sparse.node_ms)} | {bp[part]:.2f} | "
                     f"{_share(bp[part], base.node_ms)} |")
    lines += [f"| **operators, total** | {sparse.node_ms:.2f} | | {base.node_ms:.2f} | |",
              f"| whole runs (operators + runtime between them) | {sparse.run_ms:.2f} | | {base.run_ms:.2f} | |", "",
              "| operator type | sparse (ms/generation) | baseline (ms/generation) |", "|---|---:|---:|"]
    ops = sorted(set(sparse.op_types) | set(base.op_types),
                 key=lambda op: -max(sparse.op_types.get(op, 0.0), base.op_types.get(op, 0.0)))
    for op in ops[:top]:
        lines.append(f"| {op} | {sparse.op_types.get(op, 0.0):.2f} | {base.op_types.get(op, 0.0):.2f} |")
    for label, side in (("sparse", sparse), ("baseline", base)):
        if side.op_calls:
            lines += ["", f"| heaviest operator calls, {label} (type and input shapes) | ms/generation |", "|---|---:|"]
            lines += [f"| `{call}` | {ms:.2f} |" for call, ms in side.top_calls(top)]
    return lines + ["", "![per-step time by part](step_parts.png)", ""]


def _share(x: float, total: float) -> str:
    return f"{100 * x / total:.1f}%" if total > 0 else "-"


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
    fixed, fixed_run = breakdown["fixed"], breakdown.get("fixed_scheduled", breakdown["fixed"])  # less with skipped steps
    lines = ["| MACs of the run by part | layers | dense GMACs | scheduled GMACs | ratio |", "|---|---:|---:|---:|---:|",
             f"| fixed (embeddings, modulation, head) | | {fixed * g:.2f} | {fixed_run * g:.2f} | "
             f"{fixed_run / max(fixed, 1):.3f} |"]
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

    n = max(side.manifest.schedule.num_steps for side in (report.sparse, report.baseline))
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * n + 2), 3))
    # each bar at its step t: a skipped step (no graph runs) has none
    for side, shift, label in ((report.baseline, -0.2, "baseline"), (report.sparse, 0.2, "sparse")):
        ax.bar(np.asarray(side.step_indices) + shift, side.per_step_ms, 0.4, label=label)
    ax.set_xlabel("denoising step (no bar: skipped)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"per-step latency, speed-up {report.speedup:.2f}x (MACs {report.macs_speedup:.2f}x)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_step_parts(report: ProfileReport, path: Path) -> None:
    """Per step, a bar of each bundle's profiled time stacked by part (baseline left, sparse right)."""
    import matplotlib  # lazily, as in plot_k_heatmap

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = (("baseline", report.baseline, -0.2, "//"), ("sparse", report.sparse, 0.2, None))
    n = max(side.manifest.schedule.num_steps for _, side, _, _ in sides)
    colors = dict(zip(PARTS, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * n + 3) + 1, 3.5))
    for label, side, shift, hatch in sides:
        ops = side.ops
        x = np.asarray(side.step_indices) + shift   # computed steps only
        bottom = np.zeros(len(ops.per_step))
        for part in PARTS:
            ms = np.array([step.get(part, 0.0) for step in ops.per_step])
            ax.bar(x, ms, 0.38, bottom=bottom, color=colors[part], hatch=hatch, edgecolor="white", linewidth=0.3,
                   label=part if label == "sparse" else None)
            bottom += ms
    ax.set_xticks(np.arange(n))
    ax.set_xlabel("denoising step (left bar: baseline, hatched; right: sparse)")
    ax.set_ylabel("profiled time (ms)")
    ax.set_title(f"time by part per step ({report.sparse.ops.source})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
