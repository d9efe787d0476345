"""The runtime API: load a bundle, generate samples, get timings.

    from diffsparse.runtime import Pipeline
    pipe = Pipeline.from_bundle("out/bundle")                 # ONNX Runtime on the CPU
    result = pipe.generate(class_labels=[0, 1, 2], seed=0)  # the model's default guidance scale
    result.grid().save("grid.png"); result.step_seconds       # per-step latency

Threads: `generate` may be called from several threads on one Pipeline. Each call runs in a
backend context (its own latent and cache buffers) taken from the pipeline's pool of
`concurrency` contexts, waiting while all are busy; the sessions / modules and weights are
shared. concurrency=1 (default) serialises the calls at no extra memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffsparse.bundle_format import current_engine_key, step_graph_indices
from diffsparse.models.base import ModelSpec, StepCall
from diffsparse.models.zoo import make_spec
from diffsparse.runtime.backends.base import Backend, BackendContext, BackendError
from diffsparse.runtime.backends.ort import OrtBackend
from diffsparse.runtime.backends.select import resolve, tensorrt_installed
from diffsparse.runtime.backends.tensorrt import TensorRTBackend
from diffsparse.runtime.backends.torch_backend import TorchBackend
from diffsparse.runtime.bundle import Bundle
from diffsparse.sampler import SamplerPlan, initial_noise

log = logging.getLogger(__name__)


class NonFiniteOutputError(RuntimeError):
    """A generation produced NaN or infinite latents (`Pipeline.generate(check_finite=True)`)."""


class ContextPool:
    """At most `size` backend contexts, made on first need and reused; `acquire` waits while all
    are in use. The first is the backend's default context (the one `Backend.prepare` allocates)
    unless another pipeline on the same backend claimed it (`Backend.claim_context`), so a pipeline
    of concurrency 1 holds no more buffers than one without a pool."""

    def __init__(self, backend: Backend, size: int) -> None:
        self.backend = backend
        self.size = size
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._free: list[BackendContext] = []
        self._made = 0

    @property
    def made(self) -> int:
        """Contexts created so far (at most `size`)."""
        return self._made

    def _take(self) -> BackendContext:
        with self._lock:
            if self._free:
                return self._free.pop()
            first = self._made == 0
            self._made += 1
        try:
            return self.backend.claim_context(self) if first else self.backend.prepare().new_context()
        except BaseException:
            with self._lock:
                self._made -= 1
            raise

    @contextlib.contextmanager
    def acquire(self) -> Iterator[BackendContext]:
        with self._slots:
            ctx = self._take()
            try:
                yield ctx
            finally:
                with self._lock:
                    self._free.append(ctx)


@dataclass
class GenerationResult:
    samples: np.ndarray                 # (n, C, H, W) final latents / pixels, float32
    class_labels: np.ndarray | None     # (n,) for class-conditional models
    step_seconds: list[float]           # wall-clock per denoising step, summed over batches
    total_seconds: float
    backend: str = ""
    device: str = ""
    guidance_scale: float | None = None  # the scale the samples were generated with

    def images(self) -> np.ndarray:
        """uint8 images (n, H, W, C) from samples in [-1, 1]. Latent-space models need their VAE
        to decode; this then shows the first (up to 3) latent channels as a preview (the first
        frame of a video latent (n, C, F, H, W))."""
        x = self.samples[:, :, 0] if self.samples.ndim == 5 else self.samples
        x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
        x = np.clip((x + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
        return x.transpose(0, 2, 3, 1)

    def grid(self, columns: int | None = None, scale: int = 1) -> Image.Image:
        imgs = self.images()
        n, h, w, c = imgs.shape
        columns = columns or n
        rows = -(-n // columns)
        canvas = np.zeros((rows * h, columns * w, c), np.uint8)
        for i, img in enumerate(imgs):
            r, col = divmod(i, columns)
            canvas[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
        pic = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
        return pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST) if scale > 1 else pic


class Pipeline:
    """Sequences the steps of a schedule on a backend; the backend keeps latent and cache on device.

    concurrency: how many `generate` calls may run at the same time from different threads, each
    on its own backend context (latent and cache buffers: one more set of buffers per context,
    the weights and sessions are shared); further calls wait for a free context. 1 (default):
    calls are serialised. ONNX Runtime on the CPU and torch without CUDA graphs allow any number;
    torch with CUDA graphs, TensorRT and ONNX Runtime on CUDA allow 1 for now (BackendError)."""

    def __init__(self, backend: Backend, spec: ModelSpec, plan: SamplerPlan, step_graphs: Sequence[int],
                 concurrency: int = 1) -> None:
        self.backend = backend
        self.spec = spec
        self.plan = plan
        self.step_graphs = list(step_graphs)
        if len(self.step_graphs) != len(plan.timesteps):
            raise ValueError("one graph index per sampler step is needed")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a whole number of at least 1, got {concurrency!r}")
        limit = backend.max_contexts
        if limit is not None and concurrency > limit:
            why = f" {backend.context_limit_reason}" if backend.context_limit_reason else ""
            raise BackendError(f"concurrency {concurrency} is not yet supported on the {backend.name} backend on "
                               f"{backend.device}{why} (at most {limit}): use concurrency=1, which serialises calls "
                               "from several threads, or the onnxruntime backend on the CPU")
        self.concurrency = concurrency
        self._pool = ContextPool(backend, concurrency)

    @classmethod
    def from_bundle(cls, folder: str | Path, backend: str = "auto", device: str = "cpu",
                    threads: int | None = None, verify: bool = True, dtype: str = "float32",
                    prepack: str = "auto", concurrency: int = 1, compile: bool = False) -> Pipeline:
        """backend: "auto" (the fastest available on the device), "onnxruntime", "torch" or
        "tensorrt"; device: "cpu", "cuda" or "auto" (CUDA when torch sees a GPU). dtype (torch
        backend): "float32", "bfloat16" or "float16". compile: the torch backend with each step
        run through torch.compile (`TorchBackend`; backend "auto" then means torch, any other
        backend is refused). prepack (ONNX Runtime): "auto", "on" or
        "off": whether each step session keeps pre-packed weights, faster at a copy of the weights
        per session (runtime/backends/ort.py `prepack_weights`). concurrency: generations that may
        run at once from several threads (see the class; each one more set of cache buffers).
        Every backend runs the bundle itself: its graphs, its engine, or (torch) the model rebuilt
        from its manifest with the weights of its weights.bin."""
        asked = backend
        backend, device = resolve(backend, device)
        if compile and asked == "auto":
            backend = "torch"  # compile=True asks for the torch backend's compiled steps
        if compile and backend != "torch":
            raise BackendError(f"compile=True is for the torch backend (torch.compile), not {backend!r}: "
                               "pass backend='torch' (on the command line: --backend torch)")
        bundle = Bundle(folder, verify=verify)
        m = bundle.manifest
        if asked == "auto" and device == "cuda" and m.engines and tensorrt_installed() and not compile:
            if m.engine(current_engine_key()) is not None:
                backend = "tensorrt"
        # ONNX Runtime runs the bundle's graph files (several may share a sparsity pattern, writing
        # different cache entries); torch and TensorRT run one module / profile per pattern
        if backend == "tensorrt":
            return cls(TensorRTBackend(bundle, device=device), bundle.spec, m.sampler, step_graph_indices(m.schedule),
                       concurrency=concurrency)
        if backend == "torch":
            spec = bundle.model_spec()
            # the spec's cache layout was checked against the bundle's when it was built (Bundle._meta_spec)
            torch_backend = TorchBackend(spec, m.schedule, device=device, dtype=dtype, layer_cache=m.layer_cache,
                                         compile=compile)
            return cls(torch_backend, spec, m.sampler, step_graph_indices(m.schedule), concurrency=concurrency)
        return cls(OrtBackend(bundle, device=device, threads=threads, prepack=prepack), bundle.spec, m.sampler,
                   m.step_graphs, concurrency=concurrency)

    @classmethod
    def from_model(cls, model, schedule, batch_size: int = 1, guidance: bool = True, seed: int = 0,
                   device: str = "cpu", sampler: dict | None = None, options: dict | None = None,
                   dtype: str = "float32", static: bool = True, guidance_scale: float | None = None,
                   concurrency: int = 1, compile: bool = False) -> Pipeline:
        """The PyTorch pipeline of a model (built-in name or diffusers folder): same schedule,
        same sampler, the token-cached step modules over static ping-pong buffers (CUDA graphs
        on a GPU); static=False runs them eagerly. concurrency, compile: as for `from_spec`."""
        spec = make_spec(model, batch_size=batch_size, guidance=guidance, seed=seed, sampler_overrides=sampler,
                         options=options, guidance_scale=guidance_scale)
        return cls.from_spec(spec, schedule, device=device, dtype=dtype, static=static, concurrency=concurrency,
                             compile=compile)

    @classmethod
    def from_spec(cls, spec: ModelSpec, schedule, device: str = "cpu", dtype: str = "float32",
                  static: bool = True, cuda_graphs: bool | None = None, concurrency: int = 1,
                  compile: bool = False) -> Pipeline:
        """The PyTorch pipeline over an already built spec (several pipelines can share its
        model); cuda_graphs None = on whenever static buffers run on CUDA. compile: each step
        module through torch.compile (fewer, fused kernels; minutes of compilation on first use).
        concurrency: generations that may run at once from several threads, each on its own buffers
        over the shared step modules; more than 1 is refused with CUDA graphs or compile (not yet
        supported: use cuda_graphs=False, compile=False)."""
        spec = spec.for_schedule(schedule)
        backend = TorchBackend(spec, schedule, device=device, dtype=dtype, static=static, cuda_graphs=cuda_graphs,
                               compile=compile)
        return cls(backend, spec, spec.schedule_plan(schedule), step_graph_indices(schedule),
                   concurrency=concurrency)

    def generate(self, class_labels: Sequence[int] | None = None, seed: int = 0, guidance_scale: float | None = None,
                 conditioning: dict[str, np.ndarray] | None = None, time_steps: bool = True,
                 check_finite: bool = True, noise: np.ndarray | None = None) -> GenerationResult:
        """Generate one sample per conditioning row: `class_labels` for class-conditional models,
        or `conditioning` (name -> array whose first axis is the sample, e.g. prompt_embeds of
        shape (n, L, D); `spec.conditioning_inputs()` lists the names). Samples run in batches of
        the bundle's batch size (the last batch padded); sample i always starts from the noise of (seed, i).
        guidance_scale None: the model's default (`spec.default_guidance_scale`, recorded in the bundle).
        time_steps: time every step (the backend synchronises after each); False synchronises once per
        batch, so on a GPU nothing waits between the first and the last step (step_seconds then zero).
        check_finite: raise NonFiniteOutputError when a batch ends in NaN or infinite latents
        (rather than returning images that are silently black or white); False returns them.
        Conditioning is checked in full (names, shapes, label range, finiteness) before anything runs:
        ValueError naming the problem (`check_inputs` runs the same checks alone).
        noise: the starting latents (n, *spec.latent_shape) instead of those of `seed`; a server packs
        the samples of several requests, each with its own seed, into one batch with it.
        Thread-safe: concurrent calls each run on a context of the pipeline's pool (`concurrency`),
        waiting for one while all are busy; the result of a call does not depend on the others."""
        conditioning, batches = self._batches(class_labels, conditioning)
        n = len(next(iter(conditioning.values())))
        guidance_scale = self.spec.resolve_guidance_scale(guidance_scale)
        if noise is None:
            noise = initial_noise(seed, n, self.spec.latent_shape)
        elif np.shape(noise) != (n, *self.spec.latent_shape):
            raise ValueError(f"noise must have shape {(n, *self.spec.latent_shape)} (one latent per sample), "
                             f"got {np.shape(noise)}")
        b = self.spec.batch_size
        per_step = np.zeros(len(self.step_graphs))
        outs = []
        with self._pool.acquire() as ctx:
            t_start = time.perf_counter()
            for number, (start, size, batch) in enumerate(batches):
                ctx.start(_pad_rows(np.asarray(noise[start:start + size], np.float32), b))
                for i, graph in enumerate(self.step_graphs):
                    feeds = self.spec.feeds(StepCall(float(self.plan.timesteps[i]), self.plan.coefficients[i]),
                                            batch, guidance_scale)
                    t0 = time.perf_counter()
                    ctx.run_step(graph, feeds)
                    if time_steps:
                        ctx.synchronize()
                        per_step[i] += time.perf_counter() - t0
                ctx.synchronize()
                out = ctx.latent()[:size]
                if check_finite:
                    self._check_finite(out, number, start)
                outs.append(out)
            total = time.perf_counter() - t_start
        labels = conditioning.get("class_labels")
        return GenerationResult(np.concatenate(outs), labels, per_step.tolist(), total,
                                backend=self.backend.name, device=self.backend.device, guidance_scale=guidance_scale)

    def check_inputs(self, class_labels: Sequence[int] | None = None,
                     conditioning: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The conditioning arrays `generate` would run for these inputs (class_labels folded in),
        after the checks `generate` makes before any step (names, shapes, label range, finiteness,
        every batch as padded), without running anything: ValueError naming the problem."""
        return self._batches(class_labels, conditioning)[0]

    def _batches(self, class_labels, conditioning) -> tuple[dict[str, np.ndarray], list]:
        """(the checked conditioning, [(start, size, padded batch conditioning)]) or ValueError."""
        if class_labels is not None:
            conditioning = {**(conditioning or {}), "class_labels": _as_labels(class_labels)}
        if not conditioning:
            raise ValueError("no conditioning given: pass class_labels or conditioning="
                             f"{{{', '.join(repr(t.name) for t in self.spec.conditioning_inputs())}: ...}}")
        conditioning = {k: np.asarray(v) for k, v in conditioning.items()}
        counts = {k: (v.shape[0] if v.ndim else 0) for k, v in conditioning.items()}
        n = next(iter(counts.values()))
        if n == 0 or any(c != n for c in counts.values()):
            raise ValueError(f"conditioning is empty or ragged: every array needs the same, non-zero number of samples on its "
                             f"first axis; got {counts}")
        _check_values(self.spec, conditioning)
        b = self.spec.batch_size
        batches = []
        for start in range(0, n, b):
            size = min(b, n - start)
            batch = {k: _pad_rows(v[start:start + size], b) for k, v in conditioning.items()}
            try:
                self.spec.check_conditioning(batch)
            except ValueError as e:
                padded = f", padded to the batch size {b} by repeating its last row" if size < b else ""
                raise ValueError(f"samples {start}-{start + size - 1} of {n} (batch {start // b}{padded}): {e}") from None
            batches.append((start, size, batch))
        return conditioning, batches

    def _check_finite(self, latents: np.ndarray, batch: int, start: int) -> None:
        """NonFiniteOutputError naming the samples of batch `batch` whose latents are NaN or
        infinite, and the likeliest cause."""
        bad = ~np.isfinite(latents.reshape(len(latents), -1)).all(axis=1)
        if not bad.any():
            return
        samples = [start + int(i) for i in np.flatnonzero(bad)]
        nan = int(np.isnan(latents).sum())
        inf = int(np.isinf(latents).sum())
        if not (np.isfinite(self.plan.coefficients).all() and np.isfinite(self.plan.timesteps).all()):
            cause = ("the sampler's coefficients or timesteps are not finite: the bundle's manifest is corrupted or "
                     "was edited; re-export it")
        elif getattr(self.backend, "dtype", "float32") == "float16":
            cause = "float16 overflowed: run with dtype='bfloat16' or 'float32'"
        else:
            cause = ("the bundle's weights or graphs may be corrupted (re-export it, or open it with verify=True), "
                     "or the guidance scale is extreme")
        raise NonFiniteOutputError(
            f"samples {samples} (batch {batch}) ended with non-finite latents ({nan} NaN, {inf} infinite values) on "
            f"the {self.backend.name} backend; likely cause: {cause}. Pass check_finite=False to get them anyway")


