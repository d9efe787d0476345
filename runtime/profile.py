"""Latency profiling: a bundle against a baseline bundle (usually dense), measured in one process,
runs interleaved so that machine noise hits both alike. Writes JSON, a Markdown summary, and PNG
plots (the K(t, l) heatmap as in the paper's Fig. 3, and per-step latency).

Memory: each bundle's footprint is measured in a fresh process (`memory_footprint` run through
`fresh_process`), because resident-set growth inside a process that has already run other bundles
depends on what its allocators kept, and moved by tens of MB between identical runs.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from diffsparse.runtime.pipeline import Pipeline


@dataclass
class ProfileConfig:
    """runs: timed generations per bundle (median reported); warmup: untimed ones first.
    backend/device/threads: as for Pipeline.from_bundle. guidance_scale and seed: generation inputs."""

    runs: int = 3
    warmup: int = 1
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None
    dtype: str = "float32"
    seed: int = 0
    guidance_scale: float | None = None  # None: the model's default (recorded in the bundle)
    memory: bool = True  # measure each bundle's memory footprint in a fresh process (a few seconds each)


def memory_status() -> dict[str, int]:
    """Resident memory split as Linux reports it: private (RssAnon: copies, arenas, buffers) and
    file-backed (RssFile: pages of memory-mapped files such as weights.bin, which the kernel can
    drop and re-read, and which every mapping of the file shares)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def memory_footprint(folder: str | Path, cfg: ProfileConfig | None = None, generate: bool = True) -> dict[str, Any]:
    """Resident memory a bundle takes in this process, split as `memory_status` does: after loading
    (sessions or modules, shared weights, cache buffers) and, with `generate`, after one generation
    (adding the backends' activation arenas). The libraries are imported and the spec built before
    the baseline, so the figures are the bundle's, not torch's or onnxruntime's. For a figure that
    does not depend on what ran before, call it in a fresh process (`fresh_process`). On CUDA also
    the device memory of torch's allocator (torch and TensorRT backends; onnxruntime-gpu keeps its
    own arena, not counted): after loading, and the peak of one generation."""
    import onnxruntime  # noqa: F401 -- imported before the baseline: library code is not the bundle's
    import torch
    from diffsparse.runtime.bundle import Bundle

    cfg = cfg or ProfileConfig()
    bundle = Bundle(folder, verify=False)
    conditioning = bundle.spec.example_conditioning(np.random.default_rng(cfg.seed))
    device_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    before = memory_status()
    t0 = time.perf_counter()
    pipe = Pipeline.from_bundle(folder, backend=cfg.backend, device=cfg.device, threads=cfg.threads,
                                dtype=cfg.dtype, verify=False)
    pipe.backend.prepare()
    loaded = memory_status()
    cuda = pipe.backend.device.startswith("cuda")
    out: dict[str, Any] = {
        "backend": pipe.backend.name, "graphs": len(bundle.manifest.graphs), "load_seconds": time.perf_counter() - t0,
        "weights_bytes": bundle.manifest.weights["bytes"],
        "private_bytes": loaded["RssAnon"] - before["RssAnon"],
        "file_backed_bytes": loaded["RssFile"] - before["RssFile"]}
    if cuda:
        out["device_bytes"] = torch.cuda.memory_allocated() - device_before
        torch.cuda.reset_peak_memory_stats()
    if generate:
        pipe.generate(conditioning=conditioning, seed=cfg.seed, guidance_scale=cfg.guidance_scale, time_steps=False)
        ran = memory_status()
        out["run_private_bytes"] = ran["RssAnon"] - before["RssAnon"]
        out["run_file_backed_bytes"] = ran["RssFile"] - before["RssFile"]
        if cuda:
            out["run_device_peak_bytes"] = torch.cuda.max_memory_allocated() - device_before
    return out


