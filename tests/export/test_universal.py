"""One universal step graph runs every sparsity pattern and matches the per-step PyTorch steps."""

import importlib.util

import onnxruntime as ort
import pytest
from diffsparse.export.universal import export_universal_step, k_carriers
from diffsparse.export.verify import _run_torch, compare, reference_inputs

from diffsparse.manifest import Manifest
from diffsparse.models.zoo import make_spec
from diffsparse.runtime.backends.ort import session_options


@pytest.mark.parametrize("model", ["dit-tiny", "pixart-tiny", "wan-tiny", "flux-tiny"])
def test_universal_graph_matches_every_step(model, tiny_bundles, tmp_path):
    spec = make_spec(model, batch_size=2, guidance=model != "flux-tiny")
    selector = spec.default_selector()
    path = tmp_path / "universal.onnx"
    import onnx

    onnx.save(export_universal_step(spec, selector), str(path))
    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    dims = {i.name: i.shape for i in sess.get_inputs()}
    assert all(isinstance(dims[name][0], str) for name in k_carriers(spec, spec.dense_keep())), "K must be dynamic"

    # realistic inputs: the cache after one dense step, as export verification uses
    manifest = Manifest.load(tiny_bundles["toca"])
    from diffsparse.builtin_schedules import toca_schedule

    sched = toca_schedule(spec, 6, 0.5, full_every=3, selector=selector)
    manifest.schedule, manifest.sampler = sched, spec.sampler_plan(6)
    feeds = reference_inputs(spec, manifest)
    in_names = [t.name for t in spec.step_inputs()] + spec.cache_layout(selector).names
    out_names = [t.name for t in spec.step_outputs()] + spec.cache_layout(selector).output_names
    n = spec.dense_keep()
    patterns = [n, [0] * len(n), [k // 4 for k in n], [0 if i % 2 else k for i, k in enumerate(n)],
                *[list(r) for r in sched.distinct_signatures()]]
    declared = {i.name for i in sess.get_inputs()}
    for keep in patterns:
        ref = _run_torch(spec.build_step(keep, selector), feeds, in_names, out_names)
        got = sess.run(out_names, {**{k: v for k, v in feeds.items() if k in declared}, **k_carriers(spec, keep)})
        err = compare(dict(zip(out_names, got)), ref)
        assert err < 1e-4, (keep, err)
    assert any(0 < k < m for keep in patterns for k, m in zip(keep, n))


def test_tensorrt_engine_keys_profiles_and_errors(tiny_bundles, tiny_spec, tiny_schedules, tmp_path):
    """What can be checked without TensorRT: engine keys, one static profile per distinct step,
    a clear error when building or loading is not possible here."""
    from diffsparse.export.bundle import ExportConfig, ExportError, export_bundle
    from diffsparse.bundle_format import engine_key
    from diffsparse.export.tensorrt import step_profiles
    from diffsparse.runtime import BackendError
    from diffsparse.runtime.backends.tensorrt import find_engine
    from diffsparse.runtime.bundle import Bundle

    assert engine_key("10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0)) == "trt-10.13.0.35-nvidia-h100-80gb-hbm3-sm90"
    sched = tiny_schedules["toca"]
    profiles = step_profiles(tiny_spec, sched)
    assert len(profiles) == len(sched.distinct_signatures())
    for prof, sig in zip(profiles, sched.distinct_signatures()):
        assert [shape[0] for shape in prof.values()] == list(sig)
    bundle = Bundle(tiny_bundles["toca"])
    with pytest.raises(BackendError, match="no TensorRT engine for this machine .* it has: none"):
        find_engine(bundle, "trt-10.13-nvidia-h100-sm90")
    bundle.manifest.engines = [{"key": "trt-10.3-nvidia-a100-sm80", "file": "engines/x/universal.plan"}]
    with pytest.raises(BackendError, match="it has: trt-10.3-nvidia-a100-sm80.*rebuild with dsexport --tensorrt"):
        find_engine(bundle, "trt-10.13-nvidia-h100-sm90")
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(ExportError, match="pip install tensorrt polygraphy"):
            export_bundle(tiny_spec, sched, tmp_path / "trt", config=ExportConfig(tensorrt="fp16"))
        assert not (tmp_path / "trt").exists()


def test_tensorrt_refuses_layers_wider_than_its_topk(tmp_path):
    from diffsparse.builtin_schedules import dense_schedule
    from diffsparse.export.bundle import ExportConfig, ExportError, export_bundle

    spec = make_spec("flux-tiny", guidance=False, options={"height": 1024, "width": 1024})
    assert spec.num_tokens == 4096
    with pytest.raises(ExportError, match="more than 3840 tokens"):
        export_bundle(spec, dense_schedule(spec, 2), tmp_path / "b", config=ExportConfig(tensorrt="fp16"))
    assert not (tmp_path / "b").exists()
