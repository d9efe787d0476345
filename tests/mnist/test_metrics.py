"""diffsparse.mnist.metrics: pretrained classifier, MNIST-FID, PSNR, SSIM on real and degraded images."""

import importlib.metadata
import math

import numpy as np
import pytest
import torch

from diffsparse.mnist import metrics as M
from diffsparse.mnist.dataset import load_mnist_test


@pytest.fixture(scope="module")
def classifier_ready():
    try:
        M.classifier_weights_path()
    except M.ClassifierUnavailable as e:
        pytest.fail(f"required test dependency missing: {e}")


@pytest.fixture(scope="module")
def mnist():
    return load_mnist_test()


@pytest.fixture(scope="module")
def subsets(mnist):
    x, y = mnist
    idx = np.random.default_rng(0).permutation(len(x))
    a, b = idx[:500], idx[500:1000]
    return x[a], y[a], x[b]


def test_classifier_loads_strictly(classifier_ready):
    model = M.load_classifier()
    assert isinstance(model, M.MnistCNN) and not model.training
    out = model(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert M.classifier_features(np.zeros((3, 1, 32, 32), np.float32)).shape == (3, 256)


def test_real_digits_classified(classifier_ready, subsets):
    x, y, _ = subsets
    assert M.class_accuracy(x, y) >= 0.97
    assert M.class_accuracy(torch.from_numpy(x), torch.from_numpy(y)) >= 0.97  # torch input too
    # wrong labels must score low: the metric really compares with the labels
    assert M.class_accuracy(x, (y + 1) % 10) < 0.05


def test_noise_is_not_classified(classifier_ready, subsets):
    _, y, _ = subsets
    noise = np.random.default_rng(1).uniform(-1, 1, (500, 1, 32, 32)).astype(np.float32)
    assert M.class_accuracy(noise, y) < 0.3


def test_fid_real_low_noise_high(classifier_ready, subsets):
    x, _, x2 = subsets
    noise = np.random.default_rng(2).uniform(-1, 1, x.shape).astype(np.float32)
    fid_real = M.mnist_fid(x, x2)
    fid_noise = M.mnist_fid(noise, x2)
    assert fid_real < 100
    assert fid_noise > 10 * fid_real
    assert M.mnist_fid(x, x) == pytest.approx(0.0, abs=1e-3)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))  # same rotation: the covariances commute
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_psnr_and_ssim(subsets):
    x = subsets[0][:100]
    rng = np.random.default_rng(3)
    assert M.psnr(x, x) in (math.inf, M.PSNR_CAP_DB)
    assert M.ssim(x, x) == pytest.approx(1.0, abs=1e-9)
    ps, ss = [], []
    for sigma in (0.02, 0.1, 0.3):
        noisy = np.clip(x + sigma * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
        ps.append(M.psnr(x, noisy))
        ss.append(M.ssim(torch.from_numpy(x), torch.from_numpy(noisy)))
    assert ps[0] > ps[1] > ps[2] and ss[0] > ss[1] > ss[2]
    assert 30 < ps[0] < 45 and ss[2] < 0.7
    # unclipped Gaussian noise sigma on [-1,1] images (range 2): PSNR = 20*log10(2/sigma)
    unclipped = x + 0.1 * rng.standard_normal(x.shape)
    assert M.psnr(x, unclipped) == pytest.approx(20 * math.log10(2 / 0.1), abs=0.2)
    with pytest.raises(ValueError):
        M.psnr(x, x[:10])


def test_evaluate_images_keys(classifier_ready, subsets):
    x, y, x2 = subsets
    r = M.evaluate_images(x[:100], y[:100], reference_images=x[:100], real_images=x2)
    assert set(r) >= {"accuracy", "fid", "psnr", "ssim", "n"}
    assert all(isinstance(r[k], float) for k in ("accuracy", "fid", "psnr", "ssim"))
    assert set(M.evaluate_images(x[:10])) == {"n"}


def test_require_classifier_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(M.importlib.metadata, "distribution", missing)
    with pytest.raises(M.ClassifierUnavailable, match="pip install --no-deps digit-recognizer-py"):
        M.require_classifier()
