"""Faults during export lose nothing: kill exports with SIGKILL at chosen points, fill the disk.

    python benchmarks/export_faults.py [--kill-points graph-1,swapped,fallback:moved-aside] [--random-kills 3]
                                       [--seed 0] [--json results.json]

Each trial puts a complete bundle (the "old" one, of the tiny model "dit-tiny") at the target, starts
a child process exporting a different schedule over it (overwrite) and kills the child with
SIGKILL. It then checks that:
- the target holds the old bundle, the complete new one, or nothing (only where the kill landed
  between the two renames of the fallback swap): never a folder that loads as a bundle but is
  neither (`partial_bundles_loadable` must be 0);
- `recover_interrupted` (which every export runs first) brings the old bundle back where the kill
  landed between the two renames, so no bundle is lost (`bundle_lost` must be 0);
- the next export to the same target succeeds and leaves no hidden folder behind.
A last check fills the disk (a mocked ENOSPC from the weights file) under `dsexport`: exit code 2,
a clear message, no traceback, the old bundle intact and no temporary folder left.

Kill points are the names an export passes (export/bundle.py's FAULT_HOOK: "started", "graph-0",
"weights", "manifest", "verified", "pruning", "complete", "synced", "swapped", "cleaned", ...); a
"fallback:" prefix makes the child swap with two renames instead of the atomic exchange
("fallback:moved-aside" is the kill between them). The child stops at the point and tells the
parent through a pipe; the parent kills it there. Random kills come on top: the parent kills the
child after a seeded random delay within the measured duration of an export.

`run` starts one worker process (a fresh interpreter, one thread) that imports torch and the
package once and forks a child per export, so a trial costs the export, not the imports. POSIX
only (fork, SIGKILL). benchmarks/reliability.py imports `run` by file path.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch
from diffsparse.export import bundle as bundle_mod
from diffsparse.export import cli as export_cli
from diffsparse.export.bundle import ExportConfig, export_bundle, recover_interrupted
from diffsparse.export.weights import WeightStore

from diffsparse.builtin_schedules import toca_schedule
from diffsparse.manifest import MANIFEST_FILE, Manifest
from diffsparse.models.zoo import make_spec

MODEL, STEPS, BATCH = "dit-tiny", 6, 2
TARGET = "bundle"            # the target folder's name inside the work folder
FALLBACK = "fallback:"       # kill point prefix: swap with two renames instead of the atomic exchange
FALLBACK_POINTS = ["fallback:moved-aside", "fallback:renamed"]
CHILD_TIMEOUT_S = 300


def run(workdir: str | Path, kill_points: list[str] | None = None, seed: int = 0, random_kills: int = 3,
        disk_full: bool = True) -> dict:
    """Run the trials in a fresh worker process (see the module docstring) and return its figures.

    kill_points: names of points to kill the export at; None: every point a full export passes,
    plus the fallback swap's. random_kills: further kills after seeded random delays."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = {"workdir": str(workdir.resolve()), "kill_points": kill_points, "seed": seed,
              "random_kills": random_kills, "disk_full": disk_full}
    result = workdir / "export_faults.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"the export fault worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


# ---- the worker -------------------------------------------------------------------------------

