"""Where a step's time goes, measured: `dsprofile --ops` runs a few extra generations of each bundle
under a profiler, ONNX Runtime's own (per-node kernel times) or torch.profiler, and attributes
every operator's time to its denoising step, to a *part* of the step and to its operator type.
Profiling slows the runs down, so these generations are separate from the timed ones and their
numbers are shares of a step, not its latency.

Parts (`PARTS`): score (token scores, TopK), gather, compute (the transformer's own work), scatter
(cache writes, reuse-count bookkeeping), sampler (guidance combine, sampler update), other. They
are read from the graph, not guessed from operator types: the step runs its own mechanics inside
`Part` child modules (models/cached.py), so the exported node names carry the scope
(TorchScript: `/part_score/TopK`, a repeated scope `/part_scatter_3/ScatterND`; the dynamo
exporter's names are prefixed the same way from its scope metadata, export/onnx_export.py).
ONNX Runtime optimises the graph before it runs it, so an event's node name is attributed by
`part_of`:
  1. a `part_<name>` scope in it -> that part (a fused node keeps the name of one of the nodes it
     replaced, often with a suffix: `/part_sampler/Gather_4/GatherSliceToSplitFusion`);
  2. else the name of a node of the exported graph, alone or followed by a suffix after `/` or
     `_` (`/ff/net.2/MatMul/MatMulScaleFusion/`) -> compute: exported outside every part scope;
  3. else a node ONNX Runtime made itself (`ReorderOutput`, `Squeeze_token_2`): compute when its
     operator is a transformer op (`COMPUTE_OPS`: MatMul/Gemm/Conv, normalisations, activations,
     softmax, attention), other when not.
torch.profiler: each step, each step module's forward and each part call is a `record_function`
scope (added by hooks for the profiled runs only; part calls do not nest); an aten op's self time
(device time on CUDA) goes to the part scope around it, else to compute inside the forward, else
(the backend's own copies into its cache buffers) to other; its type is the aten op's name. CUDA
graphs are off for these runs: a replayed graph shows no operator.

ONNX Runtime's trace (one JSON file per session): `cat == "Session"` events named `model_run` are
the session's runs in run order; `cat == "Node"` events named `<node>_kernel_time` are kernel
times (`args.op_name` the operator type, `dur` µs, `ts` start). The k-th run of session g is the
k-th step, in step order across generations, whose graph is g; a node event belongs to the run
whose [ts, ts + dur] contains it.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffsparse.models.cached import PARTS as STEP_PARTS
from diffsparse.models.cached import Part
from diffsparse.runtime.backends.base import Backend, BackendContext, BackendError
from diffsparse.runtime.backends.ort import OrtBackend
from diffsparse.runtime.backends.torch_backend import TorchBackend
from diffsparse.runtime.bundle import Bundle
from diffsparse.runtime.pipeline import Pipeline

log = logging.getLogger(__name__)

PARTS = ("score", "gather", "compute", "scatter", "sampler", "other")
_PART_SCOPE = re.compile(r"(?:^|/)part_({})(?:_\d+)?(?=/|$)".format("|".join(STEP_PARTS)))
KERNEL_SUFFIX = "_kernel_time"
#: operator types that are the transformer's own work when a node's name says nothing (rule 3)
COMPUTE_OPS = frozenset({
    "MatMul", "FusedMatMul", "MatMulInteger", "MatMulNBits", "Gemm", "FusedGemm", "Conv", "FusedConv", "NchwcConv",
    "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization",
    "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Erf", "Tanh", "Sigmoid", "Softmax",
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding",
})


def part_of(name: str, op_type: str, exported: Iterable[str] | None = None) -> str:
    """The part of a profiled node (module docstring: the rule). exported: the node names of the
    graph as exported (without them rule 2 is skipped)."""
    m = _PART_SCOPE.search(name)
    if m:
        return m.group(1)
    if exported and _is_exported(name, exported):
        return "compute"
    return "compute" if op_type in COMPUTE_OPS else "other"


def _is_exported(name: str, exported) -> bool:
    """Whether `name` is an exported node's name, alone or with a suffix after `/` or `_`."""
    if name in exported:
        return True
    return any(name[i] in "/_" and name[:i] in exported for i in range(len(name) - 1, 0, -1))


