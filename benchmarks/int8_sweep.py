"""Which int8 settings keep the sparse mnist-dit bundle's FID within 1.15x of dense fp32 (issue 21).

    python benchmarks/int8_sweep.py [NAME ...] --out out/int8-sweep    # ~75 s per setting on 2 cores

Each setting exports the FORA-style 50%-MACs schedule at DDIM 20 steps as an int8 bundle (batch 10
with guidance; the settings of `dsexport --precision int8` named below) and scores 1,000 samples
(100 per digit, seed 0) with dseval's accuracy and MNIST-FID against the real test set. Dense fp32
on the same command line of benchmarks/precision.py is the reference (FID 36.2).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.export.calibration import CalibrationConfig
from diffsparse.export.quantize import QuantizeConfig
from diffsparse.runtime.pipeline import Pipeline

from diffsparse.builtin_schedules import resolve_schedule
from diffsparse.mnist.dataset import load_mnist_test
from diffsparse.mnist.metrics import evaluate_images, require_classifier
from diffsparse.models.zoo import make_spec

SETTINGS = {   # name -> QuantizeConfig (the dsexport flags in the comment)
    "calib8": QuantizeConfig(calibration=CalibrationConfig(batches=8)),                  # --calibration-batches 8
    "percentile": QuantizeConfig(method="percentile"),                                   # --calibration-method percentile
    "mlp-only": QuantizeConfig(kinds=("mlp",)),                                          # (attention kept fp32)
    "keep-last-block": QuantizeConfig(keep_fp32=("sa5", "mlp5")),                        # --keep-fp32 sa5,mlp5
    "keep-last-two-blocks": QuantizeConfig(keep_fp32=("sa4", "mlp4", "sa5", "mlp5")),    # --keep-fp32 sa4,mlp4,sa5,mlp5
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"settings to run, of {list(SETTINGS)} (default: all)")
    p.add_argument("--out", default="out/int8-sweep")
    args = p.parse_args()
    unknown = sorted(set(args.names) - set(SETTINGS))
    if unknown:
        p.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    logging.basicConfig(level=logging.WARNING)
    require_classifier()
    spec = make_spec("mnist-dit", batch_size=10)
    schedule = resolve_schedule("fora", spec, 20, 0.5, 3)
    real, _ = load_mnist_test(None)
    labels = np.tile(np.arange(10), 100)
    results = {}
    for name in args.names or list(SETTINGS):
        folder = Path(args.out) / name
        t0 = time.perf_counter()
        export_bundle(spec, schedule, folder, config=ExportConfig(overwrite=True, precision="int8", quantize=SETTINGS[name]))
        samples = Pipeline.from_bundle(folder).generate(labels, seed=0).samples
        metrics = evaluate_images(np.clip(samples, -1, 1), labels, real_images=real)
        results[name] = {"accuracy": metrics["accuracy"], "fid": metrics["fid"], "seconds": time.perf_counter() - t0,
                         "quantize": SETTINGS[name].describe()}
        print(name, {k: results[name][k] for k in ("accuracy", "fid")}, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
