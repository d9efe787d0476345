"""Which layers of a bundle's step graphs survive fp16 / bf16: error, overflow and ranges, per step and layer.

    dscalibrate precision BUNDLE --dtype fp16 --out report/

Inputs: every computed step of the bundle receives the inputs it gets when the fp32 bundle samples
from the calibration seeds (export/calibration.py: the sampler's own latent at that t, the token
cache as the earlier steps left it, the conditioning). Each step graph is run on them twice —
fp32, and lowered to the asked precision — and Polygraphy's comparator (CompareFunc.simple)
gives each output's max/mean absolute and relative error.

Lowering is emulated on ONNX Runtime's CPU, which has no fp16/bf16 matmul kernels on x86: every
stored weight is rounded to the precision, and every activation a transformer node produces is
rounded (Cast to fp16/bf16 and back) before the next node reads it. That is the storage
precision of an fp16/bf16 engine with fp32 accumulation inside each matmul (what GPU tensor cores
do), and a value beyond the format's range becomes Inf exactly as it would there. The step's
mechanics (token scores, TopK, gather/scatter, sampler update) and the token cache stay fp32, and
the lowered step recomputes the tokens the fp32 step selected (`pinned`): where lowering moves
scores past each other at a near tie, the step would otherwise compute other tokens and differ
by far more than the rounding measured. Those tokens are counted per step (`selection_flips`).

Per layer group (export/quantize.py `layer_groups`: "sa3", "mlp3", "block3" = adaLN and timestep
embedding of block 3, "fixed" = embeddings and head) the report gives the fp32 range of its
matmul/softmax/normalisation outputs, their error when the whole graph is lowered, any Inf/NaN,
and — with `isolate` — the error of the step's output when that group alone is lowered. A group
must stay fp32 when its lowered values overflow (or its fp32 range comes within `overflow_margin`
of the format's largest value) or when lowering it alone moves the step output by more than
`tolerance`. A last run lowers everything else and reports the error the recommendation leaves.
Exit status: 0 (report written), 2 (bad input).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from diffsparse.export.calibration import CalibrationConfig, GraphRunner, collect_step_inputs, with_outputs
from diffsparse.export.quantize import layer_groups, node_part
from diffsparse.export.verify import compare
from diffsparse.manifest import BundleError
from diffsparse.runtime.backends.base import BackendError
from diffsparse.runtime.bundle import Bundle

log = logging.getLogger(__name__)

#: the formats checked: ONNX element type and largest finite value
DTYPES = {"fp16": (TensorProto.FLOAT16, float(np.finfo(np.float16).max)),
          "bf16": (TensorProto.BFLOAT16, 3.3895313892515355e38)}
#: node types whose outputs are watched (ranges, per-layer error)
WATCHED = ("MatMul", "Gemm", "Softmax", "LayerNormalization")


@dataclass
class PrecisionConfig:
    """dscalibrate precision's settings.

    dtype: "fp16" or "bf16".
    calibration: the inputs (export/calibration.py; default 1 batch of the bundle's batch size).
    tolerance: a group whose lowering alone moves a step's output by more than this (max |diff| /
        max(1, max |fp32|), as export parity) must stay fp32.
    overflow_margin: a group whose fp32 |values| exceed the format's max / margin must stay fp32.
    isolate: lower each group alone (one more run per group and step) to attribute the error.
    threads: ONNX Runtime threads (None: one per core).
    """

    dtype: str = "fp16"
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(batches=1))
    tolerance: float = 1e-2
    overflow_margin: float = 2.0
    isolate: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not self.tolerance > 0 or not self.overflow_margin >= 1:
            raise ValueError("tolerance must be > 0 and overflow_margin >= 1")


def round_to(array: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 values rounded to the nearest fp16 / bf16 value (round half to even), as fp32."""
    a = np.asarray(array, np.float32)
    if dtype == "fp16":
        with np.errstate(over="ignore"):
            return a.astype(np.float16).astype(np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(a), a, out)


def float_values(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors a graph computes (ONNX shape inference; no weights needed)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name for v in [*inferred.graph.value_info, *inferred.graph.output]
            if v.type.tensor_type.elem_type == TensorProto.FLOAT}


