"""One copy of every weight on disk, shared by all step graphs.

Each exported graph's large initializers are renamed by content hash and moved into one
`weights.bin` as ONNX external data. The same tensor in two graphs (all of them, for weights the
sparsity pattern does not touch) is written once; graphs stay loadable on their own by ONNX tools,
and the runtime maps the file once and hands the same buffers to every session.

Graphs from the dynamo exporter are externalised from its in-memory IR (`externalize_ir`), so no
graph is ever held with all its weights copied; and a model too large for memory gives its
parameters to the store as they are initialised (`adopt`), keeping only memory-mapped views of
the store's file — the exporter then finds them here by address instead of copying them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from diffsparse.models.lazy import materialize

# Initializers smaller than this stay inside the graph (shapes, scalars, small constants).
MIN_SHARED_BYTES = 1024
ALIGN = 64


def stored_name(array: np.ndarray) -> str:
    """The name a tensor with this content (bytes, dtype, shape) is stored under in weights.bin."""
    return WeightStore._content_name(np.ascontiguousarray(array))[0]


class WeightStore:
    """Append-only weights file plus an index name -> [offset, length, dtype, shape]."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self.index: dict[str, list[Any]] = {}
        self._offset = 0
        self._by_offset: dict[int, str] = {}
        self._adopted: dict[tuple, str] = {}  # (address, bytes, dtype, shape) of adopted tensors

    @staticmethod
    def _content_name(array: np.ndarray) -> tuple[str, memoryview]:
        """The stored name of a tensor's content (hash of bytes, dtype and shape), and its bytes."""
        data = memoryview(array.reshape(-1)).cast("B")
        digest = hashlib.sha256(data)
        digest.update(str((array.dtype.str, array.shape)).encode())
        return f"w.{digest.hexdigest()[:20]}", data

    def _add(self, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        name, data = self._content_name(array)
        if name not in self.index:
            pad = (-self._offset) % ALIGN
            self._file.write(b"\0" * pad)
            self._offset += pad
            self.index[name] = [self._offset, array.nbytes, array.dtype.str, list(array.shape)]
            self._by_offset[self._offset] = name
            self._file.write(data)
            self._offset += array.nbytes
        return name

    @staticmethod
    def _address(tensor: torch.Tensor) -> tuple:
        return (tensor.data_ptr(), tensor.numel() * tensor.element_size(), str(tensor.dtype), tuple(tensor.shape))

    def adopt(self, model: torch.nn.Module, in_memory: set[str] = frozenset()) -> None:
        """Materialise a lazily initialised model (models/lazy.py) straight into the store: each
        parameter is written, then replaced by a copy-on-write memory map of its bytes here.
        Small ones (inlined in the graphs) and those named in `in_memory` (read by the graphs only
        in slices, which the exporter stores) stay in memory."""
        def keep(name: str, tensor: torch.Tensor) -> torch.Tensor:
            array = tensor.numpy()
            if name in in_memory or array.nbytes < MIN_SHARED_BYTES:
                return tensor
            stored = self._add(array)
            self._file.flush()
            offset = self.index[stored][0]
            view = torch.from_numpy(np.memmap(self.path, dtype=array.dtype, mode="c", offset=offset,
                                              shape=array.shape))
            self._adopted[self._address(view)] = stored
            return view

        materialize(model, keep)

    def parameter_map(self, model: torch.nn.Module) -> dict[str, list]:
        """Where each of the model's parameters and buffers lies in the store: name ->
        [stored tensor, transposed]. The graphs hold most weights already, as they are or (the
        TorchScript exporter's MatMul) transposed; what no graph holds whole (small tensors inlined
        in the graphs, tables read in slices) is added. So the bundle carries the model itself and
        the torch backend runs it from weights.bin, without a second copy of the weights."""
        out: dict[str, list] = {}
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        for name, tensor in tensors.items():
            stored = self._adopted.get(self._address(tensor))
            transposed = False
            if stored is None:
                array = np.ascontiguousarray(tensor.detach().cpu().numpy())
                stored = self._stored(array)
                if stored is None and array.ndim == 2:
                    stored = self._stored(np.ascontiguousarray(array.T))
                    transposed = stored is not None
                if stored is None:
                    stored = self._add(array)
            out[name] = [stored, transposed]
        return out

    def _stored(self, array: np.ndarray) -> str | None:
        name, _ = self._content_name(array)
        return name if name in self.index else None

    def externalize_ir(self, model) -> None:
        """Point the large initializers of an onnx_ir model at the store (writing those not in it
        yet); `externalize` on the serialised model then names and deduplicates them."""
        import onnx_ir as ir

        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < MIN_SHARED_BYTES or value.is_graph_output():
                continue
            raw = getattr(tensor, "raw", None)
            stored = self._adopted.get(self._address(raw)) if isinstance(raw, torch.Tensor) else None
            if stored is None:
                stored = self._add(tensor.numpy())
            offset, length = self.index[stored][:2]
            value.const_value = ir.ExternalTensor(self.path.name, offset, length, tensor.dtype, shape=tensor.shape,
                                                  name=value.name, base_dir=self.path.parent)

    def externalize(self, model: onnx.ModelProto) -> int:
        """Move the model's large initializers into the store; return how many were moved."""
        graph = model.graph
        rename: dict[str, str] = {}
        kept: dict[str, onnx.TensorProto] = {}
        small = []
        # a constant graph output (e.g. the reuse counts of a full step) keeps its name: inline
        outputs = {o.name for o in graph.output}
        for init in graph.initializer:
            name = None if init.name in outputs else self._stored_name(init)
            if name is None:
                small.append(init)
                continue
            rename[init.name] = name
            if name not in kept:
                tensor = onnx.TensorProto()
                tensor.name = name
                tensor.data_type = init.data_type
                tensor.dims.extend(init.dims)
                offset, length = self.index[name][:2]
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                kept[name] = tensor
        for node in _all_nodes(graph):
            for i, inp in enumerate(node.input):
                if inp in rename:
                    node.input[i] = rename[inp]
        del graph.initializer[:]
        graph.initializer.extend(small)
        graph.initializer.extend(kept.values())
        return len(rename)

    def _stored_name(self, init: onnx.TensorProto) -> str | None:
        """The store's name for a large initializer (added if new); None for a small one."""
        if init.data_location == onnx.TensorProto.EXTERNAL:
            ref = {e.key: e.value for e in init.external_data}
            if ref.get("location") == self.path.name and int(ref.get("offset", -1)) in self._by_offset:
                return self._by_offset[int(ref["offset"])]
            raise ValueError(f"initializer {init.name} refers to external data {ref} outside the weight store")
        array = numpy_helper.to_array(init)
        return self._add(array) if array.nbytes >= MIN_SHARED_BYTES else None

    def close(self) -> dict[str, Any]:
        self._file.close()
        return {"file": self.path.name, "bytes": self.path.stat().st_size, "tensors": len(self.index),
                "index": self.index}


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)

