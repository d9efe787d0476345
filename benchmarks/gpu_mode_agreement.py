"""Diagnostic (issue 17, GPU): do the torch backend's modes agree step by step, and what does one
step launch on the GPU?

For one built-in model and a ToCa-style schedule at --ratio, per --dtypes: the eager, static and
graphed sparse pipelines step through one generation side by side, and after every computed step
the latents of static and graphed are compared with eager's (max |difference|, and the first step
where it passes --tolerance). The dense schedule is compared the same way. Then torch.profiler
counts the CUDA kernels one static step of each kind launches (refresh, partial, dense: the step
and the writes of its outputs into the buffers, what a CUDA graph of it replays) and sums their
device time, next to that step's wall-clock time in graphed mode: a step whose wall-clock time is
near its kernel count × a few µs is bound by kernel count, not by MACs. (Before 2026-12-04 night
the count was of an eager step, which writes no buffers: `gpu_h200_mode_agreement.json`.)
--kernels-only skips the comparison (a minute instead of several at DiT-XL/2).

    python benchmarks/gpu_mode_agreement.py --model dit-xl-2 --out out/gpu-agreement   # on a CUDA machine
    python benchmarks/gpu_mode_agreement.py --model dit-xl-2 --dtypes float16 --kernels-only --out out/gpu-kernels
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from diffsparse.builtin_schedules import dense_schedule, toca_schedule
from diffsparse.models.base import StepCall
from diffsparse.models.zoo import make_spec
from diffsparse.runtime.backends.torch_backend import MODES
from diffsparse.runtime.pipeline import Pipeline
from diffsparse.sampler import initial_noise

log = logging.getLogger("gpu_mode_agreement")
#: the modes compared (torch_backend.MODES): compilation rounds differently, so it is left out
COMPARED = ("eager", "static", "graphed")


def step_feeds(pipe: Pipeline, conditioning: dict, guidance: float) -> list[dict]:
    return [pipe.spec.feeds(StepCall(float(pipe.plan.timesteps[i]), pipe.plan.coefficients[i]), conditioning, guidance)
            for i in range(len(pipe.step_graphs))]


def agreement(pipes: dict[str, Pipeline], conditioning: dict, guidance: float, tolerance: float) -> dict:
    """Per mode other than eager: max |latent - eager latent| after each computed step."""
    feeds = step_feeds(pipes["eager"], conditioning, guidance)
    spec = pipes["eager"].spec
    latents = {}
    for mode, pipe in pipes.items():
        backend = pipe.backend
        backend.start(initial_noise(0, spec.batch_size, spec.latent_shape))
        latents[mode] = []
        for graph, f in zip(pipe.step_graphs, feeds):
            backend.run_step(graph, f)
            latents[mode].append(backend.latent())
    out = {}
    for mode in pipes:
        if mode == "eager":
            continue
        diffs = [float(np.abs(a - b).max()) for a, b in zip(latents[mode], latents["eager"])]
        first = next((k for k, d in enumerate(diffs) if d > tolerance), None)
        out[mode] = {"max_abs_diff_per_step": diffs, "first_step_over_tolerance": first}
    out["latent_abs_max"] = float(np.abs(latents["eager"][-1]).max())
    return out


def kernels(pipe: Pipeline, graph_pipe: Pipeline, conditioning: dict, guidance: float, steps: list[int],
            repeats: int = 5) -> dict:
    """For computed steps `steps`: CUDA kernels one step of `pipe` (static buffers, not captured)
    launches and their summed device time, and the median wall-clock time of the same step replayed
    as a CUDA graph (synchronised)."""
    feeds = step_feeds(pipe, conditioning, guidance)
    spec = pipe.spec
    result = {}
    for which, p in (("profiled", pipe), ("graphed", graph_pipe)):
        backend = p.backend
        for _ in range(2):  # the second pass: captured graphs, warm allocator
            backend.start(initial_noise(0, spec.batch_size, spec.latent_shape))
            wall = {k: [] for k in steps}
            for k, (graph, f) in enumerate(zip(p.step_graphs, feeds)):
                if which == "profiled" and k in steps:
                    torch.cuda.synchronize()
                    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                        backend.run_step(graph, f)
                        torch.cuda.synchronize()
                    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                    result.setdefault(k, {})["kernels"] = len(events)
                    result[k]["kernel_ms"] = sum(e.device_time for e in events) / 1000
                    continue
                if which == "graphed" and k in steps:
                    # repeating a step moves the ping-pong state on; only its time is kept
                    for _ in range(repeats):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        backend.run_step(graph, f)
                        torch.cuda.synchronize()
                        wall[k].append(1000 * (time.perf_counter() - t0))
                    continue
                backend.run_step(graph, f)
            if which == "graphed":
                for k in steps:
                    result[k]["graphed_wall_ms"] = statistics.median(wall[k])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit-xl-2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    p.add_argument("--tolerance", type=float, default=1e-2)
    p.add_argument("--out", default="out/gpu-agreement")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: eager and static only, no kernel counts (how the script is tested)")
    p.add_argument("--kernels-only", action="store_true", help="count kernels (last of --dtypes) without comparing modes")
    args = p.parse_args(argv)
    if args.kernels_only and args.device != "cuda":
        p.error("--kernels-only counts CUDA kernels: run it with --device cuda")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU visible to torch: run on a GPU machine")
    spec = make_spec(args.model, batch_size=1, guidance=True)
    schedules = {"sparse": toca_schedule(spec, args.steps, args.ratio), "dense": dense_schedule(spec, args.steps)}
    conditioning = {k: v[:1] for k, v in spec.example_conditioning(np.random.default_rng(0)).items()}
    guidance = spec.default_guidance_scale
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = {"model": args.model, "steps": args.steps, "device": device_name, "torch": torch.__version__,
               "full_steps": schedules["sparse"].full_steps, "agreement": {}, "kernels": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = ("static", "graphed") if args.kernels_only else COMPARED
    for dtype in args.dtypes[-1:] if args.kernels_only else args.dtypes:
        for which, sched in schedules.items():
            pipes = {mode: Pipeline.from_spec(spec, sched, args.device, dtype, **MODES[mode]) for mode in modes
                     if args.device == "cuda" or mode != "graphed"}
            if not args.kernels_only:
                results["agreement"][f"{which}/{dtype}"] = agreement(pipes, conditioning, guidance, args.tolerance)
                log.info("%s %s: %s", which, dtype, {m: v["first_step_over_tolerance"]
                                                     for m, v in results["agreement"][f"{which}/{dtype}"].items()
                                                     if isinstance(v, dict)})
            if dtype == args.dtypes[-1] and args.device == "cuda":
                steps = [0, 1, 2] if which == "sparse" else [0, 1]
                (out / "results.json").write_text(json.dumps(results, indent=1))
                results["kernels"][which] = kernels(pipes["static"], pipes["graphed"], conditioning, guidance, steps)
                log.info("kernels %s: %s", which, results["kernels"][which])
            del pipes
            if args.device == "cuda":
                torch.cuda.empty_cache()
            (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results["kernels"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
