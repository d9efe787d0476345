"""Latency profiling, the measuring half: a bundle against a baseline bundle (usually dense),
measured in one process, runs interleaved so that machine noise hits both alike.

What lives where:
    runtime/profile.py   measurement: `ProfileConfig`, timed runs (`profile`), the memory footprint
                         in a fresh process (`memory_footprint` via `fresh_process`), `host_info`;
                         results as the `ProfileReport` / `BundleProfile` dataclasses, which hold each
                         bundle's `Manifest` and the measured numbers (`to_dict()`: profile.json).
    runtime/ops_profile.py  where the time goes (`ProfileConfig.ops`): profiled generations,
                         ONNX Runtime's traces / torch.profiler events by step, part and op type.
    runtime/report.py    rendering: a `ProfileReport` to Markdown and PNG plots, and the files
                         (`write_report`). It measures nothing and opens no bundle.

Memory: each bundle's footprint is measured in a fresh process (`memory_footprint` run through
`fresh_process`), because resident-set growth inside a process that has already run other bundles
depends on what its allocators kept, and moved by tens of MB between identical runs.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from diffsparse.runtime.backends import ort_capi
from diffsparse.runtime.bundle import Bundle
from diffsparse.runtime.ops_profile import OpsProfile, check_profilable, measure_ops
from diffsparse.runtime.pipeline import Pipeline

from diffsparse.latency_table import LatencyTable, model_fingerprint
from diffsparse.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class ProfileConfig:
    """runs: timed generations per bundle (median reported); warmup: untimed ones first.
    backend/device/threads/prepack: as for Pipeline.from_bundle. guidance_scale and seed: generation inputs.
    ops: after the timed runs, `ops_runs` more generations per bundle (and one warm-up) under the
    backend's profiler, by step, part and operator type (runtime/ops_profile.py); profiling slows
    the runs, so they are not in the latency medians."""

    runs: int = 3
    warmup: int = 1
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None
    dtype: str = "float32"
    compile: bool = False  # torch backend: torch.compile each step (compiled in the warm-up runs)
    prepack: str = "auto"
    seed: int = 0
    guidance_scale: float | None = None  # None: the model's default (recorded in the bundle)
    memory: bool = True  # measure each bundle's memory footprint in a fresh process (a few seconds each)
    ops: bool = False
    ops_runs: int = 2
    latency_table: str | None = None  # dscalibrate latency's table: predicted vs measured per step


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
    # imported here, before the baseline, and in the (fresh) process that measures: library code is
    # not the bundle's
    import onnxruntime  # noqa: F401
    import torch

    ort_capi.available()   # loads onnxruntime's C library (shared pre-packing) where it exists
    cfg = cfg or ProfileConfig()
    bundle = Bundle(folder, verify=False)
    conditioning = bundle.spec.example_conditioning(np.random.default_rng(cfg.seed))
    device_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    before = memory_status()
    t0 = time.perf_counter()
    pipe = Pipeline.from_bundle(folder, backend=cfg.backend, device=cfg.device, threads=cfg.threads,
                                dtype=cfg.dtype, prepack=cfg.prepack, verify=False,
                                compile=cfg.compile)
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
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def host_info() -> dict[str, Any]:
    # the libraries' versions; imported here so that importing this module does not load onnxruntime
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
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "platform": platform.platform(),
            "speed": host_speed()}


def host_speed(repeats: int = 3) -> dict[str, float]:
    """Two quick readings (best of `repeats`, well under a second) of how fast this machine is
    *now*: an fp32 matrix product (numpy, 1024³, all cores) and a 64 MiB memory copy. Machines
    of one class differ, and a shared one changes within the hour; the sparse/dense ratio depends
    on the balance of the two, since a partial step reads all of its weights for fewer rows (on
    2026-12-04 bundles of one DiT-XL/2 schedule read 0.93 of the MACs ratio on a host that ran the
    dense step in 1.04 s and 0.97-0.99 on one that took 2.45 s). Recorded with every result so that
    readings from different hosts can be told apart."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 1024), dtype=np.float32)
    src = np.ones(16 * 2**20, dtype=np.float32)
    dst = np.empty_like(src)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    gemm = best(lambda: a @ a)
    copy = best(lambda: np.copyto(dst, src))
    return {"gemm_gflops": round(2 * 1024**3 / gemm / 1e9, 1), "copy_gib_per_s": round(src.nbytes / copy / 2**30, 2)}


