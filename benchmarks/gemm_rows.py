"""Benchmark: ONNX Runtime CPU matmul throughput by the number of token rows, for the weight shapes
of one DiT block (DiT-XL/2 by default: width 1152, MLP 4608). A partial step multiplies K selected
tokens (2·K rows with guidance) by the same weights a dense step multiplies all N by; where fewer
rows run at a lower rate, a partial step costs more than its MACs say. `--layers L` cycles through
L weight matrices of each shape, as a step does through its blocks (28 in DiT-XL/2: 0.6 GB of the
MLP's weights, far more than the CPU's cache, so each call streams its weight from memory); with
`--layers 1` the weight stays in cache. Rows are interleaved within each round (median of
`--runs`); not a test.

    python benchmarks/gemm_rows.py --threads 2 --runs 7 --layers 1 28 --json benchmarks/results/gemm_rows_dit_xl.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
from diffsparse.runtime.backends.ort import import_ort, thread_options
from diffsparse.runtime.profile import host_info
from onnx import TensorProto, helper, numpy_helper

from interleave import interleave_parser


def matmul_model(k_in: int, k_out: int, rng: np.random.Generator) -> onnx.ModelProto:
    """x (2, M, k_in) @ W (k_in, k_out): a step's linear layer on both guidance rows."""
    weight = (rng.standard_normal((k_in, k_out)) * 0.02).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, None, k_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None, k_out])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def main() -> None:
    p = interleave_parser(__doc__)
    p.add_argument("--width", type=int, default=1152)
    p.add_argument("--mlp", type=int, default=4608)
    p.add_argument("--tokens", type=int, nargs="+", default=[32, 64, 96, 128, 192, 256],
                   help="K values (rows per guidance half) to time (default %(default)s)")
    p.add_argument("--calls", type=int, default=28, help="calls per measurement (default %(default)s)")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 28],
                   help="distinct weight matrices cycled through, one run each (default %(default)s)")
    args = p.parse_args()
    ort = import_ort()
    rng = np.random.default_rng(args.seed)
    opts = ort.SessionOptions()
    thread_options(ort, opts, args.threads, shared=True)   # one pool for all sessions, as the runtime runs steps
    shapes = {"qkv/out": (args.width, args.width), "mlp up": (args.width, args.mlp), "mlp down": (args.mlp, args.width)}
    result = {"host": host_info(), "runs": args.runs, "threads": args.threads, "calls": args.calls, "by_layers": {}}
    for layers in args.layers:
        result["by_layers"][str(layers)] = by_shape = {}
        for name, (k_in, k_out) in shapes.items():
            sessions = [ort.InferenceSession(matmul_model(k_in, k_out, rng).SerializeToString(), opts)
                        for _ in range(layers)]
            inputs = {k: rng.standard_normal((2, k, k_in)).astype(np.float32) for k in args.tokens}
            for session in sessions:
                for x in inputs.values():
                    session.run(None, {"x": x})   # warm-up (and the weight packing)
            seconds: dict[int, list[float]] = {k: [] for k in args.tokens}
            for r in range(args.runs):
                order = args.tokens[r % len(args.tokens):] + args.tokens[:r % len(args.tokens)]
                for k in order:
                    t = time.perf_counter()
                    for call in range(args.calls):
                        sessions[call % layers].run(None, {"x": inputs[k]})
                    seconds[k].append((time.perf_counter() - t) / args.calls)
            rates = {k: 2 * k * k_in * k_out / statistics.median(s) / 1e9 for k, s in seconds.items()}
            best = max(rates.values())
            by_shape[name] = {"k_in": k_in, "k_out": k_out,
                              "by_tokens": {str(k): {"ms": 1e3 * statistics.median(seconds[k]), "gmacs_per_s": rates[k],
                                                     "of_best": rates[k] / best} for k in args.tokens}}
            print(f"{layers:2d} weights, {name:9s} ({k_in}x{k_out}): "
                  + "  ".join(f"K={k}: {rates[k]:.0f} GMAC/s ({rates[k] / best:.2f})" for k in args.tokens))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
