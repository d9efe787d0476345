"""Parity of exported step graphs against the PyTorch step they came from.

Inputs are realistic rather than zeros: a random latent runs one dense PyTorch step to fill the
token cache, then every graph and its PyTorch step get the same latent, constants and cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffsparse.export.onnx_export import next_name

from diffsparse.manifest import Manifest
from diffsparse.models.base import ModelSpec, StepCall
from diffsparse.sampler import initial_noise


def reference_inputs(spec: ModelSpec, manifest: Manifest, seed: int = 0) -> dict[str, np.ndarray]:
    """Latent, step constants, conditioning and a filled cache, keyed by graph input name."""
    plan = manifest.sampler
    selector = manifest.schedule.selector
    rng = np.random.default_rng(seed)
    conditioning = spec.example_conditioning(rng)
    latent = initial_noise(seed, spec.batch_size, spec.latent_shape)
    dense = spec.build_step(spec.dense_keep(), selector)
    feeds0 = spec.feeds(StepCall(float(plan.timesteps[0]), plan.coefficients[0]), conditioning, 4.0)
    specs = spec.step_inputs()
    with torch.inference_mode():
        args = [torch.from_numpy(latent)] + [torch.from_numpy(feeds0[s.name]) for s in specs[1:]]
        out = dense(*args, *spec.zero_cache(selector))
    t = min(1, len(plan.timesteps) - 1)
    feeds = spec.feeds(StepCall(float(plan.timesteps[t]), plan.coefficients[t]), conditioning, 4.0)
    feeds[specs[0].name] = out[0].numpy()
    for buf, value in zip(spec.cache_buffers(selector), out[1:]):
        feeds[buf.name] = value.numpy()
    return feeds


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Max over outputs of max|a - b| / max(1, max|b|): absolute for O(1) tensors, relative for large."""
    worst = 0.0
    for name, ref in b.items():
        diff = np.abs(a[name].astype(np.float64) - ref.astype(np.float64)).max() if ref.size else 0.0
        worst = max(worst, float(diff / max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)))
    return worst


def verify_graphs(folder: str | Path, spec: ModelSpec) -> list[float]:
    """Per graph, the parity error of ONNX Runtime against the PyTorch step (see `compare`)."""
    import onnxruntime as ort

    folder = Path(folder)
    manifest = Manifest.load(folder, verify=False)
    feeds = reference_inputs(spec, manifest)
    selector = manifest.schedule.selector
    in_names = [s.name for s in manifest.inputs] + [c.name for c in manifest.cache]
    out_names = [s.name for s in manifest.outputs] + [next_name(c.name) for c in manifest.cache]
    errors = []
    for g in manifest.graphs:
        module = spec.build_step(g.keep, selector)
        with torch.inference_mode():
            ref = module(*[torch.from_numpy(feeds[n]) for n in in_names])
        ref_np = {n: r.numpy() for n, r in zip(out_names, ref)}
        sess = ort.InferenceSession(str(folder / g.file), providers=["CPUExecutionProvider"])
        # the exporter drops inputs a graph does not read (e.g. reuse counts of a full step)
        declared = {i.name for i in sess.get_inputs()}
        got = sess.run(out_names, {n: feeds[n] for n in in_names if n in declared})
        errors.append(compare(dict(zip(out_names, got)), ref_np))
    return errors