def target_fingerprint(host: dict[str, Any], backend: str, device: str, threads: int | None,
                       prepacked: bool | str | None, dtype: str) -> dict[str, Any]:
    """What a latency measured here depends on beyond the model: a latency table records it
    (calibrate/latency.py) and a profile compares it (`LatencyTable.mismatches`)."""
    return {"backend": backend, "device": device, "cpu": host.get("cpu"), "threads": threads, "prepacked": prepacked,
            "dtype": dtype, "onnxruntime": host.get("onnxruntime"), "torch": host.get("torch")}


def fit_latency(macs: Sequence[float], ms: Sequence[float]) -> dict[str, Any]:
    """Least-squares fit of per-step latency ≈ a + b·GMACs over a bundle's steps: a (ms) is what a
    step costs whatever it computes (runtime overhead, the part of the work MACs do not count), b
    (ms per GMAC) the cost of its arithmetic, r2 the share of the per-step latency variance the MACs
    explain. With one distinct MACs value (a dense bundle) b cannot be told from a: b and r2 are
    None and a is the mean latency. r2 is None when the latencies do not vary."""
    x, y = np.asarray(macs, dtype=float) / 1e9, np.asarray(ms, dtype=float)
    if len(x) != len(y) or not len(x):
        raise ValueError(f"{len(x)} MACs for {len(y)} latencies")
    if np.ptp(x) == 0:
        return {"a_ms": float(y.mean()), "b_ms_per_gmac": None, "r2": None, "steps": len(x)}
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
    total = float(((y - y.mean()) ** 2).sum())
    residual = float(((y - (a + b * x)) ** 2).sum())
    return {"a_ms": float(a), "b_ms_per_gmac": float(b), "r2": 1 - residual / total if total > 0 else None,
            "steps": len(x)}


