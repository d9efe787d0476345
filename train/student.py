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

    def sample(self, latents: torch.Tensor, conditioning: dict[str, np.ndarray], guidance_scale: float,
               weights: torch.Tensor) -> torch.Tensor:
        if weights.shape[0] != self.num_steps:
            raise ValueError(f"weights cover {weights.shape[0]} steps, the rollout has {self.num_steps}")
        x, dev = latents, latents.device
        cache = self.spec.cache_layout(self.selector).zeros(dev)
        weights = weights.to(dev)
        for t in range(self.num_steps):
            call = StepCall(float(self.plan.timesteps[t]), self.plan.coefficients[t])
            feeds = self.spec.feeds(call, conditioning, guidance_scale)
            args = [torch.from_numpy(np.asarray(feeds[s.name])).to(dev) for s in self.spec.step_inputs()[1:]]
            out = self.step(x, *args, *cache, weights=weights[t])
            x, cache = out[0], list(out[1:])
        return x

    @torch.no_grad()
    def teacher(self, latents: torch.Tensor, conditioning: dict[str, np.ndarray], guidance_scale: float) -> torch.Tensor:
        return self.sample(latents, conditioning, guidance_scale, self.dense_weights())
