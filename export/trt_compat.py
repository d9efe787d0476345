"""Checks that a step graph stays inside what TensorRT's ONNX parser supports.

The rules come from TensorRT's documented limits (see DESIGN.md): TopK needs a constant K <= 3840,
computed Gather/GatherElements/ScatterElements indices must be int32 (ScatterND/GatherND indices
are int64 by the ONNX spec; TensorRT's parser takes them), every shape must be static (CUDA-graph capture and one
optimization profile per step), and only operators in TensorRT's ONNX support matrix may appear.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from diffsparse.tokencache import TOPK_LIMIT


# Operators of TensorRT's ONNX operator support matrix that our step graphs may use.
TENSORRT_OPS = frozenset([
    "Abs", "Add", "And", "ArgMax", "ArgMin", "Cast", "Ceil", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "Cos", "Div", "Einsum", "Equal", "Erf", "Exp", "Expand", "Flatten",
    "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "Greater", "GreaterOrEqual",
    "Identity", "LayerNormalization", "Less", "LessOrEqual", "Log", "MatMul", "Max", "Mean", "Min",
    "Mod", "Mul", "Neg", "Not", "Or", "Pow", "Range", "Reciprocal", "ReduceL2", "ReduceMax",
    "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Reshape", "Resize", "ScatterElements",
    "ScatterND", "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub",
    "Tanh", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Where", "Xor",
])

INT32_INDEX_OPS = ("GatherElements", "ScatterElements", "Gather")


def _constant_values(graph: onnx.GraphProto) -> dict[str, object]:
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer
              if i.data_location != onnx.TensorProto.EXTERNAL}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _without_external_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose external (not loaded) initializers are declared as typed inputs instead, so
    shape inference needs no weights file."""
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = {i.name for i in external}
    kept = [i for i in copy.graph.initializer if i.name not in names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    copy.graph.input.extend(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in external)
    return copy


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """Every reason TensorRT would reject or mis-run this graph; empty when it is fine."""
    problems: list[str] = []
    graph = model.graph
    for vi in list(graph.input) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            problems.append(f"tensor {vi.name} has a dynamic shape")
    inferred = onnx.shape_inference.infer_shapes(_without_external_data(model), strict_mode=False, data_prop=True)
    dtypes = {vi.name: vi.type.tensor_type.elem_type
              for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    for init in graph.initializer:
        dtypes[init.name] = init.data_type
    constants = _constant_values(graph)
    for node in graph.node:
        if node.op_type not in TENSORRT_OPS:
            problems.append(f"operator {node.op_type} ({node.name}) is not in TensorRT's ONNX support list")
        if node.op_type == "TopK":
            k = constants.get(node.input[1])
            if k is None:
                problems.append(f"TopK {node.name} has a non-constant K")
            elif int(k.reshape(-1)[0]) > TOPK_LIMIT:
                problems.append(f"TopK {node.name} has K={int(k.reshape(-1)[0])} > {TOPK_LIMIT}")
        if node.op_type in INT32_INDEX_OPS and node.input[1] not in constants:
            idx = node.input[1]
            if dtypes.get(idx) != onnx.TensorProto.INT32:
                problems.append(f"{node.op_type} {node.name} indices {idx} are "
                                f"{onnx.TensorProto.DataType.Name(dtypes.get(idx, 0))}, not INT32")
    return problems


def operator_set(model: onnx.ModelProto) -> list[str]:
    return sorted({n.op_type for n in model.graph.node})