def lowered(model: onnx.ModelProto, dtype: str, lower: set[str], groups: dict[str, str],
            floats: set[str]) -> onnx.ModelProto:
    """A copy of `model` in which every float output of a node of a group in `lower` (mechanics
    nodes never) is rounded to `dtype` (Cast there and back) before anything reads it."""
    low = DTYPES[dtype][0]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for i, node in enumerate(out.graph.node):
        nodes.append(node)
        name = node.name or f"node{i}"
        if node_part(node) is not None or groups.get(name) not in lower or node.op_type == "Constant":
            continue
        for j, value in enumerate(node.output):
            if value not in floats:
                continue
            node.output[j] = f"{value}.fp32"
            nodes.append(onnx.helper.make_node("Cast", [f"{value}.fp32"], [f"{value}.{dtype}"], to=low,
                                               name=f"{name}/round_{dtype}_{j}"))
            nodes.append(onnx.helper.make_node("Cast", [f"{value}.{dtype}"], [value], to=TensorProto.FLOAT,
                                               name=f"{name}/back_{dtype}_{j}"))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def selection_indices(model: onnx.ModelProto) -> list[str]:
    """The token selections of a step graph: the indices output of each TopK."""
    return [n.output[1] for n in model.graph.node if n.op_type == "TopK"]


