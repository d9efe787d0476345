"""`dseval`: the quality of a bundle (or its PyTorch reference) on the MNIST demo model.

Three numbers, one command, JSON out:
  accuracy  class-conditional accuracy: n samples per digit, classified by the pretrained MNIST
            classifier of PyPI `digit-recognizer-py` (99.06% on the real test set);
  fid       MNIST-FID on that classifier's penultimate features against the 10,000 real images
            of the official MNIST *test* set (the only split we have; the demo model was trained
            on it too, so this measures closeness to the data, not generalisation);
  psnr/ssim fidelity to a reference bundle (normally the dense one) from the same seeds and labels.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffsparse.manifest import BundleError
from diffsparse.mnist.dataset import MnistDataError, load_mnist_test
from diffsparse.mnist.metrics import ClassifierUnavailable, evaluate_images, require_classifier
from diffsparse.runtime.backends.base import BackendError
from diffsparse.runtime.bundle import Bundle
from diffsparse.runtime.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """n_per_class samples of each digit 0-9 from `seed`, guidance scale as for generation;
    backend as for Pipeline.from_bundle; n_real real images for FID (all 10,000 by default)."""

    n_per_class: int = 50
    seed: int = 0
    guidance_scale: float | None = None  # None: the model's default (recorded in the bundle)
    backend: str = "onnxruntime"
    n_real: int = 10000


def generate_set(bundle: str | Path, cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(images in [-1, 1], labels, seconds, the guidance scale used)."""
    labels = np.tile(np.arange(10), cfg.n_per_class)
    pipe = Pipeline.from_bundle(bundle, backend=cfg.backend)
    result = pipe.generate(labels, seed=cfg.seed, guidance_scale=cfg.guidance_scale)
    scale = result.guidance_scale
    return np.clip(result.samples, -1.0, 1.0), labels, result.total_seconds, scale


def evaluate_bundle(bundle: str | Path, reference: str | Path | None = None, cfg: EvalConfig | None = None,
                    data_dir: str | None = None, reference_images: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of `bundle`; PSNR/SSIM against `reference` (a bundle, generated with the same
    seeds and labels) or against `reference_images` already generated that way. Checks first that
    the classifier is installed and the real images load (ClassifierUnavailable / MnistDataError
    otherwise), before generating anything."""
    require_classifier()
    real, _ = load_mnist_test(data_dir)
    cfg = cfg or EvalConfig()
    images, labels, seconds, scale = generate_set(bundle, cfg)
    ref_images = generate_set(reference, cfg)[0] if reference is not None else reference_images
    if cfg.n_real < len(real):
        real = real[np.random.default_rng(1234).permutation(len(real))[: cfg.n_real]]
    metrics = evaluate_images(images, labels, reference_images=ref_images, real_images=real)
    m = Bundle(bundle, verify=False).manifest
    return {"bundle": str(bundle), "reference": str(reference) if reference else None,
            "schedule": m.schedule.provenance.get("method", ""), "macs_ratio": m.macs["ratio"],
            "steps": m.schedule.num_steps, "generation_seconds": seconds, "config": {**asdict(cfg), "guidance_scale": scale},
            "data": "MNIST official test set (10,000 images)", **metrics}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dseval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--reference", default=None, help="bundle to compare against (PSNR/SSIM), e.g. the dense one")
    p.add_argument("--n-per-class", type=int, default=EvalConfig.n_per_class)
    p.add_argument("--seed", type=int, default=EvalConfig.seed)
    p.add_argument("--guidance-scale", type=float, default=EvalConfig.guidance_scale,
                   help="classifier-free guidance scale (default: the model's, recorded in the bundle)")
    p.add_argument("--backend", default=EvalConfig.backend, choices=["onnxruntime", "torch"])
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = EvalConfig(n_per_class=args.n_per_class, seed=args.seed, guidance_scale=args.guidance_scale,
                     backend=args.backend)
    t0 = time.perf_counter()
    try:
        result = evaluate_bundle(args.bundle, args.reference, cfg)
    except (ClassifierUnavailable, MnistDataError, BundleError, BackendError, ValueError, FileNotFoundError) as e:
        print(f"dseval: error: {e}", file=sys.stderr)
        return 2
    result["seconds"] = time.perf_counter() - t0
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
