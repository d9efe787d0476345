"""Packing requests into the bundle's static batches. Nothing here needs Ray: a replica admits
each request as it arrives (`admit`: the checks `Pipeline.generate` makes, so a bad request is
refused alone and never joins a batch), and runs what `@serve.batch` gathered (`run`).

Why the results do not depend on the packing: `Pipeline.generate` starts sample i of a request
from the noise of (request seed, i), and every row of a step graph is computed from its own
sample only (per-sample token selection, attention within the sample). So a request's samples
come out the same, bit for bit on ONNX Runtime, whether they run alone or beside others'.
Requests with different guidance scales never share a static batch: the scale is one number
per graph call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffsparse.runtime.pipeline import Pipeline
from diffsparse.sampler import initial_noise
from diffsparse.serve.schema import Generated, GenerateRequest, RequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """An admitted request: checked conditioning (name -> (n, ...)), seed, the guidance scale it
    runs with (resolved; None for bundles without guidance)."""

    conditioning: dict[str, np.ndarray]
    seed: int
    guidance_scale: float | None
    samples: int


@dataclass(frozen=True)
class BatchStats:
    """One `run` call (numbered per runner): requests and samples gathered, static batches run,
    rows of padding, seconds."""

    number: int
    requests: int
    samples: int
    static_batches: int
    padded: int
    seconds: float


@dataclass(frozen=True)
class Outcome:
    """A job's result (generated) or the reason it failed (error), and the batch it ran in."""

    generated: Generated | None
    error: str | None
    batch: BatchStats


def job_samples(jobs: Sequence[Job]) -> int:
    """The size of a gathered batch in samples (`@serve.batch`'s batch_size_fn)."""
    return sum(j.samples for j in jobs)


class BatchRunner:
    """Admits requests against a pipeline and runs gathered jobs on it, several requests per
    static batch. `run` may be called from `pipe.concurrency` threads at once."""

    def __init__(self, pipe: Pipeline, max_samples: int) -> None:
        self.pipe = pipe
        self.max_samples = max_samples
        self._lock = threading.Lock()
        self._running: dict[int, float] = {}   # run id -> start time (perf_counter)
        self._next = 0

    def admit(self, request: GenerateRequest) -> Job:
        """The job a request runs as, or RequestError(400) naming the problem: too many samples,
        a guidance scale for a bundle without guidance, or conditioning `Pipeline.generate` refuses."""
        spec = self.pipe.spec
        if request.guidance_scale is not None and not spec.guidance:
            raise RequestError(400, "this bundle runs without classifier-free guidance (exported with --no-guidance): "
                                    "leave guidance_scale out")
        try:
            conditioning = self.pipe.check_inputs(request.class_labels, request.conditioning or None)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        n = len(next(iter(conditioning.values())))
        if n > self.max_samples:
            raise RequestError(400, f"the request asks for {n} samples; this server takes at most {self.max_samples} "
                                    "per request (dsserve --max-batch): split it into several requests")
        scale = spec.resolve_guidance_scale(request.guidance_scale) if spec.guidance else None
        return Job(conditioning, request.seed, scale, n)

    def run(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Run the jobs, those of one guidance scale together in static batches of the bundle's
        batch size (the last one padded); one outcome per job, in order. A failure fails the jobs of
        its guidance scale only, with the error as their outcome (the caller stays up)."""
        t0 = time.perf_counter()
        with self._lock:
            run_id, self._next = self._next, self._next + 1
            self._running[run_id] = t0
        try:
            groups: dict[float | None, list[int]] = {}
            for i, job in enumerate(jobs):
                groups.setdefault(job.guidance_scale, []).append(i)
            results: list[Generated | str] = [""] * len(jobs)
            for scale, members in groups.items():
                for i, out in zip(members, self._run_group([jobs[i] for i in members], scale)):
                    results[i] = out
        finally:
            with self._lock:
                del self._running[run_id]
        b = self.pipe.spec.batch_size
        samples = job_samples(jobs)
        static = sum(-(-sum(jobs[i].samples for i in members) // b) for members in groups.values())
        stats = BatchStats(run_id, len(jobs), samples, static, static * b - samples, time.perf_counter() - t0)
        return [Outcome(r, None, stats) if isinstance(r, Generated) else Outcome(None, r, stats) for r in results]

    def _run_group(self, jobs: list[Job], scale: float | None) -> list[Generated | str]:
        names = list(jobs[0].conditioning)
        conditioning = {k: np.concatenate([j.conditioning[k] for j in jobs]) for k in names}
        latent = self.pipe.spec.latent_shape
        noise = np.concatenate([initial_noise(j.seed, j.samples, latent) for j in jobs])
        try:
            result = self.pipe.generate(conditioning=conditioning, noise=noise, guidance_scale=scale, time_steps=False)
        except Exception as e:  # a backend failure or non-finite output: these requests fail, the replica stays up
            log.exception("a batch of %d requests (%d samples) failed", len(jobs), len(noise))
            return [f"generation failed ({type(e).__name__}): {e}"] * len(jobs)
        out, start = [], 0
        for j in jobs:
            labels = j.conditioning.get("class_labels")
            out.append(Generated(result.samples[start:start + j.samples], labels, j.seed, j.guidance_scale))
            start += j.samples
        return out

    def longest_running(self) -> float:
        """Seconds the oldest batch still running has run (0 when idle): a replica's health check
        fails past `ServeConfig.stuck_batch_s`."""
        with self._lock:
            oldest = min(self._running.values(), default=None)
        return 0.0 if oldest is None else time.perf_counter() - oldest

    @property
    def busy(self) -> int:
        """Batches running now."""
        with self._lock:
            return len(self._running)
