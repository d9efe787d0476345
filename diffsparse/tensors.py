"""Named, statically shaped tensors: what a step graph takes and returns, and the dtypes it may use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])
