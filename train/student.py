"""The training rollout: T steps through the masked (trainable) step, for the student and the dense
teacher. (Not a `diffsparse.sampler.Sampler`: that is the per-step update this rollout runs inside
each step; this is the loop over the steps.)"""

from __future__ import annotations

import numpy as np
import torch

from diffsparse.models.base import ModelSpec, StepCall
from diffsparse.sampler import SamplerPlan
from diffsparse.schedule import SelectorConfig


class ScheduleRollout:
    """Runs T steps of `spec.build_masked_step` with per-step candidate weights (T, L, |S|).

    The cache starts at zero and is carried in memory; gradients flow through every step (the
    student's loss depends on all of them, as in the paper's multi-step distillation)."""

    def __init__(self, spec: ModelSpec, plan: SamplerPlan, token_counts, selector: SelectorConfig) -> None:
        self.spec = spec
        self.plan = plan
        self.token_counts = tuple(token_counts)
        self.selector = selector
        self.step = spec.build_masked_step(self.token_counts, selector)

    @property
    def num_steps(self) -> int:
        return len(self.plan.timesteps)

    def dense_weights(self) -> torch.Tensor:
        w = torch.zeros(self.num_steps, len(self.spec.layers), len(self.token_counts))
        w[..., -1] = 1.0
        return w

    def weights_for(self, keep: list[list[int]]) -> torch.Tensor:
        """One-hot weights for a (T, L) table of token counts."""
        col = {k: j for j, k in enumerate(self.token_counts)}
        idx = torch.tensor([[col[k] for k in row] for row in keep])
        return torch.nn.functional.one_hot(idx, len(self.token_counts)).to(torch.float32)

    def step_weights_for(self, skip: list[bool]) -> torch.Tensor | None:
        """One-hot (skip, compute) step weights (T, 2) for a schedule's skipped steps; None when
        none is skipped (the paper's space)."""
        if not any(skip):
            return None
        return torch.nn.functional.one_hot(torch.tensor([int(not s) for s in skip]), 2).to(torch.float32)

    def sample(self, latents: torch.Tensor, conditioning: dict[str, np.ndarray], guidance_scale: float,
               weights: torch.Tensor, step_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The student's samples under candidate weights (T, L, |S|) and, in the joint space,
        step weights (T, 2) = (skip, compute) (train/joint.py). A step with skip weight s runs

            x' = s · update(x, ε_last) + (1 − s) · update(x, ε_t),   ε_last ← s · ε_last + (1 − s) · ε_t,

        and keeps its cache where it skips (cache' = s · cache + (1 − s) · cache_t): with s ∈ {0, 1}
        in the forward pass, a skipped step is the sampler going on from the last model output
        (what the folded plan of an exported schedule computes, diffsparse/sampler.py), and the
        straight-through gradient of s reaches the step costs. When the spec's sampler forecasts
        skipped steps (`ModelSpec.forecasts_skips`), the skipped update runs on the forecast
        x̂0 = x0_k + r·(x0_k − x0_{k−1}) of the last two computed steps instead (the grid
        distances r from the forward pass's hard choices), and x0_k, x0_{k−1} are mixed the same
        way. Other samplers with state (DPM-Solver++) cannot skip here."""
        if weights.shape[0] != self.num_steps:
            raise ValueError(f"weights cover {weights.shape[0]} steps, the rollout has {self.num_steps}")
        forecast = self.spec.forecasts_skips
        if step_weights is not None and self.spec.sampler.state and not forecast:
            raise ValueError(f"skipped steps in training need a sampler without state, not {self.spec.sampler.kind}")
        x, dev = latents, latents.device
        cache = self.spec.cache_layout(self.selector).zeros(dev)
        weights = weights.to(dev)
        last = None   # the last computed step's guided model output
        x0_last = x0_prev = None   # forecasting: the last two computed steps' x0 and their grid indices
        i_last, i_prev = 0, None
        for t in range(self.num_steps):
            call = StepCall(float(self.plan.timesteps[t]), self.plan.coefficients[t])
            feeds = self.spec.feeds(call, conditioning, guidance_scale)
            args = [torch.from_numpy(np.asarray(feeds[s.name])).to(dev) for s in self.spec.step_inputs()[1:]]
            if step_weights is None:
                out = self.step(x, *args, *cache, weights=weights[t])
                x, cache = out[0], list(out[1:])
                continue
            x_new, cache_new, eps = self.step.run(x, *args, *cache, weights=weights[t])
            s = step_weights[t, 0].to(dev)
            coef = torch.from_numpy(np.asarray(self.plan.coefficients[t], dtype=np.float32)).to(dev)
            x0 = self.spec.sampler.data_prediction(x, eps, coef) if forecast else None
            if last is None:   # step 0 is always computed
                x, cache, last, x0_last = x_new, cache_new, eps, x0
                continue
            if forecast:
                r = (t - i_last) / (i_last - i_prev) if i_prev is not None else 0.0
                x_skip = self.spec.sampler.forecast_update(x, x0_last + r * (x0_last - x0_prev) if r else x0_last, coef)
                if float(s.detach()) < 0.5:   # computed in the forward pass: the history moves on
                    i_prev, i_last = i_last, t
                x0_prev = x0_last if x0_prev is None else s * x0_prev + (1 - s) * x0_last
                x0_last = s * x0_last + (1 - s) * x0
            else:
                x_skip, _ = self.spec.sampler.update(x, last, coef, [])
            x = s * x_skip + (1 - s) * x_new
            last = s * last + (1 - s) * eps
            cache = [s * old + (1 - s) * new for old, new in zip(cache, cache_new)]
        return x

    @torch.no_grad()
    def teacher(self, latents: torch.Tensor, conditioning: dict[str, np.ndarray], guidance_scale: float) -> torch.Tensor:
        return self.sample(latents, conditioning, guidance_scale, self.dense_weights())
