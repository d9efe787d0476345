"""Explicitly quantized TensorRT engines (`dsexport --tensorrt int8|fp8`).

TensorRT's recommended route to int8 and fp8 is *explicit* quantization: the ONNX graph carries
QuantizeLinear/DequantizeLinear pairs with their scales, and the network is built strongly typed,
without precision flags (TensorRT 10 documentation, "Explicit Quantization"). TensorRT's own
quantization is symmetric, so activations and weights are both quantized with zero point 0:

    x_q = clamp(round(x / s)),   x ≈ s · x_q,   s = max|x| / q_max   (q_max = 127 for int8, 448 for fp8 e4m3)

The graph quantized is the bundle's universal step graph (export/universal.py), from which the one
engine with a profile per distinct step is built. Which matmuls are quantized is decided by the
same rules as `dsexport --precision int8` (export/quantize.py: attention and feed-forward weights
of every block but the first; the step's mechanics, token scores, TopK and the cache stay fp32),
and the activation ranges come from the same calibration set: the bundle's own fp32 trajectory on
calibration seeds, every computed step's inputs as that step received them (export/calibration.py).
The universal graph has one scale per tensor for all steps, so a tensor's range is the range over
every computed step's inputs, run with that step's per-layer K.

The Q/DQ graph is an intermediate: it is written beside the bundle being exported, the engine is
built from it and it is removed (the engine holds the quantized weights); the manifest's engine
entry records how it was quantized and the CPU parity of the Q/DQ graph against the fp32 universal
graph on the calibration inputs (run on ONNX Runtime's CPU provider before the build).

NOT YET RUN on real TensorRT (it cannot be installed on our build machines); the Q/DQ graph, its
calibration and its parity are tested on CPU.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import numpy_helper

from diffsparse.bundle_format import UNIVERSAL_FILE
from diffsparse.cache_layout import Role, output_name
from diffsparse.export.calibration import GraphRunner, StepInputs, collect_step_inputs, tensor_ranges
from diffsparse.export.quantize import (QuantizationError, QuantizeConfig, calibration_tensors, layer_groups, quantize_graph,
                                        stored_groups, weight_nodes, write_calibration_cache)
from diffsparse.export.universal import k_carriers
from diffsparse.export.verify import compare
from diffsparse.runtime.backends.ort import import_ort, session_options
from diffsparse.runtime.bundle import Bundle

log = logging.getLogger(__name__)

#: TensorRT precision -> the largest magnitude of its quantized type (symmetric: s = max|x| / q_max)
QUANTIZED_PRECISIONS = {"int8": 127.0, "fp8": 448.0}
#: the opset fp8 QuantizeLinear/DequantizeLinear need
_FP8_OPSET = 19


def universal_feeds(bundle: Bundle, steps: list[StepInputs], declared: set[str]) -> list[dict[str, np.ndarray]]:
    """The recorded feeds of every computed step for the universal graph: each with the K
    carriers of the graph that step runs, and the cache entries that graph does not read filled
    with zeros (the universal graph declares them all; a step's outputs never depend on them)."""
    m = bundle.manifest
    zeros = {t.name: t.zeros() for t in m.cache.tensors}
    feeds = []
    for s in steps:
        carriers = k_carriers(bundle.spec, m.graphs[s.graph].keep)
        for f in s.feeds:
            full = {**zeros, **f, **carriers}
            missing = declared - set(full)
            if missing:
                raise ValueError(f"the universal graph takes inputs no step graph records: {sorted(missing)[:3]}")
            feeds.append({k: v for k, v in full.items() if k in declared})
    return feeds


def quantize_universal(folder: Path, model: torch.nn.Module, precision: str, config: QuantizeConfig, out: Path) -> dict:
    """Write the explicitly quantized universal graph of the bundle in `folder` to `out` (its
    tensors in a file beside it) and return what the engine entry records: the type, the
    quantized matmuls, the calibration and the Q/DQ graph's parity against the fp32 universal
    graph on every calibration input (max over inputs of `verify.compare`, on ONNX Runtime CPU).
    `model`: the torch model the bundle was exported from (which weight belongs to which layer)."""
    if precision not in QUANTIZED_PRECISIONS:
        raise ValueError(f"explicit quantization is for {sorted(QUANTIZED_PRECISIONS)}, got {precision!r}")
    folder, out = Path(folder), Path(out)
    bundle = Bundle(folder, verify=False)
    universal = onnx.load(str(folder / UNIVERSAL_FILE), load_external_data=False)
    nodes, _ = weight_nodes(universal, layer_groups(universal, bundle.manifest, stored_groups(model)), config)
    if not nodes:
        raise QuantizationError(f"the universal graph has no matmul left to quantize (keep_fp32="
                                f"{list(config.keep_fp32)}): build the engine in fp16 or keep fewer layers fp32")
    steps = collect_step_inputs(bundle, config.calibration)
    work = out.parent / f".{out.stem}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        with GraphRunner(bundle, threads=config.calibration.threads) as runner:
            feeds = universal_feeds(bundle, steps, {i.name for i in universal.graph.input})
            ranges = tensor_ranges(runner, universal, calibration_tensors(universal, nodes), feeds, config.percentile)
            # symmetric ranges: TensorRT quantizes with zero point 0
            ranges = {n: (-max(abs(lo), abs(hi)), max(abs(lo), abs(hi))) for n, (lo, hi) in ranges.items()}
            cache = work / "calibration.json"
            write_calibration_cache(ranges, cache)
            src = work / "universal.onnx"
            onnx.save(onnx.load(str(folder / UNIVERSAL_FILE)), str(src), save_as_external_data=True,
                      location="universal.data")
            # int8 first, for both: onnxruntime's quantizer calibrates fp8 only from a distribution
            # (its own std-based scale); TensorRT's fp8 recipe is max-calibrated, which the int8 ranges give
            quantize_graph(src, out, nodes, config, cache, symmetric=True, per_channel=precision == "int8")
            if precision == "fp8":
                qdq = int8_qdq_to_fp8(onnx.load(str(out)), onnx.load(str(src)))
                for stale in out.parent.glob(f"{out.name}*.data"):
                    stale.unlink()
                onnx.save(qdq, str(out), save_as_external_data=True, location=f"{out.name}.data")
            reuse = [output_name(e.name) for e in bundle.manifest.cache.entries if e.role == Role.REUSE]
            parity = _parity(runner, universal, out, feeds, reuse)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("quantized the universal graph to %s: %d matmuls, %d calibration inputs, CPU parity %s", precision,
             len(nodes), len(feeds), parity)
    return {"type": precision, "format": "ONNX Q/DQ, symmetric (zero point 0), strongly typed network",
            "weights": "per output channel" if precision == "int8" else "per tensor", "activations": "per tensor",
            "quantized_matmuls": len(nodes), "calibration": config.calibration.describe(),
            "calibration_inputs": len(feeds), "method": config.method, "keep_fp32": list(config.keep_fp32),
            "cpu_parity_vs_fp32_universal": parity}


def int8_qdq_to_fp8(qdq: onnx.ModelProto, fp32: onnx.ModelProto) -> onnx.ModelProto:
    """The symmetric, max-calibrated int8 Q/DQ graph `qdq` as an fp8 (e4m3) Q/DQ graph: every scale
    becomes s · 127 / 448 (the same max|x| on fp8's range), every zero point an fp8 zero, and every
    quantized weight is requantized from its fp32 original in `fp32` (not from its int8 values):
    w_fp8 = fp8(clip(w / s_fp8, ±448)). Opset raised to 19, the first with fp8 Q/DQ."""
    originals = {i.name: i for i in fp32.graph.initializer}
    inits = {i.name: i for i in qdq.graph.initializer}
    ratio = QUANTIZED_PRECISIONS["int8"] / QUANTIZED_PRECISIONS["fp8"]
    replaced: dict[str, onnx.TensorProto] = {}

    def rescale(name: str) -> None:
        if name not in replaced:
            replaced[name] = numpy_helper.from_array((numpy_helper.to_array(inits[name]) * ratio).astype(np.float32), name)

    def fp8_zero(name: str) -> None:
        if name not in replaced:
            zero = np.zeros(numpy_helper.to_array(inits[name]).shape, np.float32).astype(ml_dtypes.float8_e4m3fn)
            replaced[name] = numpy_helper.from_array(zero, name)

    for node in qdq.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        x, scale, zero = node.input[0], node.input[1], node.input[2]
        rescale(scale)
        fp8_zero(zero)
        if node.op_type == "DequantizeLinear" and x in inits and x not in replaced:   # a stored quantized weight
            source = originals.get(x.removesuffix("_quantized"))
            if source is None:
                raise ValueError(f"no fp32 original for the quantized weight {x!r}")
            w = numpy_helper.to_array(source).astype(np.float32)
            s8 = numpy_helper.to_array(replaced[scale]).astype(np.float32)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if s8.ndim == 1 and s8.size > 1:   # per channel along `axis`
                s8 = np.expand_dims(s8, [d for d in range(w.ndim) if d != axis % w.ndim])
            limit = QUANTIZED_PRECISIONS["fp8"]
            replaced[x] = numpy_helper.from_array(np.clip(w / s8, -limit, limit).astype(ml_dtypes.float8_e4m3fn), x)
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    del out.graph.initializer[:]
    out.graph.initializer.extend(replaced.get(i.name, i) for i in qdq.graph.initializer)
    for entry in out.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < _FP8_OPSET:
            entry.version = _FP8_OPSET
    return out


def _parity(runner: GraphRunner, fp32: onnx.ModelProto, quantized: Path,
            feeds: list[dict[str, np.ndarray]], reuse: list[str]) -> dict:
    """The Q/DQ graph against the fp32 universal graph on ONNX Runtime CPU, over `feeds`: the max
    `verify.compare` error of the step's output latent, and on how many inputs the token selection
    (the reuse counts it outputs, `reuse`) differs in some layer — a flipped selection is the quantized
    graph choosing other tokens, not a kernel error, so it is counted rather than folded into the
    error."""
    ref_sess = runner.session(fp32)
    q_sess = import_ort().InferenceSession(str(quantized), session_options(), providers=["CPUExecutionProvider"])
    names = [o.name for o in fp32.graph.output]
    latent = names[0]
    worst, flipped = 0.0, 0
    for f in feeds:
        ref = dict(zip(names, ref_sess.run(names, f)))
        got = dict(zip(names, q_sess.run(names, f)))
        worst = max(worst, compare({latent: got[latent]}, {latent: ref[latent]}))
        flipped += any(not np.array_equal(got[n], ref[n]) for n in reuse)
    return {"output_max_error": worst, "inputs": len(feeds), "inputs_with_other_token_selection": flipped}
