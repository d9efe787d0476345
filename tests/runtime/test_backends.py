"""Backend choice, the static-buffer PyTorch backend, precision options and the no-host-sync rule."""

import importlib.util

import numpy as np
import pytest
import torch
from diffsparse.runtime import BackendError, Pipeline
from diffsparse.runtime.backends import ort_capi
from diffsparse.runtime.backends.ort import (PREPACK_MEMORY_SHARE, physical_memory, prepack_summary, prepack_weights,
                                             shares_prepacked_weights, uniform_prepack)
from diffsparse.runtime.backends.select import resolve
from diffsparse.runtime.backends.torch_backend import compile_step, compiler_missing, copy_all
from torch.utils._python_dispatch import TorchDispatchMode

from diffsparse.builtin_schedules import toca_schedule
from diffsparse.models.base import StepCall
from diffsparse.models.zoo import make_spec
from diffsparse.sampler import initial_noise

LABELS = [0, 3, 9]


def test_auto_picks_what_runs_here():
    assert resolve("auto", "cpu") == ("onnxruntime", "cpu")
    assert resolve("torch", "cpu") == ("torch", "cpu")
    if not torch.cuda.is_available():
        assert resolve("auto", "auto") == ("onnxruntime", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
def test_unavailable_backends_name_what_to_install():
    with pytest.raises(BackendError, match="CUDA build of torch"):
        resolve("torch", "cuda")
    with pytest.raises(BackendError, match="CUDA build of torch"):
        resolve("auto", "cuda")
    with pytest.raises(BackendError, match="pip install onnxruntime-gpu"):
        resolve("onnxruntime", "cuda")
    expected = ("runs on CUDA only" if importlib.util.find_spec("tensorrt") and importlib.util.find_spec("polygraphy")
                else "pip install tensorrt polygraphy")
    with pytest.raises(BackendError, match=expected):
        resolve("tensorrt", "cpu")
    with pytest.raises(BackendError, match="unknown backend"):
        resolve("openvino", "cpu")


def _torch_pipe(bundle, **kwargs):
    from diffsparse.manifest import Manifest

    m = Manifest.load(bundle)
    return Pipeline.from_model(m.source["model"], m.schedule, batch_size=m.batch_size, guidance=m.guidance,
                               seed=m.source.get("seed", 0), sampler=m.sampler.config, **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_static_buffers_equal_eager_steps(tiny_bundles, dtype):
    """Ping-pong static buffers change where tensors live, not what is computed; under autocast
    too (both store the latent and the cache as float32: found on an H200, where fp16 eager fed
    half-precision cache entries to the next step and drifted from static by 0.2% in 10 steps)."""
    static = _torch_pipe(tiny_bundles["toca"], dtype=dtype).generate(LABELS + [5], seed=2, guidance_scale=3.0)
    eager = _torch_pipe(tiny_bundles["toca"], static=False, dtype=dtype).generate(LABELS + [5], seed=2, guidance_scale=3.0)
    np.testing.assert_array_equal(static.samples, eager.samples)
    # a second run on the same (reused) buffers starts clean
    again = _torch_pipe(tiny_bundles["toca"], dtype=dtype).generate(LABELS + [5], seed=2, guidance_scale=3.0)
    np.testing.assert_array_equal(again.samples, static.samples)


@pytest.mark.skipif(bool(compiler_missing("cpu")), reason="torch.compile on the CPU needs a C++ compiler")
def test_copy_all_writes_each_output_into_its_buffer_in_few_calls():
    """A step's outputs reach their buffers as pairwise copies would (casts, transposed views,
    broadcasts included), grouped by dtype pair into one foreach call each."""
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g).half(), torch.randn(5, generator=g),
           torch.randn(4, 3, 2, generator=g).transpose(0, 2), torch.randn(1, 4, generator=g), torch.randn(2, 3, 4, generator=g)]
    dst = [torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(5), torch.zeros(2, 3, 4), torch.zeros(3, 4),
           torch.zeros(2, 3, 4, dtype=torch.float16)]
    expected = [d.clone().copy_(s) for d, s in zip(dst, src)]
    with torch.profiler.profile() as prof:
        copy_all(dst, src)
    for d, e in zip(dst, expected):
        assert torch.equal(d, e) and d.dtype == e.dtype
    calls = [e.name for e in prof.events() if e.cpu_parent is None]
    # (f32, f32): 2 outputs; (f16, f32); (f32, f16); the transposed view and the broadcast on their own
    assert sorted(calls) == sorted(["aten::_foreach_copy_"] * 3 + ["aten::copy_"] * 2), calls
    with pytest.raises(ValueError):
        copy_all(dst, src[:-1])


