"""Image-quality metrics for the MNIST demo: classifier accuracy, MNIST-FID, PSNR, SSIM.

Used by ``dseval`` (calibrate/evaluate.py), the recipe's ``--eval`` (diffsparse.mnist.recipe) and
the distillation losses (train/losses.py: classifier features, SSIM), so it lives here, below both.

Classifier
    The pretrained CNN shipped by the PyPI package ``digit-recognizer-py`` (MIT), installed with
    ``pip install --no-deps digit-recognizer-py``.  Its ``__init__`` imports torchvision, so the
    package is never imported: only its weight file ``digit_recognizer/models/handwriting_model.pth``
    is located through ``importlib.metadata`` and loaded (strictly) into :class:`MnistCNN`, a copy of
    its ``digit_recognizer.model.CNN`` with the same layer names.  Inputs follow its preprocessing:
    28x28 in [0, 1], normalised ``(x - 0.1307) / 0.3081``.  Our images are 32x32 in [-1, 1]; the
    2-px border is cropped and values mapped to [0, 1].
    Measured accuracy on the 10,000 real MNIST test images (our loader, padded and cropped back):
    99.06% (9906/10000).  Real-vs-real MNIST-FID, 500 vs 500 disjoint images (first 1000): ~45;
    uniform noise vs real: ~2000.  The first and last 5000 test images differ in style (FID ~63).

MNIST-FID
    Frechet distance between Gaussians fitted to the classifier's penultimate features (256-d ReLU
    output of ``fc_layers[1]``) of two image sets.  Numbers are not comparable with Inception FID,
    and depend on sample count (the estimate is biased upwards for small sets): compare only values
    computed with the same sample sizes.

PSNR / SSIM
    Between two batches of the same shape, with ``data_range`` 2.0 for [-1, 1] images.  PSNR is per
    image (capped at 100 dB for identical images) then averaged.  SSIM is Wang et al. (2004): an
    11x11 Gaussian window with sigma 1.5, K1=0.01, K2=0.03, 'valid' filtering (no padding), mean of
    the SSIM map per image, averaged over images and channels.

Every function accepts numpy arrays or torch tensors and returns Python floats.
"""

from __future__ import annotations

import importlib.metadata
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CLASSIFIER_DIST = "digit-recognizer-py"
CLASSIFIER_WEIGHTS = "digit_recognizer/models/handwriting_model.pth"
INSTALL_HINT = "pip install --no-deps digit-recognizer-py"  # --no-deps: it requires torchvision, unused here
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
PSNR_CAP_DB = 100.0


class ClassifierUnavailable(RuntimeError):
    """The digit-recognizer-py weights could not be found."""


