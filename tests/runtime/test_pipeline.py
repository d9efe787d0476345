"""The runtime API on ONNX Runtime (default) and the PyTorch reference backend."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffsparse.runtime import BackendError, Pipeline

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


MEMORY_PROBE = textwrap.dedent("""
    import sys
    from diffsparse.runtime import Pipeline
    from diffsparse.runtime.profile import rss_bytes
    before = rss_bytes()
    pipe = Pipeline.from_bundle(sys.argv[1])
    pipe.generate(list(range(4)), seed=0)
    print(rss_bytes() - before)
""")


def test_step_sessions_share_one_copy_of_the_weights(tmp_path):
    """Loaded memory of a bundle with several distinct step graphs <= 1.3x its dense bundle's."""
    from diffsparse.export.bundle import ExportConfig, export_bundle

    from diffsparse.builtin_schedules import dense_schedule, toca_schedule
    from diffsparse.models.zoo import make_spec

    spec = make_spec("dit-small", batch_size=2)
    sparse = toca_schedule(spec, 12, 0.5, full_every=6)
    assert len(sparse.distinct_signatures()) >= 5
    cfg = ExportConfig(verify=False)
    export_bundle(spec, sparse, tmp_path / "sparse", config=cfg)
    export_bundle(spec, dense_schedule(spec, 12), tmp_path / "dense", config=cfg)
    weights = (tmp_path / "dense" / "weights.bin").stat().st_size

    def loaded(name):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / name)],
                             capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    dense, sparse_mem = loaded("dense"), loaded("sparse")
    graphs = len(sparse.distinct_signatures())
    assert sparse_mem <= 1.3 * dense, (sparse_mem, dense)
    assert sparse_mem < dense + (graphs - 1) * weights, "per-step sessions must not copy the weights"
