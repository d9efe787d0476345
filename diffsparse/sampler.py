"""Samplers whose per-step update runs inside the exported step graph.

Why inside the graph: the runtime then passes the latent from one step's output straight to the
next step's input (device-side, no host round trip), and each step graph takes its step-specific
constants as a small input tensor, so steps with the same sparsity pattern share one graph.

DDIM (eta = 0, epsilon prediction), bit-for-bit the arithmetic of diffusers' `DDIMScheduler.step`:
    x0   = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)          [clipped to ±r if clip_sample]
    x_t' = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps
with coefficients [sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev)] per step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


class SamplerError(ValueError):
    pass


@dataclass(frozen=True)
class DDIMConfig:
    """The DDIMScheduler settings we support (defaults are diffusers' DiT pipeline ones).

    num_train_timesteps, beta_start, beta_end, beta_schedule: the training noise schedule.
    clip_sample / clip_sample_range: clamp the predicted x0 (useful in pixel space).
    set_alpha_to_one: alpha used after the last step (1.0, or alphas_cumprod[0]).
    steps_offset, timestep_spacing: how inference timesteps are spread (diffusers semantics).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> DDIMConfig:
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise SamplerError(f"prediction_type {config['prediction_type']!r} is not yet supported (epsilon only)")
        if config.get("thresholding", False):
            raise SamplerError("dynamic thresholding is not yet supported; use clip_sample instead")
        if config.get("rescale_betas_zero_snr", False):
            raise SamplerError("rescale_betas_zero_snr is not yet supported")
        fields = cls.__dataclass_fields__
        return cls(**{k: config[k] for k in fields if k in config})

    def scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler(**asdict(self), prediction_type="epsilon")


@dataclass(frozen=True)
class SamplerPlan:
    """What the runtime feeds each step: the model timestep and the update coefficients."""

    kind: str
    timesteps: np.ndarray          # (T,) model timesteps, float32
    coefficients: np.ndarray       # (T, 4) float32
    clip_sample_range: float | None
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "timesteps": self.timesteps.tolist(),
                "coefficients": self.coefficients.tolist(),
                "clip_sample_range": self.clip_sample_range, "config": dict(self.config)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplerPlan:
        return cls(kind=data["kind"], timesteps=np.asarray(data["timesteps"], dtype=np.float32),
                   coefficients=np.asarray(data["coefficients"], dtype=np.float32),
                   clip_sample_range=data.get("clip_sample_range"), config=dict(data.get("config", {})))


def ddim_plan(config: DDIMConfig, num_steps: int) -> SamplerPlan:
    """Timesteps and coefficients exactly as `DDIMScheduler.set_timesteps` + `step` compute them."""
    sched = config.scheduler()
    sched.set_timesteps(num_steps)
    acp = sched.alphas_cumprod.to(torch.float32)
    final = sched.final_alpha_cumprod.to(torch.float32)
    stride = config.num_train_timesteps // num_steps
    coefs = []
    for t in sched.timesteps.tolist():
        prev = t - stride
        a_t = acp[t]
        a_prev = acp[prev] if prev >= 0 else final
        coefs.append([a_t.sqrt(), (1 - a_t).sqrt(), a_prev.sqrt(), (1 - a_prev).sqrt()])
    coefficients = torch.tensor(coefs, dtype=torch.float32).numpy()
    return SamplerPlan(kind="ddim", timesteps=sched.timesteps.numpy().astype(np.float32),
                       coefficients=coefficients,
                       clip_sample_range=float(config.clip_sample_range) if config.clip_sample else None,
                       config=asdict(config))


def ddim_update(sample: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor,
                clip_sample_range: float | None) -> torch.Tensor:
    """One DDIM step (eta = 0) with coef = [sqrt(a_t), sqrt(1-a_t), sqrt(a_prev), sqrt(1-a_prev)]."""
    x0 = (sample - coef[1] * eps) / coef[0]
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    return coef[2] * x0 + coef[3] * eps


def initial_noise(seed: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """Starting latents (count, *shape) for a seed, the same on every backend and batch size:
    sample i is drawn from its own NumPy PCG64 stream seeded with (seed, i)."""
    return np.stack([np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
                     for i in range(count)]) if count else np.zeros((0, *shape), np.float32)
