"""The backend interface: load -> allocate -> run steps over a device-side token cache.

A backend is split in two, so that one loaded model can serve several generations at once:

  * the backend itself holds what is heavy and read-only once loaded, shared by every
    generation: sessions / engines / modules and the weights (`load`);
  * a `BackendContext` holds one generation's state: the ping-pong latent and cache buffers, the
    IO bindings, which buffer holds each entry's latest value (`new_context`). A context runs one
    generation at a time; distinct contexts may run at the same time from different threads
    (where the backend allows it: `max_contexts`).

`allocate` creates the backend's default context (`context`), which the single-context helpers
(`start`, `run_step`, `latent`, `cache`, `synchronize`) drive, and which becomes the first context
of the first pipeline that runs on the backend (`claim_context`). In a context, two sets of buffers (ping and pong) take turns:
each step reads one set and writes the other, then they swap, so no buffer is ever both input and
output of a step (TensorRT gives wrong results when they alias) and nothing goes back to the host
between the first and the last step: only the small per-step constants (timestep, sampler
coefficients, guidance scale, labels) go in, and the latent comes out once at the end.
"""

from __future__ import annotations

import abc
import threading

import numpy as np

from diffsparse.tensors import TensorSpec


class BackendError(RuntimeError):
    """A backend that is not installed, not usable on this machine, or misused."""


class BackendContext(abc.ABC):
    """One generation's device state (latent, cache, bindings) over a loaded backend's shared
    sessions / modules. Not thread-safe itself: one thread drives a context at a time."""

    @abc.abstractmethod
    def start(self, latent: np.ndarray) -> None:
        """Write the initial latent and zero the cache."""

    @abc.abstractmethod
    def run_step(self, graph: int, feeds: dict[str, np.ndarray]) -> None:
        """Run one step with graph `graph`; the latent and cache stay on the device."""

    @abc.abstractmethod
    def latent(self) -> np.ndarray:
        """Copy the current latent to the host."""

    def cache(self) -> dict[str, np.ndarray]:
        """The latest value of every cache entry on the host (tests and debugging)."""
        raise BackendError(f"{type(self).__name__} does not expose its cache")

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on synchronous backends); used by timing."""


class Backend(abc.ABC):
    name: str = ""
    #: how many contexts may run at the same time (None: no limit). A backend whose contexts
    #: would share mutable device state (captured CUDA graphs, TensorRT's activation pool) says 1,
    #: and a pipeline over it serialises its generations.
    max_contexts: int | None = None
    #: what sets `max_contexts`, for the error that refuses more ("with CUDA graphs"); "" if nothing
    context_limit_reason: str = ""

    def __init__(self) -> None:
        self.loaded = False
        self.allocated = False
        self._context: BackendContext | None = None
        self._context_owner: object | None = None
        # two threads starting their first generation at once must not both load
        self._prepare_lock = threading.Lock()

    @abc.abstractmethod
    def load(self) -> None:
        """Create one session/engine/module per distinct step graph (shared by all contexts)."""

    @abc.abstractmethod
    def new_context(self) -> BackendContext:
        """A new context: its own ping-pong latent and cache buffers (the backend is loaded)."""

    def allocate(self) -> None:
        """Create the default context (`context`)."""
        self._context = self.new_context()

    @property
    def context(self) -> BackendContext:
        """The default context (loaded and allocated on first use)."""
        self.prepare()
        return self._context

    def claim_context(self, owner: object) -> BackendContext:
        """A context for `owner` (a pipeline's pool): the default one for the first owner that
        asks (a pipeline of concurrency 1 then holds just the buffers `prepare` allocated), a new
        one for every other call, so pipelines sharing a backend never share a context."""
        self.prepare()
        with self._prepare_lock:
            if self._context_owner is None:
                self._context_owner = owner
                return self._context
        return self.new_context()

    @property
    def device(self) -> str:
        return "cpu"

    def prepare(self) -> Backend:
        """Load, then allocate the default context, once (safe to call from several threads)."""
        with self._prepare_lock:
            if not self.loaded:
                self.load()
                self.loaded = True
            if not self.allocated:
                self.allocate()
                self.allocated = True
        return self

    # ---- the default context: a backend driven by hand, one generation at a time -------------
    def start(self, latent: np.ndarray) -> None:
        self.context.start(latent)

    def run_step(self, graph: int, feeds: dict[str, np.ndarray]) -> None:
        self.context.run_step(graph, feeds)

    def latent(self) -> np.ndarray:
        return self.context.latent()

    def cache(self) -> dict[str, np.ndarray]:
        return self.context.cache()

    def synchronize(self) -> None:
        if self._context is not None:
            self._context.synchronize()


def check_latent(latent: np.ndarray, spec: TensorSpec) -> np.ndarray:
    latent = np.ascontiguousarray(latent, dtype=spec.numpy_dtype)
    if latent.shape != spec.shape:
        raise BackendError(f"latent has shape {latent.shape}, the graphs were exported for {spec.shape}")
    return latent