def _as_labels(class_labels) -> np.ndarray:
    """class_labels as an int64 vector, or ValueError for anything that is not whole numbers."""
    labels = np.asarray(class_labels)
    if labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all():
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"class labels must be whole numbers, got {labels.tolist()!r}")
    return labels.astype(np.int64).reshape(-1)


def _check_values(spec: ModelSpec, conditioning: dict[str, np.ndarray]) -> None:
    """ValueError for conditioning the model does not take, or values its inputs cannot hold:
    non-numbers, NaN/infinite floats, fractions or out-of-range numbers for integer inputs."""
    inputs = {t.name: t for t in spec.conditioning_inputs()}
    unknown = sorted(set(conditioning) - set(inputs))
    if unknown:
        raise ValueError(f"conditioning {unknown} is not an input of this model; it takes {sorted(inputs)}")
    for name, value in conditioning.items():
        kind, target = value.dtype.kind, np.dtype(inputs[name].numpy_dtype)
        if kind not in "biuf":
            raise ValueError(f"conditioning {name!r} must hold numbers, got an array of {value.dtype}")
        if kind == "f" and not np.isfinite(value).all():
            raise ValueError(f"conditioning {name!r} holds NaN or infinite values")
        if target.kind in "iu":
            if kind == "f" and (value != np.round(value)).any():
                raise ValueError(f"conditioning {name!r} must hold whole numbers")
            info = np.iinfo(target)
            if value.size and (value.min() < info.min or value.max() > info.max):
                raise ValueError(f"conditioning {name!r} holds values outside {target} ({info.min}..{info.max})")


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Pad the first axis to `rows` by repeating the last row (a partial last batch)."""
    return x if x.shape[0] == rows else np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], 0)])
