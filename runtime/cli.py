"""`dsrun` (generate from a bundle) and `dsprofile` (profile a bundle against a baseline)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from diffsparse.runtime.backends.base import BackendError
from diffsparse.runtime.backends.ort import PREPACK_MEMORY_SHARE, PREPACK_MODES
from diffsparse.runtime.backends.select import BACKENDS, DEVICES
from diffsparse.runtime.backends.torch_backend import DTYPES
from diffsparse.runtime.pipeline import NonFiniteOutputError, Pipeline
from diffsparse.runtime.profile import ProfileConfig, profile
from diffsparse.runtime.report import write_report

from diffsparse.manifest import BundleError
from diffsparse.schedule import ScheduleError

PREPACK_HELP = ("onnxruntime on the CPU, matmul weights packed once at load instead of at every call. shared: one "
                "packed copy for all step sessions (through onnxruntime's C library); on: a copy per session; off: "
                "none; auto (default): shared where the C library loads and one copy fits in "
                f"{round(100 * PREPACK_MEMORY_SHARE)}%% of physical memory, else as many per-session copies as fit, "
                "the sessions running the most steps first")
COMPILE_HELP = ("run the torch backend (what --backend auto then picks) with each step through torch.compile: fused "
                "kernels, compiled on first use, which takes minutes for a full-size model")
USER_ERRORS = (BundleError, BackendError, ScheduleError, NonFiniteOutputError, ValueError, FileNotFoundError)


def _load_conditioning(path: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, or ValueError saying it is not one."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"--conditioning {path} could not be read as an .npz file ({e}); save the arrays "
                         "with np.savez") from None
    if isinstance(data, np.ndarray):
        raise ValueError(f"--conditioning {path} holds one unnamed array; save the named arrays with np.savez")
    with data:
        return {k: data[k] for k in data.files}


def _labels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def output_problem(out: str) -> str | None:
    """Why the image file `out` could not be written, or None: checked before generating, so a
    typo in --out does not cost a whole generation and end in a traceback."""
    path = Path(out)
    folder = path.parent
    if path.is_dir():
        return f"--out {out} is a folder; give a file name, e.g. {path / 'samples.png'}"
    if not folder.exists():
        return f"the folder of --out {out} does not exist: create it (mkdir -p {folder}) or choose another path"
    if not folder.is_dir():
        return f"--out {out}: {folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"--out {out} is not writable: choose a path in a folder you can write to"
    if path.suffix.lower() not in Image.registered_extensions():
        return f"--out {out}: unknown image type {path.suffix or '(no extension)'!r}; use a name ending in .png"
    return None


def run_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsrun", description="Generate samples from a diffsparse bundle.")
    p.add_argument("bundle")
    p.add_argument("--labels", type=_labels, default=None,
                   help="comma-separated class labels (class-conditional models; default 0-9)")
    p.add_argument("--conditioning", default=None, metavar="NPZ",
                   help="text-conditioned models: an .npz of the arrays the model takes (prompt_embeds, ...; "
                        "first axis = sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's, recorded in the bundle)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="torch backend precision")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--prepack", default="auto", choices=PREPACK_MODES, help=PREPACK_HELP)
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling of the grid")
    args = p.parse_args(argv)
    problem = output_problem(args.out)
    if problem:
        print(f"dsrun: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        pipe = Pipeline.from_bundle(args.bundle, backend=args.backend, device=args.device, dtype=args.dtype,
                                    prepack=args.prepack, compile=args.compile)
        conditioning = None
        if args.conditioning:
            conditioning = _load_conditioning(args.conditioning)
        labels = args.labels if args.labels is not None or conditioning else list(range(10))
        result = pipe.generate(labels, seed=args.seed, guidance_scale=args.guidance_scale,
                               conditioning=conditioning)
    except USER_ERRORS as e:
        print(f"dsrun: error: {e}", file=sys.stderr)
        return 2
    try:
        result.grid(scale=args.scale).save(args.out)
    except OSError as e:  # the disk filled up, or the folder changed while generating
        print(f"dsrun: error: could not write {args.out}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(result.samples)} samples in {result.total_seconds:.2f}s on "
          f"{result.backend}/{result.device}")
    return 0


def profile_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsprofile", description="Profile a bundle against a baseline bundle in one run.")
    p.add_argument("bundle")
    p.add_argument("--baseline", required=True, help="baseline bundle, e.g. the dense schedule")
    p.add_argument("--out", default="profile", help="report folder")
    p.add_argument("--runs", type=int, default=ProfileConfig.runs)
    p.add_argument("--warmup", type=int, default=ProfileConfig.warmup)
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="torch backend precision")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prepack", default=ProfileConfig.prepack, choices=PREPACK_MODES, help=PREPACK_HELP)
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory footprint (each bundle loaded and run once more in a fresh process)")
    p.add_argument("--ops", action="store_true",
                   help="also measure where the time goes: per step by part (score, gather, compute, scatter, sampler, "
                        "other) and by operator type, from the backend's profiler in extra generations (step_parts.png)")
    p.add_argument("--ops-runs", type=int, default=ProfileConfig.ops_runs, help="profiled generations per bundle (--ops)")
    p.add_argument("--latency-table", default=None,
                   help="latency table (dscalibrate latency): report predicted against measured latency per step")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = ProfileConfig(runs=args.runs, warmup=args.warmup, backend=args.backend, device=args.device,
                        threads=args.threads, dtype=args.dtype, compile=args.compile, prepack=args.prepack,
                        memory=not args.no_memory, ops=args.ops,
                        ops_runs=args.ops_runs, latency_table=args.latency_table)
    try:
        report = profile(args.bundle, args.baseline, cfg)
    except USER_ERRORS as e:
        print(f"dsprofile: error: {e}", file=sys.stderr)
        return 2
    paths = write_report(report, args.out)
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_main())
