"""The backend interface: load -> allocate -> run steps over a device-side token cache.

A backend owns the latent and the cache. `allocate` creates two sets of buffers (ping and pong);
each step reads one set and writes the other, then they swap, so no buffer is ever both input and
output of a step (TensorRT gives wrong results when they alias) and nothing goes back to the host
between the first and the last step: only the small per-step constants (timestep, sampler
coefficients, guidance scale, labels) go in, and the latent comes out once at the end.
"""

from __future__ import annotations

import abc

import numpy as np

from diffsparse.tensors import TensorSpec


class BackendError(RuntimeError):
    """A backend that is not installed, not usable on this machine, or misused."""


class Backend(abc.ABC):
    name: str = ""

    def __init__(self) -> None:
        self.loaded = False
        self.allocated = False

    @abc.abstractmethod
    def load(self) -> None:
        """Create one session/engine/module per distinct step graph."""

    @abc.abstractmethod
    def allocate(self) -> None:
        """Preallocate the ping-pong latent and cache buffers."""

    @abc.abstractmethod
    def start(self, latent: np.ndarray) -> None:
        """Write the initial latent and zero the cache."""

    @abc.abstractmethod
    def run_step(self, graph: int, feeds: dict[str, np.ndarray]) -> None:
        """Run one step with graph `graph`; the latent and cache stay on the device."""

    @abc.abstractmethod
    def latent(self) -> np.ndarray:
        """Copy the current latent to the host."""

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on synchronous backends); used by timing."""

    @property
    def device(self) -> str:
        return "cpu"

    def prepare(self) -> Backend:
        if not self.loaded:
            self.load()
            self.loaded = True
        if not self.allocated:
            self.allocate()
            self.allocated = True
        return self


def check_latent(latent: np.ndarray, spec: TensorSpec) -> np.ndarray:
    latent = np.ascontiguousarray(latent, dtype=spec.numpy_dtype)
    if latent.shape != spec.shape:
        raise BackendError(f"latent has shape {latent.shape}, the graphs were exported for {spec.shape}")
    return latent

