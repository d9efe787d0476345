"""Samplers whose per-step update runs inside the exported step graph.

`Sampler` is the interface; one class per kind implements it (`SAMPLERS` maps kind -> class):
  * ``ddim``       `DDIMSampler`       DDIM, eta = 0, epsilon prediction (DiT);
  * ``dpmpp_2m``   `DPMSolverSampler`  DPM-Solver++ multistep, order 2, midpoint (PixArt-α);
  * ``flow_euler`` `FlowMatchSampler`  flow-matching Euler (FLUX.1, Wan2.1).
A sampler is a frozen dataclass of its settings (the supported subset of one diffusers scheduler's
config). Every update is linear in (sample, model output, sampler state) with per-step
coefficients that `Sampler.plan` computes once on the host from diffusers' own scheduler, so the
graph only multiplies and adds. Multistep state (DPM-Solver++'s previous x0) travels with the
token cache.

Why inside the graph: the runtime then passes the latent from one step's output straight to the
next step's input (device-side, no host round trip), and each step graph takes its step-specific
constants as a small input tensor, so steps with the same sparsity pattern share one graph.

Names: a *sampler* is an instance of one of these classes (`ModelSpec.sampler`); its *plan*
(`SamplerPlan`, the manifest's "sampler" entry) is what it computed for T steps; the plan's
`config` is the sampler's settings, from which `sampler_config(kind, config)` rebuilds it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch


class SamplerError(ValueError):
    pass


@dataclass(frozen=True)
class SamplerPlan:
    """A sampler planned for T steps: what the runtime feeds each step (the manifest's "sampler").

    kind          the sampler's kind (a `SAMPLERS` key).
    timesteps     (T,) float32: the model timestep of each step.
    coefficients  (T, C) float32: each step's update coefficients, C = the sampler's num_coefficients.
    config        the sampler's settings (its dataclass fields, `asdict(sampler)`): what
                  `sampler_config(kind, config)` / `ModelSpec.make_sampler` rebuilds the sampler
                  from, e.g. for DDIM's clipping (clip_sample, clip_sample_range). Not a diffusers
                  scheduler config, though it is read the same way.
    """

    kind: str
    timesteps: np.ndarray
    coefficients: np.ndarray
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "timesteps": self.timesteps.tolist(),
                "coefficients": self.coefficients.tolist(), "config": dict(self.config)}

    @classmethod
    def from_dict(cls, data: Any, num_steps: int | None = None) -> SamplerPlan:
        """The inverse of `to_dict`: exactly its keys, each checked, SamplerError naming the field
        otherwise. A plan comes from a bundle manifest that may be corrupted or edited, and its
        numbers go straight into every step: `kind` a known sampler, `config` exactly that
        sampler's settings with their types and in range (so that rebuilding the sampler from it
        cannot fail deep inside diffusers), `timesteps` T finite numbers within the training
        timesteps (integers for the samplers whose model timesteps are), `coefficients` T rows of
        the sampler's C finite numbers. num_steps: the T expected (None: any, at least 1)."""
        if not isinstance(data, dict):
            raise SamplerError(f"a sampler plan is a JSON object, got {type(data).__name__}")
        keys = list(cls.__dataclass_fields__)
        missing, unknown = [k for k in keys if k not in data], sorted(map(str, set(data) - set(keys)))
        if missing or unknown:
            raise SamplerError(f"sampler plan: missing key(s) {missing}, unknown key(s) {unknown} "
                               f"(it has exactly {keys})")
        kind = data["kind"]
        if not isinstance(kind, str) or kind not in SAMPLERS:
            raise SamplerError(f"sampler.kind must be one of {sorted(SAMPLERS)}, got {kind!r}")
        sampler_cls = SAMPLERS[kind]
        config = _check_config(sampler_cls, data["config"])
        sampler = sampler_cls.from_scheduler_config(config)
        timesteps = _number_array(data["timesteps"], "timesteps", 1)
        t = len(timesteps)
        if t == 0 or (num_steps is not None and t != num_steps):
            raise SamplerError(f"sampler.timesteps has {t} entries; the schedule computes {num_steps} steps")
        top = config["num_train_timesteps"]
        integral = sampler_cls.integer_timesteps
        last = top - 1 if integral else top   # an index into the training timesteps, or σ·top
        bad = [i for i, x in enumerate(timesteps) if not (0 <= x <= last and (not integral or x == int(x)))]
        if bad:
            what = f"an integer in [0, {last}]" if integral else f"a number in [0, {last}]"
            raise SamplerError(f"sampler.timesteps[{bad[0]}] = {float(timesteps[bad[0]])!r} must be {what} "
                               f"(the sampler's num_train_timesteps is {top})")
        coefficients = _number_array(data["coefficients"], "coefficients", 2)
        c = sampler.num_coefficients
        if coefficients.shape != (t, c):
            raise SamplerError(f"sampler.coefficients must be {t} rows of {c} numbers (one row per step for "
                               f"{kind!r}), got shape {list(coefficients.shape)}")
        return cls(kind=kind, timesteps=timesteps.astype(np.float32), coefficients=coefficients.astype(np.float32),
                   config=config)


