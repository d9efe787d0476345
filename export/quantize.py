"""Post-training quantization of a bundle's step graphs (`dsexport --precision int8`).

What is quantized: the weight-bearing matmuls (MatMul/Gemm with a stored weight) of the cacheable
layers — attention projections and feed-forward layers of every block but the first — as ONNX
QDQ: weights int8 symmetric per output channel, activations uint8 per
tensor with ranges calibrated per step graph on the sampler's own inputs at the timesteps that
graph runs (export/calibration.py). ONNX Runtime's CPU provider fuses each DequantizeLinear ->
MatMul into an int8 GEMM with an fp32 output (MatMulIntegerToFloat / QGemm), so everything between
matmuls (normalisation, softmax, residuals, the adaLN gates) stays fp32.

What is not: the conditioning path (timestep/label embedding and each block's adaLN modulation,
whose error shifts every token of a block alike), the patch embedding and head, and the first
block — measured on mnist-dit, quantizing all matmuls gave 7.8 dB PSNR against fp32 (broken
digits), these exclusions 28.3 dB (docs/precision.md has the table); every node of the step's
mechanics — token scoring, TopK, gather, scatter into the token cache and the sampler update (the `part_*` scopes of
models/cached.py) — and the
activation x activation matmuls of attention (QK^T, PV; `QuantizeConfig.attention`), because the
token scores rank tokens by small differences and the cache carries values across steps; the
cache tensors stay fp32 inputs/outputs. Layers named in `keep_fp32` (e.g. from `dscalibrate
precision`) stay fp32 as well.

Consistency across the bundle: every step graph is quantized by the same rules with the same
calibration method; a weight's int8 values and scales depend only on the weight (symmetric
min/max per channel), so the int8 copy of a weight shared by all graphs is byte-identical in each
and stored once in weights.bin (content-hash names, export/weights.py). Activation scales differ
per graph (their timesteps differ) and are small constants inside each graph. weights.bin also
keeps the model's fp32 parameters that the int8 graphs no longer read, so the torch backend still
runs the bundle (in fp32) and the parameter map stays complete; ONNX Runtime maps but never reads
those pages.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from diffsparse.bundle_format import WEIGHTS_FILE, graph_file
from diffsparse.export.calibration import (CalibrationConfig, GraphRunner, collect_step_inputs, inputs_by_graph,
                                           tensor_ranges)
from diffsparse.export.weights import WeightStore, stored_name
from diffsparse.manifest import Manifest, sha256_file
from diffsparse.runtime.bundle import Bundle

log = logging.getLogger(__name__)

#: graph precisions `dsexport --precision` writes (fp16 runs on TensorRT: `--tensorrt fp16`)
PRECISIONS = ("fp32", "int8")
#: parity tolerance recorded (and enforced) per precision: max |graph - fp32 PyTorch step| /
#: max(1, max |PyTorch|) over every output, with the graph's token selection imposed (export/verify.py)
DEFAULT_TOLERANCE = {"fp32": 1e-3, "int8": 0.5}
#: the step's mechanics, which stay fp32 (models/cached.py part scopes)
MECHANICS_PARTS = ("part_score", "part_gather", "part_scatter", "part_sampler")
CALIBRATION_METHODS = ("minmax", "percentile")
_WEIGHT_OPS = ("MatMul", "Gemm")
_BLOCK = re.compile(r"(?:^|\.)(single_transformer_blocks|transformer_blocks|blocks)\.(\d+)\.(.*)$")


class QuantizationError(ValueError):
    """The bundle cannot be quantized as asked (names the problem and the fix)."""


@dataclass
class QuantizeConfig:
    """Options of int8 post-training quantization (module docstring).

    calibration: how the calibration set is drawn (export/calibration.py; 2 batches from seed 1000).
    method: activation ranges from "minmax" (default: no clipping, the safe choice at 8 bits for
        activations that carry the adaLN-modulated outliers of diffusion transformers) or
        "percentile" (99.999th percentile of |x|, clips rare outliers).
    attention: also quantize the activation x activation matmuls of attention (off).
    kinds: layer kinds whose matmuls are quantized (`parameter_group` prefixes); the others
        ("block": adaLN and timestep embedding, "fixed": embeddings and head) stay fp32.
    first_block_fp32: keep every matmul of block 0 fp32 (the most sensitive block, measured).
    keep_fp32: further layer groups kept fp32 by name (`layer_groups`: "sa3", "mlp3").
    reduce_range: 7-bit weights, for x86 CPUs without VNNI whose u8 x s8 kernel can saturate in
        16 bits (off: measured on this AVX2 machine, no accuracy gain; see docs/precision.md).
    tolerance: parity tolerance against the fp32 PyTorch step, recorded in the manifest.
    """

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    method: str = "minmax"
    attention: bool = False
    kinds: tuple[str, ...] = ("sa", "ca", "mlp", "tmlp", "single")
    first_block_fp32: bool = True
    keep_fp32: tuple[str, ...] = ()
    reduce_range: bool = False
    tolerance: float = DEFAULT_TOLERANCE["int8"]

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise QuantizationError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        if not (isinstance(self.tolerance, (int, float)) and 0 < self.tolerance <= 1):
            raise QuantizationError(f"int8 parity tolerance must be in (0, 1], got {self.tolerance!r}")

    @property
    def percentile(self) -> float | None:
        """The |x| percentile activation ranges are clipped at (`tensor_ranges`), or None for min/max."""
        return 99.999 if self.method == "percentile" else None

    def describe(self) -> dict:
        d = asdict(self)
        d["calibration"] = self.calibration.describe()
        d["keep_fp32"] = list(self.keep_fp32)
        d["kinds"] = list(self.kinds)
        d.update(weights="int8 symmetric per output channel", activations="uint8 per tensor (asymmetric)",
                 format="ONNX QDQ", quantized_ops="MatMul/Gemm with a stored weight",
                 fp32=list(MECHANICS_PARTS) + ([] if self.attention else ["attention QK^T and PV"]) + ["token cache"])
        return d


def layer_group_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of layer groups as `keep_fp32` takes it ("sa4, mlp4" -> ("sa4", "mlp4"))."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parameter_group(name: str) -> str:
    """The layer group of a model parameter: "sa<b>" / "ca<b>" / "mlp<b>" / "tmlp<b>" (the
    schedule's layer names) for attention and feed-forward weights of block b, "block<b>" for the
    rest of a block (adaLN modulation, norms), "single<b>" for FLUX's single-stream blocks, and
    "fixed" outside the blocks (embeddings, head)."""
    m = _BLOCK.search(name)
    if m is None:
        return "fixed"
    kind, block, rest = m.groups()
    if kind == "single_transformer_blocks":
        return f"single{block}"
    module = rest.split(".")[0]
    return {"attn1": f"sa{block}", "attn": f"sa{block}", "attn2": f"ca{block}", "ff": f"mlp{block}",
            "ff_context": f"tmlp{block}"}.get(module, f"block{block}")


def node_part(node: onnx.NodeProto) -> str | None:
    """The mechanics part scope of a node ("score", "gather", "scatter", "sampler"), or None."""
    for part in MECHANICS_PARTS:
        if f"/{part}/" in node.name or node.name.startswith(f"{part}/"):
            return part.removeprefix("part_")
    return None


def stored_groups(model: torch.nn.Module) -> dict[str, str]:
    """Stored weight name -> layer group, for every parameter in both orientations: the
    TorchScript step graphs hold MatMul weights transposed, the dynamo universal graph as they are,
    and the manifest's parameter map names only one of the two."""
    out: dict[str, str] = {}
    for pname, tensor in model.named_parameters():
        array = tensor.detach().cpu().numpy()
        for a in (array, array.T) if array.ndim == 2 else (array,):
            out.setdefault(stored_name(a), parameter_group(pname))
    return out


def layer_groups(model: onnx.ModelProto, manifest: Manifest, by_stored: dict[str, str] | None = None) -> dict[str, str]:
    """node name -> layer group. A node reading a stored weight belongs to that weight's group
    (`parameter_group` of the parameter the manifest maps to it, or `by_stored`: `stored_groups`);
    a mechanics node to its part ("score", ...); any other node to the group of the last
    weight-reading node before it in the graph's (topological, execution) order — the norms,
    softmax and residuals between matmuls."""
    if by_stored is None:
        by_stored = {}
        for pname, (stored, _) in manifest.parameters.items():
            by_stored.setdefault(stored, parameter_group(pname))
    inits = {i.name for i in model.graph.initializer}
    groups: dict[str, str] = {}
    current = "fixed"
    for i, node in enumerate(model.graph.node):
        name = node.name or f"node{i}"
        part = node_part(node)
        if part is not None:
            groups[name] = part
            continue
        weight = next((by_stored[x] for x in node.input if x in inits and x in by_stored), None)
        if weight is not None:
            current = weight
        groups[name] = current
    return groups


def quantized_group(group: str, config: QuantizeConfig) -> bool:
    """Whether matmuls of layer group `group` ("sa3", "block3", "fixed", ...) are quantized."""
    m = re.fullmatch(r"([a-z]+)(\d*)", group)
    if m is None or group in config.keep_fp32 or m[1] not in config.kinds:
        return False
    return not (config.first_block_fp32 and m[2] == "0")


def weight_nodes(model: onnx.ModelProto, groups: dict[str, str], config: QuantizeConfig) -> tuple[list[str], list[str]]:
    """(matmuls to quantize, activation x activation matmuls) of a step graph under `config`."""
    inits = {i.name for i in model.graph.initializer}
    chosen, attention = [], []
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_OPS or node_part(node) is not None:
            continue
        if not quantized_group(groups.get(node.name, "fixed"), config):
            continue
        if len(node.input) > 1 and node.input[1] in inits:
            chosen.append(node.name)
        elif node.op_type == "MatMul":
            attention.append(node.name)
    return chosen + (attention if config.attention else []), attention


def calibration_tensors(model: onnx.ModelProto, nodes: list[str]) -> list[str]:
    """The activations whose ranges quantizing `nodes` needs: their non-constant inputs and outputs."""
    inits = {i.name for i in model.graph.initializer}
    wanted = set(nodes)
    names: list[str] = []
    for node in model.graph.node:
        if node.name in wanted:
            names += [x for x in (*node.input[:2], node.output[0]) if x and x not in inits and x not in names]
    return names


def write_calibration_cache(ranges: dict[str, tuple[float, float]], path: Path) -> None:
    """Activation ranges as onnxruntime's JSON calibration cache (read by quantize_static)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    data = {n: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for n, (lo, hi) in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)


def quantize_graph(src: Path, dst: Path, nodes: list[str], config: QuantizeConfig, cache: Path,
                   symmetric: bool = False, per_channel: bool = True) -> None:
    """QDQ-quantize the graph at `src` (weights as external data) to `dst` (its own external data
    file beside it) with the activation ranges of the calibration cache `cache`
    (`write_calibration_cache`; onnxruntime's own calibrator is not used: it opens sessions of its
    own, which a process on the runtime's shared thread pool refuses)."""
    # symmetric: TensorRT's explicit quantization (zero point 0, int8 activations, full-range weights)
    # optional at import time: onnxruntime.quantization pulls in more than the runtime needs
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    extra = {"WeightSymmetric": True, "ActivationSymmetric": symmetric}
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # onnxruntime logs its pre-processing advice on the root logger
    try:
        quantize_static(str(src), str(dst), None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(_WEIGHT_OPS), nodes_to_quantize=nodes, per_channel=per_channel,
                        reduce_range=config.reduce_range and not symmetric,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        use_external_data_format=True, calibrate_method=CalibrationMethod.MinMax,
                        extra_options=extra, calibration_cache_path=str(cache))
    finally:
        root.setLevel(level)


def quantize_bundle_graphs(folder: Path, model, config: QuantizeConfig) -> Manifest:
    """Quantize every step graph of the (complete, fp32) bundle being written in `folder` in place:
    graphs rewritten, weights.bin rebuilt (int8 weights stored once, plus the model's fp32
    parameters for the torch backend), the manifest's graph, weight and precision entries updated
    and saved (parity not yet checked). `model`: the torch model the bundle was exported from
    (its parameter map). Returns the updated manifest."""
    folder = Path(folder)
    bundle = Bundle(folder, verify=False)
    manifest = bundle.manifest
    steps = collect_step_inputs(bundle, config.calibration)
    per_graph = inputs_by_graph(steps, len(manifest.graphs))
    work = folder / ".quantize"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    counts = []
    try:
        with GraphRunner(bundle, threads=config.calibration.threads) as runner:
            for i, g in enumerate(manifest.graphs):
                traced = bundle.graph_model(i)
                groups = layer_groups(traced, manifest)
                nodes, attention = weight_nodes(traced, groups, config)
                if nodes:
                    cache = work / f"{Path(g.file).stem}.calibration.json"
                    ranges = tensor_ranges(runner, traced, calibration_tensors(traced, nodes), per_graph[i],
                                           config.percentile)
                    write_calibration_cache(ranges, cache)
                    quantize_graph(folder / g.file, work / g.file, nodes, config, cache)
                else:   # e.g. a step reusing every layer (K = 0 everywhere): only fp32 matmuls are left in it
                    onnx.save(onnx.load(str(folder / g.file)), str(work / g.file), save_as_external_data=True,
                              location=f"{g.file}.data")
                counts.append({"graph": g.file, "quantized_matmuls": len(nodes),
                               "fp32_matmuls": sum(1 for n in traced.graph.node if n.op_type in _WEIGHT_OPS) - len(nodes),
                               "attention_matmuls_fp32": 0 if config.attention else len(attention),
                               "calibration_inputs": len(per_graph[i])})
                log.info("quantized %s: %d matmuls int8 on %d calibration inputs", g.file, len(nodes),
                         len(per_graph[i]))
        if not any(c["quantized_matmuls"] for c in counts):
            raise QuantizationError(f"no step graph has a matmul left to quantize (keep_fp32={list(config.keep_fp32)}): "
                                    "export the bundle in fp32")
        universal = None
        if manifest.universal is not None:  # refers to the old weights.bin: keep it (fp32), loaded
            universal = onnx.load(str(folder / manifest.universal["file"]), load_external_data=True)
        del bundle
        (folder / WEIGHTS_FILE).unlink()
        store = WeightStore(folder / WEIGHTS_FILE)
        for i, g in enumerate(manifest.graphs):
            q = onnx.load(str(work / g.file), load_external_data=True)
            store.externalize(q)
            onnx.save(q, str(folder / graph_file(i)))
            g.sha256, g.bytes = sha256_file(folder / g.file), (folder / g.file).stat().st_size
            g.ops = sorted({n.op_type for n in q.graph.node})
        if universal is not None:
            store.externalize(universal)
            onnx.save(universal, str(folder / manifest.universal["file"]))
            manifest.universal.update(sha256=sha256_file(folder / manifest.universal["file"]),
                                      bytes=(folder / manifest.universal["file"]).stat().st_size)
        int8_bytes = sum(v[1] for v in store.index.values() if v[2] == "|i1")
        parameters = store.parameter_map(model)
        weights = store.close()
        weights["parameters"] = parameters
        weights["sha256"] = sha256_file(folder / weights["file"])
        manifest.weights = weights
        manifest.precision = {"dtype": "int8", "parity_tolerance": float(config.tolerance),
                              "quantization": {**config.describe(), "graphs": counts, "int8_weight_bytes": int8_bytes}}
        manifest.save(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest
