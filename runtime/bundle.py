"""A loaded bundle: the validated manifest, the shared weights mapped once, and the model spec.

Everything a backend allocates or runs comes from here: the ONNX Runtime backend reads the
stored tensors the graphs name (`weights`), the torch backend the model's own parameters
(`model_tensors`, from the manifest's parameter map) — both views of the same weights.bin.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch

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

    def _meta_spec(self) -> ModelSpec:
        m = self.manifest
        return spec_from_config(m.family, m.diffusers_class, m.model_config, m.batch_size, m.guidance,
                                m.sampler.config, m.spec_options, m.guidance_scale)

    @cached_property
    def spec(self) -> ModelSpec:
        """The model's spec with its structure only (the model on the meta device)."""
        return self._meta_spec()

    def _views(self, mode: str) -> dict[str, np.ndarray]:
        w = self.manifest.weights
        path = self.folder / w["file"]
        raw = np.memmap(path, dtype=np.uint8, mode=mode)
        out = {}
        for name, (offset, length, dtype, shape) in w["index"].items():
            if offset + length > raw.size:
                raise BundleError(f"{path} is shorter than the manifest's index says; re-export the bundle")
            out[name] = raw[offset:offset + length].view(np.dtype(dtype)).reshape(shape)
        return out

    @cached_property
    def weights(self) -> dict[str, np.ndarray]:
        """Every stored tensor as a read-only view of one memory map of weights.bin (no copies)."""
        return self._views("r")

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers by name, as views of a copy-on-write memory map of
        weights.bin (no copy is made unless a tensor is written to); transposed where the graphs
        store the transpose."""
        stored = self._views("c")
        out = {}
        for name, (key, transposed) in self.manifest.parameters.items():
            tensor = torch.from_numpy(stored[key])
            out[name] = tensor.T if transposed else tensor
        return out

    def check_cache_layout(self, layout) -> None:
        """BundleError unless `layout` (what a backend builds for this bundle's model and schedule)
        is the cache layout the bundle records."""
        if layout != self.manifest.cache:
            raise BundleError(f"bundle {self.folder}: its cache layout is not the one this diffsparse builds for "
                              "its model and schedule; re-export the bundle")

    def model_spec(self) -> ModelSpec:
        """A spec whose model holds this bundle's own weights (a fresh model each call): what the
        torch backend runs. BundleError if the parameter map does not fit the model."""
        spec = self._meta_spec()
        assign_tensors(spec.model, self.model_tensors(), str(self.folder))
        return spec


def assign_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Give a model built on the meta device its parameters and buffers (no copies)."""
    expected = dict(model.named_parameters())
    expected.update(model.named_buffers())
    persistent = set(model.state_dict(keep_vars=True))
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise BundleError(f"bundle {source}: its parameter map does not fit the model (missing {missing[:3]}, "
                          f"unknown {unknown[:3]}); re-export the bundle")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise BundleError(f"bundle {source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                              f"{tuple(expected[name].shape)}; re-export the bundle")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in dict(module.named_parameters(recurse=False)):
            setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            module.register_buffer(attr, tensor, persistent=name in persistent)
