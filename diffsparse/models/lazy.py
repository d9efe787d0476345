"""Random weights for models larger than memory, initialised one module at a time.

FLUX.1-schnell has 11.9 B parameters (47.6 GB in fp32): more than a 23 GB build machine holds.
Such a built-in is constructed with its parameters on the meta device (buffers stay real: some
modules compute them in `__init__`), and `materialize` gives each module its weights in turn,
handing every tensor to a `sink` — the exporter's weight store, which writes it into the bundle's
weights file and returns a view of a memory map of that file. The whole model never sits in RAM.

The values depend only on the seed and the module order, not on where they go, so the in-memory
and the streamed model are the same model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Sink = Callable[[str, torch.Tensor], torch.Tensor]
LAZY_ATTR = "_diffsparse_lazy_seed"


def build_lazy(cls, config: dict, seed: int) -> nn.Module:
    """The model with parameters on meta, to be given weights by `materialize` with `seed`."""
    # not under torch.device("meta"): that would put buffers there too, and some modules compute
    # their buffers' values in __init__; parameters are swapped for meta ones as they register
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        model = cls(**config).eval()
    finally:
        nn.Module.register_parameter = register
    setattr(model, LAZY_ATTR, seed)
    return model


def is_lazy(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _init_(module: nn.Module, name: str, param: torch.Tensor) -> None:
    """Weights of a parameter whose module has no `reset_parameters` (norm scales, learned tables)."""
    kind = type(module).__name__.lower()
    if "norm" in kind:
        nn.init.ones_(param) if name == "weight" else nn.init.zeros_(param)
    elif name == "bias":
        nn.init.zeros_(param)
    else:
        nn.init.normal_(param, std=0.02)


def materialize(model: nn.Module, sink: Sink | None = None) -> nn.Module:
    """Give every meta parameter its seeded random weights, module by module in `modules()` order;
    `sink(name, tensor)` returns the tensor to keep (default: the tensor itself, in memory)."""
    if not is_lazy(model):
        return model
    seed = getattr(model, LAZY_ATTR, 0)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for prefix, module in model.named_modules():
            direct = {n: p for n, p in module.named_parameters(recurse=False) if p.device.type == "meta"}
            if not direct:
                continue
            with torch.no_grad():
                fresh = {n: nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
                         for n, p in direct.items()}
                for n, p in fresh.items():
                    setattr(module, n, p)
                if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
                    module.reset_parameters()
                else:
                    for n, p in fresh.items():
                        _init_(module, n, p)
                for n, p in fresh.items():
                    full = f"{prefix}.{n}" if prefix else n
                    kept = sink(full, p.data) if sink is not None else p.data
                    setattr(module, n, nn.Parameter(kept, requires_grad=False))
    finally:
        torch.random.set_rng_state(generator_state)
    return model
