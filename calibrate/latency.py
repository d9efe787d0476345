"""dscalibrate latency: measure what each cacheable layer and each step kind costs on this target.

    dscalibrate latency --model mnist-dit --batch 10 --out out/latency-mnist-dit.json

Exports two bundles of the model (into a temporary folder, removed afterwards) and times them on
the chosen backend, interleaved, with medians over `--runs` generations:

- a *calibration* bundle whose steps are: a refresh step (every token); a partial step with every
  layer at K = 0 (FORA-style reuse: the partial step's fixed cost); for each layer kind κ and each
  candidate K > 0, a step with the layers of kind κ at K and every other layer at 0; a second
  refresh step. Each step is a real exported step graph, run by the real runtime.
- the plain *dense* bundle (the model without the token cache): what a dense step costs.

From the per-step medians m: partial_fixed_ms = m(all 0); c(κ, K) = (m(κ at K) − m(all 0)) / n_κ
with n_κ layers of kind κ (clipped at 0: at small K the difference is within noise); refresh_ms
= the mean of the two refresh steps; dense_step_ms = the median dense step. The table's cost
model is diffsparse/latency_table.py's; `dsprofile --latency-table` compares its predictions with
measured steps.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from diffsparse.export.bundle import ExportConfig, ExportError, export_bundle
from diffsparse.runtime.backends import BackendError
from diffsparse.runtime.backends.ort import PREPACK_MODES, uniform_prepack
from diffsparse.runtime.bundle import Bundle
from diffsparse.runtime.profile import ProfileConfig, profile

from diffsparse.builtin_schedules import dense_schedule
from diffsparse.latency_table import KindLatency, LatencyTable, LatencyTableError, model_fingerprint
from diffsparse.manifest import BundleError
from diffsparse.models.base import ModelSpec, SpecError
from diffsparse.models.zoo import ModelSourceError, make_spec
from diffsparse.schedule import DEFAULT_CANDIDATES, Schedule, ScheduleError, provenance

log = logging.getLogger("dscalibrate.latency")


@dataclass
class LatencyCalibration:
    """What `calibrate_latency` measures on. runs/warmup: timed and untimed generations per bundle
    (interleaved, medians); backend/device/threads/prepack: as for `Pipeline.from_bundle` (record
    the setting the deployed bundles will run with: the table's fingerprint says which it was)."""

    model: str = "mnist-dit"
    batch_size: int = 1
    guidance: bool = True
    candidates: tuple[float, ...] = DEFAULT_CANDIDATES
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None
    prepack: str = "auto"
    runs: int = 7
    warmup: int = 1
    seed: int = 0
    dense_steps: int = 3


def calibration_schedule(spec: ModelSpec, candidates: tuple[float, ...]) -> tuple[Schedule, list[tuple[str, int]]]:
    """The calibration bundle's schedule and, per step, what it measures: ("refresh", N),
    ("fixed", 0) or (kind, K)."""
    dense = spec.dense_keep()
    zero = [0] * len(spec.layers)
    rows, labels = [dense, zero], [("refresh", spec.num_tokens), ("fixed", 0)]
    kinds = list(dict.fromkeys(layer.kind for layer in spec.layers))
    for kind in kinds:
        for frac in sorted(set(candidates)):
            ks = [int(round(frac * spec.layer_tokens(layer))) for layer in spec.layers]
            row = [k if layer.kind == kind else 0 for layer, k in zip(spec.layers, ks)]
            if frac > 0 and row not in rows:
                rows.append(row)
                labels.append((kind, int(round(frac * spec.num_tokens))))
    rows.append(dense)
    labels.append(("refresh", spec.num_tokens))
    sched = Schedule(family=spec.family, num_tokens=spec.num_tokens, layers=spec.layers, keep=rows,
                     layer_tokens=spec.dense_keep(), candidates=tuple(candidates), selector=spec.default_selector(),
                     provenance=provenance("latency-calibration"))
    return sched, labels


def table_from_medians(spec: ModelSpec, labels: list[tuple[str, int]], step_ms: list[float], dense_ms: list[float],
                       candidates: tuple[float, ...], fingerprint: dict[str, Any]) -> LatencyTable:
    """The table from the calibration bundle's per-step medians (module docstring)."""
    if len(labels) != len(step_ms):
        raise ValueError(f"{len(step_ms)} step latencies for {len(labels)} calibration steps")
    fixed = step_ms[labels.index(("fixed", 0))]
    refresh = statistics.fmean(ms for (what, _), ms in zip(labels, step_ms) if what == "refresh")
    counts = Counter(layer.kind for layer in spec.layers)
    kinds = {}
    for kind, n_kind in counts.items():
        measured = {k: ms for (what, k), ms in zip(labels, step_ms) if what == kind}
        tokens = sorted({0, *(int(round(f * spec.num_tokens)) for f in candidates)})
        missing = [k for k in tokens if k and k not in measured]
        if missing:
            raise ValueError(f"no calibration step measured {kind} layers at K={missing}")
        kinds[kind] = KindLatency(tuple(tokens), tuple(0.0 if k == 0 else max(0.0, (measured[k] - fixed) / n_kind)
                                                        for k in tokens))
    samples = {"steps": [{"measures": what, "tokens": k, "ms": ms} for (what, k), ms in zip(labels, step_ms)],
               "dense_steps_ms": dense_ms}
    return LatencyTable(fingerprint=fingerprint, kinds=kinds, partial_fixed_ms=fixed, refresh_ms=refresh,
                        dense_step_ms=statistics.median(dense_ms), samples=samples)


def _reusable(folder: Path, schedule: Schedule, spec: ModelSpec) -> bool:
    """Whether `folder` already holds this calibration bundle (same schedule, batch and guidance)."""
    try:
        m = Bundle(folder, verify=False).manifest
    except BundleError:
        return False
    return (m.schedule.keep == schedule.keep and m.schedule.skip == schedule.skip and m.batch_size == spec.batch_size
            and m.guidance == spec.guidance)


def calibrate_latency(cfg: LatencyCalibration, work: str | Path | None = None, bundles: str | Path | None = None,
                      progress: bool = False) -> LatencyTable:
    """Export the calibration and dense bundles, time them interleaved and return the table. The
    bundles go to a temporary folder in `work`, removed afterwards; or to `bundles`, where they are
    kept, and reused by a later calibration of the same model and shape (timing again without
    exporting again)."""
    spec = make_spec(cfg.model, batch_size=cfg.batch_size, guidance=cfg.guidance, streamed_weights=True)
    sched, labels = calibration_schedule(spec, cfg.candidates)
    if bundles is not None:
        Path(bundles).mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(bundles)) if bundles is not None
          else tempfile.TemporaryDirectory(prefix="dscalibrate-", dir=work)) as tmp:
        folders = {}
        for name, schedule in (("calibration", sched), ("dense", dense_schedule(spec, cfg.dense_steps))):
            folders[name] = Path(tmp) / name
            if _reusable(folders[name], schedule, spec):
                log.info("reusing the %s bundle in %s", name, folders[name])
                continue
            log.info("exporting the %s bundle (%d steps)", name, schedule.num_steps)
            export_bundle(spec, schedule, folders[name], source={"model": cfg.model, "seed": cfg.seed},
                          config=ExportConfig(verify=False, overwrite=True))
        # one packing setting for every graph: a table mixing packed and unpacked entries would
        # misprice whichever steps a schedule draws from the other kind
        calibration = Bundle(folders["calibration"])   # opened once: profile() takes it as it is
        prepack = uniform_prepack(cfg.prepack, calibration.manifest.steps_per_graph,
                                  int(calibration.manifest.weights["bytes"]), cfg.device)
        log.info("timing %d generations of each bundle, interleaved (pre-packing %s)", cfg.runs, prepack)
        with tqdm(total=cfg.runs, desc="dscalibrate latency", unit="run", disable=not progress) as bar:
            report = profile(calibration, folders["dense"],
                             ProfileConfig(runs=cfg.runs, warmup=cfg.warmup, backend=cfg.backend, device=cfg.device,
                                           threads=cfg.threads, prepack=prepack, seed=cfg.seed, memory=False),
                             progress=bar.update)
    host = report.host
    fingerprint = {**model_fingerprint(spec), "model": cfg.model, "backend": report.sparse.backend,
                   "device": report.sparse.device, "cpu": host.get("cpu"), "cores": host.get("cores"),
                   "threads": cfg.threads, "prepacked": report.sparse.prepacked, "dtype": "float32",
                   "onnxruntime": host.get("onnxruntime"), "torch": host.get("torch"),
                   "guidance_scale": spec.resolve_guidance_scale(None),
                   "config": {**asdict(cfg), "candidates": list(cfg.candidates)}}   # JSON-clean: loads back equal
    return table_from_medians(spec, labels, report.sparse.per_step_ms, report.baseline.per_step_ms,
                              cfg.candidates, fingerprint)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LatencyCalibration()
    p.add_argument("--model", default=d.model, help="built-in name or local diffusers folder (default %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch_size, help="samples per run, as the bundles will be exported")
    p.add_argument("--no-guidance", action="store_true", help="bundles without classifier-free guidance")
    p.add_argument("--candidates", default=",".join(str(c) for c in d.candidates),
                   help="the schedule's candidate set S, fractions of N (default %(default)s)")
    p.add_argument("--backend", default=d.backend, choices=["onnxruntime", "torch"])
    p.add_argument("--device", default=d.device, choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the backend's)")
    p.add_argument("--prepack", default=d.prepack, choices=PREPACK_MODES,
                   help="ONNX Runtime weight pre-packing, as the deployed bundles will run (default %(default)s)")
    p.add_argument("--runs", type=int, default=d.runs, help="timed generations per bundle (medians; default %(default)s)")
    p.add_argument("--bundles", default=None,
                   help="keep the calibration and dense bundles in this folder (reused by a later run of the same "
                        "model and shape); default: a temporary folder, removed")
    p.add_argument("--out", required=True, help="latency table JSON to write")


def run(args: argparse.Namespace) -> int:
    try:
        candidates = tuple(float(x) for x in args.candidates.split(","))
    except ValueError:
        print(f"dscalibrate latency: error: --candidates must be comma-separated fractions, got {args.candidates!r}",
              file=sys.stderr)
        return 2
    cfg = LatencyCalibration(model=args.model, batch_size=args.batch, guidance=not args.no_guidance,
                             candidates=candidates, backend=args.backend, device=args.device, threads=args.threads,
                             prepack=args.prepack, runs=args.runs)
    out = Path(args.out)
    if cfg.runs < 1 or 0.0 not in cfg.candidates or 1.0 not in cfg.candidates:
        print("dscalibrate latency: error: --runs must be >= 1 and --candidates must include 0 and 1", file=sys.stderr)
        return 2
    if not out.parent.is_dir():
        print(f"dscalibrate latency: error: {out.parent} is not a folder; create it first", file=sys.stderr)
        return 2
    try:
        table = calibrate_latency(cfg, work=out.parent, bundles=args.bundles, progress=sys.stderr.isatty())
    except (ModelSourceError, SpecError, ScheduleError, ExportError, BundleError, BackendError, LatencyTableError) as e:
        print(f"dscalibrate latency: error: {e}", file=sys.stderr)
        return 2
    table.save(out)
    kinds = ", ".join(f"{k}: " + " ".join(f"K={t} {ms:.2f}" for t, ms in zip(v.tokens, v.ms)) for k, v in table.kinds.items())
    print(f"wrote {out}: dense step {table.dense_step_ms:.2f} ms, refresh {table.refresh_ms:.2f} ms, "
          f"partial fixed {table.partial_fixed_ms:.2f} ms; per layer (ms) {kinds}")
    return 0
