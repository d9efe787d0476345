"""Samplers whose per-step update runs inside the exported step graph.

Three kinds, one interface (`kind`, `from_scheduler_config`, `plan`, `update`, `state`):
  * ``ddim``       DDIM, eta = 0, epsilon prediction (DiT);
  * ``dpmpp_2m``   DPM-Solver++ multistep, order 2, midpoint (PixArt-α);
  * ``flow_euler`` flow-matching Euler (FLUX.1, Wan2.1).
Every update is linear in (sample, model output, sampler state) with per-step coefficients that
the plan computes once on the host from diffusers' own scheduler, so the graph only multiplies
and adds. Multistep state (DPM-Solver++'s previous x0) travels with the token cache.

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


# ---- one interface for all kinds ---------------------------------------------------------------
# DDIM keeps its original free functions (ddim_plan / ddim_update); these methods make it fit the
# same interface as the other kinds.
DDIMConfig.kind = "ddim"
DDIMConfig.state = ()
DDIMConfig.num_coefficients = 4
DDIMConfig.plan = lambda self, num_steps, image_seq_len=None: ddim_plan(self, num_steps)


def _ddim_update(self, sample, model_output, coef, state):
    clip = self.clip_sample_range if self.clip_sample else None
    return ddim_update(sample, model_output, coef, clip), []


DDIMConfig.update = _ddim_update


def _check_prediction(config: dict[str, Any], expected: str) -> None:
    if config.get("prediction_type", expected) != expected:
        raise SamplerError(f"prediction_type {config['prediction_type']!r} is not yet supported ({expected} only)")


@dataclass(frozen=True)
class DPMSolverConfig:
    """DPM-Solver++ (data prediction), multistep order 2 with the midpoint rule — diffusers'
    `DPMSolverMultistepScheduler` defaults as PixArt-α's pipeline uses them. Epsilon prediction.

    lower_order_final: first-order last step(s) when fewer than 15 steps (diffusers' rule).
    final_sigmas_type: "zero" ends exactly at sigma 0 (first-order last step), or "sigma_min".
    """

    kind = "dpmpp_2m"
    state = ("prev_x0",)
    num_coefficients = 5

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> DPMSolverConfig:
        _check_prediction(config, "epsilon")
        unsupported = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "thresholding": False,
                       "use_karras_sigmas": False, "use_lu_lambdas": False, "use_exponential_sigmas": False,
                       "use_beta_sigmas": False, "use_flow_sigmas": False, "variance_type": None}
        for key, ok in unsupported.items():
            if config.get(key, ok) != ok:
                raise SamplerError(f"DPM-Solver {key}={config[key]!r} is not yet supported (only {ok!r})")
        if int(config.get("solver_order", 2)) > 2:
            raise SamplerError("DPM-Solver order 3 is not yet supported; use solver_order 2")
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})

    def scheduler(self):
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(**asdict(self), algorithm_type="dpmsolver++", solver_order=2,
                                           solver_type="midpoint", prediction_type="epsilon")

    def plan(self, num_steps: int, image_seq_len: int | None = None) -> SamplerPlan:
        """coefficients (T, 5) = [alpha_s, sigma_s, c_sample, c_x0, c_prev]:
        x0 = (x - sigma_s eps) / alpha_s;  x' = c_sample x + c_x0 x0 + c_prev x0_prev."""
        sched = self.scheduler()
        sched.set_timesteps(num_steps)
        sigmas = sched.sigmas.double()
        alpha, sigma = sched._sigma_to_alpha_sigma_t(sigmas)
        with np.errstate(divide="ignore"):
            lam = (torch.log(alpha) - torch.log(sigma)).numpy()  # +inf at a zero final sigma
        alpha, sigma = alpha.numpy(), sigma.numpy()
        n = len(sched.timesteps)
        coefs = []
        for i in range(n):
            a_t, s_t, s_s0 = alpha[i + 1], sigma[i + 1], sigma[i]
            h = lam[i + 1] - lam[i]
            phi = a_t * (np.exp(-h) - 1.0)  # -> -a_t when the next sigma is zero
            last = i == n - 1 and (self.euler_at_final or (self.lower_order_final and n < 15)
                                   or self.final_sigmas_type == "zero")
            second_last = i == n - 2 and self.lower_order_final and n < 15
            first_order = i == 0 or last
            c_sample = s_t / s_s0
            if first_order:
                c_x0, c_prev = -phi, 0.0
            else:
                # D0 = x0, D1 = (x0 - x0_prev) / r0; x' = c x - phi D0 - phi/2 D1
                r0 = (lam[i] - lam[i - 1]) / h
                c_x0, c_prev = -phi - 0.5 * phi / r0, 0.5 * phi / r0
            del second_last  # order 2 is the maximum here, so diffusers' "lower order second" is a no-op
            coefs.append([alpha[i], sigma[i], c_sample, c_x0, c_prev])
        return SamplerPlan(kind=self.kind, timesteps=sched.timesteps.numpy().astype(np.float32),
                           coefficients=np.asarray(coefs, dtype=np.float32), clip_sample_range=None,
                           config=asdict(self))

    def update(self, sample, model_output, coef, state):
        x0 = (sample - coef[1] * model_output) / coef[0]
        return coef[2] * sample + coef[3] * x0 + coef[4] * state[0], [x0]


@dataclass(frozen=True)
class FlowMatchConfig:
    """Flow-matching Euler (diffusers' `FlowMatchEulerDiscreteScheduler`): x' = x + (σ' − σ)·v.

    shift: the static time shift σ ← shift·σ / (1 + (shift − 1)·σ) (FLUX.1-schnell 1.0; Wan2.1
        uses 3.0 at 480p and 5.0 at 720p, as `flow_shift`).
    use_dynamic_shifting and base/max_shift, base/max_image_seq_len: FLUX.1-dev's resolution-
        dependent shift mu, computed from the image token count the way FluxPipeline does.
    schnell_sigmas: FluxPipeline's linspace(1, 1/T, T) sigmas before shifting (otherwise the
        scheduler's own spacing).
    """

    kind = "flow_euler"
    state = ()
    num_coefficients = 2

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    schnell_sigmas: bool = True

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> FlowMatchConfig:
        _check_prediction(config, "flow_prediction")
        config = dict(config)
        if "flow_shift" in config and "shift" not in config:  # Wan's UniPC / DPM configs
            config["shift"] = config["flow_shift"]
        for key in ("invert_sigmas", "stochastic_sampling", "use_karras_sigmas", "use_exponential_sigmas",
                    "use_beta_sigmas"):
            if config.get(key, False):
                raise SamplerError(f"flow-matching {key}=True is not yet supported")
        if config.get("time_shift_type", "exponential") != "exponential":
            raise SamplerError("flow-matching time_shift_type 'linear' is not yet supported")
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        fields = {k: v for k, v in asdict(self).items() if k != "schnell_sigmas"}
        return FlowMatchEulerDiscreteScheduler(**fields)

    def mu(self, image_seq_len: int | None) -> float | None:
        if not self.use_dynamic_shifting:
            return None
        if image_seq_len is None:
            raise SamplerError("dynamic shifting needs the image token count")
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * slope + self.base_shift - slope * self.base_image_seq_len

    def plan(self, num_steps: int, image_seq_len: int | None = None) -> SamplerPlan:
        """coefficients (T, 2) = [σ, σ' − σ]; the timesteps are diffusers' (σ·1000)."""
        sched = self.scheduler()
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps) if self.schnell_sigmas else None
        sched.set_timesteps(num_steps, sigmas=sigmas, mu=self.mu(image_seq_len))
        s = sched.sigmas.to(torch.float32).numpy()
        coefs = np.stack([s[:-1], s[1:] - s[:-1]], axis=1).astype(np.float32)
        return SamplerPlan(kind=self.kind, timesteps=sched.timesteps.numpy().astype(np.float32),
                           coefficients=coefs, clip_sample_range=None, config=asdict(self))

    def update(self, sample, model_output, coef, state):
        return sample + coef[1] * model_output, []


SAMPLERS = {c.kind: c for c in (DDIMConfig, DPMSolverConfig, FlowMatchConfig)}


def sampler_config(kind: str, config: dict[str, Any]):
    """The sampler config of `kind` from a diffusers scheduler config (or our own saved one)."""
    if kind not in SAMPLERS:
        raise SamplerError(f"sampler {kind!r} is not supported; supported: {sorted(SAMPLERS)}")
    return SAMPLERS[kind].from_scheduler_config(config)
