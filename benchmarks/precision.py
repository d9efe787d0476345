"""Benchmark: precision and sparsity side by side — dense fp32, dense int8, sparse fp32, sparse int8.

quality (mnist-dit, trained): every bundle generates the same n samples (100 per digit, seed 0,
the model's guidance), scored with dseval's metrics: accuracy, MNIST-FID against the 10,000 real
test images, PSNR/SSIM against dense fp32 from the same noise.

    python benchmarks/precision.py quality --out out/precision-mnist --threads 1

latency (DiT-XL/2 size, random weights, ONNX Runtime CPU): the same four bundles (batch 1 with
CFG, DDIM 5 steps; sparse = one full step then ToCa-style steps at half the dense MACs, as
benchmarks/cpu_sparse_vs_dense.py), all loaded in one process, timed in interleaved rounds
(median of --runs). The int8 bundles are quantized from the fp32 ones (export/quantize.py, one
calibration batch: the weights are random, so only the arithmetic matters here) and not
parity-checked (the quality run and the tests check int8 parity).

    python benchmarks/precision.py latency --out out/precision-xl --threads 1 --runs 5

Weight pre-packing (runtime/backends/ort.py): on for dense fp32 and both int8 bundles; off for
sparse fp32, whose 5 packed fp32 copies (14 GB) do not fit beside the others on a 23 GiB machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.export.calibration import CalibrationConfig
from diffsparse.export.quantize import QuantizeConfig, layer_group_list, quantize_bundle_graphs
from diffsparse.runtime.pipeline import Pipeline

from diffsparse.builtin_schedules import BUILTIN_NAMES, dense_schedule, resolve_schedule, toca_schedule
from diffsparse.mnist.dataset import load_mnist_test
from diffsparse.mnist.metrics import evaluate_images
from diffsparse.models.zoo import make_spec

BUNDLES = ("dense-fp32", "dense-int8", "sparse-fp32", "sparse-int8")


def _export(spec, schedules: dict, out: Path, model: str, verify: bool, calibration_batches: int,
            keep_fp32: tuple[str, ...] = ()) -> dict:
    info = {}
    for kind, sched in schedules.items():
        for precision in ("fp32", "int8"):
            name = f"{kind}-{precision}"
            t0 = time.perf_counter()
            folder = out / f"bundle-{name}"
            if precision == "fp32" or verify:
                m = export_bundle(spec, sched, folder, source={"model": model, "seed": 0},
                                  config=ExportConfig(overwrite=True, verify=verify, precision=precision,
                                                      quantize=QuantizeConfig(calibration=CalibrationConfig(
                                                          batches=calibration_batches), keep_fp32=keep_fp32)))
            else:  # quantize a copy of the fp32 bundle (saves a second fp32 export at XL size)
                src = out / f"bundle-{kind}-fp32"
                shutil.rmtree(folder, ignore_errors=True)
                shutil.copytree(src, folder)
                m = quantize_bundle_graphs(folder, spec.model, QuantizeConfig(
                    calibration=CalibrationConfig(batches=calibration_batches), keep_fp32=keep_fp32))
            info[name] = {"export_seconds": time.perf_counter() - t0, "graphs": len(m.graphs),
                          "weights_bytes": m.weights["bytes"], "macs_ratio": m.macs["ratio"],
                          "precision": m.precision["dtype"], "parity_tolerance": m.precision["parity_tolerance"],
                          "parity_max_abs_err": max((g.parity_max_abs_err or 0.0) for g in m.graphs),
                          "int8_weight_bytes": m.precision.get("quantization", {}).get("int8_weight_bytes")}
            logging.info("exported %s: %s", name, info[name])
    return info


def quality(args) -> dict:
    out = Path(args.out)
    spec = make_spec("mnist-dit", batch_size=args.batch)
    schedules = {"dense": dense_schedule(spec, args.steps),
                 "sparse": resolve_schedule(args.schedule, spec, args.steps if args.schedule in BUILTIN_NAMES else None,
                                            0.5, 3)}
    exports = _export(spec, schedules, out, "mnist-dit", verify=True, calibration_batches=args.calibration_batches,
                      keep_fp32=layer_group_list(args.keep_fp32))
    real, _ = load_mnist_test(None)
    labels = np.tile(np.arange(10), args.n_per_class)
    rows, images = {}, {}
    for name in BUNDLES:
        pipe = Pipeline.from_bundle(out / f"bundle-{name}", threads=args.threads)
        t0 = time.perf_counter()
        result = pipe.generate(labels, seed=0)
        seconds = time.perf_counter() - t0
        images[name] = np.clip(result.samples, -1, 1)
        ref = images.get("dense-fp32") if name != "dense-fp32" else None
        rows[name] = {**evaluate_images(images[name], labels, reference_images=ref, real_images=real),
                      "generation_seconds": seconds, **exports[name]}
        logging.info("%s: %s", name, rows[name])
    return {"model": "mnist-dit", "steps": args.steps, "schedule": args.schedule, "keep_fp32": layer_group_list(args.keep_fp32),
            "batch": args.batch, "n": int(len(labels)), "seed": 0, "rows": rows}


def latency(args) -> dict:
    out = Path(args.out)
    spec = make_spec(args.model, batch_size=1, guidance=True)
    schedules = {"dense": dense_schedule(spec, args.steps),
                 "sparse": toca_schedule(spec, args.steps, 0.5, full_every=args.steps)}
    exports = {} if args.reuse_bundles else _export(spec, schedules, out, args.model, verify=False,
                                                     calibration_batches=1, keep_fp32=layer_group_list(args.keep_fp32))
    del spec
    prepack = {"dense-fp32": "on", "dense-int8": "on", "sparse-fp32": "off", "sparse-int8": "on"}
    pipes = {name: Pipeline.from_bundle(out / f"bundle-{name}", threads=args.threads, prepack=prepack[name])
             for name in BUNDLES}
    labels = [1]
    for name, pipe in pipes.items():  # warm-up: first runs allocate and pack
        pipe.generate(labels, seed=0)
    times = {name: [] for name in BUNDLES}
    steps = {name: [] for name in BUNDLES}
    for r in range(args.runs):
        for name, pipe in pipes.items():
            res = pipe.generate(labels, seed=r)
            times[name].append(res.total_seconds)
            steps[name].append(res.step_seconds)
        logging.info("round %d: %s", r, {n: round(t[-1], 2) for n, t in times.items()})
    rows = {}
    for name in BUNDLES:
        m = pipes[name].backend.bundle.manifest
        rows[name] = {"median_seconds": float(np.median(times[name])), "runs": times[name],
                      "median_step_seconds": np.median(np.array(steps[name]), axis=0).tolist(),
                      "macs_ratio": m.macs["ratio"], "prepack": prepack[name], **exports.get(name, {})}
    base = rows["dense-fp32"]["median_seconds"]
    for row in rows.values():
        row["speedup_vs_dense_fp32"] = base / row["median_seconds"]
    return {"model": args.model, "steps": args.steps, "batch": 1, "guidance": True, "threads": args.threads,
            "runs": args.runs, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["quality", "latency"])
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--result", default=None, help="also write the result JSON here (e.g. benchmarks/results/...)")
    p.add_argument("--model", default="dit-xl-2", help="latency: the built-in model")
    p.add_argument("--steps", type=int, default=None, help="default: 10 (quality), 5 (latency)")
    p.add_argument("--schedule", default="mnist-dit-joint-50", help="quality: the sparse schedule (50%% MACs)")
    p.add_argument("--batch", type=int, default=10, help="quality: bundle batch size")
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--calibration-batches", type=int, default=CalibrationConfig.batches)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--keep-fp32", default="", metavar="LAYERS",
                   help="layer groups the int8 bundles keep fp32 (dsexport --keep-fp32), e.g. sa4,mlp4,sa5,mlp5")
    p.add_argument("--reuse-bundles", action="store_true", help="latency: time bundles already in --out")
    args = p.parse_args()
    args.steps = args.steps or (10 if args.what == "quality" else 5)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = quality(args) if args.what == "quality" else latency(args)
    flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                     for k, v in vars(args).items() if k != "what" and v not in (None, False))
    result.update(command=f"python benchmarks/precision.py {args.what} {flags}", seconds=time.perf_counter() - t0,
                  host={"machine": platform.processor() or platform.machine(), "cpus": __import__("os").cpu_count()},
                  date=time.strftime("%Y-%m-%d"))
    text = json.dumps(result, indent=1)
    (Path(args.out) / f"precision_{args.what}.json").write_text(text)
    if args.result:
        Path(args.result).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
