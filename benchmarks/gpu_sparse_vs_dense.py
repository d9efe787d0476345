"""Benchmark (issue 6): sparse vs dense on one GPU, in one run, per backend mode.

For each model (default: the built-in MNIST DiT, DiT-XL/2 at 256² with CFG, PixArt-α at 256² with
CFG; random weights except MNIST) a ToCa-style schedule at --ratio of the dense MACs and the dense
schedule run on the torch backend in each mode of --modes (default all four), interleaved run by run:

  eager    the step modules called one after another, outputs becoming inputs — how token-cache
           research code runs;
  static   preallocated ping-pong buffers, no host sync between the first and the last step;
  graphed  static + one CUDA graph per (step graph, parity) replayed;
  compiled graphed (static on the CPU) over step modules run through torch.compile, which fuses
           a step's many small ops (compilation, on the first warm-up run, is not timed).

Timing synchronises once per generation (Pipeline.generate(time_steps=False)). Then --step-runs
more interleaved generations per mode time every step (the backend synchronises after each) for
issue 17's refresh-step rule: the median over the sparse schedule's refresh steps of sparse step /
dense step at the same index, target ≤ 1.10. The JSON records the GPU, driver and library versions;
--markdown writes the README table from it.

    python benchmarks/gpu_sparse_vs_dense.py --out out/bench-gpu                 # on a CUDA machine
    python benchmarks/gpu_sparse_vs_dense.py --markdown out/bench-gpu/results.json

With --device cpu it runs the same comparison on the CPU (no graphed mode): how it is tested.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffsparse.builtin_schedules import dense_schedule, toca_schedule
from diffsparse.models.zoo import BUILTINS, make_spec
from diffsparse.runtime.backends.torch_backend import MODES
from diffsparse.runtime.pipeline import Pipeline

log = logging.getLogger("gpu_bench")
# guidance: each listed model's own default (spec.default_guidance_scale); 4.0 for any other
MODELS = {"mnist-dit": dict(batch=10, steps=10), "dit-xl-2": dict(batch=1, steps=50),
          "pixart-alpha-256": dict(batch=1, steps=20)}


def host_info(device: str) -> dict:
    import diffusers
    import onnxruntime

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "onnxruntime": onnxruntime.__version__, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
        info["driver"] = _driver_version()
    return info


def _driver_version() -> str:
    """The NVIDIA driver release: NVML when nvidia-ml-py is installed, else nvidia-smi (torch exposes
    only the CUDA driver API version)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001 - optional dependency, any failure falls through
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def bench_model(name: str, cfg: dict, args) -> dict:
    steps = args.steps or cfg["steps"]
    spec = make_spec(name, batch_size=cfg["batch"], guidance=True)
    schedules = {"sparse": toca_schedule(spec, steps, args.ratio), "dense": dense_schedule(spec, steps)}
    modes = [m for m in args.modes if args.device == "cuda" or m != "graphed"]
    conditioning = spec.example_conditioning(np.random.default_rng(0))
    pipes = {(mode, which): Pipeline.from_spec(spec, sched, args.device, args.dtype, **MODES[mode])
             for mode in modes for which, sched in schedules.items()}
    times: dict[tuple, list[float]] = {key: [] for key in pipes}
    first_run: dict[tuple, float] = {}  # the first generation: loading, CUDA-graph capture, compilation
    outputs = {}
    for run in range(args.warmup + args.runs):
        for key, pipe in pipes.items():  # interleaved: machine noise hits every variant alike
            t0 = time.perf_counter()
            result = pipe.generate(conditioning=conditioning, seed=0, time_steps=False,
                                   guidance_scale=cfg.get("guidance_scale", spec.default_guidance_scale))
            seconds = time.perf_counter() - t0
            first_run.setdefault(key, seconds)
            if run >= args.warmup:
                times[key].append(seconds)
            outputs[key] = result.samples
    step_ms = {key: [] for key in pipes}
    for _ in range(args.step_runs):
        for key, pipe in pipes.items():
            result = pipe.generate(conditioning=conditioning, seed=0, time_steps=True,
                                   guidance_scale=cfg.get("guidance_scale", spec.default_guidance_scale))
            step_ms[key].append([1000 * s for s in result.step_seconds])
    macs = {which: spec.schedule_macs(s) for which, s in schedules.items()}
    out = {"model": name, "batch_size": cfg["batch"], "guidance": True, "steps": steps, "dtype": args.dtype,
           "macs": macs, "macs_speedup": macs["dense"] / macs["sparse"], "modes": {}}
    for mode in modes:
        sparse, dense = (statistics.median(times[(mode, w)]) for w in ("sparse", "dense"))
        out["modes"][mode] = {"sparse_ms": 1000 * sparse, "dense_ms": 1000 * dense, "speedup": dense / sparse,
                              "efficiency": dense / sparse / out["macs_speedup"],
                              "runs_ms": {w: [1000 * t for t in times[(mode, w)]] for w in ("sparse", "dense")},
                              "first_run_ms": {w: 1000 * first_run[(mode, w)] for w in ("sparse", "dense")}}
        if args.step_runs:
            out["modes"][mode].update(refresh_rule(schedules, step_ms[(mode, "sparse")], step_ms[(mode, "dense")]))
    # the modes compute the same thing: their outputs must agree (fp32 rounding aside)
    for which in ("sparse", "dense"):
        ref = outputs[(modes[0], which)]
        out[f"max_abs_diff_between_modes_{which}"] = max(
            float(np.abs(outputs[(m, which)] - ref).max()) for m in modes)
    log.info("%s: %s", name, {m: round(v["speedup"], 3) for m, v in out["modes"].items()})
    return out


