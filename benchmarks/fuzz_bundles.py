"""Fuzz bundle manifests and schedule files: seeded mutations, each loaded in-process.

A manifest mutant is the bundle's manifest.json with one change: a key deleted, a value of the
wrong type, NaN / inf / huge / negative numbers, a number as a string, a scalar wrapped in a list,
two sibling values swapped, a file name that leaves the bundle (`../`, absolute, a separator, a
symbolic link pointing out), or the JSON text cut short. Each is written into a copy of the bundle
folder (the other files hard-linked, or copied across file systems), loaded with
`Pipeline.from_bundle(folder, backend="onnxruntime")` and run for the same labels and seed as the
original. Outcomes:

    refused_cleanly          one of the project's errors (BundleError, ScheduleError, BackendError,
                             or a ValueError raised by diffsparse's own code with a message)
    accepted_informational   loaded and ran, the same output; the change was to an informational
                             field (diffsparse.manifest.INFORMATIONAL_FIELDS)
    accepted_setting         loaded and ran; the change was to a setting (SETTING_FIELDS, e.g. the
                             default guidance scale), which may change the output by design
    accepted_same_output     loaded and ran with bit-identical output
    accepted_changed_output  loaded and ran, a different output, and the field is no setting: a bug
    crashed                  any other exception (a traceback from numpy, torch, ONNX Runtime, ...)

Schedule mutants are checked with `Schedule.load` and `ModelSpec.check_schedule`: refused with a
ScheduleError, or accepted — the same schedule up to its informational fields (provenance,
macs_ratio), or another valid one — and an accepted schedule must hold finite numbers and
round-trip through its own file format (`accepted_invalid` otherwise, a bug).

    python benchmarks/fuzz_bundles.py BUNDLE [--n 300] [--seed 0]
    python benchmarks/fuzz_bundles.py --schedule FILE --model dit-tiny [--n 300]

`fuzz_manifest` and `fuzz_schedule` are what tests/runtime/test_manifest_fuzz.py and
benchmarks/reliability.py call.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import diffsparse
import diffsparse.runtime
from diffsparse.bundle_format import MANIFEST_FILE
from diffsparse.manifest import INFORMATIONAL_FIELDS, SETTING_FIELDS, BundleError
from diffsparse.runtime import BackendError, Pipeline
from diffsparse.schedule import Schedule, ScheduleError

#: the folders whose code raises "our" ValueErrors (the installed package and its stages)
PROJECT_DIRS = tuple(str(Path(m.__file__).resolve().parent) for m in (diffsparse, diffsparse.runtime))
CLEAN_ERRORS = (BundleError, ScheduleError, BackendError,
                *((diffsparse.runtime.NonFiniteOutputError,) if hasattr(diffsparse.runtime, "NonFiniteOutputError") else ()))
SCHEDULE_INFORMATIONAL = ("provenance", "macs_ratio")
#: seconds one mutant may take before it counts as a crash (a hang: a huge value the loader trusted)
MUTANT_TIMEOUT = 20
EXAMPLES = 5

Path_ = list  # a JSON path: the keys and indices from the root to a node


class _Timeout(Exception):
    pass


# ---- JSON paths ----------------------------------------------------------------------------------
def path_name(path: Path_) -> str:
    """graphs[2].keep for ["graphs", 2, "keep"] (the manifest's error-message spelling)."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _pattern_match(name: str, pattern: str) -> bool:
    """Whether a path name falls under a field pattern (`graphs[].ops` covers graphs[3].ops[1])."""
    parts = [p for p in pattern.replace("[]", ".[]").split(".") if p]
    tokens = [t for t in name.replace("[", ".[").split(".") if t]
    if len(tokens) < len(parts):
        return False
    return all(p == t or (p == "[]" and t.startswith("[")) for p, t in zip(parts, tokens))


def is_informational(path: Path_, fields=INFORMATIONAL_FIELDS) -> bool:
    return bool(path) and any(_pattern_match(path_name(path), f) for f in fields)


def _get(tree: Any, path: Path_) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _random_path(rng: random.Random, tree: Any) -> Path_:
    """A random node: descend from the root, at each level into a random child, stopping at a leaf
    or with probability 1/4 (so top-level fields are hit as often as deep ones)."""
    path: Path_ = []
    node = tree
    while True:
        children = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not children or (path and rng.random() < 0.25):
            return path
        key = rng.choice(children)
        path.append(key)
        node = node[key]


# ---- mutations -----------------------------------------------------------------------------------
BAD_NUMBERS = (math.nan, math.inf, -math.inf, 1e308, -1, -1.5, 0, 10**30, 2**63, 0.5)
WRONG_TYPES = ("x", "", [], {}, None, True, False, 1, 1.5, [1, 2])
PATH_TRICKS = ("../x.bin", "/etc/passwd", "sub/step_000.onnx", "..", ".", "", "./weights.bin", "weights.bin/",
               "..\\weights.bin", " weights.bin", "step_000.onnx\0")


def _mutate_value(rng: random.Random, value: Any) -> tuple[str, Any]:
    """A replacement for one value: (description, new value)."""
    choices: list[tuple[str, Callable[[], Any]]] = [
        ("wrong type", lambda: rng.choice(WRONG_TYPES)),
        ("list for scalar", lambda: [value]),
    ]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        choices += [("bad number", lambda: rng.choice(BAD_NUMBERS)), ("bad number", lambda: rng.choice(BAD_NUMBERS)),
                    ("string for number", lambda: str(value)), ("negated", lambda: -value),
                    ("off by one", lambda: value + rng.choice((-1, 1))), ("scaled", lambda: value * 2)]
    if isinstance(value, str):
        choices += [("path trick", lambda: rng.choice(PATH_TRICKS)), ("string edit", lambda: value[::-1]),
                    ("string edit", lambda: value + "x")]
    if isinstance(value, bool):
        choices += [("negated", lambda: not value), ("number for bool", lambda: int(value))]
    if isinstance(value, list) and value:
        choices += [("truncated list", lambda: value[:-1]), ("extended list", lambda: value + [value[-1]])]
    what, make = rng.choice(choices)
    return what, make()


def mutate(rng: random.Random, tree: Any, files: bool = True) -> tuple[str, list[Path_], Any]:
    """One mutation of a JSON tree: (description, the paths it touched, the new tree or, for a
    cut of the text, the text itself). files: also try path tricks on a manifest's file names."""
    tree = copy.deepcopy(tree)
    op = rng.choices(("value", "delete", "swap", "truncate", "file"), weights=(10, 3, 2, 1, 2 if files else 0))[0]
    if op == "truncate":
        text = json.dumps(tree, indent=1)
        cut = rng.randrange(len(text))
        return f"text cut at {cut} of {len(text)}", [[]], text[:cut]
    if op == "file":
        paths = [p for p in _file_paths(tree)]
        if paths:
            p = rng.choice(paths)
            trick = rng.choice((*PATH_TRICKS, "@symlink"))
            _set(tree, p, trick)
            return f"file name {trick!r}", [p], tree
    path = _random_path(rng, tree)
    if not path:
        return "no change", [[]], tree
    parent, key = _get(tree, path[:-1]), path[-1]
    if op == "delete":
        del parent[key]
        return "deleted", [path], tree
    if op == "swap":
        siblings = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
        if len(siblings) > 1:
            other = rng.choice([s for s in siblings if s != key])
            parent[key], parent[other] = parent[other], parent[key]
            return f"swapped with {other!r}", [path, path[:-1] + [other]], tree
    what, new = _mutate_value(rng, parent[key])
    parent[key] = new
    return f"{what}: {_short(new)}", [path], tree


def _file_paths(tree: dict) -> list[Path_]:
    out = [["graphs", i, "file"] for i in range(len(tree.get("graphs", [])))]
    if isinstance(tree.get("weights"), dict):
        out.append(["weights", "file"])
    if isinstance(tree.get("universal"), dict):
        out.append(["universal", "file"])
    out += [["engines", i, "file"] for i in range(len(tree.get("engines", [])))]
    return out


def _set(tree: Any, path: Path_, value: Any) -> None:
    _get(tree, path[:-1])[path[-1]] = value


def _short(value: Any, limit: int = 50) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- running a mutant ----------------------------------------------------------------------------
def _ours(e: BaseException) -> bool:
    """Whether an exception is one of the project's clean errors."""
    if isinstance(e, CLEAN_ERRORS):
        return True
    if type(e) is ValueError and str(e):
        frames = traceback.extract_tb(e.__traceback__)
        return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(PROJECT_DIRS)
    return False


def _with_timeout(fn: Callable[[], Any], seconds: int) -> Any:
    """fn(), or _Timeout after `seconds` (SIGALRM: main thread on POSIX only; elsewhere no limit)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        return fn()

    def alarm(signum, frame):
        raise _Timeout(f"took more than {seconds}s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _stage(bundle: Path, folder: Path) -> None:
    """A fresh copy of the bundle in `folder`, its files hard-linked (copied across file systems)."""
    shutil.rmtree(folder, ignore_errors=True)
    for src in bundle.rglob("*"):
        dst = folder / src.relative_to(bundle)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        elif src.name != MANIFEST_FILE:
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(src, dst)
    folder.mkdir(parents=True, exist_ok=True)


def _generate(folder: Path, labels: list[int], seed: int) -> np.ndarray:
    pipe = Pipeline.from_bundle(folder, backend="onnxruntime", threads=1)
    return pipe.generate(class_labels=labels, seed=seed, time_steps=False).samples


def _record(counts: dict, outcome: str, example: dict) -> None:
    counts[outcome] += 1
    if outcome in ("crashed", "accepted_changed_output", "accepted_invalid"):
        counts.setdefault("examples", {}).setdefault(outcome, [])
        if len(counts["examples"][outcome]) < EXAMPLES:
            counts["examples"][outcome].append(example)


def fuzz_manifest(bundle_folder: str | Path, n: int = 300, seed: int = 0, workdir: str | Path | None = None,
                  labels: list[int] | None = None, gen_seed: int = 0) -> dict[str, Any]:
    """Run `n` seeded mutants of a bundle's manifest (module docstring); the counts per outcome,
    with up to 5 examples of each failure ({mutation, fields, error})."""
    bundle = Path(bundle_folder)
    labels = list(labels) if labels is not None else [1, 7]
    original = json.loads((bundle / MANIFEST_FILE).read_text())
    reference = _generate(bundle, labels, gen_seed)
    rng = random.Random(seed)
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="fuzz-bundles-")) if own else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    outside = work / "outside"
    outside.mkdir(exist_ok=True)
    weights_name = original["weights"]["file"]
    if not (outside / weights_name).exists():
        shutil.copy2(bundle / weights_name, outside / weights_name)
    folder = work / "mutant"
    counts: dict[str, Any] = {k: 0 for k in ("tried", "refused_cleanly", "accepted_informational", "accepted_setting",
                                             "accepted_same_output", "accepted_changed_output", "crashed")}
    try:
        for i in range(n):
            what, paths, mutant = mutate(rng, original)
            _stage(bundle, folder)
            text = mutant if isinstance(mutant, str) else json.dumps(mutant, indent=1)
            if isinstance(mutant, dict) and "@symlink" in text:  # a link inside the bundle to a file outside
                (folder / "link.bin").symlink_to(outside / weights_name)
                text = text.replace('"@symlink"', '"link.bin"')
            (folder / MANIFEST_FILE).write_text(text)
            fields = [path_name(p) or "<whole file>" for p in paths]
            example = {"mutant": i, "mutation": what, "fields": fields}
            counts["tried"] += 1
            try:
                out = _with_timeout(lambda: _generate(folder, labels, gen_seed), MUTANT_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - classifying every failure is the point
                outcome = "refused_cleanly" if _ours(e) else "crashed"
                _record(counts, outcome, {**example, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                continue
            same = out.shape == reference.shape and np.array_equal(out, reference)
            if all(p and is_informational(p, SETTING_FIELDS) for p in paths):
                outcome = "accepted_setting"
            elif not same:
                outcome = "accepted_changed_output"
            elif all(p and is_informational(p) for p in paths):
                outcome = "accepted_informational"
            else:
                outcome = "accepted_same_output"
            _record(counts, outcome, example)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return counts


# ---- schedules -----------------------------------------------------------------------------------
def _finite_tree(tree: Any) -> bool:
    if isinstance(tree, dict):
        return all(_finite_tree(v) for v in tree.values())
    if isinstance(tree, list):
        return all(_finite_tree(v) for v in tree)
    return not isinstance(tree, float) or math.isfinite(tree)


def _strip(schedule: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schedule.items() if k not in SCHEDULE_INFORMATIONAL}


def fuzz_schedule(schedule: str | Path | dict, n: int = 300, seed: int = 0, workdir: str | Path | None = None,
                  spec=None) -> dict[str, Any]:
    """Run `n` seeded mutants of a schedule (a file or its dict) through `Schedule.load` and, with
    a spec, `spec.check_schedule`; counts per outcome as `fuzz_manifest`, where
    accepted_changed_output is a different schedule that is valid (not a failure: schedules are
    inputs) and accepted_invalid one holding non-finite numbers or failing its own round trip."""
    original = schedule if isinstance(schedule, dict) else json.loads(Path(schedule).read_text())
    reference = _strip(Schedule.from_dict(original).to_dict())
    rng = random.Random(seed)
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="fuzz-schedules-")) if own else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "schedule.json"
    counts: dict[str, Any] = {k: 0 for k in ("tried", "refused_cleanly", "accepted_informational", "accepted_same_output",
                                             "accepted_changed_output", "accepted_invalid", "crashed")}
    try:
        for i in range(n):
            what, paths, mutant = mutate(rng, original, files=False)
            path.write_text(mutant if isinstance(mutant, str) else json.dumps(mutant, indent=1))
            example = {"mutant": i, "mutation": what, "fields": [path_name(p) or "<whole file>" for p in paths]}
            counts["tried"] += 1

            def load():
                s = Schedule.load(path)
                if spec is not None:
                    spec.check_schedule(s)
                return s

            try:
                sched = _with_timeout(load, MUTANT_TIMEOUT)
            except Exception as e:  # noqa: BLE001
                outcome = "refused_cleanly" if _ours(e) else "crashed"
                _record(counts, outcome, {**example, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                continue
            data = sched.to_dict()
            try:
                valid = _finite_tree(_strip(data)) and Schedule.from_dict(json.loads(json.dumps(data))).to_dict() == data
            except Exception as e:  # noqa: BLE001
                valid, example["error"] = False, f"{type(e).__name__}: {e}"
            if not valid:
                _record(counts, "accepted_invalid", example)
                continue
            if _strip(data) == reference:
                informational = all(p and p[0] in SCHEDULE_INFORMATIONAL for p in paths)
                _record(counts, "accepted_informational" if informational else "accepted_same_output", example)
            else:
                _record(counts, "accepted_changed_output", example)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", help="a bundle folder whose manifest to fuzz")
    p.add_argument("--schedule", help="a schedule file to fuzz instead")
    p.add_argument("--model", default=None, help="with --schedule: check the mutants fit this model (e.g. dit-tiny)")
    p.add_argument("--n", type=int, default=300, help="mutants to try")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where mutants are written (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.schedule:
        spec = None
        if args.model:
            from diffsparse.models.zoo import make_spec  # a script: the model zoo only when asked for

            spec = make_spec(args.model, batch_size=2)
        counts = fuzz_schedule(args.schedule, args.n, args.seed, args.workdir, spec=spec)
    elif args.bundle:
        counts = fuzz_manifest(args.bundle, args.n, args.seed, args.workdir)
    else:
        p.error("give a bundle folder or --schedule FILE")
    json.dump(counts, sys.stdout, indent=1)
    print()
    failures = counts["crashed"] + counts.get("accepted_invalid", 0) + (
        counts["accepted_changed_output"] if not args.schedule else 0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
