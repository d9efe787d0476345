"""The package is layered: core -> runtime -> export -> mnist -> train | calibrate -> demo.

A module may import its own layer and the layers below it; train and calibrate do not import each
other; the module import graph has no cycles; and no module imports one of ours inside a function
body (such imports hide cycles and layering breaks; an optional heavy dependency may be imported
lazily, which this check does not concern: it looks only at diffsparse modules).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package folder -> installed package (pyproject's package-dir)
FOLDERS = {"diffsparse": "diffsparse", "runtime": "diffsparse.runtime", "export": "diffsparse.export",
           "train": "diffsparse.train", "calibrate": "diffsparse.calibrate"}
# (layer rank, layer name) per package prefix; the longest matching prefix decides
LAYERS = {"diffsparse": (0, "core"), "diffsparse.runtime": (1, "runtime"), "diffsparse.export": (2, "export"),
          "diffsparse.mnist": (3, "mnist"), "diffsparse.train": (4, "train"), "diffsparse.calibrate": (4, "calibrate"),
          "diffsparse.demo": (5, "demo"), "diffsparse.serve": (5, "serve")}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _layer(module: str) -> tuple[int, str]:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def _resolve(name: str) -> str | None:
    """The project module an import names (`from pkg import mod` names pkg.mod when that is one)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path):
    """(imported project module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    nested = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] != "diffsparse":
                continue
            target = _resolve(name)
            if target is not None:
                yield target, node.lineno, id(node) in nested


def test_no_project_import_inside_a_function():
    hidden = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}"
              for m in MODULES for t, line, inside in _imports(MODULES[m]) if inside]
    assert not hidden, "import these at module level (a cycle or layering break is hiding behind them):\n" + \
        "\n".join(hidden)


def test_every_import_goes_down_the_layers():
    bad = []
    for module, path in MODULES.items():
        rank, name = _layer(module)
        for target, line, _ in _imports(path):
            t_rank, t_name = _layer(target)
            if t_rank > rank or (t_rank == rank and t_name != name):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({name}) imports {target} ({t_name})")
    assert not bad, "\n".join(bad)


def test_the_module_graph_has_no_cycles():
    graph = {m: {t for t, _, _ in _imports(p) if t != m} for m, p in MODULES.items()}
    # a package's __init__ may import its own submodules (the registry of model families)
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m, trail):
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(t):] + [t]))
            if t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


LAYER_ENTRIES = ["diffsparse.models", "diffsparse.runtime.cli", "diffsparse.export.cli", "diffsparse.mnist.recipe",
                 "diffsparse.train.cli", "diffsparse.calibrate.evaluate"]
# one fresh interpreter for all layers: third-party libraries stay loaded (they take seconds),
# our modules are dropped before each layer is imported, so each layer is imported alone
_PROBE = """
import importlib, json, sys
import diffusers, numpy, onnx, onnxruntime, torch
out = {}
for entry in sys.argv[1:]:
    for name in [m for m in sys.modules if m == "diffsparse" or m.startswith("diffsparse.")]:
        del sys.modules[name]
    importlib.import_module(entry)
    out[entry] = [m for m in sys.modules if m.startswith("diffsparse.")]
print(json.dumps(out))
"""


def test_each_layer_imports_alone():
    """Importing a layer loads nothing from the layers above it."""
    run = subprocess.run([sys.executable, "-c", _PROBE, *LAYER_ENTRIES], capture_output=True, text=True, check=True)
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    bad = {}
    for entry in LAYER_ENTRIES:
        rank, name = _layer(entry)
        above = [m for m in loaded[entry]
                 if m in MODULES and (_layer(m)[0] > rank or (_layer(m)[0] == rank and _layer(m)[1] != name))]
        if above:
            bad[entry] = above
    assert not bad, f"layers that load modules above them: {bad}"