class MnistCNN(nn.Module):
    """Same layout and parameter names as ``digit_recognizer.model.CNN`` (0.1.0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (256-d, post-ReLU) features, used for MNIST-FID."""
        x = self.conv_layers(x).flatten(1)
        return self.fc_layers[1](self.fc_layers[0](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers[2](self.features(x))


def require_classifier() -> Path:
    """Check that the MNIST classifier (PyPI ``digit-recognizer-py``) is installed; returns its weight
    file.  Call it at the very start of anything that scores images with it (``dseval``, the recipe's
    ``--eval``, the schedule benchmark), so a missing install fails at once, not after minutes of
    sampling.  Raises :class:`ClassifierUnavailable` naming ``pip install --no-deps digit-recognizer-py``."""
    return classifier_weights_path()


def classifier_weights_path() -> Path:
    """Locate the installed weight file without importing the (torchvision-dependent) package."""
    try:
        dist = importlib.metadata.distribution(CLASSIFIER_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise ClassifierUnavailable(
            f"The MNIST classifier package '{CLASSIFIER_DIST}' is not installed; install it with: {INSTALL_HINT}"
        ) from e
    path = Path(dist.locate_file(CLASSIFIER_WEIGHTS))
    if not path.is_file():
        raise ClassifierUnavailable(f"'{CLASSIFIER_DIST}' is installed but {path} is missing; reinstall: {INSTALL_HINT}")
    return path


@lru_cache(maxsize=2)
def load_classifier(weights_path: str | None = None) -> MnistCNN:
    """The pretrained classifier in eval mode on CPU (cached)."""
    path = Path(weights_path) if weights_path else classifier_weights_path()
    model = MnistCNN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    model.eval().requires_grad_(False)
    logger.debug("loaded MNIST classifier from %s", path)
    return model


def _as_tensor(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.detach().to("cpu", torch.float32)


def _np64(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


def _as_nchw(images) -> torch.Tensor:
    x = _as_tensor(images)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images of shape (N,1,H,W) or (N,H,W), got {tuple(x.shape)}")
    return x


def preprocess_for_classifier(images) -> torch.Tensor:
    """[-1, 1] images, 32x32 (2-px border cropped) or 28x28 -> normalised 28x28 classifier input."""
    return classifier_input(_as_nchw(images))


def classifier_input(x: torch.Tensor) -> torch.Tensor:
    """Differentiable part of preprocess_for_classifier, on an (N, 1, H, W) tensor."""
    if x.shape[-2:] == (32, 32):
        x = x[..., 2:30, 2:30]
    elif x.shape[-2:] != (28, 28):
        raise ValueError(f"expected 32x32 or 28x28 images, got {tuple(x.shape[-2:])}")
    x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
    return (x - MNIST_MEAN) / MNIST_STD


@torch.no_grad()
def _run(images, fn: str, batch_size: int = 500) -> torch.Tensor:
    model = load_classifier()
    x = preprocess_for_classifier(images)
    op = model.features if fn == "features" else model
    return torch.cat([op(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def classify(images) -> np.ndarray:
    """Predicted digit (int64) for each image in [-1, 1]."""
    return _run(images, "logits").argmax(1).numpy()


def classifier_features(images) -> np.ndarray:
    """Penultimate-layer features, float64 array (N, 256)."""
    return _run(images, "features").double().numpy()


def class_accuracy(images, labels) -> float:
    """Fraction of images the classifier assigns to their intended label."""
    labels = _as_tensor(labels).long().numpy().reshape(-1)
    pred = classify(images)
    if len(pred) != len(labels):
        raise ValueError(f"{len(pred)} images but {len(labels)} labels")
    return float((pred == labels).mean())


def _sqrtm_trace_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr(sqrtm(S1 S2)) for symmetric PSD S1, S2, without scipy.

    S1 S2 is similar to the symmetric PSD M = S1^{1/2} S2 S1^{1/2} (same eigenvalues), so
    tr sqrt(S1 S2) = sum_i sqrt(lambda_i(M)); S1^{1/2} comes from eigh of S1 and tiny negative
    eigenvalues from round-off are clamped to zero.
    """
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = r1 @ s2 @ r1
    lam = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)) between two Gaussians."""
    mu1, mu2, s1, s2 = (_np64(v) for v in (mu1, mu2, sigma1, sigma2))
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * _sqrtm_trace_product(s1, s2))
    return max(d, 0.0)


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    f = _np64(features)
    return f.mean(0), np.cov(f, rowvar=False)


def mnist_fid(images, real_images) -> float:
    """MNIST-FID of ``images`` against ``real_images`` on classifier penultimate features."""
    return frechet_distance(*feature_stats(classifier_features(images)), *feature_stats(classifier_features(real_images)))


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_nchw(a).double(), _as_nchw(b).double()
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def psnr(a, b, data_range: float = 2.0) -> float:
    """Mean per-image PSNR in dB (identical images count as PSNR_CAP_DB)."""
    x, y = _pair(a, b)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    db = 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-300))
    return float(db.clamp(max=PSNR_CAP_DB).mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a, b, data_range: float = 2.0, win_size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Gaussian 11x11, sigma 1.5, valid filtering) over images."""
    x, y = _pair(a, b)
    return float(ssim_per_image(x, y, data_range, win_size, sigma).mean())


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win_size: int = 11,
                   sigma: float = 1.5) -> torch.Tensor:
    """Differentiable SSIM per (image, channel) of two (N, C, H, W) tensors -> (N*C,)."""
    n, c = x.shape[:2]
    x, y = x.reshape(n * c, 1, *x.shape[2:]), y.reshape(n * c, 1, *y.shape[2:])
    w = _gaussian_window(win_size, sigma).to(x)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx**2
    syy = F.conv2d(y * y, w) - my**2
    sxy = F.conv2d(x * y, w) - mx * my
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return smap.flatten(1).mean(1)


def evaluate_images(images, labels=None, reference_images=None, real_images=None) -> dict:
    """Whatever applies: ``accuracy`` (given labels), ``fid`` (given real images), ``psnr``/``ssim``
    (given reference images of the same shape, e.g. the dense model's outputs for the same noise)."""
    out: dict = {"n": int(_as_nchw(images).shape[0])}
    if labels is not None:
        out["accuracy"] = class_accuracy(images, labels)
    if real_images is not None:
        out["fid"] = mnist_fid(images, real_images)
        out["n_real"] = int(_as_nchw(real_images).shape[0])
    if reference_images is not None:
        out["psnr"] = psnr(images, reference_images)
        out["ssim"] = ssim(images, reference_images)
    return out
