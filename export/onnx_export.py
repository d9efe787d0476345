"""Export one token-cached step module to ONNX (static shapes, opset 18)."""

from __future__ import annotations

import ast
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from diffsparse.export.weights import WeightStore

from diffsparse.conditioning import ConditioningPlan
from diffsparse.models.base import ModelSpec
from diffsparse.tensors import TensorSpec
from diffsparse.schedule import SelectorConfig

log = logging.getLogger(__name__)
OPSET = 18


def _dynamo_translations() -> dict:
    """Overrides of the dynamo exporter's op translations.

    index_select: the default casts the (int32) Gather indices to int64, outside TensorRT's subset.
    linear: the default multiplies by Transpose(weight), which the optimizer folds into a
    transposed copy of every weight — held in memory during export (47.6 GB for FLUX) and no
    longer the parameter itself. Gemm with transB reads the weight as PyTorch stores it.
    """
    from onnxscript import opset18 as op

    def index_select(self, dim: int, index):
        return op.Gather(self, op.Reshape(index, op.Constant(value_ints=[-1])), axis=dim)

    def linear(x, weight, bias=None):
        rank = len(x.shape)
        flat = x if rank == 2 else op.Flatten(x, axis=rank - 1)
        y = op.Gemm(flat, weight, transB=1) if bias is None else op.Gemm(flat, weight, bias, transB=1)
        if rank == 2:
            return y
        lead = op.Slice(op.Shape(x), op.Constant(value_ints=[0]), op.Constant(value_ints=[rank - 1]))
        return op.Reshape(y, op.Concat(lead, op.Constant(value_ints=[-1]), axis=0))

    return {torch.ops.aten.index_select.default: index_select, torch.ops.aten.linear.default: linear}


def sample_tensor(spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    if spec.dtype.startswith("int"):
        return torch.zeros(spec.shape, dtype=spec.torch_dtype)
    return torch.randn(spec.shape, generator=generator, dtype=spec.torch_dtype)


def _register_dangling_constants(model: ir.Model) -> None:
    """Make initializers of constant values that no node produces. The optimizer folds the
    output-shape computation of our Gemm `linear` into such a value, which `ONNXProgram.save` would
    also serialise without its data (an invalid model)."""
    graph = model.graph
    for node in graph.all_nodes():
        for value in node.inputs:
            if (value is not None and value.const_value is not None and value.producer() is None
                    and not value.is_initializer() and not value.is_graph_input()):
                graph.register_initializer(value)


def _fold_weight_slices(model: ir.Model) -> None:
    """Replace each Slice of an initializer by constant bounds with an initializer of its own.

    The optimizer leaves slices of large weights in the graph (FLUX's single-stream proj_out is
    read as its attention and MLP columns); ONNX Runtime would then fold them at load, a private
    copy per session, or slice on every step. Folded here, the slices are stored once, in place
    of the weight they partition."""
    import numpy as np

    graph = model.graph
    for node in list(graph):
        if node.op_type != "Slice" or node.domain not in ("", "ai.onnx"):
            continue
        data, *bounds = node.inputs
        out = node.outputs[0]
        if data is None or not data.is_initializer() or data.const_value is None or out.is_graph_output():
            continue
        if any(b is not None and b.const_value is None for b in bounds):
            continue
        starts, ends, axes, steps = (None if b is None else b.const_value.numpy().tolist()
                                     for b in (bounds + [None] * 4)[:4])
        rank = len(data.shape)
        index = [slice(None)] * rank
        for i, axis in enumerate(axes if axes is not None else range(len(starts))):
            index[axis % rank] = slice(starts[i], ends[i], steps[i] if steps is not None else 1)
        folded = ir.Value(name=f"{out.name}.folded", const_value=ir.tensor(
            np.ascontiguousarray(data.const_value.numpy()[tuple(index)]), name=f"{out.name}.folded"))
        folded.shape, folded.type = folded.const_value.shape, ir.TensorType(folded.const_value.dtype)
        graph.register_initializer(folded)
        ir.convenience.replace_all_uses_with(out, folded)
        graph.remove(node, safe=True)
        if not data.uses() and not data.is_graph_output():
            graph.initializers.pop(data.name)


def _name_parts(model: ir.Model) -> None:
    """Prefix the name of each node the dynamo exporter traced inside a part scope of the step
    (`Part` children of models/cached.py) with that scope, as the TorchScript exporter's names
    carry it: `node_topk` -> `/part_score/node_topk`. Dynamo's names carry no module scope; it
    records the scopes in each node's metadata. Only names change: the profiler reads them
    (runtime/ops_profile.py)."""
    for node in model.graph.all_nodes():
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if not scopes or "part_" not in scopes:
            continue
        part = next((s for s in ast.literal_eval(scopes) if s.startswith("part_")), None)
        if part is not None and node.name:
            node.name = f"/{part}/{node.name}"


def trace_to_onnx(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                  dynamo: bool, dynamic_shapes=None, store: WeightStore | None = None) -> onnx.ModelProto:
    """Run torch.onnx.export (TorchScript or dynamo). With a weight store, the model's large
    initializers are in the store and the returned model refers to them; without, they are in
    the model (in memory)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            # its registry warns about every torchvision op it skips (torchvision is absent)
            logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
            # in memory: the program's initializers are the module's own tensors, not copies
            program = torch.onnx.export(module, args, None, input_names=input_names, output_names=output_names,
                                        opset_version=OPSET, dynamo=True, verbose=False, optimize=True,
                                        dynamic_shapes=dynamic_shapes,
                                        custom_translation_table=_dynamo_translations())
            _register_dangling_constants(program.model)
            _fold_weight_slices(program.model)
            _name_parts(program.model)
            if store is not None:
                store.externalize_ir(program.model)
            model = ir.serde.serialize_model(program.model)
        else:
            with tempfile.TemporaryDirectory(prefix="dsexport-") as tmp:
                path = Path(tmp) / "step.onnx"
                torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                                  opset_version=OPSET, do_constant_folding=True, dynamo=False)
                model = onnx.load(str(path), load_external_data=True)
    if store is not None:
        store.externalize(model)
    return model


def export_step(spec: ModelSpec, keep: list[int], selector: SelectorConfig,
                store: WeightStore | None = None, layer_cache: bool = True,
                conditioning: ConditioningPlan | None = None) -> onnx.ModelProto:
    """Trace the cached step for `keep`: the ONNX model, its large weights in `store` if given,
    else in the model. layer_cache False: a dense step without the layer cache (the plain model).
    conditioning: the schedule's hoisting plan (`ModelSpec.conditioning_plan`)."""
    module = spec.build_step(keep, selector, layer_cache, conditioning)
    inputs = spec.step_inputs()
    layout = spec.cache_layout(selector, layer_cache, conditioning)
    cache = layout.tensors
    g = torch.Generator().manual_seed(0)
    args = tuple(sample_tensor(t, g) for t in inputs + cache)
    input_names = [t.name for t in inputs + cache]
    output_names = [t.name for t in spec.step_outputs()] + layout.output_names
    # The family's spec picks the exporter that works for it (DESIGN.md: TorchScript fails on
    # aten::rms_norm, dynamo's PixArt graph is rejected by ONNX Runtime).
    return trace_to_onnx(module, args, input_names, output_names, dynamo=spec.onnx_exporter == "dynamo",
                         store=store)
