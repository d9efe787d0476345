"""One copy of every weight on disk, shared by all step graphs.

Each exported graph's large initializers are renamed by content hash and moved into one
`weights.bin` as ONNX external data. The same tensor in two graphs (all of them, for weights the
sparsity pattern does not touch) is written once; graphs stay loadable on their own by ONNX tools,
and the runtime maps the file once and hands the same buffers to every session.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

# Initializers smaller than this stay inside the graph (shapes, scalars, small constants).
MIN_SHARED_BYTES = 1024
ALIGN = 64


class WeightStore:
    """Append-only weights file plus an index name -> [offset, length, dtype, shape]."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self.index: dict[str, list[Any]] = {}
        self._offset = 0

    def _add(self, array: np.ndarray) -> str:
        data = np.ascontiguousarray(array).tobytes()
        digest = hashlib.sha256(data + str((array.dtype.str, array.shape)).encode()).hexdigest()[:20]
        name = f"w.{digest}"
        if name not in self.index:
            pad = (-self._offset) % ALIGN
            self._file.write(b"\0" * pad)
            self._offset += pad
            self.index[name] = [self._offset, len(data), array.dtype.str, list(array.shape)]
            self._file.write(data)
            self._offset += len(data)
        return name

    def externalize(self, model: onnx.ModelProto) -> int:
        """Move the model's large initializers into the store; return how many were moved."""
        graph = model.graph
        rename: dict[str, str] = {}
        kept: dict[str, onnx.TensorProto] = {}
        small = []
        for init in graph.initializer:
            array = numpy_helper.to_array(init)
            if array.nbytes < MIN_SHARED_BYTES:
                small.append(init)
                continue
            name = self._add(array)
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
        for out in graph.output:
            if out.name in rename:
                raise ValueError(f"graph output {out.name} is an initializer; cannot share it")
        del graph.initializer[:]
        graph.initializer.extend(small)
        graph.initializer.extend(kept.values())
        return len(rename)

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

