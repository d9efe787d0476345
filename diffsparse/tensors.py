"""Named, statically shaped tensors: what a step graph takes and returns, and the dtypes it may use.

`TensorSpec.from_dict` reads one from a bundle manifest, which may be corrupted or hand-edited: it
checks every field (a name, positive integer dimensions, a dtype of `DTYPES`) and raises
`TensorSpecError` saying which, so that nothing later allocates a NaN-sized or negative buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: largest dimension / element count a spec may declare: far beyond any real step tensor, small
#: enough that a corrupted shape is refused before anything tries to allocate it
MAX_DIM = 1 << 31
MAX_ELEMENTS = 1 << 40


class TensorSpecError(ValueError):
    """A tensor description (a manifest's inputs, outputs or cache entry) that is malformed."""

#: dtype name -> (numpy, torch): the allow-list of step graph input, output and cache dtypes
DTYPES = {"float32": (np.float32, torch.float32), "int64": (np.int64, torch.int64),
          "int32": (np.int32, torch.int32), "float16": (np.float16, torch.float16)}


@dataclass(frozen=True)
class TensorSpec:
    """A named, statically shaped tensor of a step graph."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def numpy_dtype(self):
        return DTYPES[self.dtype][0]

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.numpy_dtype).itemsize

    def zeros(self) -> np.ndarray:
        return np.zeros(self.shape, dtype=self.numpy_dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Any) -> TensorSpec:
        """The inverse of `to_dict`: exactly its keys, each checked; TensorSpecError naming the
        field otherwise (JSON integers only: 2.0 or "2" is not a dimension)."""
        if not isinstance(d, dict):
            raise TensorSpecError(f"must be an object {{name, shape, dtype}}, got {type(d).__name__}")
        keys = ("name", "shape", "dtype")
        missing, unknown = [k for k in keys if k not in d], sorted(map(str, set(d) - set(keys)))
        if missing or unknown:
            raise TensorSpecError(f"has missing key(s) {missing}, unknown key(s) {unknown} (it has exactly {list(keys)})")
        name, shape, dtype = d["name"], d["shape"], d["dtype"]
        if not isinstance(name, str) or not name:
            raise TensorSpecError(f".name must be a non-empty string, got {name!r}")
        if not isinstance(shape, list) or not all(_is_dim(x) for x in shape):
            raise TensorSpecError(f".shape must be a list of positive integers (each < 2**31), got {shape!r}")
        if int(np.prod(shape, dtype=np.float64)) > MAX_ELEMENTS:
            raise TensorSpecError(f".shape {shape} has more than 2**40 elements")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise TensorSpecError(f".dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return cls(name, tuple(shape), dtype)


def _is_dim(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 < x < MAX_DIM