def refresh_rule(schedules: dict, sparse_runs: list[list[float]], dense_runs: list[list[float]]) -> dict:
    """Per computed step the median step time of each schedule, and the refresh-step rule: the
    median over the sparse schedule's refresh steps t of sparse(t) / dense(t) (the dense schedule
    computes every step, so its step t is its t-th computed step)."""
    sparse, dense = schedules["sparse"], schedules["dense"]
    sparse_ms = np.median(np.asarray(sparse_runs), axis=0)
    dense_ms = np.median(np.asarray(dense_runs), axis=0)
    if dense.computed_steps != list(range(dense.num_steps)):
        raise ValueError("the dense schedule skips steps: no dense step to compare a refresh step with")
    refresh = [(k, t) for k, t in enumerate(sparse.computed_steps) if sparse.full_steps[t]]
    ratios = [float(sparse_ms[k] / dense_ms[t]) for k, t in refresh]
    return {"step_ms": {"sparse": sparse_ms.tolist(), "dense": dense_ms.tolist()},
            "refresh_steps": [t for _, t in refresh], "refresh_vs_dense_per_step": ratios,
            "refresh_vs_dense": statistics.median(ratios) if ratios else None}


def markdown(results: dict) -> str:
    h = results["host"]
    where = h.get("gpu", "CPU") + (f", driver {h['driver']}" if "driver" in h else "")
    lines = [f"Measured on {where}; torch {h['torch']} (CUDA {h['cuda']}), {results['dtype']}, "
             f"median of {results['runs']} interleaved runs, ToCa-style schedule at {results['ratio']:.2f} of the "
             f"dense MACs. Command: `{results['command']}`.", "",
             "| model | steps | MACs speed-up | mode | sparse (ms) | dense (ms) | speed-up | speed-up / MACs speed-up "
             "| refresh step / dense step |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results["models"]:
        for mode, v in r["modes"].items():
            lines.append(f"| {r['model']} | {r['steps']} | {r['macs_speedup']:.2f}× | {mode} | {v['sparse_ms']:.1f} | "
                         f"{v['dense_ms']:.1f} | {v['speedup']:.2f}× | {v['efficiency']:.2f} | "
                         f"{_ratio(v.get('refresh_vs_dense'))} |")
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"built-in models (default {list(MODELS)})")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=None, help="override every model's step count")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--step-runs", type=int, default=5,
                   help="per mode, generations timed step by step for the refresh-step rule (0: none)")
    p.add_argument("--out", default="out/bench-gpu")
    p.add_argument("--markdown", default=None, metavar="RESULTS_JSON", help="print the table of a results file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU visible to torch: run on a GPU machine, or pass --device cpu")
    unknown = [m for m in args.models if m not in BUILTINS]
    if unknown:
        p.error(f"unknown built-in model(s) {unknown}; choose from {sorted(BUILTINS)}")
    results = {"host": host_info(args.device), "dtype": args.dtype, "ratio": args.ratio, "runs": args.runs,
               "command": "python benchmarks/gpu_sparse_vs_dense.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "models": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        cfg = dict(MODELS.get(name, dict(batch=1, steps=20, guidance_scale=4.0)))
        if args.batch:
            cfg["batch"] = args.batch
        results["models"].append(bench_model(name, cfg, args))
        # after every model: a run cut short keeps what it measured
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
