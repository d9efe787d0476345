"""Holding requests back while a replica's batch slots are busy, so `@serve.batch` forms full batches.

Ray Serve's batch loop gathers the next batch as soon as the previous one is *formed*, not when
it has *finished*: a batch formed while another runs waits for the `max_concurrent_batches`
semaphore with only the requests that came within `batch_wait_timeout_s` of its first one. Under
load a replica then runs a queue of small batches (measured: 2.9 requests per batch call with 16
closed-loop clients and max_batch 10) and its throughput stops growing with load.

The gate sits in front of `@serve.batch`, on the replica's event loop (no locks: every method runs
there). A request passes it when the samples already let through but not yet running, plus its
own, fit in the free batch slots:

    released + n  ≤  max_samples · (slots − running)

Otherwise it waits, first come first served. When a batch starts, its requests stop counting as
released and a slot is taken; when it finishes, the slot frees and the waiting requests pass, up
to a full batch per free slot, together, so they are gathered into one batch call.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from diffsparse.serve.batches import Job


class AdmissionGate:
    """FIFO admission of jobs into `@serve.batch` (module docstring). `slots`: batch calls a
    replica runs at once; `max_samples`: samples per batch call."""

    def __init__(self, slots: int, max_samples: int) -> None:
        if slots < 1 or max_samples < 1:
            raise ValueError(f"slots and max_samples must be >= 1, got {slots} and {max_samples}")
        self.slots = slots
        self.max_samples = max_samples
        self.running = 0
        self._released: dict[int, int] = {}   # id(job) -> samples, let through and not yet running
        self._waiting: deque[tuple[Job, asyncio.Future]] = deque()

    @property
    def released_samples(self) -> int:
        return sum(self._released.values())

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _fits(self, samples: int) -> bool:
        return self.released_samples + samples <= self.max_samples * (self.slots - self.running)

    async def enter(self, job: Job) -> None:
        """Return once `job` may join the batch being gathered (at once if it fits and nobody waits)."""
        if not self._waiting and self._fits(job.samples):
            self._released[id(job)] = job.samples
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((job, future))
        try:
            await future
        except asyncio.CancelledError:   # the client went away: give back its place or its share
            if future.done() and not future.cancelled():
                self.leave(job)
            else:
                self._waiting = deque(w for w in self._waiting if w[0] is not job)
                self._pump()
            raise

    def started(self, jobs: Iterable[Job]) -> None:
        """A batch call with `jobs` begins: its samples no longer wait, and it takes a slot."""
        for job in jobs:
            self._released.pop(id(job), None)
        self.running += 1

    def finished(self) -> None:
        """A batch call ended: its slot frees, and waiting jobs pass up to a full batch per free slot."""
        self.running = max(0, self.running - 1)
        self._pump()

    def leave(self, job: Job) -> None:
        """`job` is done with the gate (answered, failed or cancelled); a no-op once its batch started."""
        if self._released.pop(id(job), None) is not None:
            self._pump()

    def _pump(self) -> None:
        while self._waiting:
            job, future = self._waiting[0]
            if future.done():   # cancelled while waiting
                self._waiting.popleft()
                continue
            if not self._fits(job.samples):
                return
            self._waiting.popleft()
            self._released[id(job)] = job.samples
            future.set_result(None)