#: per setting type (the dataclass annotations, strings under `from __future__ import annotations`):
#: the JSON types that may hold it
_SETTING_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
#: settings that index, size or spread the training timesteps: a huge one would make diffusers
#: build a huge schedule, so they are bounded well beyond any real model's
_SETTING_RANGES = {"num_train_timesteps": (1, 100_000), "steps_offset": (0, 100_000),
                   "base_image_seq_len": (1, 1 << 24), "max_image_seq_len": (1, 1 << 24)}
#: string settings and the values the matching diffusers schedulers accept
_SETTING_CHOICES = {"beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
                    "timestep_spacing": ("leading", "trailing", "linspace"),
                    "final_sigmas_type": ("zero", "sigma_min")}


#: settings added after bundles were first written, and the value a plan without them meant
_LATER_SETTINGS = {"skip_forecast": False}


def _check_config(sampler_cls: type[Sampler], config: Any) -> dict[str, Any]:
    """A plan's `config`: exactly the sampler's settings (`asdict` of it), each of its type and range."""
    if not isinstance(config, dict):
        raise SamplerError(f"sampler.config must be an object, got {type(config).__name__}")
    fields = sampler_cls.__dataclass_fields__
    config = {**{k: v for k, v in _LATER_SETTINGS.items() if k in fields}, **config}
    missing, unknown = [k for k in fields if k not in config], sorted(map(str, set(config) - set(fields)))
    if missing or unknown:
        raise SamplerError(f"sampler.config: missing key(s) {missing}, unknown key(s) {unknown} "
                           f"({sampler_cls.kind!r} has exactly {list(fields)})")
    for name, f in fields.items():
        value, kind = config[name], str(f.type)
        ok = isinstance(value, _SETTING_TYPES.get(kind, (object,))) and (kind == "bool" or not isinstance(value, bool))
        if ok and kind == "float":
            ok = bool(np.isfinite(value))
        if ok and name in _SETTING_RANGES:
            lo, hi = _SETTING_RANGES[name]
            ok = lo <= value <= hi
        if ok and name in _SETTING_CHOICES:
            ok = value in _SETTING_CHOICES[name]
        if not ok:
            rule = (f"one of {_SETTING_CHOICES[name]}" if name in _SETTING_CHOICES
                    else f"an integer in {list(_SETTING_RANGES[name])}" if name in _SETTING_RANGES
                    else "a finite number" if kind == "float" else f"a {kind}")
            raise SamplerError(f"sampler.config.{name} must be {rule}, got {_short(value)}")
    return dict(config)


