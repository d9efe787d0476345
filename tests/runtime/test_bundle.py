"""The bundle is the contract: every backend runs what the bundle holds, not the model it came from."""

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest

from diffsparse.builtin_schedules import toca_schedule
from diffsparse.export.bundle import export_bundle
from diffsparse.export.prune import prune_outputs
from diffsparse.manifest import BundleError
from diffsparse.models.zoo import load_model, make_spec
from diffsparse.runtime.bundle import Bundle
from diffsparse.runtime.pipeline import Pipeline


def test_a_bundle_runs_on_both_backends_after_its_source_is_deleted(tmp_path):
    _, model, _ = load_model("dit-tiny", seed=3)
    source = tmp_path / "my-dit"
    model.save_pretrained(source)
    spec = make_spec(source, batch_size=2)
    schedule = toca_schedule(spec, 4, 0.5, full_every=3)
    reference = Pipeline.from_spec(spec, schedule).generate(class_labels=[1, 7, 3], seed=0, guidance_scale=2.0)
    export_bundle(spec, schedule, tmp_path / "bundle", source={"model": str(source), "seed": 0})
    shutil.rmtree(source)
    del model, spec

    ort = Pipeline.from_bundle(tmp_path / "bundle").generate(class_labels=[1, 7, 3], seed=0, guidance_scale=2.0)
    pipe = Pipeline.from_bundle(tmp_path / "bundle", backend="torch")
    torch_run = pipe.generate(class_labels=[1, 7, 3], seed=0, guidance_scale=2.0)
    np.testing.assert_allclose(torch_run.samples, reference.samples, atol=1e-5)
    np.testing.assert_allclose(ort.samples, torch_run.samples, atol=1e-4)
    # the torch backend's weights are views of the bundle's weights file, not copies
    weights = tmp_path / "bundle" / "weights.bin"
    mapped = [p for p in pipe.spec.model.parameters() if p.numel() > 256]
    assert mapped and all(_backed_by(p, weights) for p in mapped)


def _backed_by(tensor, path) -> bool:
    base = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= base < hi:
                return len(parts) > 5 and parts[5] == str(path)
    return False


def test_a_parameter_map_that_does_not_fit_the_model_is_refused(tiny_bundles, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundles["toca"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    params = manifest["weights"]["parameters"]
    params.pop(next(iter(params)))
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="parameter map does not fit the model"):
        Bundle(bundle).model_spec()
    params["pos_embed.proj.weight"] = ["w.not-stored", False]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="which weights.bin does not hold"):
        Bundle(bundle)


