"""A loaded bundle: the validated manifest, the shared weights mapped once, and the model spec."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from diffsparse.manifest import BundleError, Manifest
from diffsparse.models.base import ModelSpec
from diffsparse.models.zoo import spec_from_config


class Bundle:
    """Lazy: the manifest is read (and checksums verified) at construction; weights and spec on use."""

    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder, verify=verify)

    @property
    def schedule(self):
        return self.manifest.schedule

    @property
    def num_steps(self) -> int:
        return self.manifest.schedule.num_steps

    def graph_path(self, index: int) -> Path:
        return self.folder / self.manifest.graphs[index].file

    @cached_property
    def spec(self) -> ModelSpec:
        m = self.manifest
        return spec_from_config(m.family, m.diffusers_class, m.model_config, m.batch_size, m.guidance,
                                m.sampler.config, m.spec_options, m.guidance_scale)

    @cached_property
    def weights(self) -> dict[str, np.ndarray]:
        """Every shared weight as a read-only view of one memory map of weights.bin (no copies)."""
        w = self.manifest.weights
        path = self.folder / w["file"]
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        out = {}
        for name, (offset, length, dtype, shape) in w["index"].items():
            if offset + length > raw.size:
                raise BundleError(f"{path} is shorter than the manifest's index says; re-export the bundle")
            out[name] = raw[offset:offset + length].view(np.dtype(dtype)).reshape(shape)
        return out