def _short(value: Any, limit: int = 60) -> str:
    """repr for an error message, cut short (a corrupted file may hold a 400-digit number)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _finite_number(x: Any) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return math.isfinite(x) if isinstance(x, float) else abs(x) < 1 << 1000   # float() of a larger int fails


def _number_array(value: Any, name: str, ndim: int) -> np.ndarray:
    """A list (ndim 1) or a list of equally long lists (ndim 2) of finite JSON numbers, as float64;
    SamplerError naming the first bad entry otherwise."""
    rows = [value] if ndim == 1 else value
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows) or len({len(r) for r in rows}) > 1:
        shape = "a list of numbers" if ndim == 1 else "a list of equally long lists of numbers"
        raise SamplerError(f"sampler.{name} must be {shape}")
    for i, row in enumerate(rows):
        for j, x in enumerate(row):
            if not _finite_number(x):
                where = f"[{j}]" if ndim == 1 else f"[{i}][{j}]"
                raise SamplerError(f"sampler.{name}{where} must be a finite number, got {_short(x)}")
    array = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1 if rows and rows[0] else 0)
    return array[0] if ndim == 1 else array


class Sampler(ABC):
    """The interface every family's sampler implements.

    An implementation is a frozen dataclass whose fields are its settings, the supported subset of
    one diffusers scheduler's config; `asdict(sampler)` is the plan's `config`, and
    `from_scheduler_config` of it gives the same sampler back. Class attributes:

    kind              the registry key (`SAMPLERS`) and the plan's `kind`.
    state             names of the latent-shaped tensors the update carries from one step to the
                      next (e.g. ("prev_x0",)); they travel with the token cache as "sampler.<name>"
                      and start at zero. () when the sampler is single-step.
    num_coefficients  C, the length of one step's coefficient vector (the plan's coefficients are (T, C)).
    (`state` and `num_coefficients` may depend on the settings: a `ForecastingSampler` whose
    skipped steps forecast carries the last x0 and plans 5 coefficients.)

    The split: `plan` runs once on the host (float64/float32 as diffusers does) and reduces each
    step of diffusers' `step` to C numbers; `update` runs inside the step graph and only multiplies
    and adds (and, for DDIM with clip_sample, clamps).
    """

    kind: ClassVar[str]
    state: ClassVar[tuple[str, ...]]
    num_coefficients: ClassVar[int]
    #: whether the plan's timesteps are integers (indices into the training schedule) or, for
    #: flow matching, σ·num_train_timesteps (`SamplerPlan.from_dict` checks them accordingly)
    integer_timesteps: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> Sampler:
        """The sampler from a diffusers scheduler config (`scheduler_config.json`) or from a plan's
        `config`. Keys that are not settings are ignored; settings this sampler does not implement
        (another prediction type, thresholding, ...) raise SamplerError."""

    @abstractmethod
    def plan(self, num_steps: int, image_seq_len: int | None = None,
             computed: Sequence[bool] | None = None) -> SamplerPlan:
        """Timesteps (T,) and coefficients (T, num_coefficients) for `num_steps` steps, exactly as
        diffusers' scheduler computes them. image_seq_len: the image token count, for samplers
        whose schedule depends on the resolution (ignored by the others).

        computed: which of the T steps evaluate the model (None: all). The plan then has one row
        per computed step, whose update goes straight to where the next computed step starts (or
        to the end): the T-step grid with the skipped steps taken out. For DDIM (η = 0) and
        flow-matching Euler this equals running the skipped steps on the last model output; for
        DPM-Solver++ it is the multistep solver on the sub-grid (diffsparse/schedule.py: skip)."""

    @abstractmethod
    def update(self, sample: torch.Tensor, model_output: torch.Tensor, coef: torch.Tensor,
               state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step inside the graph: x_t, the model output at x_t, coef = plan.coefficients[i] and
        the state tensors in `state` order -> (x_t', the new state tensors in the same order)."""

    @abstractmethod
    def scheduler(self):
        """The diffusers scheduler these settings describe (the reference `plan` and `update` match)."""

    def scheduler_settings(self) -> dict[str, Any]:
        """The settings that are diffusers scheduler arguments (all but `skip_forecast`, ours)."""
        return {k: v for k, v in asdict(self).items() if k != "skip_forecast"}


#: the state a sampler whose skipped steps forecast carries: the last computed step's x0
FORECAST_STATE = ("prev_x0",)
#: a forecasting plan's coefficients per computed step: [c0, c1, P, Q, Q_prev] (`ForecastingSampler`)
FORECAST_COEFFICIENTS = 5


