"""The Ray Serve deployment: each replica loads the bundle once and answers

    POST /generate   JSON body (diffsparse/serve/schema.py) -> PNG grid or NPZ arrays by `Accept`
    GET  /healthz    JSON: the bundle, backend, batch settings, this replica

Requests are admitted one by one (a bad one gets HTTP 4xx and never joins a batch), held while
every batch slot is busy (diffsparse/serve/admission.py), gathered by `@serve.batch` up to
`max_batch` samples, and run as the bundle's static batches in a worker
thread, so the replica keeps answering (and gathering the next batch) while one runs. Each
response carries X-Diffsparse-* headers saying which batch it ran in.

    from ray import serve
    from diffsparse.serve import app
    serve.run(app("out/demo/bundle-sparse", replicas=2), route_prefix="/")

`serve run diffsparse.serve:build bundle=/abs/path/bundle replicas=2` runs the same application on
an existing Ray cluster (`build` takes ServeConfig's fields as key=value strings).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from diffsparse.manifest import Manifest
from diffsparse.runtime.pipeline import Pipeline
from diffsparse.serve.admission import AdmissionGate
from diffsparse.serve.batches import BatchRunner, Job, Outcome, job_samples
from diffsparse.serve.config import ServeConfig
from diffsparse.serve.schema import NPZ, RequestError, encode, negotiate, parse_generate

try:  # the optional `serve` extra; without it `app` and `dsserve` say what to install
    from ray import serve
    from ray.serve import Application
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    from diffsparse.serve.metrics import ServeMetrics
    SERVE_IMPORT_ERROR: ModuleNotFoundError | None = None
except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] not in ("ray", "starlette"):
        raise
    serve = None
    SERVE_IMPORT_ERROR = e

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[serve]' (or pip install 'diffsparse[serve]')"


class ServeUnavailable(ImportError):
    """Ray Serve is not installed (the optional `serve` extra)."""


def require_serve() -> None:
    """ServeUnavailable naming the fix when Ray Serve cannot be imported."""
    if SERVE_IMPORT_ERROR is not None:
        raise ServeUnavailable(f"serving needs Ray Serve, which is not installed ({SERVE_IMPORT_ERROR}): {INSTALL_HINT}")


class GenerateServer:
    """One replica of the deployment (Ray constructs it with the ServeConfig)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.pipe = Pipeline.from_bundle(config.bundle, backend=config.backend, device=config.device,
                                         threads=config.threads, dtype=config.dtype, prepack=config.prepack,
                                         concurrency=config.concurrency)
        self.max_samples = config.batch_samples(self.pipe.spec.batch_size)
        self.runner = BatchRunner(self.pipe, self.max_samples)
        self.gate = AdmissionGate(config.concurrency, self.max_samples)
        self.metrics = ServeMetrics()
        # the pipeline runs in these threads: the replica's event loop stays free for other requests
        self._executor = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="diffsparse-batch")
        self.generate_batch = serve.batch(max_batch_size=self.max_samples, batch_wait_timeout_s=config.batch_wait_ms / 1000.0,
                                          max_concurrent_batches=config.concurrency,
                                          batch_size_fn=job_samples)(self._run_batch)
        try:
            self.replica = serve.get_replica_context().replica_tag
        except Exception:  # constructed outside a replica (a test or a script)
            self.replica = "local"
        if config.warmup:
            spec = self.pipe.spec
            self.pipe.generate(conditioning=spec.example_conditioning(np.random.default_rng(0)), time_steps=False)
        log.info("replica %s serves %s on %s/%s (batch %d, up to %d samples per call)", self.replica, config.bundle,
                 self.pipe.backend.name, self.pipe.backend.device, self.pipe.spec.batch_size, self.max_samples)

    # ---- HTTP ------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        path = _route(request)
        try:
            if path == "/generate":
                _method(request, "POST")
                response = await self._generate(request)
            elif path == "/healthz":
                _method(request, "GET")
                response = JSONResponse(self.health())
            else:
                raise RequestError(404, f"no route {path}: this server answers POST /generate and GET /healthz")
        except RequestError as e:
            response = JSONResponse({"error": e.message}, status_code=e.status)
        except Exception as e:  # a bug: the request fails, the replica stays up
            log.exception("request %s %s failed", request.method, path)
            response = JSONResponse({"error": f"internal error ({type(e).__name__}): {e}"}, status_code=500)
        self.metrics.request(path, response.status_code, time.perf_counter() - started)
        return response

    async def _generate(self, request: Request) -> Response:
        media = negotiate(request.headers.get("accept"))
        body = await _read_body(request, self.config.max_body_bytes)
        parsed = parse_generate(body)
        job = self.runner.admit(parsed)
        await self.gate.enter(job)   # held while every batch slot is busy: the next batch forms full
        try:
            outcome: Outcome = await self.generate_batch(job)
        finally:
            self.gate.leave(job)
        if outcome.error is not None:
            return JSONResponse({"error": outcome.error}, status_code=500)
        generated = outcome.generated
        content = encode(generated, media, scale=parsed.scale, columns=parsed.columns)
        headers = {"X-Diffsparse-Replica": self.replica, "X-Diffsparse-Seed": str(generated.seed),
                   "X-Diffsparse-Batch": f"{self.replica}-{outcome.batch.number}",
                   "X-Diffsparse-Batch-Requests": str(outcome.batch.requests),
                   "X-Diffsparse-Batch-Samples": str(outcome.batch.samples),
                   "X-Diffsparse-Static-Batches": str(outcome.batch.static_batches)}
        if generated.guidance_scale is not None:
            headers["X-Diffsparse-Guidance-Scale"] = repr(generated.guidance_scale)
        if media == NPZ:
            headers["Content-Disposition"] = 'attachment; filename="samples.npz"'
        return Response(content, media_type=media, headers=headers)

    async def _run_batch(self, jobs: list[Job]) -> list[Outcome]:
        if not jobs:
            return []
        loop = asyncio.get_running_loop()
        self.gate.started(jobs)
        try:
            outcomes = await loop.run_in_executor(self._executor, self.runner.run, jobs)
        finally:
            self.gate.finished()
        self.metrics.batch(outcomes[0].batch, sum(o.generated.samples.shape[0] for o in outcomes if o.generated))
        return outcomes

    # ---- health ----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        spec = self.pipe.spec
        return {"status": "ok", "bundle": self.config.bundle, "family": spec.family,
                "backend": self.pipe.backend.name, "device": self.pipe.backend.device,
                "batch_size": spec.batch_size, "max_batch": self.max_samples, "guidance": spec.guidance,
                "default_guidance_scale": spec.default_guidance_scale if spec.guidance else None,
                "conditioning": [{"name": t.name, "shape": list(t.shape[1:]), "dtype": t.dtype}
                                 for t in spec.conditioning_inputs()],
                "replica": self.replica, "pid": os.getpid(), "batches_running": self.runner.busy,
                "requests_waiting": self.gate.waiting}

    def check_health(self) -> None:
        """Ray's periodic health check: a batch stuck past `stuck_batch_s` (a hung backend) fails
        it, and Ray replaces the replica."""
        running = self.runner.longest_running()
        if running > self.config.stuck_batch_s:
            raise RuntimeError(f"a batch has run for {running:.0f} s (stuck_batch_s {self.config.stuck_batch_s:g}); "
                               "the replica is replaced")


