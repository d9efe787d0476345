"""Reliability figures for the README, from one command (issue 18):

    python benchmarks/reliability.py --out out/reliability

1. fuzzed manifests (benchmarks/fuzz_bundles.py): seeded mutants of a tiny bundle's manifest.json,
   each loaded and run: refused cleanly / accepted (informational field, a setting, same output) /
   accepted with a changed output (must be 0) / crashed (must be 0); and mutants of its schedule;
2. concurrency (benchmarks/concurrency_check.py): threads x calls generate() calls on one
   Pipeline, bit-identical to the same calls made one after another, ONNX Runtime (pools of 1
   and 2 contexts) and torch;
3. export faults (benchmarks/export_faults.py): dsexport killed (SIGKILL) at every named point of
   an export and at random moments, then a full disk: the old bundle intact, no partial bundle
   that loads, the next export succeeds.

The bundles are exported here from the built-in `dit-tiny` (random weights: 2 blocks, 64
tokens), like the test suite's. Writes <out>/reliability.json (committed as
benchmarks/results/reliability.json) and prints a Markdown table. About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import time
from pathlib import Path

import onnxruntime
import torch
from diffsparse.export.bundle import ExportConfig, export_bundle

from diffsparse import __version__
from diffsparse.builtin_schedules import toca_schedule
from diffsparse.models.zoo import make_spec

HERE = Path(__file__).resolve().parent
MODEL, STEPS, BATCH = "dit-tiny", 6, 2


def _load(name: str):
    """A sibling benchmark module, by file path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(out: Path, mutants: int, schedule_mutants: int, threads: int, calls: int, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    fuzz, concurrency, faults = _load("fuzz_bundles"), _load("concurrency_check"), _load("export_faults")
    spec = make_spec(MODEL, batch_size=BATCH)
    bundle = out / "bundle-toca"
    sched = toca_schedule(spec, STEPS, 0.5, full_every=3)
    export_bundle(spec, sched, bundle, source={"model": MODEL, "seed": 0}, config=ExportConfig(overwrite=True))
    result: dict = {"command": "python benchmarks/reliability.py " + " ".join(sys.argv[1:]),
                    "host": {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                             "torch": torch.__version__, "diffsparse": __version__, "platform": platform.platform()},
                    "bundle": {"model": MODEL, "steps": STEPS, "batch": BATCH, "schedule": "toca 0.5"}}
    t0 = time.perf_counter()
    result["manifest_fuzz"] = fuzz.fuzz_manifest(bundle, n=mutants, seed=seed, workdir=out / "fuzz")
    result["schedule_fuzz"] = fuzz.fuzz_schedule(sched.to_dict(), n=schedule_mutants, seed=seed,
                                                 workdir=out / "fuzz", spec=spec)
    result["fuzz_seconds"] = time.perf_counter() - t0
    result["concurrency"] = [concurrency.run(bundle, threads=threads, calls=calls, concurrency=(1, 2)),
                             concurrency.run(bundle, threads=threads, calls=calls, concurrency=(1, 2), backend="torch")]
    result["export_faults"] = faults.run(out / "faults", seed=seed)
    result["ok"] = (result["manifest_fuzz"]["crashed"] == 0 and result["manifest_fuzz"]["accepted_changed_output"] == 0
                    and result["schedule_fuzz"]["crashed"] == 0 and result["schedule_fuzz"]["accepted_invalid"] == 0
                    and all(c["mismatches"] == 0 for c in result["concurrency"]) and bool(result["export_faults"]["ok"]))
    return result


def markdown(r: dict) -> str:
    m, s, f = r["manifest_fuzz"], r["schedule_fuzz"], r["export_faults"]
    valid = s["accepted_informational"] + s["accepted_same_output"] + s["accepted_changed_output"]
    rows = [
        "| check | tried | result |", "|---|---:|---|",
        f"| manifest.json mutants, each loaded and run | {m['tried']} | refused cleanly {m['refused_cleanly']}, "
        f"accepted: informational field {m['accepted_informational']}, setting {m['accepted_setting']}, same output "
        f"{m['accepted_same_output']}; **changed output {m['accepted_changed_output']}, crashed {m['crashed']}** |",
        f"| schedule mutants (`Schedule.from_dict` + fit to the model) | {s['tried']} | refused cleanly "
        f"{s['refused_cleanly']}, accepted valid {valid}; "
        f"**accepted invalid {s['accepted_invalid']}, crashed {s['crashed']}** |",
    ]
    for c in r["concurrency"]:
        runs = ", ".join(f"pool {x['concurrency']}: {x['calls']} calls in {x['wall_seconds']:.2f} s" for x in c["runs"])
        rows.append(f"| {c['threads']} threads x {c['calls_per_thread']} `generate` calls on one Pipeline, "
                    f"{c['backend']} | {c['calls_checked']} | **{c['mismatches']} not bit-identical** to the same calls "
                    f"made one by one ({c['sequential_seconds']:.2f} s sequential; {runs}) |")
    rows.append(f"| dsexport killed (SIGKILL) at named points and random moments | {f['kill_points_tried']} | old "
                f"bundle kept {f['old_bundle_kept']}, restored by recovery {f['old_bundle_restored_by_recovery']}, "
                f"complete new bundle {f['replaced_by_complete_new']}; **bundle lost {f['bundle_lost']}, partial bundle "
                f"that loads {f['partial_bundles_loadable']}**; next export ok {f['next_export_ok']} |")
    disk = f.get("disk_full") or {}
    if disk:
        rows.append(f"| full disk during export | 1 | {'clear error, old bundle intact' if disk.get('ok') else 'FAILED'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/reliability")
    p.add_argument("--mutants", type=int, default=300, help="manifest mutants")
    p.add_argument("--schedule-mutants", type=int, default=1000)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--calls", type=int, default=3, help="generate() calls per thread")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = Path(args.out)
    result = run(out, args.mutants, args.schedule_mutants, args.threads, args.calls, args.seed)
    (out / "reliability.json").write_text(json.dumps(result, indent=1, default=str))
    print(markdown(result))
    print(f"\nall checks passed: {result['ok']}; figures in {out / 'reliability.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