@dataclass
class BundleProfile:
    """One bundle as profiled: its manifest and what was measured. `runs`: seconds per denoising
    step of each timed generation; `macs_breakdown`: `ModelSpec.macs_breakdown` of its schedule;
    `memory`: `memory_footprint` in a fresh process, or None when not measured; `ops`: where the
    time goes (`ProfileConfig.ops`), or None."""

    folder: Path
    manifest: Manifest
    backend: str
    device: str
    runs: list[list[float]]
    load_seconds: float
    macs_breakdown: dict[str, Any]
    memory: dict[str, Any] | None = None
    ops: OpsProfile | None = None
    prepacked: bool | str | None = None   # ONNX Runtime: whether the sessions pre-packed their weights (ort.prepack_summary)
    predicted_ms: list[float] | None = None   # per computed step, from ProfileConfig.latency_table

    @property
    def schedule_method(self) -> str:
        return self.manifest.schedule.provenance.get("method", "")

    @property
    def totals(self) -> list[float]:
        """Seconds of each timed generation (the sum of its steps)."""
        return [float(sum(run)) for run in self.runs]

    @property
    def step_indices(self) -> list[int]:
        """The denoising step t of each timed step: a skipped step runs nothing, so is not timed
        (per_step_ms, the MACs per step and the ops profile list the computed steps only)."""
        return [s["index"] for s in self.manifest.steps]

    @property
    def per_step_ms(self) -> list[float]:
        """Median over the timed runs of each step's latency, in ms."""
        return [1000 * x for x in np.median(np.asarray(self.runs), axis=0).tolist()]

    @property
    def total_ms(self) -> float:
        return 1000 * statistics.median(self.totals)

    @property
    def macs_total(self) -> int:
        return self.manifest.macs["total"]

    @property
    def latency_fit(self) -> dict[str, Any]:
        """`fit_latency` of the median per-step latencies against each step's MACs."""
        return fit_latency(self.manifest.macs["per_step"], self.per_step_ms)

    def to_dict(self) -> dict[str, Any]:
        """One side of profile.json (`sparse` or `baseline`)."""
        m = self.manifest
        return {
            "bundle": str(self.folder), "backend": self.backend, "device": self.device,
            "batch_size": m.batch_size, "guidance": m.guidance, "steps": m.schedule.num_steps,
            "graphs": len(m.graphs), "schedule_method": self.schedule_method,
            "step_indices": self.step_indices, "per_step_ms": self.per_step_ms,
            "total_ms": self.total_ms, "total_ms_runs": [1000 * x for x in self.totals],
            "macs_per_step": m.macs["per_step"], "macs_total": m.macs["total"], "dense_macs_total": m.macs["dense_total"],
            "macs_ratio": m.macs["ratio"], "load_seconds": self.load_seconds, "prepacked": self.prepacked,
            "memory": self.memory,
            "weights_bytes": m.weights["bytes"], "macs_breakdown": self.macs_breakdown,
            "latency_fit": self.latency_fit, "ops": self.ops.to_dict() if self.ops else None,
            **(self.prediction() if self.predicted_ms is not None else {}),
        }

    def prediction(self) -> dict[str, Any]:
        """Predicted (latency table) against measured: per step and in total, error = predicted /
        measured − 1 (totals: sums of the per-step medians on both sides)."""
        measured = self.per_step_ms
        total_pred, total_meas = float(sum(self.predicted_ms)), float(sum(measured))
        return {"predicted_per_step_ms": self.predicted_ms, "predicted_total_ms": total_pred,
                "prediction_error_per_step": [p / m - 1 for p, m in zip(self.predicted_ms, measured)],
                "prediction_error_total": total_pred / total_meas - 1}


@dataclass
class ProfileReport:
    """A bundle against its baseline, as `profile` measured them. The ratios are derived;
    `extra`: caller's additions to profile.json (appended after the measured keys)."""

    config: ProfileConfig
    host: dict[str, Any]
    peak_rss_bytes: int
    sparse: BundleProfile
    baseline: BundleProfile
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        """Wall-clock speed-up of the bundle over the baseline (median totals)."""
        return self.baseline.total_ms / self.sparse.total_ms

    @property
    def macs_speedup(self) -> float:
        return self.baseline.macs_total / self.sparse.macs_total

    @property
    def macs_ratio(self) -> float:
        return self.sparse.macs_total / self.baseline.macs_total

    @property
    def efficiency(self) -> float:
        """speed-up / MACs speed-up: 1.0 when latency falls as fast as the MACs do."""
        return self.speedup / self.macs_speedup

    def to_dict(self) -> dict[str, Any]:
        """profile.json's content."""
        return {
            "config": asdict(self.config), "host": self.host, "peak_rss_bytes": self.peak_rss_bytes,
            "sparse": self.sparse.to_dict(), "baseline": self.baseline.to_dict(),
            "speedup": self.speedup, "macs_speedup": self.macs_speedup, "macs_ratio": self.macs_ratio,
            "efficiency": self.efficiency, **self.extra,
        }


