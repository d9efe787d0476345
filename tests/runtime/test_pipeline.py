"""The runtime API on ONNX Runtime (default) and the PyTorch reference backend."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffsparse.runtime import BackendError, NonFiniteOutputError, Pipeline

from diffsparse.manifest import BundleError
from diffsparse.sampler import initial_noise


@pytest.mark.parametrize("name", ["dense", "toca"])
def test_onnxruntime_matches_torch_reference(tiny_bundles, name):
    labels = [0, 3, 9]
    ort_result = Pipeline.from_bundle(tiny_bundles[name]).generate(labels, seed=5, guidance_scale=3.0)
    ref_result = Pipeline.from_bundle(tiny_bundles[name], backend="torch").generate(labels, seed=5, guidance_scale=3.0)
    assert ort_result.backend == "onnxruntime" and ref_result.backend == "torch"
    assert ort_result.samples.shape == (3, 4, 16, 16)
    scale = max(1.0, float(np.abs(ref_result.samples).max()))
    assert np.abs(ort_result.samples - ref_result.samples).max() / scale < 1e-3
    assert len(ort_result.step_seconds) == 6 and all(s > 0 for s in ort_result.step_seconds)


def test_dense_bundle_reproduces_diffusers_sampling(tiny_bundles, tiny_spec):
    """Runtime (ORT) with the dense schedule == diffusers model + DDIMScheduler, CFG, same noise."""
    labels, guidance, steps = np.array([4, 8]), 4.0, 6
    result = Pipeline.from_bundle(tiny_bundles["dense"]).generate(labels, seed=1, guidance_scale=guidance)
    sched = tiny_spec.sampler.scheduler()
    sched.set_timesteps(steps)
    x = torch.from_numpy(initial_noise(1, 2, (4, 16, 16)))
    for t in sched.timesteps:
        with torch.no_grad():
            out = tiny_spec.model(torch.cat([x, x]), timestep=t.expand(4),
                                  class_labels=torch.tensor([4, 8, 10, 10])).sample
        cond, uncond = out.chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    scale = max(1.0, float(x.abs().max()))
    assert np.abs(result.samples - x.numpy()).max() / scale < 1e-4


def test_sparse_schedule_changes_the_result_but_not_much(tiny_bundles):
    a = Pipeline.from_bundle(tiny_bundles["dense"]).generate([1, 2], seed=0)
    b = Pipeline.from_bundle(tiny_bundles["toca"]).generate([1, 2], seed=0)
    assert not np.allclose(a.samples, b.samples)


def test_generation_defaults_to_the_bundles_guidance_scale(tiny_bundles, tmp_path):
    bundle = _copy(tiny_bundles["toca"], tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["guidance_scale"] = 2.5
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.spec.default_guidance_scale == 2.5
    default = pipe.generate([1, 2], seed=0)
    np.testing.assert_array_equal(default.samples, pipe.generate([1, 2], seed=0, guidance_scale=2.5).samples)
    assert not np.allclose(default.samples, pipe.generate([1, 2], seed=0, guidance_scale=4.0).samples)
    torch_pipe = Pipeline.from_bundle(bundle, backend="torch")
    assert torch_pipe.spec.default_guidance_scale == 2.5


def test_batches_are_padded_and_independent_of_batch_size(tiny_bundles):
    pipe = Pipeline.from_bundle(tiny_bundles["toca"])
    three = pipe.generate([1, 2, 3], seed=0)
    one = pipe.generate([3], seed=0)
    # sample i's noise depends on (seed, i) only; index 0 here vs index 2 there differ
    assert not np.allclose(three.samples[2], one.samples[0])
    again = pipe.generate([1, 2, 3], seed=0)
    np.testing.assert_array_equal(three.samples, again.samples)
    img = three.grid(scale=2)
    assert img.size == (3 * 16 * 2, 16 * 2)


def test_bad_inputs_give_clear_errors(tiny_bundles, tmp_path):
    pipe = Pipeline.from_bundle(tiny_bundles["toca"])
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 9\]"):
        pipe.generate([1, 12])
    with pytest.raises(ValueError, match="empty"):
        pipe.generate([])
    with pytest.raises(BackendError, match="unknown backend"):
        Pipeline.from_bundle(tiny_bundles["toca"], backend="tensorflow")
    with pytest.raises(BackendError, match="unknown device"):
        Pipeline.from_bundle(tiny_bundles["toca"], device="tpu")


def test_bad_conditioning_is_refused_before_anything_runs(tiny_bundles):
    """Names, values and label ranges of every batch are checked before the first step runs."""
    pipe = Pipeline.from_bundle(tiny_bundles["toca"], verify=False)
    ran = []
    acquire = pipe._pool.acquire
    pipe._pool.acquire = lambda: (ran.append(1), acquire())[1]
    with pytest.raises(ValueError, match=r"samples 4-4 of 5 \(batch 2, padded .*\): class labels must be in \[0, 9\]"):
        pipe.generate([1, 2, 3, 4, 12])  # the last batch is out of range
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 9\]"):
        pipe.generate([-1])
    with pytest.raises(ValueError, match=r"'class_labels' holds values outside int32"):
        pipe.generate([2**40])
    with pytest.raises(ValueError, match="class labels must be whole numbers, got \\[1.5\\]"):
        pipe.generate([1.5])
    with pytest.raises(ValueError, match="class labels must be whole numbers"):
        pipe.generate(["cat"])
    with pytest.raises(ValueError, match="'class_labels' holds NaN or infinite values"):
        pipe.generate(conditioning={"class_labels": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match=r"conditioning \['prompt_embeds'\] is not an input of this model; "
                                         r"it takes \['class_labels'\]"):
        pipe.generate([1], conditioning={"prompt_embeds": np.zeros((1, 4, 8))})
    with pytest.raises(ValueError, match="must hold numbers"):
        pipe.generate(conditioning={"class_labels": np.array(["1"])})
    assert not ran, "a step ran before the conditioning was checked"
    np.testing.assert_array_equal(pipe.generate(np.array([1.0, 2.0]), seed=0).samples,
                                  pipe.generate([1, 2], seed=0).samples)


def test_non_finite_latents_raise_a_clear_error(tiny_bundles):
    good = Pipeline.from_bundle(tiny_bundles["toca"], verify=False)
    coefficients = good.plan.coefficients.copy()
    coefficients[2, 0] = np.nan
    plan = dataclasses.replace(good.plan, coefficients=coefficients)
    pipe = Pipeline(good.backend, good.spec, plan, good.step_graphs)
    with pytest.raises(NonFiniteOutputError, match=r"samples \[0, 1\] \(batch 0\) ended with non-finite latents "
                                                   r".*sampler's coefficients or timesteps are not finite.*check_finite=False"):
        pipe.generate([1, 2, 3], seed=0)
    assert np.isnan(pipe.generate([1, 2, 3], seed=0, check_finite=False).samples).all()
    # finite coefficients: the message points at the weights instead
    with pytest.raises(NonFiniteOutputError, match="weights or graphs may be corrupted"):
        good.generate([1, 2], seed=0, guidance_scale=1e38)
    assert isinstance(NonFiniteOutputError("x"), RuntimeError)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupted_or_partial_bundles_are_refused(tiny_bundles, tmp_path):
    b = _copy(tiny_bundles["toca"], tmp_path / "flip")
    data = bytearray((b / "weights.bin").read_bytes())
    data[100] ^= 0xFF
    (b / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="fails its checksum"):
        Pipeline.from_bundle(b)

    b = _copy(tiny_bundles["toca"], tmp_path / "trunc")
    (b / "step_001.onnx").write_bytes((b / "step_001.onnx").read_bytes()[:100])
    with pytest.raises(BundleError, match="truncated"):
        Pipeline.from_bundle(b)

    b = _copy(tiny_bundles["toca"], tmp_path / "missing")
    (b / "step_000.onnx").unlink()
    with pytest.raises(BundleError, match="missing step_000.onnx"):
        Pipeline.from_bundle(b)

    b = _copy(tiny_bundles["toca"], tmp_path / ".half.tmp-1")
    (b / "manifest.json").unlink()
    with pytest.raises(BundleError, match="export did not finish"):
        Pipeline.from_bundle(b)

    b = _copy(tiny_bundles["toca"], tmp_path / "version")
    m = json.loads((b / "manifest.json").read_text())
    m["version"] = 7
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="bundle version 7 is not supported"):
        Pipeline.from_bundle(b)

    b = _copy(tiny_bundles["toca"], tmp_path / "json")
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Pipeline.from_bundle(b)

    with pytest.raises(BundleError, match="does not exist"):
        Pipeline.from_bundle(tmp_path / "nowhere")


def test_step_sessions_share_one_copy_of_the_weights(tmp_path):
    """A bundle with several distinct step graphs against one with two (a full first step, then one
    sparse graph: same cache, same activations), each measured in a fresh process: the extra
    sessions copy no weights and share one activation arena."""
    import dataclasses

    from diffsparse.export.bundle import ExportConfig, export_bundle

    from diffsparse.builtin_schedules import toca_schedule
    from diffsparse.models.zoo import make_spec
    from diffsparse.runtime.profile import ProfileConfig, fresh_process, memory_footprint

    spec = make_spec("dit-small", batch_size=2)
    sparse = toca_schedule(spec, 12, 0.5, full_every=6)
    extra = len(sparse.distinct_signatures()) - 2
    assert extra >= 3
    two_graphs = dataclasses.replace(sparse, keep=[sparse.keep[0]] + [sparse.keep[1]] * 11, full_steps=None)
    assert len(two_graphs.distinct_signatures()) == 2
    cfg = ExportConfig(verify=False)
    export_bundle(spec, sparse, tmp_path / "sparse", config=cfg)
    export_bundle(spec, two_graphs, tmp_path / "two", config=cfg)
    weights = (tmp_path / "two" / "weights.bin").stat().st_size
    shared = ProfileConfig(prepack="off")   # pre-packing gives each session its own packed copy, by design
    two, many = (fresh_process(memory_footprint, tmp_path / name, shared) for name in ("two", "sparse"))
    # each extra session's own memory (graph, kernels) is less than one copy of the weights
    assert many["private_bytes"] - two["private_bytes"] < extra * weights, (many, two, weights)
    # pre-packed, each extra session keeps about a copy of the (matmul) weights: the price of "on"
    packed = [fresh_process(memory_footprint, tmp_path / name, ProfileConfig(prepack="on"), False)
              for name in ("two", "sparse")]
    assert packed[1]["private_bytes"] - packed[0]["private_bytes"] > 0.5 * extra * weights, packed
    assert abs(many["file_backed_bytes"] - two["file_backed_bytes"]) < 0.25 * weights, "weights.bin mapped once"
    # running adds the same activation memory however many sessions there are
    added = [m["run_private_bytes"] - m["private_bytes"] for m in (many, two)]
    assert added[0] < 1.1 * added[1] + 2**20, (many, two)
