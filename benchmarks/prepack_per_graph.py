"""Benchmark: what ONNX Runtime's weight pre-packing saves per step graph of a bundle (CPU).

For each graph, two sessions over the bundle's shared weights, one packing the matmul weights at
load (`session.disable_prepacking` 0) and one packing them on every call (1), run interleaved on
the same random inputs; medians. This is the gain `prepack="auto"` buys per packed copy
(runtime/backends/ort.py `prepack_weights`). Only two sessions are alive at a time. Not a test.

    python benchmarks/prepack_per_graph.py out/xl/bundle-sparse --runs 5 --json benchmarks/results/prepack_per_graph_dit_xl.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffsparse.runtime.backends.ort import CPU_DISABLED_OPTIMIZERS, import_ort
from diffsparse.runtime.bundle import Bundle
from diffsparse.runtime.profile import host_info

from diffsparse.export.onnx_export import sample_tensor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    ort = import_ort()
    bundle = Bundle(args.bundle)
    m = bundle.manifest
    weights = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in bundle.weights.items()}
    specs = {t.name: t for t in [*m.inputs, *m.cache.tensors]}
    generator = torch.Generator().manual_seed(0)

    def session(index: int, prepack: bool):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.enable_mem_pattern = False
        opts.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
        for init in bundle.graph_model(index).graph.initializer:
            if init.name in weights:
                opts.add_initializer(init.name, weights[init.name])
        return ort.InferenceSession(str(bundle.graph_path(index)), opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(CPU_DISABLED_OPTIMIZERS))

    rows = []
    for index, graph in enumerate(m.graphs):
        sessions = {packed: session(index, packed) for packed in (False, True)}
        feeds = {i.name: sample_tensor(specs[i.name], generator).numpy() for i in sessions[False].get_inputs()}
        times: dict[bool, list[float]] = {False: [], True: []}
        for packed in (False, True):   # warm-up
            sessions[packed].run(None, feeds)
        for _ in range(args.runs):
            for packed in (False, True):
                t0 = time.perf_counter()
                sessions[packed].run(None, feeds)
                times[packed].append(time.perf_counter() - t0)
        per_call, packed = (statistics.median(times[flag]) * 1e3 for flag in (False, True))
        rows.append({"graph": index, "gmacs": graph.macs / 1e9, "steps": m.steps_per_graph[index],
                     "packed_per_call_ms": per_call, "pre_packed_ms": packed, "saved_ms": per_call - packed})
        print(f"graph {index} ({graph.macs / 1e9:.1f} GMACs): packed per call {per_call:.0f} ms, "
              f"pre-packed {packed:.0f} ms, saved {per_call - packed:.0f} ms", flush=True)
        del sessions
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host_info(), "bundle": args.bundle, "runs": args.runs,
                                               "graphs": rows}, indent=1))


if __name__ == "__main__":
    main()
