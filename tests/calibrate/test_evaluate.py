"""dseval plumbing on a 1-block pixel-space MNIST-shaped DiT saved as a diffusers pipeline folder."""

import json

import pytest
from diffsparse.calibrate import evaluate as evaluate_module
from diffsparse.calibrate.evaluate import EvalConfig, evaluate_bundle
from diffsparse.calibrate.evaluate import main as dseval
from diffsparse.export.bundle import ExportConfig, export_bundle

from diffsparse.builtin_schedules import dense_schedule, toca_schedule
from diffsparse.mnist import metrics
from diffsparse.mnist.recipe import MnistDiTConfig, build_model, package_model
from diffsparse.models.zoo import make_spec


@pytest.fixture(scope="module")
def mnist_like_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    model = build_model(MnistDiTConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8, dit_init=False))
    model.save_pretrained(root / "raw")
    package_model(root / "raw", root / "pipeline")
    spec = make_spec(root / "pipeline", batch_size=10)
    assert not spec.sampler.clip_sample and spec.sampler.timestep_spacing == "trailing"
    out = {}
    for name, sched in (("dense", dense_schedule(spec, 4)), ("toca", toca_schedule(spec, 4, 0.5, full_every=4))):
        out[name] = root / name
        export_bundle(spec, sched, out[name], source={"model": str(root / "pipeline")}, config=ExportConfig())
    return out


def test_evaluate_bundle_reports_all_metrics(mnist_like_bundles):
    cfg = EvalConfig(n_per_class=2, n_real=200)
    res = evaluate_bundle(mnist_like_bundles["toca"], mnist_like_bundles["dense"], cfg)
    assert res["n"] == 20 and 0.0 <= res["accuracy"] <= 1.0
    assert res["fid"] > 0 and res["n_real"] == 200
    assert 0 < res["psnr"] < 100 and -1 <= res["ssim"] < 1, "sparse differs from dense, but not wildly"
    same = evaluate_bundle(mnist_like_bundles["dense"], mnist_like_bundles["dense"], cfg)
    assert same["psnr"] >= 99 and same["ssim"] == pytest.approx(1.0)
    assert 0.3 < res["macs_ratio"] < 0.7 and same["macs_ratio"] == 1.0


def test_dseval_cli_writes_json(mnist_like_bundles, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert dseval([str(mnist_like_bundles["toca"]), "--n-per-class", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 10
    assert dseval([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dseval_checks_the_classifier_before_generating(monkeypatch, tmp_path, capsys):
    """A missing digit-recognizer-py fails at once, naming the install command, not after sampling."""
    def missing():
        raise metrics.ClassifierUnavailable(f"not installed; install it with: {metrics.INSTALL_HINT}")

    def no_generation(*args, **kwargs):
        raise AssertionError("a pipeline was built before the classifier check")

    monkeypatch.setattr(metrics, "classifier_weights_path", missing)
    monkeypatch.setattr(evaluate_module.Pipeline, "from_bundle", no_generation)
    with pytest.raises(metrics.ClassifierUnavailable, match="pip install --no-deps digit-recognizer-py"):
        evaluate_bundle(tmp_path / "any-bundle", cfg=EvalConfig(n_per_class=1))
    assert dseval([str(tmp_path / "any-bundle")]) == 2
    assert "pip install --no-deps digit-recognizer-py" in capsys.readouterr().err