def _route(request: Request) -> str:
    """The request's path below the application's route prefix."""
    path = request.url.path
    root = request.scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root):]
    return "/" + path.strip("/")


def _method(request: Request, allowed: str) -> None:
    if request.method != allowed:
        raise RequestError(405, f"{request.method} {request.url.path} is not allowed: use {allowed}")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or RequestError(413) past `limit` bytes (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body has {int(declared)} bytes, more than this server takes ({limit}; "
                                "ServeConfig.max_body_mb): send fewer samples per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over {limit} bytes, more than this server takes "
                                    "(ServeConfig.max_body_mb): send fewer samples per request")
        chunks.append(chunk)
    return b"".join(chunks)


# ---- the application -------------------------------------------------------------------
def application(config: ServeConfig) -> Application:
    """The Ray Serve application for a config: the bundle's manifest is read here, so a wrong path
    or a broken bundle fails now (BundleError) rather than in every replica."""
    require_serve()
    manifest = Manifest.load(config.bundle, verify=False)
    batch = config.batch_samples(manifest.batch_size)
    deployment = serve.deployment(GenerateServer, name=config.name, num_replicas=config.replicas,
                                  ray_actor_options=config.ray_actor_options(),
                                  max_ongoing_requests=config.ongoing_requests(manifest.batch_size),
                                  max_queued_requests=config.max_queued_requests,
                                  health_check_period_s=config.health_check_period_s)
    log.info("%s: %d replica(s), %s each, up to %d samples per batch call", config.bundle, config.replicas,
             config.ray_actor_options(), batch)
    return deployment.bind(config)


def app(bundle: str | Path, **options: Any) -> Application:
    """A Ray Serve application serving `bundle`; options are ServeConfig's fields (replicas,
    max_batch, threads, backend, device, ...). Run it with `serve.run(app(...))`."""
    require_serve()
    fields = {f.name for f in dataclasses.fields(ServeConfig)} - {"bundle"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for diffsparse.serve.app; it takes {sorted(fields)}")
    return application(ServeConfig(bundle=str(bundle), **options))


def build(args: dict[str, Any]) -> Application:
    """The application builder for Ray's CLI and config files:
    `serve run diffsparse.serve:build bundle=/abs/path replicas=2 max_batch=10`."""
    return application(ServeConfig.from_args(args))
