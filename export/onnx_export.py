"""Export one token-cached step module to ONNX (static shapes, opset 18)."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from diffsparse.models.base import ModelSpec, TensorSpec
from diffsparse.schedule import SelectorConfig

log = logging.getLogger(__name__)
OPSET = 18


def next_name(name: str) -> str:
    """Graph output name for the updated cache buffer `name` (ONNX names must be unique)."""
    return f"next.{name}"


def _dynamo_translations() -> dict:
    """Overrides of the dynamo exporter's op translations that keep graphs in TensorRT's subset:
    its default index_select casts the (int32) Gather indices to int64."""
    from onnxscript import opset18 as op

    def index_select(self, dim: int, index):
        return op.Gather(self, op.Reshape(index, op.Constant(value_ints=[-1])), axis=dim)

    return {torch.ops.aten.index_select.default: index_select}


def sample_tensor(spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    if spec.dtype.startswith("int"):
        return torch.zeros(spec.shape, dtype=spec.torch_dtype)
    return torch.randn(spec.shape, generator=generator, dtype=spec.torch_dtype)


def trace_to_onnx(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
                  dynamo: bool, dynamic_shapes=None) -> onnx.ModelProto:
    """Run torch.onnx.export (TorchScript or dynamo) into a temporary file and load the model with
    its weights in memory."""
    with tempfile.TemporaryDirectory(prefix="dsexport-") as tmp:
        path = Path(tmp) / "step.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                # its registry warns about every torchvision op it skips (torchvision is absent)
                logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
                torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                                  opset_version=OPSET, dynamo=True, external_data=True, verbose=False,
                                  optimize=True, dynamic_shapes=dynamic_shapes,
                                  custom_translation_table=_dynamo_translations())
            else:
                torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                                  opset_version=OPSET, do_constant_folding=True, dynamo=False)
        return onnx.load(str(path), load_external_data=True)


def export_step(spec: ModelSpec, keep: list[int], selector: SelectorConfig) -> onnx.ModelProto:
    """Trace the cached step for `keep` and return the ONNX model with its weights in memory."""
    module = spec.build_step(keep, selector)
    inputs = spec.step_inputs()
    cache = spec.cache_buffers(selector)
    g = torch.Generator().manual_seed(0)
    args = tuple(sample_tensor(t, g) for t in inputs + cache)
    input_names = [t.name for t in inputs + cache]
    output_names = [t.name for t in spec.step_outputs()] + [next_name(t.name) for t in cache]
    # The family's spec picks the exporter that works for it (DESIGN.md: TorchScript fails on
    # aten::rms_norm, dynamo's PixArt graph is rejected by ONNX Runtime).
    return trace_to_onnx(module, args, input_names, output_names, dynamo=spec.onnx_exporter == "dynamo")
