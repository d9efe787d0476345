"""TensorRT engines for a bundle: one engine, one optimization profile per distinct step.

Built from the bundle's universal step graph (export/universal.py), whose per-layer K are carrier
input lengths: every distinct step of the schedule becomes a profile with min = opt = max, so each
profile is fully static (graph-capturable) and the weights are stored once (docs/gpu-deployment.md
says why this beats per-step or per-block engines). Built through Polygraphy's Python API with a
timing cache and fp16/bf16 as asked; int8 and fp8 engines are built strongly typed from the
explicitly quantized (Q/DQ) universal graph (export/tensorrt_quantize.py). Engines are only
valid for the TensorRT version and GPU they were built with, so they live under a key naming
both, and the runtime refuses any other.

NOT YET RUN on real TensorRT: it cannot be installed on our build machines; everything around it
(keys, profiles, errors) is tested on CPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from diffsparse.cache_layout import carrier_name
from diffsparse.models.base import ModelSpec
from diffsparse.schedule import Schedule

log = logging.getLogger(__name__)
INSTALL = "pip install tensorrt polygraphy (on a machine with an NVIDIA GPU and a CUDA build of torch)"
#: engine precisions; int8 and fp8 are explicitly quantized (export/tensorrt_quantize.py)
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
EXPLICITLY_QUANTIZED = ("int8", "fp8")


class TensorRTUnavailable(RuntimeError):
    """TensorRT, Polygraphy or a CUDA GPU is missing."""


def check_available() -> None:
    missing = [m for m in ("tensorrt", "polygraphy") if importlib.util.find_spec(m) is None]
    if missing:
        raise TensorRTUnavailable(f"building TensorRT engines needs {' and '.join(missing)}: {INSTALL}")
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("building TensorRT engines needs a CUDA GPU visible to torch")


def step_profiles(spec: ModelSpec, schedule: Schedule) -> list[dict[str, tuple[int, ...]]]:
    """One profile per distinct step graph, in graph order: each carrier fixed at that step's K."""
    return [{carrier_name(l): (k,) for l, k in zip(spec.layers, sig)} for sig in schedule.distinct_signatures()]


def build_settings(precision: str) -> tuple[dict[str, bool], bool]:
    """(Polygraphy CreateConfig precision flags, strongly typed network) for an engine precision.
    fp16/bf16 let TensorRT choose per layer; an explicitly quantized graph is built strongly typed
    with no precision flag, as TensorRT's documentation asks: its Q/DQ pairs say where int8/fp8 is."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision in EXPLICITLY_QUANTIZED:
        return {}, True
    return {"fp16": precision == "fp16", "bf16": precision == "bf16"}, False


def build_engine(onnx_path: Path, profiles: list[dict[str, tuple[int, ...]]], out_path: Path,
                 precision: str = "fp16", timing_cache: Path | None = None) -> int:
    """Build and write the engine (atomically); returns its size in bytes. `onnx_path`: the
    universal graph, explicitly quantized for int8/fp8."""
    flags, strongly_typed = build_settings(precision)
    check_available()
    # optional heavy dependency, present on GPU machines only
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path

    trt_profiles = []
    for p in profiles:
        prof = Profile()
        for name, shape in p.items():
            prof.add(name, min=shape, opt=shape, max=shape)
        trt_profiles.append(prof)
    cache = str(timing_cache) if timing_cache is not None else None
    config = CreateConfig(**flags, profiles=trt_profiles,
                          load_timing_cache=cache if cache and os.path.exists(cache) else None)
    network = network_from_onnx_path(str(onnx_path), strongly_typed=strongly_typed)
    data = engine_bytes_from_network(network, config=config, save_timing_cache=cache)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, out_path)
    log.info("built TensorRT engine %s (%d profiles, %s)", out_path, len(profiles), precision)
    return out_path.stat().st_size