def test_version_1_bundles_are_refused_with_a_re_export_message(tiny_bundles, tmp_path):
    bundle = tmp_path / "old"
    shutil.copytree(tiny_bundles["dense"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["version"] = 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="version 1 is not supported.*re-export"):
        Bundle(bundle)


# ---- a corrupted, edited or hostile manifest: one BundleError naming the field ----------------------
def _edit(bundle, **changes):
    """Rewrite the bundle's manifest.json with `changes` applied: key -> value, or a function of the manifest."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    for edit in changes.values():
        edit(manifest)
    path.write_text(json.dumps(manifest))


def _copy(tiny_bundles, tmp_path, name="toca"):
    bundle = tmp_path / name
    shutil.copytree(tiny_bundles[name], bundle)
    return bundle


def _set(*path_and_value):
    *path, value = path_and_value

    def edit(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("path, value, message", [
    (("sampler", "coefficients", 2, 1), float("nan"), r"sampler.coefficients\[2\]\[1\] must be a finite number"),
    (("sampler", "timesteps", 1), 12.5, r"sampler.timesteps\[1\] = 12.5 must be an integer in \[0, 999\]"),
    (("steps", 3, "timestep"), [5.0], r"steps\[3\].timestep must be a finite number"),
    (("steps", 2, "index"), 3, r"steps\[2\].index must be 2"),
    (("steps", 1, "graph"), 7, r"steps\[1\].graph must be an integer in \[0, "),
    (("batch_size",), "2", r"batch_size must be an integer"),
    (("guidance",), 1, r"guidance must be true or false"),
    (("guidance_scale",), float("inf"), r"guidance_scale must be a finite number"),
    (("inputs", 0, "shape", 1), -4, r"inputs\[0\].shape must be a list of positive integers"),
    (("cache", 0, "dtype"), "float64", r"cache\[0\].dtype must be one of"),
    (("graphs", 1, "keep"), [4], r"graphs\[1\].keep must hold one token count per schedule layer"),
    (("weights", "bytes"), -1, r"weights.bytes must be an integer >= 0"),
])
def test_a_bad_field_is_refused_naming_it(tiny_bundles, tmp_path, path, value, message):
    bundle = _copy(tiny_bundles, tmp_path)
    _edit(bundle, change=_set(*path, value))
    with pytest.raises(BundleError, match=message + r".*re-export the bundle with dsexport"):
        Bundle(bundle)


def test_the_weight_index_must_fit_the_file_and_the_graphs(tiny_bundles, tmp_path):
    bundle = _copy(tiny_bundles, tmp_path)
    index = json.loads((bundle / "manifest.json").read_text())["weights"]["index"]
    name, (offset, length, dtype, shape) = next((k, v) for k, v in index.items() if len(v[3]) == 2 and v[3][0] != v[3][1])
    _edit(bundle, change=_set("weights", "index", name, [offset, length + 4, dtype, shape]))
    with pytest.raises(BundleError, match=rf"weights.index\['{name}'\]\[1\] \(bytes\) is {length + 4}, but shape"):
        Bundle(bundle)
    _edit(bundle, change=_set("weights", "index", name, [offset, length, dtype, shape[::-1]]))
    with pytest.raises(BundleError, match="which is not the weights index's entry for it"):
        Bundle(bundle)   # consistent by itself, but the graphs read that tensor with the other shape
    _edit(bundle, change=_set("weights", "index", name, [10**12, length, dtype, shape]))
    with pytest.raises(BundleError, match=rf"weights.index\['{name}'\]\[0\] must be an integer in \[0, "):
        Bundle(bundle)


def test_a_sampler_plan_that_is_not_its_configs_is_refused_when_the_spec_is_built(tiny_bundles, tmp_path):
    bundle = _copy(tiny_bundles, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    coefficients = manifest["sampler"]["coefficients"]
    coefficients[1][0] *= 1.01   # finite and plausible, but not what the sampler computes
    _edit(bundle, change=_set("sampler", "coefficients", coefficients))
    with pytest.raises(BundleError, match="sampler.coefficients is not what sampler.config computes"):
        Pipeline.from_bundle(bundle, backend="onnxruntime")


def test_a_step_signature_other_than_the_models_is_refused(tiny_bundles, tmp_path):
    bundle = _copy(tiny_bundles, tmp_path)
    _edit(bundle, change=_set("inputs", 3, "dtype", "float32"))   # class_labels
    with pytest.raises(BundleError, match=r"inputs\[3\] is .* but the model's step takes"):
        Bundle(bundle).spec


# ---- no path leaves the bundle -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../other/weights.bin", "/tmp/weights.bin", "sub/weights.bin", "..", "..\\w.bin", ""])
def test_file_names_that_leave_the_bundle_are_refused(tiny_bundles, tmp_path, name):
    bundle = _copy(tiny_bundles, tmp_path)
    _edit(bundle, change=_set("weights", "file", name))
    with pytest.raises(BundleError, match=r"weights.file must be a plain file name inside the bundle folder"):
        Bundle(bundle)
    _edit(bundle, change=_set("weights", "file", "weights.bin"))
    _edit(bundle, change=_set("graphs", 0, "file", name))
    with pytest.raises(BundleError, match=r"graphs\[0\].file must be a plain file name"):
        Bundle(bundle)


def test_an_engine_must_live_in_its_engine_folder(tiny_bundles, tmp_path):
    bundle = _copy(tiny_bundles, tmp_path)
    engine = {"key": "trt-10-gpu-sm90", "file": "../trt-10-gpu-sm90/universal.plan", "sha256": "0" * 64, "bytes": 1,
              "precision": "fp16", "profiles": 2}
    _edit(bundle, change=_set("engines", [engine]))
    with pytest.raises(BundleError, match=r"engines\[0\].file must be 'engines/trt-10-gpu-sm90/universal.plan'"):
        Bundle(bundle)
    _edit(bundle, change=_set("engines", [{**engine, "key": "..", "file": "engines/../universal.plan"}]))
    with pytest.raises(BundleError, match=r"engines\[0\].key must be an engine key"):
        Bundle(bundle)


def test_a_symbolic_link_out_of_the_bundle_is_refused(tiny_bundles, tmp_path):
    bundle = _copy(tiny_bundles, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (bundle / "weights.bin").rename(outside / "weights.bin")
    (bundle / "weights.bin").symlink_to(outside / "weights.bin")   # same bytes, same checksum
    with pytest.raises(BundleError, match="is a link to .*outside the bundle folder"):
        Bundle(bundle)
    (bundle / "weights.bin").unlink()
    shutil.copy(outside / "weights.bin", bundle / "real.bin")
    (bundle / "weights.bin").symlink_to("real.bin")   # a link inside the bundle is fine
    Bundle(bundle)


def _replace_graph(bundle, index: int, model: onnx.ModelProto) -> None:
    """Write `model` as the bundle's graph `index` and record its checksum, as an export would."""
    name = f"step_{index:03d}.onnx"
    onnx.save(model, str(bundle / name))
    _edit(bundle, sha=_set("graphs", index, "sha256", hashlib.sha256((bundle / name).read_bytes()).hexdigest()),
          size=_set("graphs", index, "bytes", (bundle / name).stat().st_size))


def _graph_with_external_weight(location: str, offset: int = 0, length: int = 16) -> onnx.ModelProto:
    """A hand-made graph: next_latent = latent + W, W (4 floats) kept as external data at `location`."""
    w = onnx.TensorProto(name="w.hand-made", data_type=onnx.TensorProto.FLOAT, dims=[4],
                         data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["latent", "w.hand-made"], ["next_latent"])], "hand-made",
        [onnx.helper.make_tensor_value_info("latent", onnx.TensorProto.FLOAT, [4])],
        [onnx.helper.make_tensor_value_info("next_latent", onnx.TensorProto.FLOAT, [4])], [w])
    return onnx.helper.make_model(graph)


