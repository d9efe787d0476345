"""The bundle is the contract: every backend runs what the bundle holds, not the model it came from."""

import json
import shutil

import numpy as np
import pytest

from diffsparse.builtin_schedules import toca_schedule
from diffsparse.export.bundle import export_bundle
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
