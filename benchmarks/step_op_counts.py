"""Benchmark: how many operators each denoising step runs — the fixed cost of a partial step is
mostly many small ops (token scores, index plumbing, scatters), so their count is what a change to
the step's mechanics moves. Not a test; counts, not timings, so one run is exact.

  * ONNX Runtime: the nodes of each step graph after the graph optimisations the ORT backend
    applies (`CPU_DISABLED_OPTIMIZERS` off), i.e. the kernels one run of the step launches;
  * torch backend (static buffers, CPU): the aten ops each step calls directly (torch.profiler,
    views and other metadata-only ops left out), the calls a GPU launches kernels for.

A ToCa-style schedule at --ratio of the dense MACs (one full step, then partial steps), batch 1
with guidance; random weights:

    python benchmarks/step_op_counts.py --model dit-tiny --json out/op_counts.json
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.profiler import ProfilerActivity, profile

from diffsparse.builtin_schedules import dense_schedule, toca_schedule
from diffsparse.bundle_format import step_graph_indices
from diffsparse.export.bundle import ExportConfig, export_bundle
from diffsparse.models.zoo import make_spec
from diffsparse.runtime.backends.ort import CPU_DISABLED_OPTIMIZERS, import_ort, session_options
from diffsparse.runtime.bundle import Bundle
from diffsparse.runtime.pipeline import Pipeline

#: aten ops that may only make a new view or read metadata: counted only where they call an op that
#: does work (`.to` a new dtype, `.reshape` of a non-contiguous tensor copy; the same op can be free)
VIEW_OPS = frozenset(f"aten::{name}" for name in (
    "view", "reshape", "_reshape_alias", "_unsafe_view", "expand", "unsqueeze", "squeeze", "slice", "select",
    "transpose", "t", "permute", "alias", "as_strided", "unflatten", "chunk", "split", "detach", "lift_fresh",
    "empty", "empty_strided", "result_type", "to", "contiguous", "numpy_T"))


def ort_nodes(bundle: Bundle) -> list[int]:
    """Nodes of each step graph as ONNX Runtime runs it (optimised as the ORT backend loads it)."""
    ort = import_ort()
    weights = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in bundle.weights.items()}
    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(len(bundle.manifest.graphs)):
            opts = session_options()  # on the process's shared thread pool once one exists
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3  # no warning that the optimised file is for this machine only
            opts.optimized_model_filepath = str(Path(tmp) / f"opt{index}.onnx")
            for init in bundle.graph_model(index).graph.initializer:
                if init.name in weights:
                    opts.add_initializer(init.name, weights[init.name])
            ort.InferenceSession(str(bundle.graph_path(index)), opts, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))
            counts.append(len(onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node))
    return counts


def works(event) -> bool:
    """Whether a profiled aten op does work (launches a kernel on a GPU): any op outside `VIEW_OPS`,
    or one of them that called such an op."""
    if event.name not in VIEW_OPS:
        return True
    return any(works(child) for child in event.cpu_children if child.name.startswith("aten::"))


def torch_ops(spec, schedule, conditioning: dict) -> list[dict[str, int]]:
    """Per step of one generation on the torch backend: the aten ops it calls directly that do work
    (`works`), by name."""
    pipe = Pipeline.from_spec(spec, schedule, static=True)
    backend = pipe.backend
    run = backend.run_step_into
    steps: list[dict[str, int]] = []

    def counted(graph, *args):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(graph, *args)
        top = [e for e in prof.events() if e.name.startswith("aten::")
               and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
        steps.append(dict(collections.Counter(e.name for e in top if works(e))))

    backend.run_step_into = counted
    pipe.generate(conditioning=conditioning, seed=0)
    return steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit-tiny", help="a built-in model (random weights); default %(default)s")
    p.add_argument("--steps", type=int, default=5, help="denoising steps, the first one full")
    p.add_argument("--ratio", type=float, default=0.5, help="the schedule's target share of the dense MACs")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = make_spec(args.model, batch_size=1, guidance=True)
    schedule = toca_schedule(spec, args.steps, args.ratio, full_every=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        export_bundle(spec, schedule, Path(tmp) / "bundle", config=ExportConfig(verify=False))
        bundle = Bundle(Path(tmp) / "bundle")
        nodes = ort_nodes(bundle)
    conditioning = spec.example_conditioning(np.random.default_rng(0))
    ops = torch_ops(spec, schedule, conditioning)
    # a plain dense step, for the refresh-step rule (a full step of the sparse schedule costs about a
    # dense one): every step of the dense schedule runs the same graph
    dense_ops = torch_ops(spec, dense_schedule(spec, 1), conditioning)[0]
    partial = [sum(1 for k in keep if 0 < k < spec.num_tokens) for keep in schedule.keep]
    result = {"model": args.model, "steps": args.steps, "ratio": args.ratio, "full_steps": schedule.full_steps,
              "partial_layers_per_step": partial, "onnxruntime_nodes_per_graph": nodes,
              "graph_of_step": step_graph_indices(schedule),
              "torch_aten_ops_per_step": [sum(s.values()) for s in ops], "torch_aten_ops_by_name": ops,
              "torch_aten_ops_dense_step": sum(dense_ops.values()), "torch_aten_ops_dense_step_by_name": dense_ops}
    print(f"{args.model}: partial layers per step {partial}")
    print(f"  onnxruntime nodes per step graph: {nodes}")
    print(f"  torch aten ops per step:          {result['torch_aten_ops_per_step']} "
          f"(a plain dense step: {result['torch_aten_ops_dense_step']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