@pytest.mark.parametrize("location, message", [
    ("../x.bin", "not a plain file name inside the bundle"),
    ("/tmp/x.bin", "not a plain file name inside the bundle"),
    ("other.bin", "not the bundle's weights file 'weights.bin'"),
    ("weights.bin", "which is not the weights index's entry for it"),
])
def test_graphs_whose_external_data_leaves_the_bundle_are_refused(tiny_bundles, tmp_path, location, message):
    bundle = _copy(tiny_bundles, tmp_path, "dense")
    (tmp_path / "x.bin").write_bytes(bytes(16))
    (bundle / "other.bin").write_bytes(bytes(16))
    _replace_graph(bundle, 0, _graph_with_external_weight(location))
    with pytest.raises(BundleError, match=rf"step_000.onnx: initializer 'w.hand-made' keeps its data in .*{message}"):
        Bundle(bundle)


def test_a_step_running_a_graph_that_skips_a_needed_cache_write_is_refused(tiny_bundles, tmp_path):
    """A graph of the same sparsity pattern that writes fewer cache entries (as the last step's does)
    run at a step whose writes a later step reads would feed that step a stale cache."""
    bundle = _copy(tiny_bundles, tmp_path)
    m = json.loads((bundle / "manifest.json").read_text())
    g = m["steps"][4]["graph"]
    assert m["graphs"][g]["cache_writes"], "step 4 of the tiny toca bundle writes cache entries step 5 reads"
    lean = prune_outputs(onnx.load(str(bundle / m["graphs"][g]["file"]), load_external_data=False), {"next_latent"})
    onnx.save(lean, str(bundle / "step_003.onnx"))
    entry = {**m["graphs"][g], "file": "step_003.onnx", "cache_writes": [], "bytes": (bundle / "step_003.onnx").stat().st_size,
             "sha256": hashlib.sha256((bundle / "step_003.onnx").read_bytes()).hexdigest()}
    _edit(bundle, add=lambda manifest: manifest["graphs"].append(entry), step=_set("steps", 4, "graph", 3))
    with pytest.raises(BundleError, match=r"steps\[4\].graph runs graphs\[3\], which does not output"):
        Bundle(bundle)