def pinned(model: onnx.ModelProto, indices: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose TopK selections `indices` are graph inputs (fed the fp32 run's), each
    TopK's own result still computed and output as `<name>.own`.

    Lowering may move two tokens' scores past each other at a near tie: the lowered step then
    recomputes another token, and every output it touches differs by far more than the rounding
    being measured (a reuse count by 1). Pinned, the lowered step computes the same tokens as the
    fp32 step, so its error is the numerics of the lowered layers; the flips are counted apart."""
    out = with_outputs(model, [_own(name) for name in indices], TensorProto.INT64)
    wanted = set(indices)
    for node in out.graph.node:
        if node.op_type == "TopK" and node.output[1] in wanted:
            node.output[1] = _own(node.output[1])
    for name in indices:
        out.graph.input.append(onnx.helper.make_tensor_value_info(name, TensorProto.INT64, None))
    return out


def _own(name: str) -> str:
    """The name a pinned graph gives its TopK's own selection `name`."""
    return f"{name}.own"


def _pinned_feeds(session, feeds: dict[str, np.ndarray], selection: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The step inputs `session` (a pinned graph) declares, and the fp32 run's `selection`."""
    declared = {i.name for i in session.get_inputs()}
    return {**{k: v for k, v in feeds.items() if k in declared}, **selection}


def selection_flips(own: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> int:
    """Tokens a step would select differently from the reference selections (per TopK and row,
    the size of the set difference)."""
    flips = 0
    for name, ref in reference.items():
        mine = own[_own(name)].reshape(-1, ref.shape[-1])
        for a, b in zip(mine, ref.reshape(-1, ref.shape[-1])):
            flips += len(set(b.tolist()) - set(a.tolist()))
    return flips


def lowered_weights(model: onnx.ModelProto, bundle: Bundle, dtype: str, lower: set[str],
                    groups: dict[str, str]) -> dict[str, np.ndarray]:
    """The stored float weights read by nodes of the lowered groups, rounded to `dtype`."""
    read = {x for i, n in enumerate(model.graph.node) if groups.get(n.name or f"node{i}") in lower
            and node_part(n) is None for x in n.input}
    return {name: round_to(array, dtype) for name, array in bundle.weights.items()
            if name in read and array.dtype == np.float32}


def _polygraphy_compare(reference: dict[str, np.ndarray], other: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
    """Per output: Polygraphy's max/mean absolute and relative difference."""
    # optional dependency (the `precision` extra)
    from polygraphy.comparator import CompareFunc, Comparator, RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    results = RunResults([("fp32", [IterationResult(reference, runner_name="fp32")]),
                          (dtype, [IterationResult(other, runner_name=dtype)])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(
            check_error_stat="max", infinities_compare_equal=False))
    first = accuracy.lst[0]
    iterations = first[1] if isinstance(first, tuple) else next(iter(first.values()))
    return {name: {"max_abs": float(r.max_absdiff), "mean_abs": float(r.mean_absdiff), "max_rel": float(r.max_reldiff),
                   "mean_rel": float(r.mean_reldiff)} for name, r in iterations[0].items()}


@dataclass
class _GraphRuns:
    """One step graph's analysis: the graph, its layer groups, what is watched and compared, its
    TopK selections (`selection_indices`), and the fp32 / all-lowered sessions."""

    model: onnx.ModelProto
    groups: dict[str, str]
    floats: set[str]
    lower: list[str]
    watched: list[str]
    owner: dict[str, str]
    outputs: list[str]
    picks: list[str]
    #: sessions of the fp32 graph (also outputting `watched` and the selections) and of the graph
    #: with every group in `lower` lowered (pinned)
    ref_session: Any = None
    low_session: Any = None

    def lowered_session_model(self, dtype: str, lower: set[str]) -> onnx.ModelProto:
        """The graph with the groups `lower` lowered to `dtype`, its selection pinned (`pinned`)."""
        return pinned(lowered(self.model, dtype, lower, self.groups, self.floats), self.picks)


class _Group:
    def __init__(self) -> None:
        self.lo, self.hi = np.inf, -np.inf
        self.max_abs = 0.0
        self.mean_abs: list[float] = []
        self.nonfinite = 0
        self.isolated = 0.0

    def to_dict(self, limit: float) -> dict[str, Any]:
        absmax = max(abs(self.lo), abs(self.hi)) if np.isfinite(self.lo) else 0.0
        return {"fp32_min": float(self.lo), "fp32_max": float(self.hi), "fp32_absmax": float(absmax),
                "headroom": float(limit / absmax) if absmax else None, "max_abs_err": self.max_abs,
                "mean_abs_err": float(np.mean(self.mean_abs)) if self.mean_abs else 0.0,
                "nonfinite": self.nonfinite, "isolated_step_err": self.isolated}


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def analyse(folder: str | Path, config: PrecisionConfig | None = None) -> dict[str, Any]:
    """The precision report of a bundle (module docstring) as a JSON-able dict."""
    config = config or PrecisionConfig()
    bundle = Bundle(folder)
    m = bundle.manifest
    if m.precision["dtype"] != "fp32":
        raise ValueError(f"bundle {folder} has {m.precision['dtype']} graphs; analyse its fp32 export instead")
    limit = DTYPES[config.dtype][1]
    steps = collect_step_inputs(bundle, config.calibration)
    latent_out = m.outputs[0].name
    groups_all: dict[str, _Group] = {}
    step_rows = []
    with GraphRunner(bundle, threads=config.threads) as runner:
        per_graph: dict[int, _GraphRuns] = {}
        for g in range(len(m.graphs)):
            model = bundle.graph_model(g)
            groups = layer_groups(model, m)
            floats = float_values(model)
            names = sorted(groups.values())
            lower = {x for x in names if x not in ("score", "gather", "scatter", "sampler")}
            watched = [n.output[0] for n in model.graph.node if n.op_type in WATCHED and node_part(n) is None
                       and n.output[0] in floats]
            owner = {n.output[0]: groups[n.name] for n in model.graph.node if n.output and n.name in groups}
            outputs = [o.name for o in model.graph.output]
            picks = selection_indices(model)
            runs = per_graph[g] = _GraphRuns(model, groups, floats, sorted(lower), watched, owner, outputs, picks)
            runs.ref_session = runner.session(with_outputs(with_outputs(model, watched), picks, TensorProto.INT64))
            runs.low_session = runner.session(with_outputs(runs.lowered_session_model(config.dtype, lower), watched),
                                              lowered_weights(model, bundle, config.dtype, lower, groups))
        step_refs: list[list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]] = []  # (outputs, selection)
        for s in steps:
            runs = per_graph[s.graph]
            outputs, picks, watched, owner = runs.outputs, runs.picks, runs.watched, runs.owner
            ref_sess, low_sess = runs.ref_session, runs.low_session
            declared = {i.name for i in ref_sess.get_inputs()}
            own = [_own(p) for p in picks]
            errs, refs, flips = [], [], 0
            for feeds in s.feeds:
                f = {k: v for k, v in feeds.items() if k in declared}
                ref = dict(zip(outputs + watched + picks, ref_sess.run(outputs + watched + picks, f)))
                selection = {p: ref[p] for p in picks}
                low_names = outputs + watched + own
                low = dict(zip(low_names, low_sess.run(low_names, _pinned_feeds(low_sess, f, selection))))
                flips += selection_flips(low, selection)
                refs.append(({k: ref[k] for k in outputs}, selection))
                stats = _polygraphy_compare({k: ref[k] for k in outputs + watched}, {k: low[k] for k in outputs + watched},
                                            config.dtype)
                errs.append((compare({k: low[k] for k in outputs}, {k: ref[k] for k in outputs}), stats[latent_out]))
                for name in watched:
                    grp = groups_all.setdefault(owner[name], _Group())
                    grp.lo, grp.hi = min(grp.lo, float(ref[name].min())), max(grp.hi, float(ref[name].max()))
                    grp.max_abs = max(grp.max_abs, stats[name]["max_abs"]) if np.isfinite(stats[name]["max_abs"]) \
                        else grp.max_abs
                    grp.mean_abs.append(stats[name]["mean_abs"])
                    grp.nonfinite += int((~np.isfinite(low[name])).sum())
            step_refs.append(refs)
            step_rows.append({"step": s.index, "graph": m.graphs[s.graph].file, "timestep": s.timestep,
                              "step_err": max(e[0] for e in errs), "selection_flips": flips,
                              "latent_max_abs": _finite(max(e[1]["max_abs"] for e in errs)),
                              "latent_mean_abs": _finite(float(np.mean([e[1]["mean_abs"] for e in errs]))),
                              "nonfinite_outputs": sum(int((~np.isfinite(v)).sum()) for v in low.values())})
        if config.isolate:
            _isolate(bundle, runner, steps, per_graph, step_refs, config, groups_all)
        keep = sorted(name for name, grp in groups_all.items()
                      if grp.nonfinite or (np.isfinite(grp.hi) and max(abs(grp.lo), abs(grp.hi)) > limit / config.overflow_margin)
                      or grp.isolated > config.tolerance)
        residual = _residual(bundle, runner, steps, per_graph, step_refs, config, set(keep))
    for row, err in zip(step_rows, residual):
        row["step_err_with_fp32_layers"] = err
    return {"bundle": str(folder), "dtype": config.dtype, "config": {**asdict(config),
                                                                      "calibration": config.calibration.describe()},
            "emulation": "weights and every transformer activation rounded to the format (Cast there and back) on "
                         "ONNX Runtime CPU; fp32 accumulation inside matmuls; mechanics and token cache fp32",
            "comparison": "polygraphy.comparator.CompareFunc.simple", "format_max": limit,
            "steps": step_rows, "layers": {k: groups_all[k].to_dict(limit) for k in sorted(groups_all, key=_order)},
            "keep_fp32": keep, "max_step_err": max(r["step_err"] for r in step_rows),
            "max_step_err_with_fp32_layers": max(residual) if residual else None}


def _order(name: str) -> tuple:
    digits = "".join(c for c in name if c.isdigit())
    return (int(digits) if digits else -1, name)


def _isolate(bundle, runner, steps, per_graph, step_refs, config, groups_all) -> None:
    """Per group: the worst step-output error when only that group is lowered (first batch; the
    fp32 run's token selection pinned)."""
    for g, runs in per_graph.items():
        for grp in runs.lower:
            sess = runner.session(runs.lowered_session_model(config.dtype, {grp}),
                                  lowered_weights(runs.model, bundle, config.dtype, {grp}, runs.groups))
            for s, refs in zip(steps, step_refs):
                if s.graph != g:
                    continue
                ref, selection = refs[0]
                low = dict(zip(runs.outputs, sess.run(runs.outputs, _pinned_feeds(sess, s.feeds[0], selection))))
                err = compare(low, ref)
                target = groups_all.setdefault(grp, _Group())
                target.isolated = max(target.isolated, err if np.isfinite(err) else float("inf"))


def _residual(bundle, runner, steps, per_graph, step_refs, config, keep: set[str]) -> list[float]:
    """Per step, the output error with every group lowered but `keep` (first batch)."""
    sessions = {}
    out = []
    for s, refs in zip(steps, step_refs):
        runs = per_graph[s.graph]
        if s.graph not in sessions:
            chosen = set(runs.lower) - keep
            sessions[s.graph] = runner.session(runs.lowered_session_model(config.dtype, chosen),
                                               lowered_weights(runs.model, bundle, config.dtype, chosen, runs.groups))
        sess = sessions[s.graph]
        ref, selection = refs[0]
        low = dict(zip(runs.outputs, sess.run(runs.outputs, _pinned_feeds(sess, s.feeds[0], selection))))
        out.append(compare(low, ref))
    return out


def markdown(report: dict[str, Any]) -> str:
    d = report["dtype"]
    lines = [f"# Precision report: {d} vs fp32", "", f"Bundle `{report['bundle']}`; {report['emulation']}.",
             f"Calibration: {report['config']['calibration']['batches']} batch(es) from seed "
             f"{report['config']['calibration']['seed']}; comparison: {report['comparison']}.", "",
             f"**Layers that must stay fp32**: {', '.join(report['keep_fp32']) or 'none'} "
             f"(step output error {report['max_step_err']:.3g} with everything lowered, "
             f"{report['max_step_err_with_fp32_layers']:.3g} with these kept fp32; tolerance "
             f"{report['config']['tolerance']:g}).", "",
             "## Per step", "", "| step | graph | timestep | step output err | latent max abs | latent mean abs | Inf/NaN |"
             " tokens selected differently | err with fp32 layers |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["steps"]:
        lines.append(f"| {r['step']} | {r['graph']} | {r['timestep']:.0f} | {r['step_err']:.3g} | {r['latent_max_abs']} | "
                     f"{r['latent_mean_abs']} | {r['nonfinite_outputs']} | {r['selection_flips']} | "
                     f"{r['step_err_with_fp32_layers']:.3g} |")
    lines += ["", "## Per layer", "", f"| layer | fp32 min | fp32 max | headroom to {d} max | max abs err | mean abs err |"
              " Inf/NaN | step err, this layer alone lowered | stays fp32 |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in report["layers"].items():
        head = f"{r['headroom']:.3g}x" if r["headroom"] else "-"
        lines.append(f"| {name} | {r['fp32_min']:.4g} | {r['fp32_max']:.4g} | {head} | {r['max_abs_err']:.3g} | "
                     f"{r['mean_abs_err']:.3g} | {r['nonfinite']} | {r['isolated_step_err']:.3g} | "
                     f"{'**yes**' if name in report['keep_fp32'] else ''} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """report.json and report.md in `out`, written to a temporary folder renamed when complete."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "precision.json").write_text(json.dumps(report, indent=1))
    (tmp / "precision.md").write_text(markdown(report))
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="an fp32 bundle folder (dsexport)")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--out", required=True, help="report folder (precision.json, precision.md)")
    p.add_argument("--calibration-batches", type=int, default=1)
    p.add_argument("--calibration-seed", type=int, default=CalibrationConfig.seed)
    p.add_argument("--tolerance", type=float, default=PrecisionConfig.tolerance)
    p.add_argument("--no-isolate", action="store_true", help="skip the one-group-at-a-time runs (large models)")
    p.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    try:
        config = PrecisionConfig(dtype=args.dtype, tolerance=args.tolerance, isolate=not args.no_isolate,
                                 threads=args.threads,
                                 calibration=CalibrationConfig(batches=args.calibration_batches, seed=args.calibration_seed,
                                                               threads=args.threads))
        report = analyse(args.bundle, config)
    except (BundleError, BackendError, ValueError, FileNotFoundError) as e:
        print(f"dscalibrate precision: error: {e}", file=sys.stderr)
        return 2
    write_report(report, args.out)
    print(markdown(report).split("\n## Per step")[0])
    return 0
