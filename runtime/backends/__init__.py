"""Execution backends behind one interface (load -> allocate -> start -> run_step -> latent)."""

from diffsparse.runtime.backends.base import Backend, BackendError  # noqa: F401
