"""Shared fixtures: tiny DiT (2 blocks, 64 tokens, random weights) and bundles exported from it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from diffsparse.export.bundle import ExportConfig, export_bundle

from diffsparse.builtin_schedules import dense_schedule, toca_schedule
from diffsparse.latency_table import KindLatency, LatencyTable, model_fingerprint
from diffsparse.models.zoo import make_spec

TINY = "dit-tiny"
STEPS = 6
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def benchmark_script():
    """A loader of the scripts in benchmarks/ (scripts, not a package): benchmark_script("fuzz_bundles")
    executes benchmarks/fuzz_bundles.py as a fresh module and returns it."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


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


@pytest.fixture(scope="session")
def synthetic_table():
    """make(spec, sa=..., mlp=..., fixed=, refresh=, dense=, **fingerprint): a latency table with
    known costs in ms (per layer at K = 0, N/4, N/2, 3N/4, N), as `dscalibrate latency` writes them."""
    def make(spec, sa=(0.0, 1.0, 2.0, 3.0, 4.0), mlp=(0.0, 0.5, 1.0, 1.5, 2.0), fixed=1.0, refresh=14.0, dense=12.0,
             **fingerprint):
        n = spec.num_tokens
        tokens = (0, n // 4, n // 2, 3 * n // 4, n)
        return LatencyTable(fingerprint={**model_fingerprint(spec), **fingerprint},
                            kinds={"SA": KindLatency(tokens, sa), "MLP": KindLatency(tokens, mlp)},
                            partial_fixed_ms=fixed, refresh_ms=refresh, dense_step_ms=dense)
    return make