class ForecastingSampler(Sampler):
    """A single-step sampler whose skipped steps may *forecast* the model's prediction instead of
    reusing it (the `skip_forecast` setting; the schedule's `skip_forecast` chooses it).

    Each step j of the T-step grid is written in data-prediction form: the computed step's model
    output o gives x0 = (x_j − c1_j·o) / c0_j, and the update is x_{j+1} = p_j·x_j + q_j·x0
    (`fine_grid`). A skipped step j after the computed steps i_{k−1} < i_k (the last two) runs
    that update on the linear extrapolation

        x̂0(j) = x0_k + r_j·(x0_k − x0_{k−1}),   r_j = (j − i_k) / (i_k − i_{k−1})

    (r_j = 0, i.e. reuse, while only one step has been computed). Reusing the model output
    (skip_forecast False) is r_j = 0 throughout: for DDIM (η = 0) and flow-matching Euler the
    plain sub-grid plan. The update is linear in (x_{i_k}, x0_k, x0_{k−1}), so the computed step
    i_k and the skipped steps after it fold into one row of `FORECAST_COEFFICIENTS`

        [c0, c1, P, Q, Q_prev]:  x0 = (x − c1·o) / c0;   x' = P·x + Q·x0 + Q_prev·x0_prev,

    with P = Π p_j and Q, Q_prev accumulated over j = i_k … i_{k+1} − 1; the state ("prev_x0")
    carries x0 to the next computed step. It is a linear multistep method on the fine grid, as
    DPM-Solver++(2M) is one on the sub-grid (TaylorSeer-style forecasting, at the model output).
    """

    #: the setting (a dataclass field of every subclass)
    skip_forecast: bool
    #: C and state without forecasting
    plain_num_coefficients: ClassVar[int]

    @property
    def state(self) -> tuple[str, ...]:
        return FORECAST_STATE if self.skip_forecast else ()

    @property
    def num_coefficients(self) -> int:
        return FORECAST_COEFFICIENTS if self.skip_forecast else self.plain_num_coefficients

    @abstractmethod
    def fine_grid(self, num_steps: int, image_seq_len: int | None = None) -> tuple[np.ndarray, ...]:
        """(timesteps, c0, c1, p, q), each (T,), float64 but the timesteps: the T-step grid in
        data-prediction form (class docstring)."""

    @abstractmethod
    def plain_plan(self, num_steps: int, image_seq_len: int | None,
                   computed: Sequence[bool] | None) -> SamplerPlan:
        """The plan when skipped steps reuse the last model output (diffusers' own arithmetic)."""

    @abstractmethod
    def plain_update(self, sample: torch.Tensor, model_output: torch.Tensor,
                     coef: torch.Tensor) -> torch.Tensor:
        """The update of `plain_plan`'s coefficients."""

    def data_prediction(self, sample: torch.Tensor, model_output: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """x0 = (x − c1·o) / c0, the step's prediction of the clean sample (coef[0], coef[1])."""
        return (sample - coef[1] * model_output) / coef[0]

    def plan(self, num_steps: int, image_seq_len: int | None = None,
             computed: Sequence[bool] | None = None) -> SamplerPlan:
        if not self.skip_forecast:
            return self.plain_plan(num_steps, image_seq_len, computed)
        idx = computed_indices(num_steps, computed)
        timesteps, c0, c1, p, q = self.fine_grid(num_steps, image_seq_len)
        rows = []
        for k, i in enumerate(idx):
            end = idx[k + 1] if k + 1 < len(idx) else num_steps
            gap = i - idx[k - 1] if k else 0
            big_p, big_q, q_prev = 1.0, 0.0, 0.0
            for j in range(i, end):
                r = (j - i) / gap if gap else 0.0
                big_p, big_q, q_prev = p[j] * big_p, p[j] * big_q + q[j] * (1 + r), p[j] * q_prev - q[j] * r
            rows.append([c0[i], c1[i], big_p, big_q, q_prev])
        return SamplerPlan(kind=self.kind, timesteps=np.asarray(timesteps, np.float32)[idx],
                           coefficients=np.asarray(rows, dtype=np.float32), config=asdict(self))

    def update(self, sample, model_output, coef, state):
        if not self.skip_forecast:
            return self.plain_update(sample, model_output, coef), []
        x0 = self.data_prediction(sample, model_output, coef)
        return coef[2] * sample + coef[3] * x0 + coef[4] * state[0], [x0]

    def forecast_update(self, sample: torch.Tensor, x0: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """One grid step on a given x0 (a forecast one), coef a row of the all-computed forecasting
        plan ([c0, c1, p, q, 0]): x' = p·x + q·x0. The training rollout's skipped step."""
        return coef[2] * sample + coef[3] * x0


@dataclass(frozen=True)
class DDIMSampler(ForecastingSampler):
    """DDIM (eta = 0, epsilon prediction), bit-for-bit the arithmetic of diffusers' `DDIMScheduler.step`:
        x0   = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)          [clipped to ±r if clip_sample]
        x_t' = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps
    with coefficients [sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev)] per step (a = alphas_cumprod).

    The DDIMScheduler settings we support (defaults are diffusers' DiT pipeline ones):
    num_train_timesteps, beta_start, beta_end, beta_schedule: the training noise schedule.
    clip_sample / clip_sample_range: clamp the predicted x0 to ±r (useful in pixel space); the
        clamp is part of `update`, read from these settings (not from the plan's coefficients).
    set_alpha_to_one: alpha used after the last step (1.0, or alphas_cumprod[0]).
    steps_offset, timestep_spacing: how inference timesteps are spread (diffusers semantics).
    """

    kind = "ddim"
    plain_num_coefficients = 4

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    skip_forecast: bool = False

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> DDIMSampler:
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise SamplerError(f"prediction_type {config['prediction_type']!r} is not yet supported (epsilon only)")
        if config.get("thresholding", False):
            raise SamplerError("dynamic thresholding is not yet supported; use clip_sample instead")
        if config.get("rescale_betas_zero_snr", False):
            raise SamplerError("rescale_betas_zero_snr is not yet supported")
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})

    def scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler(**self.scheduler_settings(), prediction_type="epsilon")

    def grid_alphas(self, num_steps: int, dtype: torch.dtype):
        """(the scheduler set to num_steps, ᾱ where each grid step starts, ᾱ where it ends): a step
        ends one stride lower, the last at diffusers' final ᾱ. The one home of that rule."""
        sched = self.scheduler()
        sched.set_timesteps(num_steps)
        acp = sched.alphas_cumprod.to(dtype)
        final = sched.final_alpha_cumprod.to(dtype)
        stride = self.num_train_timesteps // num_steps
        steps = sched.timesteps.tolist()
        end = torch.stack([acp[t - stride] if t - stride >= 0 else final for t in steps])
        return sched, acp[steps], end

    def fine_grid(self, num_steps, image_seq_len=None):
        """c0 = √ᾱ_j, c1 = √(1 − ᾱ_j); with ᾱ'_j where step j ends, p = √(1 − ᾱ'_j) / √(1 − ᾱ_j),
        q = √ᾱ'_j − p·√ᾱ_j (the DDIM step on x0: x' = √ᾱ'·x0 + √(1 − ᾱ')·ε)."""
        sched, a, a_end = self.grid_alphas(num_steps, torch.float64)
        a, a_end = a.numpy(), a_end.numpy()
        p = np.sqrt(1 - a_end) / np.sqrt(1 - a)
        return sched.timesteps.numpy(), np.sqrt(a), np.sqrt(1 - a), p, np.sqrt(a_end) - p * np.sqrt(a)

    def data_prediction(self, sample, model_output, coef):
        x0 = super().data_prediction(sample, model_output, coef)
        return x0.clamp(-self.clip_sample_range, self.clip_sample_range) if self.clip_sample else x0

    def plain_plan(self, num_steps: int, image_seq_len: int | None = None,
                   computed: Sequence[bool] | None = None) -> SamplerPlan:
        """Timesteps and coefficients exactly as `DDIMScheduler.set_timesteps` + `step` compute them
        (image_seq_len is not used). A computed step followed by skipped ones targets ᾱ of where
        the last of them ends: x0 is unchanged by a DDIM step on the same ε, so this is exact."""
        idx = computed_indices(num_steps, computed)
        sched, start, end = self.grid_alphas(num_steps, torch.float32)
        coefs = []
        for k, i in enumerate(idx):
            last = (idx[k + 1] if k + 1 < len(idx) else num_steps) - 1   # the step whose end this one reaches
            a_t, a_prev = start[i], end[last]
            coefs.append([a_t.sqrt(), (1 - a_t).sqrt(), a_prev.sqrt(), (1 - a_prev).sqrt()])
        coefficients = torch.tensor(coefs, dtype=torch.float32).numpy()
        return SamplerPlan(kind=self.kind, timesteps=sched.timesteps.numpy().astype(np.float32)[idx],
                           coefficients=coefficients, config=asdict(self))

    def plain_update(self, sample, model_output, coef):
        """coef = [sqrt(a_t), sqrt(1-a_t), sqrt(a_prev), sqrt(1-a_prev)]."""
        return coef[2] * self.data_prediction(sample, model_output, coef) + coef[3] * model_output