def fresh_process(fn, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a new (spawned) Python process; fn must be importable."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def host_info() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "platform": platform.platform()}


class _Subject:
    def __init__(self, folder: Path, cfg: ProfileConfig) -> None:
        t0 = time.perf_counter()
        self.pipe = Pipeline.from_bundle(folder, backend=cfg.backend, device=cfg.device, threads=cfg.threads,
                                         dtype=cfg.dtype)
        self.pipe.backend.prepare()
        self.load_seconds = time.perf_counter() - t0
        self.folder = folder
        self.conditioning = self.pipe.spec.example_conditioning(np.random.default_rng(cfg.seed))
        self.cfg = cfg
        self.runs: list[list[float]] = []
        self.totals: list[float] = []
        self.generate(record=False)
        self.memory = fresh_process(memory_footprint, folder, cfg) if cfg.memory else None

    def generate(self, record: bool = True) -> None:
        r = self.pipe.generate(conditioning=self.conditioning, seed=self.cfg.seed,
                               guidance_scale=self.cfg.guidance_scale)
        if record:
            self.runs.append(r.step_seconds)
            self.totals.append(float(sum(r.step_seconds)))

    def summary(self) -> dict[str, Any]:
        from diffsparse.runtime.bundle import Bundle

        bundle = Bundle(self.folder, verify=False)
        m = bundle.manifest
        per_step = np.median(np.asarray(self.runs), axis=0)
        return {
            "bundle": str(self.folder), "backend": self.pipe.backend.name, "device": self.pipe.backend.device,
            "batch_size": m.batch_size, "guidance": m.guidance, "steps": m.schedule.num_steps,
            "graphs": len(m.graphs), "schedule_method": m.schedule.provenance.get("method", ""),
            "per_step_ms": [1000 * x for x in per_step.tolist()],
            "total_ms": 1000 * statistics.median(self.totals), "total_ms_runs": [1000 * x for x in self.totals],
            "macs_per_step": m.macs["per_step"], "macs_total": m.macs["total"], "dense_macs_total": m.macs["dense_total"],
            "macs_ratio": m.macs["ratio"], "load_seconds": self.load_seconds, "memory": self.memory,
            "weights_bytes": m.weights["bytes"], "macs_breakdown": bundle.spec.macs_breakdown(m.schedule),
        }


def profile(bundle: str | Path, baseline: str | Path, cfg: ProfileConfig | None = None) -> dict[str, Any]:
    """Profile `bundle` against `baseline` on the same backend, interleaving timed runs."""
    cfg = cfg or ProfileConfig()
    if cfg.runs < 1:
        raise ValueError("runs must be >= 1")
    sparse = _Subject(Path(bundle), cfg)
    base = _Subject(Path(baseline), cfg)
    for _ in range(cfg.warmup):
        sparse.generate(record=False)
        base.generate(record=False)
    for _ in range(cfg.runs):
        sparse.generate()
        base.generate()
    s, b = sparse.summary(), base.summary()
    speedup = b["total_ms"] / s["total_ms"]
    macs_speedup = b["macs_total"] / s["macs_total"]
    return {
        "config": asdict(cfg), "host": host_info(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "sparse": s, "baseline": b,
        "speedup": speedup, "macs_speedup": macs_speedup, "macs_ratio": s["macs_total"] / b["macs_total"],
        "efficiency": speedup / macs_speedup,
    }


def write_report(report: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """profile.json, profile.md, k_heatmap.png and step_latency.png in `out`."""
    from diffsparse.runtime.bundle import Bundle

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "profile.json", "md": out / "profile.md",
             "heatmap": out / "k_heatmap.png", "latency": out / "step_latency.png"}
    paths["json"].write_text(json.dumps(report, indent=1))
    schedule = Bundle(report["sparse"]["bundle"], verify=False).schedule
    plot_k_heatmap(schedule, paths["heatmap"])
    plot_step_latency(report, paths["latency"])
    paths["md"].write_text(markdown_summary(report))
    return paths


def markdown_summary(report: dict[str, Any]) -> str:
    s, b, h = report["sparse"], report["baseline"], report["host"]
    mb = 1 / 2**20
    lines = [
        "# diffsparse latency profile", "",
        f"Backend **{s['backend']}** on **{s['device']}** ({h['cpu']}, {h['cores']} cores); "
        f"onnxruntime {h['onnxruntime']}, torch {h['torch']}. Median of {report['config']['runs']} interleaved runs.", "",
        "| | sparse | baseline |", "|---|---:|---:|",
        f"| schedule | {s['schedule_method']} | {b['schedule_method']} |",
        f"| steps / distinct graphs | {s['steps']} / {s['graphs']} | {b['steps']} / {b['graphs']} |",
        f"| batch (x2 with guidance) | {s['batch_size']} | {b['batch_size']} |",
        f"| total latency (ms) | {s['total_ms']:.1f} | {b['total_ms']:.1f} |",
        f"| GMACs | {s['macs_total'] / 1e9:.2f} | {b['macs_total'] / 1e9:.2f} |",
        f"| MACs ratio vs dense | {s['macs_ratio']:.3f} | {b['macs_ratio']:.3f} |",
        f"| weights on disk (MB) | {s['weights_bytes'] * mb:.1f} | {b['weights_bytes'] * mb:.1f} |",
        *_memory_rows(s["memory"], b["memory"]), "",
        f"**Speed-up {report['speedup']:.2f}x** wall-clock for **{report['macs_speedup']:.2f}x** fewer MACs "
        f"(efficiency {report['efficiency']:.2f} = speed-up / MACs speed-up). "
        f"Process peak RSS {report['peak_rss_bytes'] * mb:.0f} MB.", "",
        "![K(t,l)](k_heatmap.png) ![per-step latency](step_latency.png)", "",
        *macs_by_kind(s["macs_breakdown"]),
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


def plot_k_heatmap(schedule, path: Path) -> None:
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


def plot_step_latency(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, b = np.asarray(report["sparse"]["per_step_ms"]), np.asarray(report["baseline"]["per_step_ms"])
    x = np.arange(len(s))
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(s) + 2), 3))
    ax.bar(x - 0.2, b, 0.4, label="baseline")
    ax.bar(x + 0.2, s, 0.4, label="sparse")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"per-step latency, speed-up {report['speedup']:.2f}x (MACs {report['macs_speedup']:.2f}x)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
