"""`dsexport`: a model (built-in name or diffusers folder) plus a schedule -> a bundle folder."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from diffsparse.export.bundle import ExportConfig, ExportError, export_bundle

from diffsparse.builtin_schedules import BUILTIN_NAMES, resolve_schedule
from diffsparse.manifest import BundleError
from diffsparse.models.base import SpecError
from diffsparse.models.zoo import BUILTINS, ModelSourceError, make_spec
from diffsparse.sampler import SamplerError
from diffsparse.schedule import ScheduleError

USER_ERRORS = (ScheduleError, BundleError, ExportError, ModelSourceError, SamplerError, SpecError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsexport", description=__doc__)
    p.add_argument("--model", default="mnist-dit",
                   help=f"built-in model ({', '.join(sorted(BUILTINS))}) or a local diffusers folder")
    p.add_argument("--schedule", default="toca",
                   help=f"built-in schedule ({', '.join(BUILTIN_NAMES)}) or a schedule JSON file")
    p.add_argument("--steps", type=int, default=None, help="denoising steps T (built-in schedules; default 20)")
    p.add_argument("--ratio", type=float, default=0.5, help="target MACs ratio of the toca schedule")
    p.add_argument("--full-every", type=int, default=3, help="full step period of the toca schedule")
    p.add_argument("--batch", type=int, default=1, help="samples per run (static in the graphs)")
    p.add_argument("--no-guidance", action="store_true", help="export without classifier-free guidance")
    p.add_argument("--seed", type=int, default=0, help="seed of a built-in model's random weights")
    p.add_argument("--clip-sample", action="store_true", help="clip the predicted x0 to [-1, 1] (pixel space)")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="a model-family option such as text_len=120, height=512 or num_frames=9 "
                        "(repeatable; see the family table in the README)")
    p.add_argument("--tensorrt", default=None, choices=["fp32", "fp16", "bf16"],
                   help="also build a TensorRT engine at this precision (needs tensorrt, polygraphy and a GPU; "
                        "not yet run on real TensorRT)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle (after the new one is complete)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch parity check")
    p.add_argument("--write-schedule", default=None, help="also save the resolved schedule to this JSON file")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def parse_options(items: list[str]) -> dict:
    """NAME=VALUE pairs; VALUE is read as JSON where it parses (numbers, true/false), else a string."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--option {item!r} must be NAME=VALUE, e.g. text_len=120")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        overrides = {"clip_sample": True} if args.clip_sample else None
        spec = make_spec(args.model, batch_size=args.batch, guidance=not args.no_guidance, seed=args.seed,
                         sampler_overrides=overrides, options=parse_options(args.option),
                         streamed_weights=True)  # a built-in larger than memory goes straight to disk
        steps = args.steps if args.steps is not None else (20 if args.schedule in BUILTIN_NAMES else None)
        schedule = resolve_schedule(args.schedule, spec, steps, args.ratio, args.full_every)
        if args.write_schedule:
            schedule.save(args.write_schedule)
        manifest = export_bundle(spec, schedule, args.out, source={"model": args.model, "seed": args.seed},
                                 config=ExportConfig(overwrite=args.overwrite, verify=not args.no_verify,
                                                    tensorrt=args.tensorrt))
    except USER_ERRORS as e:
        print(f"dsexport: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the export removed its temporary folder: --out holds the old bundle or the new one
        print(f"dsexport: interrupted; nothing partial was left at {args.out}", file=sys.stderr)
        return 130
    parity = [g.parity_max_abs_err for g in manifest.graphs if g.parity_max_abs_err is not None]
    if not args.quiet:
        print(f"wrote {args.out}: {manifest.schedule.num_steps} steps, {len(manifest.graphs)} distinct graphs, "
              f"MACs ratio {manifest.macs['ratio']:.3f}, weights {manifest.weights['bytes'] / 2**20:.1f} MB"
              + (f", parity max err {max(parity):.2e}" if parity else "") + f" ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
