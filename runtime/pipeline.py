"""The runtime API: load a bundle, generate samples, get timings.

    from diffsparse.runtime import Pipeline
    pipe = Pipeline.from_bundle("out/bundle")                 # ONNX Runtime on the CPU
    result = pipe.generate(class_labels=[0, 1, 2], seed=0)  # the model's default guidance scale
    result.grid().save("grid.png"); result.step_seconds       # per-step latency
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffsparse.bundle_format import current_engine_key, step_graph_indices
from diffsparse.models.base import ModelSpec, StepCall
from diffsparse.models.zoo import make_spec
from diffsparse.runtime.backends.base import Backend
from diffsparse.runtime.backends.ort import OrtBackend
from diffsparse.runtime.backends.select import resolve, tensorrt_installed
from diffsparse.runtime.backends.tensorrt import TensorRTBackend
from diffsparse.runtime.backends.torch_backend import TorchBackend
from diffsparse.runtime.bundle import Bundle
from diffsparse.sampler import SamplerPlan, initial_noise

log = logging.getLogger(__name__)


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
    """Sequences the steps of a schedule on a backend; the backend keeps latent and cache on device."""

    def __init__(self, backend: Backend, spec: ModelSpec, plan: SamplerPlan, step_graphs: Sequence[int]) -> None:
        self.backend = backend
        self.spec = spec
        self.plan = plan
        self.step_graphs = list(step_graphs)
        if len(self.step_graphs) != len(plan.timesteps):
            raise ValueError("one graph index per sampler step is needed")

    @classmethod
    def from_bundle(cls, folder: str | Path, backend: str = "auto", device: str = "cpu",
                    threads: int | None = None, verify: bool = True, dtype: str = "float32",
                    prepack: str = "auto") -> Pipeline:
        """backend: "auto" (the fastest available on the device), "onnxruntime", "torch" or
        "tensorrt"; device: "cpu", "cuda" or "auto" (CUDA when torch sees a GPU). dtype (torch
        backend): "float32", "bfloat16" or "float16". prepack (ONNX Runtime): "auto", "on" or
        "off": whether each step session keeps pre-packed weights, faster at a copy of the weights
        per session (runtime/backends/ort.py `prepack_weights`). Every backend runs the bundle itself: its
        graphs, its engine, or (torch) the model rebuilt from its manifest with the weights of
        its weights.bin."""
        asked = backend
        backend, device = resolve(backend, device)
        bundle = Bundle(folder, verify=verify)
        m = bundle.manifest
        if asked == "auto" and device == "cuda" and m.engines and tensorrt_installed():
            if m.engine(current_engine_key()) is not None:
                backend = "tensorrt"
        # ONNX Runtime runs the bundle's graph files (several may share a sparsity pattern, writing
        # different cache entries); torch and TensorRT run one module / profile per pattern
        if backend == "tensorrt":
            return cls(TensorRTBackend(bundle, device=device), bundle.spec, m.sampler, step_graph_indices(m.schedule))
        if backend == "torch":
            spec = bundle.model_spec()
            torch_backend = TorchBackend(spec, m.schedule, device=device, dtype=dtype, layer_cache=m.layer_cache)
            bundle.check_cache_layout(torch_backend.cache_layout)
            return cls(torch_backend, spec, m.sampler, step_graph_indices(m.schedule))
        return cls(OrtBackend(bundle, device=device, threads=threads, prepack=prepack), bundle.spec, m.sampler,
                   m.step_graphs)

    @classmethod
    def from_model(cls, model, schedule, batch_size: int = 1, guidance: bool = True, seed: int = 0,
                   device: str = "cpu", sampler: dict | None = None, options: dict | None = None,
                   dtype: str = "float32", static: bool = True, guidance_scale: float | None = None) -> Pipeline:
        """The PyTorch pipeline of a model (built-in name or diffusers folder): same schedule,
        same sampler, the token-cached step modules over static ping-pong buffers (CUDA graphs
        on a GPU); static=False runs them eagerly."""
        spec = make_spec(model, batch_size=batch_size, guidance=guidance, seed=seed, sampler_overrides=sampler,
                         options=options, guidance_scale=guidance_scale)
        return cls.from_spec(spec, schedule, device=device, dtype=dtype, static=static)

    @classmethod
    def from_spec(cls, spec: ModelSpec, schedule, device: str = "cpu", dtype: str = "float32",
                  static: bool = True, cuda_graphs: bool | None = None) -> Pipeline:
        """The PyTorch pipeline over an already built spec (several pipelines can share its
        model); cuda_graphs None = on whenever static buffers run on CUDA."""
        backend = TorchBackend(spec, schedule, device=device, dtype=dtype, static=static, cuda_graphs=cuda_graphs)
        return cls(backend, spec, spec.sampler_plan(schedule.num_steps), step_graph_indices(schedule))

    def generate(self, class_labels: Sequence[int] | None = None, seed: int = 0, guidance_scale: float | None = None,
                 conditioning: dict[str, np.ndarray] | None = None, time_steps: bool = True) -> GenerationResult:
        """Generate one sample per conditioning row: `class_labels` for class-conditional models,
        or `conditioning` (name -> array whose first axis is the sample, e.g. prompt_embeds of
        shape (n, L, D); `spec.conditioning_inputs()` lists the names). Samples run in batches of
        the bundle's batch size (the last batch padded); sample i always starts from the noise of (seed, i).
        guidance_scale None: the model's default (`spec.default_guidance_scale`, recorded in the bundle).
        time_steps: time every step (the backend synchronises after each); False synchronises once per
        batch, so on a GPU nothing waits between the first and the last step (step_seconds then zero)."""
        if class_labels is not None:
            conditioning = {**(conditioning or {}), "class_labels": np.asarray(class_labels, dtype=np.int64).reshape(-1)}
        if not conditioning:
            raise ValueError("no conditioning given: pass class_labels or conditioning="
                             f"{{{', '.join(repr(t.name) for t in self.spec.conditioning_inputs())}: ...}}")
        conditioning = {k: np.asarray(v) for k, v in conditioning.items()}
        guidance_scale = self.spec.resolve_guidance_scale(guidance_scale)
        counts = {k: (v.shape[0] if v.ndim else 0) for k, v in conditioning.items()}
        n = next(iter(counts.values()))
        if n == 0 or any(c != n for c in counts.values()):
            raise ValueError(f"conditioning is empty or ragged: every array needs the same, non-zero number of samples on its "
                             f"first axis; got {counts}")
        b = self.spec.batch_size
        noise = initial_noise(seed, n, self.spec.latent_shape)
        backend = self.backend.prepare()
        per_step = np.zeros(len(self.step_graphs))
        outs = []
        t_start = time.perf_counter()
        for start in range(0, n, b):
            size = min(b, n - start)
            batch = {k: _pad_rows(v[start:start + size], b) for k, v in conditioning.items()}
            self.spec.check_conditioning(batch)
            backend.start(_pad_rows(noise[start:start + size], b))
            for i, graph in enumerate(self.step_graphs):
                feeds = self.spec.feeds(StepCall(float(self.plan.timesteps[i]), self.plan.coefficients[i]),
                                        batch, guidance_scale)
                t0 = time.perf_counter()
                backend.run_step(graph, feeds)
                if time_steps:
                    backend.synchronize()
                    per_step[i] += time.perf_counter() - t0
            backend.synchronize()
            outs.append(backend.latent()[:size])
        total = time.perf_counter() - t_start
        labels = conditioning.get("class_labels")
        return GenerationResult(np.concatenate(outs), labels, per_step.tolist(), total,
                                backend=backend.name, device=backend.device, guidance_scale=guidance_scale)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Pad the first axis to `rows` by repeating the last row (a partial last batch)."""
    return x if x.shape[0] == rows else np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], 0)])