class _Subject:
    """One bundle being timed: its pipeline, loaded once, and the runs recorded so far."""

    def __init__(self, bundle: str | Path | Bundle, cfg: ProfileConfig) -> None:
        t0 = time.perf_counter()
        # a folder is opened (and its checksums verified) here, inside the load time; the pipeline
        # then skips the verification it would otherwise repeat
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.pipe = Pipeline.from_bundle(self.bundle.folder, backend=cfg.backend, device=cfg.device,
                                         threads=cfg.threads, dtype=cfg.dtype, prepack=cfg.prepack, verify=False,
                                         compile=cfg.compile)
        self.pipe.backend.prepare()
        self.load_seconds = time.perf_counter() - t0
        self.conditioning = self.pipe.spec.example_conditioning(np.random.default_rng(cfg.seed))
        self.cfg = cfg
        self.runs: list[list[float]] = []
        self.ops: OpsProfile | None = None
        self.generate(record=False)
        self.memory = fresh_process(memory_footprint, self.bundle.folder, cfg) if cfg.memory else None

    def generate(self, record: bool = True, pipe: Pipeline | None = None) -> None:
        r = (pipe or self.pipe).generate(conditioning=self.conditioning, seed=self.cfg.seed,
                                         guidance_scale=self.cfg.guidance_scale)
        if record:
            self.runs.append(r.step_seconds)

    def profile_ops(self) -> None:
        self.ops = measure_ops(self.bundle, self.pipe, lambda pipe: self.generate(record=False, pipe=pipe),
                               generations=self.cfg.ops_runs)

    def result(self) -> BundleProfile:
        return BundleProfile(
            folder=self.bundle.folder, manifest=self.bundle.manifest, backend=self.pipe.backend.name,
            device=self.pipe.backend.device, runs=self.runs, load_seconds=self.load_seconds,
            macs_breakdown=self.pipe.spec.macs_breakdown(self.bundle.schedule, self.bundle.conditioning),
            memory=self.memory, ops=self.ops,
            prepacked=getattr(self.pipe.backend, "prepacked", None))


def profile(bundle: str | Path | Bundle, baseline: str | Path | Bundle, cfg: ProfileConfig | None = None,
            progress: Callable[[], None] | None = None) -> ProfileReport:
    """Profile `bundle` against `baseline` on the same backend, interleaving timed runs. Each is a
    bundle folder or an already opened `Bundle` (then not opened again; its load time covers the
    pipeline only). `progress`, if given, is called after each timed pair of runs. Render the
    result with `diffsparse.runtime.report`."""
    cfg = cfg or ProfileConfig()
    if cfg.runs < 1:
        raise ValueError("runs must be >= 1")
    if cfg.ops and cfg.ops_runs < 1:
        raise ValueError("ops_runs must be >= 1")
    table = LatencyTable.load(cfg.latency_table) if cfg.latency_table else None   # before minutes of timing
    sparse = _Subject(bundle, cfg)
    base = _Subject(baseline, cfg)
    if cfg.ops:
        check_profilable(sparse.pipe.backend)
    for _ in range(cfg.warmup):
        sparse.generate(record=False)
        base.generate(record=False)
    for _ in range(cfg.runs):
        sparse.generate()
        base.generate()
        if progress is not None:
            progress()
    if cfg.ops:  # after the timed runs: profiling slows a run down
        sparse.profile_ops()
        base.profile_ops()
    host = host_info()
    report = ProfileReport(config=cfg, host=host, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                           sparse=sparse.result(), baseline=base.result())
    if table is not None:
        report.extra["latency_table"] = _predict(table, cfg, host, (sparse, report.sparse), (base, report.baseline))
    return report


def _predict(table: LatencyTable, cfg: ProfileConfig, host: dict[str, Any], *sides) -> dict[str, Any]:
    """Fill each side's predicted per-step latency from the table; what the report records of it,
    with every fingerprint mismatch (logged as a warning: a table for another target is reported,
    not silently used)."""
    mismatches = []
    for subject, result in sides:
        spec = subject.pipe.spec
        table.check_model(spec)
        result.predicted_ms = table.schedule_step_ms(spec, result.manifest.schedule)
        here = {**model_fingerprint(spec), **target_fingerprint(host, result.backend, result.device, cfg.threads,
                                                                 result.prepacked, cfg.dtype)}
        mismatches += [m for m in table.mismatches(here) if m not in mismatches]
    if mismatches:
        log.warning("latency table %s was measured on another target or run shape: %s", cfg.latency_table,
                    "; ".join(mismatches))
    return {"path": str(cfg.latency_table), "fingerprint": table.fingerprint, "mismatches": mismatches}