def test_compiled_steps_reproduce_the_uncompiled_ones(tiny_bundles):
    """compile=True: each step module through torch.compile (the CPU's C++ backend here, Triton
    on a GPU) gives the uncompiled samples up to float rounding, and is refused where it means nothing."""
    ref = Pipeline.from_bundle(tiny_bundles["toca"], backend="torch").generate(LABELS, seed=1, guidance_scale=3.0)
    pipe = Pipeline.from_bundle(tiny_bundles["toca"], compile=True)  # backend "auto": torch, compiled
    assert pipe.backend.name == "torch" and pipe.backend.compile and pipe.backend.max_contexts == 1
    compiled = pipe.generate(LABELS, seed=1, guidance_scale=3.0)
    np.testing.assert_allclose(compiled.samples, ref.samples, atol=1e-4)
    # eager: the modules alone compiled (static compiles each step with its buffer writes)
    eager = _torch_pipe(tiny_bundles["toca"], static=False, compile=True).generate(LABELS, seed=1, guidance_scale=3.0)
    np.testing.assert_allclose(eager.samples, ref.samples, atol=1e-4)
    with pytest.raises(BackendError, match="with torch.compile"):
        Pipeline.from_bundle(tiny_bundles["toca"], backend="torch", compile=True, concurrency=2)
    with pytest.raises(BackendError, match="compile=True is for the torch backend"):
        Pipeline.from_bundle(tiny_bundles["toca"], backend="onnxruntime", compile=True)


def test_bfloat16_runs_in_low_precision_close_to_float32(tiny_bundles):
    ref = Pipeline.from_bundle(tiny_bundles["toca"], backend="torch").generate(LABELS, seed=1, guidance_scale=3.0)
    low = Pipeline.from_bundle(tiny_bundles["toca"], backend="torch", dtype="bfloat16").generate(
        LABELS, seed=1, guidance_scale=3.0)
    err = np.abs(low.samples - ref.samples).max() / np.abs(ref.samples).max()
    assert 0 < err < 0.1, err  # bf16 matmuls: different, but close
    with pytest.raises(BackendError, match="dtype must be one of"):
        Pipeline.from_bundle(tiny_bundles["toca"], backend="torch", dtype="int8")


class _HostSyncs(TorchDispatchMode):
    """Records ops that make the host wait for the device: reading a tensor's value (.item(),
    bool(), int()) and ops whose output shape depends on data."""

    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model, guidance", [("dit-tiny", True), ("pixart-tiny", True), ("flux-tiny", False),
                                             ("wan-tiny", True)])
def test_steps_never_wait_for_the_device(model, guidance):
    """No step of any family reads a device value on the host or has a data-dependent shape, so
    the steps can be captured as CUDA graphs and run back to back without host syncs."""
    spec = make_spec(model, guidance=guidance)
    sched = toca_schedule(spec, 4, 0.8, full_every=4)
    plan = spec.sampler_plan(4)
    cond = spec.example_conditioning(np.random.default_rng(0))
    latent = torch.from_numpy(initial_noise(0, 1, spec.latent_shape))
    cache = spec.cache_layout(sched.selector).zeros()
    modes = []
    for t in range(4):
        feeds = spec.feeds(StepCall(float(plan.timesteps[t]), plan.coefficients[t]), cond, 2.0)
        args = [torch.from_numpy(np.asarray(feeds[s.name])) for s in spec.step_inputs()[1:]]
        step = spec.build_step(sched.keep[t], sched.selector)
        with torch.no_grad(), _HostSyncs() as mode:
            out = step(latent, *args, *cache)
        modes.append(mode.calls)
        latent, cache = out[0], list(out[1:])
    assert any(0 < k < n for row in sched.keep for k, n in zip(row, spec.dense_keep())), "schedule must be sparse"
    assert modes == [[]] * 4


