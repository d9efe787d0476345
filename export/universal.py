"""The universal step graph: one ONNX graph for every sparsity pattern of a model.

Each cacheable layer's K is the length of a carrier input `k.<layer>` (a float tensor of shape
(K,); only its length is read), declared as a dynamic axis. ONNX TopK takes K as a tensor and the
gathers, attention and scatters follow its size, so the graph runs any K in [0, N] per layer. This
is the input TensorRT needs for the design in docs/gpu-deployment.md (one engine, one optimization
profile per distinct step, weights stored once); ONNX Runtime runs it directly, which is how it is
checked here. K above TensorRT's TopK limit (3840) is not supported in this graph (the stratified
split needs K at export time).
"""

from __future__ import annotations


import numpy as np
import torch

from diffsparse.cache_layout import carrier_name
from diffsparse.export.onnx_export import sample_tensor, trace_to_onnx
from diffsparse.models.base import ModelSpec
from diffsparse.schedule import SelectorConfig


def k_carriers(spec: ModelSpec, keep: list[int]) -> dict[str, np.ndarray]:
    """The carrier inputs that make the universal graph run with per-layer token counts `keep`."""
    if len(keep) != len(spec.layers):
        raise ValueError(f"keep has {len(keep)} entries for {len(spec.layers)} layers")
    return {carrier_name(l): np.zeros(k, np.float32) for l, k in zip(spec.layers, keep)}


def export_universal_step(spec: ModelSpec, selector: SelectorConfig, trace_keep: list[int] | None = None,
                          store=None):
    """Trace the universal step with the dynamo exporter, each carrier's length a symbolic
    dimension (the TorchScript tracer freezes intermediate sizes into the graph). Traced at
    `trace_keep`, by default half of every layer's tokens; large weights go to `store` if given."""
    module = spec.build_universal_step(selector)
    n = spec.dense_keep()
    trace_keep = trace_keep or [max(2, k // 2) for k in n]
    inputs, layout = spec.step_inputs(), spec.cache_layout(selector)
    cache = layout.tensors
    g = torch.Generator().manual_seed(0)
    carriers = [torch.from_numpy(v) for v in k_carriers(spec, trace_keep).values()]
    args = (*[sample_tensor(t, g) for t in inputs], *carriers, *[sample_tensor(t, g) for t in cache])
    k_names = [carrier_name(l) for l in spec.layers]
    input_names = [t.name for t in inputs] + k_names + [t.name for t in cache]
    output_names = [t.name for t in spec.step_outputs()] + layout.output_names
    # torch.export specialises sizes 0 and 1, so the declared range starts at 2; the graph has no
    # guard on it and runs K = 0 and 1 as well (tested)
    dims = [torch.export.Dim(f"K_{l.name}", min=2, max=max(2, k)) for l, k in zip(spec.layers, n)]
    dynamic = (tuple([None] * len(inputs) + [{0: d} for d in dims] + [None] * len(cache)),)
    return trace_to_onnx(module, args, input_names, output_names, dynamo=True, dynamic_shapes=dynamic,
                         store=store)