@dataclass
class RunTimes:
    """One profiled run of a step graph: its whole duration and its node times (µs)."""

    run_us: float
    parts: dict[str, float] = field(default_factory=dict)
    ops: dict[str, float] = field(default_factory=dict)
    shapes: dict[str, float] = field(default_factory=dict)

    def add(self, part: str, op: str, us: float, shapes: str = "") -> None:
        """shapes: the call's input shapes (`op_call`), when the profiler recorded them."""
        self.parts[part] = self.parts.get(part, 0.0) + us
        self.ops[op] = self.ops.get(op, 0.0) + us
        if shapes:
            key = op_call(op, shapes)
            self.shapes[key] = self.shapes.get(key, 0.0) + us


def op_call(op: str, shapes: str) -> str:
    """The key of an operator call by its input shapes: `MatMul(2x64x1152, 1152x4608)`. The same
    operator at different shapes is told apart: where a K-row matmul costs more than K/N of the
    dense one shows here."""
    return f"{op}({shapes})"


def shape_text(shapes: Iterable[Sequence[int] | None]) -> str:
    """Input shapes -> `2x64x1152, 1152x4608` (a scalar is `()`, an absent input `-`)."""
    return ", ".join("-" if s is None else ("x".join(str(d) for d in s) or "()") for s in shapes)


def _ort_shapes(args: dict[str, Any]) -> str:
    """`args.input_type_shape` of an ONNX Runtime node event ([{"float": [2, 64, 1152]}, ...])."""
    return shape_text(next(iter(d.values()), None) for d in args.get("input_type_shape", []))


