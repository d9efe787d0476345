"""Shared fixtures: tiny DiT (2 blocks, 64 tokens, random weights) and bundles exported from it."""

from __future__ import annotations

import pytest
import torch
from diffsparse.export.bundle import ExportConfig, export_bundle

from diffsparse.builtin_schedules import dense_schedule, toca_schedule
from diffsparse.models.zoo import make_spec

TINY = "dit-tiny"
STEPS = 6


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_spec():
    return make_spec(TINY, batch_size=2)


@pytest.fixture(scope="session")
def tiny_schedules(tiny_spec):
    return {"dense": dense_schedule(tiny_spec, STEPS), "toca": toca_schedule(tiny_spec, STEPS, 0.5, full_every=3)}


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory, tiny_spec, tiny_schedules):
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, sched in tiny_schedules.items():
        out[name] = root / name
        export_bundle(tiny_spec, sched, out[name], source={"model": TINY, "seed": 0}, config=ExportConfig())
    return out


@pytest.fixture
def count_macs():
    """count_macs(fn, *args) -> PyTorch's own FLOP count / 2 of what fn runs, with the math
    attention kernel (the fused CPU kernel is invisible to the FLOP counter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn, *args) -> int:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn(*args)
        return counter.get_total_flops() // 2

    return count
