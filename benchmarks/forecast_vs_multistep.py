"""Where the forecasting skip's gain comes from: fewer steps three ways at the same NFE (issue 19).

On the built-in MNIST DiT, n computed steps of the T-step DDIM grid (spread as `fewer-steps`
spreads them), 1,000 samples (100 per class, `initial_noise` seed 0, the model's guidance):

    reuse     skipped steps reuse the last model output = DDIM on the sub-grid (the baseline);
    forecast  skipped steps run on x0 extrapolated from the last two computed steps
              (`DDIMSampler(skip_forecast=True)`, what `dsexport --skip-forecast` bakes in);
    dpmpp_2m  DPM-Solver++(2M), diffusers' multistep solver, on its own n-step grid with the
              same training noise schedule and spacing: a second-order solver at the same NFE,
              the fair reference for a forecast (it is not a diffsparse schedule: the DiT family
              samples with DDIM).

Every variant runs the same PyTorch model with the project's sampler arithmetic
(`diffsparse.sampler`), so only the update differs; accuracy and MNIST-FID as dseval computes them.

    python benchmarks/forecast_vs_multistep.py --steps 20 --computed 4 6 10 --out benchmarks/results/forecast_vs_multistep.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffsparse.builtin_schedules import fewer_steps_schedule
from diffsparse.mnist.dataset import load_mnist_test
from diffsparse.mnist.metrics import evaluate_images, require_classifier
from diffsparse.mnist.recipe import NULL_CLASS
from diffsparse.models.zoo import make_spec
from diffsparse.sampler import Sampler, initial_noise, sampler_config


@torch.no_grad()
def sample(spec, sampler: Sampler, num_steps: int, computed: list[bool] | None, labels: np.ndarray,
           guidance: float, batch: int = 250) -> np.ndarray:
    plan = sampler.plan(num_steps, computed=computed)
    noise = initial_noise(0, len(labels), spec.latent_shape)
    out = []
    for s in range(0, len(labels), batch):
        y = torch.from_numpy(labels[s:s + batch])
        x = torch.from_numpy(noise[s:s + batch])
        rows = torch.cat([y, torch.full_like(y, NULL_CLASS)])
        state = [torch.zeros_like(x) for _ in sampler.state]
        for t, coef in zip(plan.timesteps, torch.from_numpy(plan.coefficients)):
            eps = spec.model(torch.cat([x, x]), timestep=torch.full((len(rows),), int(t)), class_labels=rows).sample
            cond, uncond = eps.chunk(2)
            x, state = sampler.update(x, uncond + guidance * (cond - uncond), coef, state)
        out.append(x.clamp(-1, 1).numpy())
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="T, the grid the computed steps are taken from")
    p.add_argument("--computed", type=int, nargs="+", default=[4, 6, 10], help="n computed steps (NFE)")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/forecast_vs_multistep.json")
    args = p.parse_args()
    require_classifier()
    torch.set_num_threads(args.threads)
    spec = make_spec("mnist-dit", batch_size=1)
    guidance = spec.resolve_guidance_scale(None)
    ddim = spec.sampler
    settings = ddim.scheduler_settings()
    dpm = sampler_config("dpmpp_2m", {k: settings[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                                 "beta_schedule", "timestep_spacing", "steps_offset")})
    labels = np.tile(np.arange(10), args.n_per_class)
    real, _ = load_mnist_test()
    rows = []
    for n in args.computed:
        computed = fewer_steps_schedule(spec, args.steps, n / args.steps).computed
        variants = {"reuse": (ddim, args.steps, computed),
                    "forecast": (dataclasses.replace(ddim, skip_forecast=True), args.steps, computed),
                    "dpmpp_2m": (dpm, n, None)}
        for name, (sampler, steps, comp) in variants.items():
            t0 = time.perf_counter()
            images = sample(spec, sampler, steps, comp, labels, guidance)
            res = evaluate_images(images, labels, real_images=real)
            rows.append({"variant": name, "steps": args.steps, "computed": n, "accuracy": res["accuracy"],
                         "fid": res["fid"], "seconds": time.perf_counter() - t0})
            print(f"T={args.steps} n={n} {name:9s} accuracy {res['accuracy']:.3f} FID {res['fid']:.1f}", flush=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/forecast_vs_multistep.py "
                                          f"--steps {args.steps} --computed {' '.join(map(str, args.computed))}",
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