def session_runs(events: list[dict[str, Any]], exported: Iterable[str] | None = None) -> tuple[list[RunTimes], float]:
    """One session's trace -> (its runs in run order, µs of node events inside no run)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    out = [RunTimes(run_us=float(r["dur"])) for r in runs]
    starts = [r["ts"] for r in runs]
    outside = 0.0
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith(KERNEL_SUFFIX):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] + e["dur"] > runs[i]["ts"] + runs[i]["dur"]:
            outside += e["dur"]
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        out[i].add(part_of(name[:-len(KERNEL_SUFFIX)], op, exported), op, float(e["dur"]), _ort_shapes(args))
    return out, outside


def steps_of_runs(step_graphs: Sequence[int], generations: int, graphs: int) -> list[list[tuple[int, int]]]:
    """For each graph g, the (generation, step) of its k-th run: the k-th step, in step order
    across `generations` generations, whose graph is g."""
    out: list[list[tuple[int, int]]] = [[] for _ in range(graphs)]
    for gen in range(generations):
        for step, g in enumerate(step_graphs):
            out[g].append((gen, step))
    return out


@dataclass
class OpsProfile:
    """A bundle's profiled generations, averaged per generation (ms): per step by part, whole
    runs per step, by operator type and by operator call (`op_call`: type and input shapes).
    `outside_ms`: profiled node time in no run (normally 0)."""

    #: operator calls `to_dict` keeps (the heaviest)
    TOP_CALLS: ClassVar[int] = 40

    source: str
    generations: int
    per_step: list[dict[str, float]]
    per_step_run_ms: list[float]
    op_types: dict[str, float]
    outside_ms: float = 0.0
    op_calls: dict[str, float] = field(default_factory=dict)

    @property
    def total_by_part(self) -> dict[str, float]:
        return {p: sum(step.get(p, 0.0) for step in self.per_step) for p in PARTS}

    @property
    def node_ms(self) -> float:
        """All attributed operator time of a generation (= the sum of the parts)."""
        return sum(self.total_by_part.values())

    @property
    def run_ms(self) -> float:
        """The profiled runs of a generation, whole (operators + the runtime's own work between them)."""
        return sum(self.per_step_run_ms)

    def to_dict(self) -> dict[str, Any]:
        """The `ops` key of a profile.json side."""
        by_op = dict(sorted(self.op_types.items(), key=lambda kv: -kv[1]))
        return {"source": self.source, "generations": self.generations, "per_step": self.per_step,
                "per_step_run_ms": self.per_step_run_ms, "total_by_part": self.total_by_part,
                "total_by_op_type": by_op, "top_op_calls": dict(self.top_calls()), "node_ms": self.node_ms,
                "run_ms": self.run_ms, "outside_ms": self.outside_ms}

    def top_calls(self, n: int | None = None) -> list[tuple[str, float]]:
        """The `n` (default TOP_CALLS) heaviest operator calls, (op_call, ms per generation)."""
        return sorted(self.op_calls.items(), key=lambda kv: -kv[1])[:n or self.TOP_CALLS]

    @classmethod
    def collect(cls, source: str, runs: Iterable[tuple[int, int, RunTimes]], num_steps: int, skip: int,
                generations: int, outside_us: float = 0.0) -> OpsProfile:
        """From (generation, step, times) of every profiled run: generations before `skip` (warm-up)
        are dropped, the others averaged."""
        per_step = [{p: 0.0 for p in PARTS} for _ in range(num_steps)]
        run_ms = [0.0] * num_steps
        ops: dict[str, float] = {}
        calls: dict[str, float] = {}
        scale = 1e-3 / generations  # µs over all generations -> ms per generation
        for gen, step, times in runs:
            if gen < skip:
                continue
            run_ms[step] += times.run_us * scale
            for part, us in times.parts.items():
                per_step[step][part] += us * scale
            for op, us in times.ops.items():
                ops[op] = ops.get(op, 0.0) + us * scale
            for call, us in times.shapes.items():
                calls[call] = calls.get(call, 0.0) + us * scale
        return cls(source=source, generations=generations, per_step=per_step, per_step_run_ms=run_ms,
                   op_types=ops, outside_ms=outside_us * scale, op_calls=calls)


def ort_ops(traces: Sequence[str | Path], step_graphs: Sequence[int], generations: int, skip: int = 0,
            exported: Sequence[Iterable[str]] | None = None) -> OpsProfile:
    """ONNX Runtime traces (one per session, in graph order) of `skip` + `generations` generations
    -> their `OpsProfile`. exported: each graph's exported node names (rule 2 of `part_of`)."""
    mapping = steps_of_runs(step_graphs, skip + generations, len(traces))
    runs, outside = [], 0.0
    for g, path in enumerate(traces):
        session, out = session_runs(json.loads(Path(path).read_text()), exported[g] if exported else None)
        if len(session) != len(mapping[g]):
            raise ValueError(f"trace {path}: {len(session)} runs of graph {g}, the schedule ran it {len(mapping[g])} times")
        runs += [(gen, step, t) for (gen, step), t in zip(mapping[g], session)]
        outside += out
    if outside:
        log.info("%.3f ms of profiled node time fell in no run (dropped)", outside / 1000)
    return OpsProfile.collect("onnxruntime profiler", runs, len(step_graphs), skip, generations, outside)


def exported_names(bundle: Bundle) -> list[set[str]]:
    """Each graph's node names as exported (the graphs without their weights)."""
    return [{n.name for n in bundle.graph_model(i).graph.node} for i in range(len(bundle.manifest.graphs))]


def measure_ops(bundle: Bundle, pipe: Pipeline, generate: Callable[[Pipeline], Any], generations: int = 2,
                warmup: int = 1) -> OpsProfile:
    """Profile `warmup` + `generations` generations of a bundle (`generate(pipeline)` runs one) on
    the backend of `pipe`, its timed pipeline. ONNX Runtime: new sessions with profiling on (a
    session's profile cannot be switched on later), the same device and threads. torch: the same
    modules, with scopes added for these runs only."""
    if generations < 1:
        raise ValueError("ops profiling needs at least one generation")
    check_profilable(pipe.backend)
    backend = pipe.backend
    if isinstance(backend, OrtBackend):
        with tempfile.TemporaryDirectory(prefix="dsprofile-ops-") as tmp:
            profiled = OrtBackend(bundle, device=backend.device, threads=backend.threads, prepack=backend.prepack,
                                  profile_prefix=str(Path(tmp) / "graph"))
            run = Pipeline(profiled, pipe.spec, pipe.plan, pipe.step_graphs)
            for _ in range(warmup + generations):
                generate(run)
            traces = profiled.end_profiling()
            return ort_ops(traces, pipe.step_graphs, generations, warmup, exported_names(bundle))
    return _torch_ops(pipe, generate, generations, warmup)


def check_profilable(backend: Backend) -> None:
    """BackendError unless `measure_ops` can profile this backend (before anything is timed)."""
    if not isinstance(backend, (OrtBackend, TorchBackend)):
        raise BackendError(f"--ops profiles the onnxruntime and torch backends, not {backend.name}")


# ---- torch.profiler ----------------------------------------------------------------------------

STEP_SCOPE, FORWARD_SCOPE, PART_SCOPE = "diffsparse.step.", "diffsparse.forward", "diffsparse.part."


class _ScopedSteps(Backend):
    """A torch backend whose steps run inside record_function scopes `diffsparse.step.<gen>.<step>`
    (in a context of its own over the inner backend's modules)."""

    def __init__(self, inner: TorchBackend, num_steps: int) -> None:
        super().__init__()
        self.inner, self.num_steps, self.calls = inner, num_steps, 0
        self.name = inner.name
        self.loaded = inner.loaded

    @property
    def device(self) -> str:
        return self.inner.device

    def load(self) -> None:
        self.inner.prepare()

    def new_context(self) -> _ScopedContext:
        return _ScopedContext(self, self.inner.new_context())


class _ScopedContext(BackendContext):
    def __init__(self, scoped: _ScopedSteps, inner: BackendContext) -> None:
        self.scoped, self.inner = scoped, inner

    def start(self, latent) -> None:
        self.inner.start(latent)

    def run_step(self, graph: int, feeds) -> None:
        gen, step = divmod(self.scoped.calls, self.scoped.num_steps)
        self.scoped.calls += 1
        with torch.profiler.record_function(f"{STEP_SCOPE}{gen}.{step}"):
            self.inner.run_step(graph, feeds)
            self.inner.synchronize()

    def latent(self):
        return self.inner.latent()

    def synchronize(self) -> None:
        self.inner.synchronize()


def _scope_hooks(module: torch.nn.Module) -> list:
    """record_function scopes around the step module's forward and each `Part` call."""
    handles = []
    for name, sub in module.named_modules():
        if sub is not module and not isinstance(sub, Part):
            continue
        scope = FORWARD_SCOPE if sub is module else PART_SCOPE + name.removeprefix("part_")
        stack: list = []

        def enter(_mod, _args, scope=scope, stack=stack):
            rf = torch.profiler.record_function(scope)
            rf.__enter__()
            stack.append(rf)

        def leave(_mod, _args, _out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [sub.register_forward_pre_hook(enter), sub.register_forward_hook(leave)]
    return handles


def _torch_ops(pipe: Pipeline, generate, generations: int, warmup: int) -> OpsProfile:
    backend: TorchBackend = pipe.backend
    backend.prepare()
    n = len(pipe.step_graphs)
    cuda = backend.device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    handles = [h for module in backend.modules for h in _scope_hooks(module)]
    graphs, backend.cuda_graphs = backend.cuda_graphs, False
    try:
        run = Pipeline(_ScopedSteps(backend, n), pipe.spec, pipe.plan, pipe.step_graphs)
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            for _ in range(warmup + generations):
                generate(run)
    finally:
        backend.cuda_graphs = graphs
        for h in handles:
            h.remove()
    return torch_events_ops(prof.events(), n, generations, warmup, cuda)


def torch_events_ops(events, num_steps: int, generations: int, skip: int, device: bool = False) -> OpsProfile:
    """torch.profiler events (`prof.events()`) of `skip` + `generations` generations -> OpsProfile.
    device: count the operators' device (CUDA) self time instead of their CPU self time."""
    steps, forwards, parts, ops = [], [], [], []
    for e in events:
        span = (e.time_range.start, e.time_range.end)
        if e.name.startswith(STEP_SCOPE):
            gen, step = (int(x) for x in e.name[len(STEP_SCOPE):].split("."))
            steps.append((*span, gen, step))
        elif e.name == FORWARD_SCOPE:
            forwards.append(span)
        elif e.name.startswith(PART_SCOPE):
            parts.append((*span, e.name[len(PART_SCOPE):]))
        elif not e.name.startswith("diffsparse."):
            ops.append(e)
    steps.sort()
    forwards.sort()
    parts.sort()
    times = {(gen, step): RunTimes(run_us=float(end - start)) for start, end, gen, step in steps}
    for e in ops:
        t = e.time_range.start
        step = _around(steps, t)
        if step is None:
            continue
        part = _around(parts, t)
        name = part[2] if part else ("compute" if _around(forwards, t) else "other")
        us = e.self_device_time_total if device else e.self_cpu_time_total
        times[step[2:]].add(name, e.name, float(us), shape_text(e.input_shapes or []))
    runs = [(gen, step, t) for (gen, step), t in times.items()]
    return OpsProfile.collect("torch.profiler", runs, num_steps, skip, generations)


def _around(spans: list[tuple], t: float) -> tuple | None:
    """The span (start, end, ...) of the sorted, non-nested `spans` that contains t, or None."""
    i = bisect.bisect_right(spans, (t, float("inf"))) - 1
    return spans[i] if i >= 0 and spans[i][1] >= t else None