@pytest.mark.gpu
def test_cuda_graphs_reproduce_the_eager_steps(tiny_bundles):
    """On a GPU: captured-and-replayed steps give the eager result, and once captured the steps
    run back to back with no synchronising call (torch's sync debug mode raises on one)."""
    eager = _torch_pipe(tiny_bundles["toca"], device="cuda", static=False).generate(LABELS, seed=3, guidance_scale=3.0)
    pipe = _torch_pipe(tiny_bundles["toca"], device="cuda")
    assert pipe.backend.cuda_graphs
    graphed = pipe.generate(LABELS, seed=3, guidance_scale=3.0)  # captures every (graph, parity)
    np.testing.assert_allclose(graphed.samples, eager.samples, atol=1e-4)
    backend, spec, plan = pipe.backend, pipe.spec, pipe.plan
    cond = {"class_labels": np.array(LABELS[:2])}
    backend.start(initial_noise(3, 2, spec.latent_shape))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, graph in enumerate(pipe.step_graphs):
            backend.run_step(graph, spec.feeds(StepCall(float(plan.timesteps[i]), plan.coefficients[i]), cond, 3.0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    np.testing.assert_allclose(backend.latent(), graphed.samples[:2], atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(bool(compiler_missing("cuda")), reason="torch.compile on CUDA needs a C compiler (Triton)")
def test_compiled_steps_captured_as_cuda_graphs_reproduce_the_eager_steps(tiny_bundles):
    """On a GPU: steps compiled with their buffer writes (Triton kernels), then captured and
    replayed as CUDA graphs, give the eager samples; a second generation replays the same graphs."""
    eager = _torch_pipe(tiny_bundles["toca"], device="cuda", static=False).generate(LABELS, seed=3, guidance_scale=3.0)
    pipe = _torch_pipe(tiny_bundles["toca"], device="cuda", compile=True)
    assert pipe.backend.cuda_graphs and pipe.backend.compile
    first = pipe.generate(LABELS, seed=3, guidance_scale=3.0)
    again = pipe.generate(LABELS, seed=3, guidance_scale=3.0)
    np.testing.assert_allclose(first.samples, eager.samples, atol=1e-4)
    np.testing.assert_array_equal(again.samples, first.samples)


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="needs onnxruntime-gpu")
def test_onnxruntime_cuda_matches_cpu(tiny_bundles):
    """onnxruntime-gpu on a GPU: device weights, device cache, the same samples as on the CPU."""
    cpu = Pipeline.from_bundle(tiny_bundles["toca"], backend="onnxruntime").generate(LABELS, seed=4, guidance_scale=3.0)
    pipe = Pipeline.from_bundle(tiny_bundles["toca"], backend="onnxruntime", device="cuda")
    gpu = pipe.generate(LABELS, seed=4, guidance_scale=3.0)
    assert gpu.device == "cuda"
    np.testing.assert_allclose(gpu.samples, cpu.samples, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not (importlib.util.find_spec("tensorrt") and importlib.util.find_spec("polygraphy")),
                    reason="needs tensorrt and polygraphy")
def test_tensorrt_engine_matches_onnxruntime(tiny_spec, tiny_schedules, tmp_path):
    """On a GPU with TensorRT: dsexport --tensorrt builds one engine with a profile per distinct
    step, backend='auto' picks it, and it reproduces ONNX Runtime on the CPU."""
    from diffsparse.export.bundle import ExportConfig, export_bundle

    m = export_bundle(tiny_spec, tiny_schedules["toca"], tmp_path / "trt", source={"model": "dit-tiny", "seed": 0},
                      config=ExportConfig(tensorrt="fp32"))
    assert len(m.engines) == 1 and m.engines[0]["profiles"] == len(m.graphs)
    cpu = Pipeline.from_bundle(tmp_path / "trt", backend="onnxruntime").generate(LABELS, seed=6, guidance_scale=3.0)
    pipe = Pipeline.from_bundle(tmp_path / "trt", backend="auto", device="cuda")
    assert pipe.backend.name == "tensorrt"
    trt = pipe.generate(LABELS, seed=6, guidance_scale=3.0)
    np.testing.assert_allclose(trt.samples, cpu.samples, atol=1e-3)


def test_per_session_threads_give_the_same_samples(tiny_bundles, tmp_path):
    """The shared thread pool (default) and per-session pools ($DIFFSPARSE_ORT_SHARED_THREADS=0)
    change only where work runs, not what is computed (each in a fresh process: the choice is
    process-wide in ONNX Runtime)."""
    import os
    import subprocess
    import sys

    code = ("import sys, numpy as np; from diffsparse.runtime import Pipeline; "
            "r = Pipeline.from_bundle(sys.argv[1]).generate([1, 2, 3], seed=4, guidance_scale=2.0); "
            "np.save(sys.argv[2], r.samples)")
    for shared in ("1", "0"):
        env = {**os.environ, "DIFFSPARSE_ORT_SHARED_THREADS": shared}
        subprocess.run([sys.executable, "-c", code, str(tiny_bundles["toca"]), str(tmp_path / f"{shared}.npy")],
                       check=True, env=env)
    np.testing.assert_allclose(np.load(tmp_path / "1.npy"), np.load(tmp_path / "0.npy"), atol=1e-5)


def test_prepacked_weights_give_the_same_samples(tiny_bundles):
    """Pre-packing changes where the packed weights live (per session, once), not the results."""
    runs = {}
    for mode in ("on", "off"):
        pipe = Pipeline.from_bundle(tiny_bundles["toca"], backend="onnxruntime", prepack=mode, verify=False)
        assert pipe.backend.prepacked is (mode == "on")
        runs[mode] = pipe.generate([1, 2, 3], seed=4).samples
    np.testing.assert_allclose(runs["on"], runs["off"], atol=1e-5)
    with pytest.raises(BackendError, match="prepack must be one of"):
        Pipeline.from_bundle(tiny_bundles["toca"], backend="onnxruntime", prepack="yes", verify=False)


def test_prepack_auto_weighs_the_copies_against_physical_memory(monkeypatch):
    monkeypatch.setattr(ort_capi, "available", lambda: False)   # per-session copies: what auto weighs then
    total = physical_memory()
    share = int(PREPACK_MEMORY_SHARE * total)
    assert prepack_weights("auto", [1], share) == [True]
    assert prepack_weights("auto", [1, 1, 1, 1], share // 4) == [True] * 4
    # 5 copies of a quarter of the budget do not fit: the graphs that run the most steps are packed
    assert prepack_weights("auto", [1, 3, 1, 2, 2], share // 4) == [True, True, False, True, True]
    assert prepack_weights("auto", [1, 1, 1, 1, 1], share // 4) == [True, True, True, True, False]
    assert prepack_weights("auto", [4, 1], 2 * total) == [False, False]
    assert prepack_weights("auto", [1] * 50, total, device="cuda") == [True] * 50, "only the CPU weighs the copies"
    assert prepack_weights("on", [1] * 7, total) == [True] * 7 and prepack_weights("off", [1], 1) == [False]
    assert prepack_summary([True, True]) is True and prepack_summary([False]) is False
    assert prepack_summary([True, False, True]) == "2 of 3 graphs"
    # one setting for all graphs (latency calibration): auto packs all or none
    assert uniform_prepack("auto", [1] * 4, share // 4) == "on"
    assert uniform_prepack("auto", [1] * 5, share // 4) == "off", "auto would pack 4 of 5"
    assert uniform_prepack("on", [1] * 5, total) == "on" and uniform_prepack("off", [1], 1) == "off"


@pytest.mark.skipif(not ort_capi.available(), reason="the onnxruntime wheel here ships no C library")
def test_shared_prepacked_weights_give_the_same_samples(tiny_bundles):
    """Sessions made through the C API with one shared packed copy compute what the Python API's
    sessions with a copy each compute, in place and into two buffers, and carry the same cache."""
    pipes = {mode: Pipeline.from_bundle(tiny_bundles["toca"], backend="onnxruntime", prepack=mode, verify=False)
             for mode in ("on", "shared")}
    runs = {mode: pipe.generate(LABELS, seed=4, guidance_scale=3.0).samples for mode, pipe in pipes.items()}
    shared = pipes["shared"].backend
    assert shared.prepacked == "shared" and shared.shared_prepack and any(shared.in_place)
    np.testing.assert_allclose(runs["shared"], runs["on"], rtol=0, atol=1e-6)
    caches = {}
    for mode, pipe in pipes.items():
        spec, plan, ctx = pipe.spec, pipe.plan, pipe.backend.new_context()
        ctx.start(initial_noise(1, spec.batch_size, spec.latent_shape))
        labels = {"class_labels": np.arange(spec.batch_size) % 10}
        for i in (0, 1):   # a refresh step, then a partial one
            ctx.run_step(pipe.step_graphs[i], spec.feeds(StepCall(float(plan.timesteps[i]), plan.coefficients[i]),
                                                          labels, 3.0))
        caches[mode] = ctx.cache()
    on, sh = caches["on"], caches["shared"]
    assert on.keys() == sh.keys()
    for name in on:
        np.testing.assert_allclose(sh[name], on[name], rtol=0, atol=1e-6, err_msg=name)


def test_shared_prepack_is_chosen_where_it_can_run(monkeypatch):
    total = physical_memory()
    assert shares_prepacked_weights("auto", 1) is ort_capi.available()
    assert not shares_prepacked_weights("auto", total), "one packed copy must fit in the memory share"
    assert not shares_prepacked_weights("auto", 1, device="cuda") and not shares_prepacked_weights("on", 1)
    with pytest.raises(BackendError, match="CPU only"):
        shares_prepacked_weights("shared", 1, device="cuda")
    monkeypatch.setattr(ort_capi, "available", lambda: False)
    with pytest.raises(BackendError, match="reinstall onnxruntime"):
        shares_prepacked_weights("shared", 1)
    assert not shares_prepacked_weights("auto", 1)


def test_ort_in_place_scatters_equal_two_buffers(tiny_bundles):
    """Token scatters written into the buffer they read (CPU) compute what separate buffers do."""
    pipe = Pipeline.from_bundle(tiny_bundles["toca"], backend="onnxruntime")
    backend = pipe.backend.prepare()
    assert any(backend.in_place), "a ToCa bundle scatters tokens into its cache"
    assert all(set(p) <= set(w) for p, w in zip(backend.in_place, backend.written))
    fast = pipe.generate(LABELS, seed=4, guidance_scale=3.0)
    backend.in_place = [frozenset()] * len(backend.in_place)
    plain = pipe.generate(LABELS, seed=4, guidance_scale=3.0)
    np.testing.assert_array_equal(fast.samples, plain.samples)


@pytest.mark.skipif(bool(compiler_missing("cpu")), reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("model", ["pixart-tiny", "flux-tiny", "wan-tiny"])
def test_every_family_compiles_as_one_graph(model):
    """The other families' steps (cross-attention, joint text tokens, video latents) compile
    without a graph break (fullgraph) and give the uncompiled samples up to float rounding."""
    spec = make_spec(model, batch_size=1, guidance=model.startswith("pixart"))
    sched = toca_schedule(spec, 3, 0.5, full_every=3)
    cond = {k: v[:1] for k, v in spec.example_conditioning(np.random.default_rng(0)).items()}
    ref = Pipeline.from_spec(spec, sched).generate(conditioning=cond, seed=0).samples
    out = Pipeline.from_spec(spec, sched, compile=True).generate(conditioning=cond, seed=0).samples
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max())


class _Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor + 1.0


@pytest.mark.skipif(bool(compiler_missing("cpu")), reason="torch.compile on the CPU needs a C++ compiler")
def test_more_step_graphs_than_the_default_compile_cache_holds():
    """Step graphs share one code object (a step module class's forward), whose compile cache
    holds 8 entries by default: the 9th whole-graph compile failed (found in CI, where the tests'
    pipelines add up to more). compile_step gives each step graph its own."""
    steps = [compile_step(_Scale(float(i))) for i in range(10)]
    x = torch.ones(3)
    for i, step in enumerate(steps):
        torch.testing.assert_close(step(x), x * i + 1.0)


def test_compile_step_on_a_torch_without_isolated_recompiles(monkeypatch):
    """An older torch.compile (no isolate_recompiles, e.g. torch 2.11 on our GPU image) gets a
    shared compile cache large enough for many step graphs instead."""
    calls = []

    def old_compile(model, fullgraph=False, dynamic=None):
        calls.append(dict(fullgraph=fullgraph, dynamic=dynamic))
        return model

    monkeypatch.setattr(torch, "compile", old_compile)
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 8)
    step = _Scale(2.0)
    assert compile_step(step) is step and calls == [dict(fullgraph=True, dynamic=False)]
    assert torch._dynamo.config.cache_size_limit >= 64


def test_compile_without_a_compiler_is_refused_before_loading(tiny_bundles, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(BackendError, match=r"compile=True needs a C\+\+ compiler \(g\+\+ or clang\+\+\)"):
        Pipeline.from_bundle(tiny_bundles["toca"], backend="torch", compile=True)