def computed_indices(num_steps: int, computed: Sequence[bool] | None) -> list[int]:
    """The indices of the computed steps (all when None); SamplerError unless step 0 is one of them."""
    if computed is None:
        return list(range(num_steps))
    if len(computed) != num_steps:
        raise SamplerError(f"computed has {len(computed)} entries for {num_steps} steps")
    if not computed[0]:
        raise SamplerError("step 0 must be computed: there is no model output before it")
    return [i for i, c in enumerate(computed) if c]


def _check_prediction(config: dict[str, Any], expected: str) -> None:
    if config.get("prediction_type", expected) != expected:
        raise SamplerError(f"prediction_type {config['prediction_type']!r} is not yet supported ({expected} only)")


@dataclass(frozen=True)
class DPMSolverSampler(Sampler):
    """DPM-Solver++ (data prediction), multistep order 2 with the midpoint rule — diffusers'
    `DPMSolverMultistepScheduler` defaults as PixArt-α's pipeline uses them. Epsilon prediction.

    With λ = log(α/σ), h = λ_t − λ_s and x0 = (x_s − σ_s ε) / α_s, one step from s to t is
        first order:  x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) x0
        second order: x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) (x0 + ½ (x0 − x0_prev) / r),
                      r = (λ_s − λ_prev) / h
    (diffusers' midpoint rule); the first step is first order, and so is the last one under
    lower_order_final (T < 15), euler_at_final or a zero final sigma. The state is the
    previous step's x0 ("prev_x0", zero before the first step, where its coefficient is 0).

    Settings:
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
    def from_scheduler_config(cls, config: dict[str, Any]) -> DPMSolverSampler:
        _check_prediction(config, "epsilon")
        unsupported = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "thresholding": False,
                       "use_karras_sigmas": False, "use_lu_lambdas": False, "use_exponential_sigmas": False,
                       "use_beta_sigmas": False, "use_flow_sigmas": False, "variance_type": None}
        for key, ok in unsupported.items():
            if config.get(key, ok) != ok:
                raise SamplerError(f"DPM-Solver {key}={config[key]!r} is not yet supported (only {ok!r})")
        if config.get("skip_forecast", False):
            raise SamplerError("forecasting skipped steps is not yet supported with DPM-Solver++ (already a "
                               "multistep solver on the computed steps); use skip_forecast false")
        if int(config.get("solver_order", 2)) > 2:
            raise SamplerError("DPM-Solver order 3 is not yet supported; use solver_order 2")
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})

    def scheduler(self):
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(**asdict(self), algorithm_type="dpmsolver++", solver_order=2,
                                           solver_type="midpoint", prediction_type="epsilon")

    def plan(self, num_steps: int, image_seq_len: int | None = None,
             computed: Sequence[bool] | None = None) -> SamplerPlan:
        """coefficients (T, 5) = [alpha_s, sigma_s, c_sample, c_x0, c_prev]:
        x0 = (x - sigma_s eps) / alpha_s;  x' = c_sample x + c_x0 x0 + c_prev x0_prev.
        With skipped steps, the solver runs on the sub-grid of computed steps' sigmas (each step
        to the next computed one; its order rules counted on the sub-grid)."""
        sched = self.scheduler()
        sched.set_timesteps(num_steps)
        sigmas = sched.sigmas.double()
        alpha, sigma = sched._sigma_to_alpha_sigma_t(sigmas)
        with np.errstate(divide="ignore"):
            lam = (torch.log(alpha) - torch.log(sigma)).numpy()  # +inf at a zero final sigma
        alpha, sigma = alpha.numpy(), sigma.numpy()
        idx = computed_indices(len(sched.timesteps), computed)
        grid = idx + [len(sched.timesteps)]   # sigma indices the solver visits, the end included
        n = len(idx)
        coefs = []
        for i in range(n):
            s_i, t_i = grid[i], grid[i + 1]
            a_t, s_t, s_s0 = alpha[t_i], sigma[t_i], sigma[s_i]
            h = lam[t_i] - lam[s_i]
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
                r0 = (lam[s_i] - lam[grid[i - 1]]) / h
                c_x0, c_prev = -phi - 0.5 * phi / r0, 0.5 * phi / r0
            del second_last  # order 2 is the maximum here, so diffusers' "lower order second" is a no-op
            coefs.append([alpha[s_i], sigma[s_i], c_sample, c_x0, c_prev])
        return SamplerPlan(kind=self.kind, timesteps=sched.timesteps.numpy().astype(np.float32)[idx],
                           coefficients=np.asarray(coefs, dtype=np.float32), config=asdict(self))

    def update(self, sample, model_output, coef, state):
        """coef = [α_s, σ_s, c_sample, c_x0, c_prev] (see `plan`); state = [x0_prev] -> [x0]."""
        x0 = (sample - coef[1] * model_output) / coef[0]
        return coef[2] * sample + coef[3] * x0 + coef[4] * state[0], [x0]


@dataclass(frozen=True)
class FlowMatchSampler(ForecastingSampler):
    """Flow-matching Euler (diffusers' `FlowMatchEulerDiscreteScheduler`): x' = x + (σ' − σ)·v.

    shift: the static time shift σ ← shift·σ / (1 + (shift − 1)·σ) (FLUX.1-schnell 1.0; Wan2.1
        uses 3.0 at 480p and 5.0 at 720p, as `flow_shift`).
    use_dynamic_shifting and base/max_shift, base/max_image_seq_len: FLUX.1-dev's resolution-
        dependent shift mu, computed from the image token count the way FluxPipeline does.
    schnell_sigmas: FluxPipeline's linspace(1, 1/T, T) sigmas before shifting (otherwise the
        scheduler's own spacing).
    The timesteps and coefficients ignore image_seq_len unless use_dynamic_shifting is set, when it
    is required.
    """

    kind = "flow_euler"
    plain_num_coefficients = 2
    integer_timesteps = False

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    schnell_sigmas: bool = True
    skip_forecast: bool = False

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> FlowMatchSampler:
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

        fields = {k: v for k, v in self.scheduler_settings().items() if k != "schnell_sigmas"}
        return FlowMatchEulerDiscreteScheduler(**fields)

    def mu(self, image_seq_len: int | None) -> float | None:
        if not self.use_dynamic_shifting:
            return None
        if image_seq_len is None:
            raise SamplerError("dynamic shifting needs the image token count")
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * slope + self.base_shift - slope * self.base_image_seq_len

    def _scheduler_for(self, num_steps: int, image_seq_len: int | None):
        sched = self.scheduler()
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps) if self.schnell_sigmas else None
        sched.set_timesteps(num_steps, sigmas=sigmas, mu=self.mu(image_seq_len))
        return sched

    def fine_grid(self, num_steps, image_seq_len=None):
        """c0 = 1, c1 = σ_j (x0 = x − σ·v); p = σ_{j+1} / σ_j, q = 1 − p."""
        sched = self._scheduler_for(num_steps, image_seq_len)
        s = sched.sigmas.double().numpy()
        p = s[1:] / s[:-1]
        return sched.timesteps.numpy(), np.ones(num_steps), s[:-1], p, 1 - p

    def plain_plan(self, num_steps: int, image_seq_len: int | None = None,
                   computed: Sequence[bool] | None = None) -> SamplerPlan:
        """coefficients (T, 2) = [σ, σ' − σ]; the timesteps are diffusers' (σ·1000). With skipped
        steps σ' is where the next computed step starts (Euler steps on one v add up exactly)."""
        idx = computed_indices(num_steps, computed)
        sched = self._scheduler_for(num_steps, image_seq_len)
        s = sched.sigmas.to(torch.float32).numpy()
        nxt = np.asarray(idx[1:] + [len(s) - 1])
        coefs = np.stack([s[idx], s[nxt] - s[idx]], axis=1).astype(np.float32)
        return SamplerPlan(kind=self.kind, timesteps=sched.timesteps.numpy().astype(np.float32)[idx],
                           coefficients=coefs, config=asdict(self))

    def plain_update(self, sample, model_output, coef):
        """coef = [σ, σ' − σ], model_output the velocity v."""
        return sample + coef[1] * model_output


SAMPLERS: dict[str, type[Sampler]] = {c.kind: c for c in (DDIMSampler, DPMSolverSampler, FlowMatchSampler)}


def sampler_config(kind: str, config: dict[str, Any]) -> Sampler:
    """The sampler of `kind` from a diffusers scheduler config or a plan's `config` (its settings)."""
    if kind not in SAMPLERS:
        raise SamplerError(f"sampler {kind!r} is not supported; supported: {sorted(SAMPLERS)}")
    return SAMPLERS[kind].from_scheduler_config(config)


def initial_noise(seed: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """Starting latents (count, *shape) for a seed, the same on every backend and batch size:
    sample i is drawn from its own NumPy PCG64 stream seeded with (seed, i)."""
    return np.stack([np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
                     for i in range(count)]) if count else np.zeros((0, *shape), np.float32)
