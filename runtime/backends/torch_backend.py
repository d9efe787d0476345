"""PyTorch backend: runs the same token-cached step modules that are exported, eagerly.

It is the reference the exported graphs are checked against, and the path on which CUDA-graph
capture of each distinct step is built later (static shapes per step make that possible).
"""

from __future__ import annotations

import numpy as np
import torch
from diffsparse.runtime.backends.base import Backend, BackendError, check_latent

from diffsparse.models.base import ModelSpec
from diffsparse.schedule import Schedule


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, spec: ModelSpec, schedule: Schedule, device: str = "cpu") -> None:
        super().__init__()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("the torch backend was asked for CUDA but torch.cuda.is_available() is False: "
                               "install a CUDA build of torch on a machine with an NVIDIA GPU")
        spec.check_schedule(schedule)
        self.spec = spec
        self.schedule = schedule
        self._device = torch.device(device)
        self.input_specs = spec.step_inputs()
        self.latent_spec = self.input_specs[0]
        self.cache_specs = spec.cache_buffers(schedule.selector)

    @property
    def device(self) -> str:
        return str(self._device)

    def load(self) -> None:
        self.spec.model.to(self._device)
        self.modules = [self.spec.build_step(list(sig), self.schedule.selector)
                        for sig in self.schedule.distinct_signatures()]

    def allocate(self) -> None:
        self._latent = torch.zeros(self.latent_spec.shape, device=self._device)
        self._cache = [torch.zeros(s.shape, dtype=s.torch_dtype, device=self._device) for s in self.cache_specs]

    def start(self, latent: np.ndarray) -> None:
        latent = check_latent(latent, self.latent_spec)
        self._latent = torch.from_numpy(latent).to(self._device)
        for c in self._cache:
            c.zero_()

    def run_step(self, graph: int, feeds: dict[str, np.ndarray]) -> None:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name], dtype=s.numpy_dtype)).to(self._device)
                for s in self.input_specs[1:]]
        with torch.no_grad():
            out = self.modules[graph](self._latent, *args, *self._cache)
        self._latent, self._cache = out[0], list(out[1:])

    def latent(self) -> np.ndarray:
        return self._latent.detach().cpu().numpy().copy()

    def cache(self) -> dict[str, np.ndarray]:
        return {s.name: c.detach().cpu().numpy().copy() for s, c in zip(self.cache_specs, self._cache)}

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