def _spawn(spec, schedule, out: Path, role: str, stop_at: str | None = None, fallback: bool = False):
    """Fork a child that exports to `out`, writing each point it passes to a pipe and, at `stop_at`,
    waiting to be killed. Returns (pid, read end of the pipe, start time)."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(r)
            if fallback:
                bundle_mod._exchange = lambda a, b: False

            def hook(name: str) -> None:
                os.write(w, f"{name}\n".encode())
                if name == stop_at:
                    time.sleep(CHILD_TIMEOUT_S)

            bundle_mod.FAULT_HOOK = hook
            export_bundle(spec, schedule, out, source={"model": MODEL, "role": role}, config=ExportConfig(overwrite=True))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    return pid, r, t0


def _read_points(fd: int, until: str | None, timeout: float = CHILD_TIMEOUT_S) -> list[str]:
    """Points the child reports, up to `until` (or its exit: end of the pipe)."""
    buf, deadline = b"", time.monotonic() + timeout
    while True:
        points = buf.decode().splitlines()
        if until is not None and until in points:
            return points
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            return points
        buf += chunk


def _kill(pid: int) -> int:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _export(spec, schedule, out: Path, role: str) -> tuple[bool, list[str], float]:
    """A full export in a child: (succeeded, points passed, seconds)."""
    pid, r, t0 = _spawn(spec, schedule, out, role)
    points = _read_points(r, None)
    status = os.waitpid(pid, 0)[1]
    os.close(r)
    return os.waitstatus_to_exitcode(status) == 0, points, time.perf_counter() - t0


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _state(out: Path, old_manifest: str) -> str:
    """old / new (complete) / missing / unloadable / partial-loadable (loads but is neither: a bug)."""
    if not os.path.lexists(out):
        return "missing"
    try:
        m = Manifest.load(out, verify=True)
    except Exception:  # BundleError, or whatever a broken manifest raises: either way it does not load
        return "unloadable"
    if (out / MANIFEST_FILE).read_text() == old_manifest:
        return "old"
    if m.source.get("role") == "new" and m.graphs and all(g.parity_max_abs_err is not None for g in m.graphs):
        return "new"
    return "partial-loadable"


def _reset(out: Path, old: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    for name in _leftovers(out):
        shutil.rmtree(out.parent / name, ignore_errors=True)
    shutil.copytree(old, out)


def _disk_full(out: Path, old: Path, old_manifest: str) -> dict:
    """dsexport over the old bundle with the weights file failing with ENOSPC after a few tensors."""
    _reset(out, old)
    real_add, calls = WeightStore._add, []

    def full(self, array):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real_add(self, array)

    WeightStore._add = full
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = export_cli.main(["--model", MODEL, "--batch", str(BATCH), "--steps", str(STEPS),
                                    "--out", str(out), "--overwrite", "-q"])
    finally:
        WeightStore._add = real_add
    message = err.getvalue().strip()
    result = {"exit_code": code, "message": message, "traceback": "Traceback" in message,
              "no_space_named": "no space left" in message, "old_bundle_intact": _state(out, old_manifest) == "old",
              "temp_left": _leftovers(out)}
    result["ok"] = (code == 2 and not result["traceback"] and result["no_space_named"] and result["old_bundle_intact"]
                    and not result["temp_left"])
    return result


def _worker(config: dict) -> dict:
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    work = Path(config["workdir"])
    spec = make_spec(MODEL, batch_size=BATCH)
    old_schedule = toca_schedule(spec, STEPS, 0.5, full_every=3)
    new_schedule = toca_schedule(spec, STEPS, 0.3, full_every=2)
    out, old = work / TARGET, work / "old-reference"
    for path in (out, old):
        shutil.rmtree(path, ignore_errors=True)
    ok, _, _ = _export(spec, old_schedule, old, "old")
    if not ok:
        raise RuntimeError("the reference export failed")
    old_manifest = (old / MANIFEST_FILE).read_text()

    durations, trace = [], []
    points = config["kill_points"]
    if points is None or (not points and config["random_kills"]):  # a dry run: the points and the duration
        _reset(out, old)
        ok, trace, seconds = _export(spec, new_schedule, out, "new")
        if not ok or _state(out, old_manifest) != "new":
            raise RuntimeError("the dry-run export failed")
        durations.append(seconds)
    if points is None:
        points = trace + [p for p in FALLBACK_POINTS if p[len(FALLBACK):] not in trace]

    rng = random.Random(config["seed"])
    trials = []

    def trial(point: str | None, delay: float | None) -> None:
        _reset(out, old)
        fallback = point is not None and point.startswith(FALLBACK)
        stop_at = point[len(FALLBACK):] if fallback else point
        pid, r, t0 = _spawn(spec, new_schedule, out, "new", stop_at=stop_at, fallback=fallback)
        if stop_at is not None:
            passed = _read_points(r, stop_at)
        else:
            time.sleep(delay)
        status = _kill(pid)
        if stop_at is None:
            passed = _read_points(r, None)
        os.close(r)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        after_kill = _state(out, old_manifest)
        recovered = recover_interrupted(out)
        after_recovery = _state(out, old_manifest)
        ok, _, seconds = _export(spec, new_schedule, out, "new")
        durations.append(seconds)
        trials.append({"point": point if point is not None else f"random {delay:.3f}s",
                       "reached": stop_at is None or stop_at in passed, "killed": killed,
                       "last_point_passed": passed[-1] if passed else None,
                       "after_kill": after_kill, "recovery": recovered, "after_recovery": after_recovery,
                       "next_export_ok": ok and _state(out, old_manifest) == "new", "left_after_next": _leftovers(out)})

    for point in points:
        trial(point, None)
    span = sum(durations) / len(durations)
    for _ in range(config["random_kills"]):
        trial(None, rng.uniform(0.0, span))

    result = {
        "model": MODEL, "steps": STEPS, "seed": config["seed"],
        "atomic_exchange": "swapped" in trace if trace else bundle_mod._RENAMEAT2 is not None,
        "export_seconds": round(span, 3),
        "kill_points_tried": len(trials),
        "killed": sum(t["killed"] for t in trials),
        "unreached_points": [t["point"] for t in trials if not t["reached"]],
        "after_kill": dict(Counter(t["after_kill"] for t in trials)),
        "old_bundle_kept": sum(t["after_recovery"] == "old" for t in trials),
        "old_bundle_restored_by_recovery": sum(t["after_kill"] == "missing" and t["after_recovery"] == "old"
                                               for t in trials),
        "replaced_by_complete_new": sum(t["after_recovery"] == "new" for t in trials),
        "bundle_lost": sum(t["after_recovery"] not in ("old", "new") for t in trials),
        "partial_bundles_loadable": sum("partial-loadable" in (t["after_kill"], t["after_recovery"]) for t in trials),
        "next_export_ok": sum(t["next_export_ok"] and not t["left_after_next"] for t in trials),
        "trials": trials,
    }
    if config["disk_full"]:
        result["disk_full"] = _disk_full(out, old, old_manifest)
    result["ok"] = (result["bundle_lost"] == 0 and result["partial_bundles_loadable"] == 0
                    and result["next_export_ok"] == len(trials) and not result["unreached_points"]
                    and result.get("disk_full", {"ok": True})["ok"])
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    (work / "export_faults.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--kill-points", default=None,
                   help="comma-separated points (default: every point of an export, plus the fallback swap's)")
    p.add_argument("--random-kills", type=int, default=3, help="further kills after seeded random delays")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-disk-full", action="store_true", help="skip the full-disk check")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        _worker(json.loads(args.worker))
        return 0
    points = None if args.kill_points is None else [k for k in args.kill_points.split(",") if k]
    with tempfile.TemporaryDirectory() as scratch:
        result = run(args.workdir or scratch, kill_points=points, seed=args.seed, random_kills=args.random_kills,
                     disk_full=not args.no_disk_full)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    for t in result["trials"]:
        print(f"kill at {t['point']:<22} after {str(t['last_point_passed']):<12} -> {t['after_kill']:<10} "
              f"recovered: {t['after_recovery']:<4} next export ok: {t['next_export_ok']}")
    summary = {k: v for k, v in result.items() if k != "trials"}
    print(json.dumps(summary, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
