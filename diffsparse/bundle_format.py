"""The bundle's layout on disk and the rules every writer and reader of a bundle share.

`dsexport` writes a bundle and the runtime reads it; neither imports the other. What both must
agree on lives here (the schema of `manifest.json` is in diffsparse/manifest.py):

* file names: the manifest, the shared weights, the step graphs, the universal step
  graph and the TensorRT engines (one folder per TensorRT version + GPU model: `engine_key`);
* the sparsity pattern each computed step runs (`step_graph_indices`; a skipped step runs no
  graph: the sampler plan folds it into the step before, diffsparse/schedule.py): steps with the
  same K(t, l) share a pattern (one PyTorch module, one TensorRT profile), numbered in order of first use. The bundle's
  graph files go one step further: one per (pattern, cache entries the step writes), export/prune.py;
  the manifest's `steps` say which file each step runs;
* whether a bundle carries the layer cache (`needs_layer_cache`);
* which cache entries each step must write (`step_cache_writes`): export prunes its graphs to
  them (export/prune.py) and the runtime refuses a bundle whose steps would read a stale entry
  (runtime/bundle.py);
* which of a graph's cache writes may go to the buffer its input came from (`in_place_writes`):
  a token scatter then writes K rows instead of copying the whole entry first.

A bundle folder::

    manifest.json
    weights.bin                         every weight once; graphs name it as ONNX external data
    step_000.onnx, step_001.onnx, ...   one graph per (K pattern, cache entries written)
    universal.onnx                      (with engines) every layer's K a dynamic carrier length
    engines/<engine key>/universal.plan (with engines) one TensorRT engine, a profile per step
    engines/<engine key>/timing.cache
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Sequence

import onnx
import torch

from diffsparse.cache_layout import output_name
from diffsparse.schedule import Schedule

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.bin"
UNIVERSAL_FILE = "universal.onnx"
ENGINES_DIR = "engines"


def graph_file(index: int) -> str:
    """File name of the bundle's `index`-th step graph."""
    return f"step_{index:03d}.onnx"


def engine_file(key: str) -> str:
    return f"{ENGINES_DIR}/{key}/universal.plan"


def timing_cache_file(key: str) -> str:
    return f"{ENGINES_DIR}/{key}/timing.cache"


def step_graph_indices(schedule: Schedule) -> list[int]:
    """For each computed step (`Schedule.computed_steps`: a skipped step runs nothing), the index
    of the graph it runs: its position among the schedule's distinct step signatures
    (`Schedule.distinct_signatures`, in order of first use)."""
    signatures = schedule.distinct_signatures()
    return [signatures.index(schedule.step_signature(t)) for t in schedule.computed_steps]


def step_cache_writes(step_graphs: Sequence[int], reads: Sequence[set[str]],
                      changes: Sequence[set[str]]) -> list[frozenset[str]]:
    """Per step, the cache entries it must output: a backward liveness pass. An entry is live after
    step t if some later step reads it before a step changes it again; step t writes the entries
    it changes that are live after it. `step_graphs[t]` is the graph of step t; `reads[g]` /
    `changes[g]` what graph g reads / changes."""
    writes: list[frozenset[str]] = []
    live: set[str] = set()   # after the step being visited: read later before being changed again
    for g in reversed(step_graphs):
        writes.append(frozenset(changes[g] & live))
        live = reads[g] | (live - changes[g])
    return writes[::-1]


#: operators that read only their input's shape, never its values
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def in_place_writes(graph: onnx.GraphProto, names: Iterable[str]) -> frozenset[str]:
    """The cache entries among `names` whose updated value (output `next.<name>`) a backend may
    write into the very buffer that holds the input `<name>`.

    A partial step updates an entry with a token scatter (paper eq. 4): output = ScatterND(input,
    rows, fresh). With separate buffers ONNX Runtime first copies all N rows of the input into the
    output and then writes the K fresh ones, a cost of the whole (R, N, D) entry that K does not
    shrink; its ScatterND kernel skips the copy when input and output are one buffer. That is safe
    when nothing reads the input's values after the scatter ran: the output must come straight from
    a ScatterND whose data input is the graph input (and not also its indices or updates), and every
    other node reading that input's values must be an ancestor of the scatter, so that it runs first
    in any valid order (the value-norm score reads the values it then scatters into). Shape-only
    readers (`SHAPE_ONLY_OPS`) do not count; a graph with subgraphs (If, Loop: implicit readers)
    gets none."""
    nodes = list(graph.node)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
        return frozenset()
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    graph_inputs = {i.name for i in graph.input}
    graph_outputs = {o.name for o in graph.output}
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(nodes):
        if node.op_type not in SHAPE_ONLY_OPS:
            for name in node.input:
                readers.setdefault(name, set()).add(i)
    safe = set()
    for name in names:
        scatter = producer.get(output_name(name))
        if scatter is None or name not in graph_inputs or output_name(name) not in graph_outputs:
            continue
        node = nodes[scatter]
        if node.op_type != "ScatterND" or list(node.input).count(name) != 1 or node.input[0] != name:
            continue
        others = readers.get(name, set()) - {scatter}
        if not others or others <= _ancestors(nodes, scatter, producer):
            safe.add(name)
    return frozenset(safe)


def _ancestors(nodes: Sequence[onnx.NodeProto], start: int, producer: dict[str, int]) -> set[int]:
    """Positions of the nodes the node at `start` depends on, directly or not."""
    seen: set[int] = set()
    stack = [start]
    while stack:
        for name in nodes[stack.pop()].input:
            i = producer.get(name)
            if i is not None and i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def needs_layer_cache(schedule: Schedule, tensorrt: bool = False) -> bool:
    """Whether a bundle's graphs carry the layer cache. A schedule that never reuses a token runs
    the plain model, without it; but the universal step graph a TensorRT engine is built from
    always carries it (export/universal.py), so a bundle with engines keeps it."""
    return schedule.reuses_tokens or tensorrt


class EngineUnavailable(RuntimeError):
    """No TensorRT or no CUDA GPU here, so no engine key can be named."""


def engine_key(trt_version: str, gpu_name: str, capability: tuple[int, int]) -> str:
    """The folder engines built by one TensorRT version for one GPU model live in: an engine runs
    only on the TensorRT version and GPU model it was built with."""
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return f"trt-{trt_version}-{gpu}-sm{capability[0]}{capability[1]}"


def current_engine_key() -> str:
    """The engine key of this machine's TensorRT and GPU (EngineUnavailable without them)."""
    if importlib.util.find_spec("tensorrt") is None:
        raise EngineUnavailable("TensorRT is not installed: pip install tensorrt polygraphy "
                                "(on a machine with an NVIDIA GPU)")
    if not torch.cuda.is_available():
        raise EngineUnavailable("TensorRT engines need a CUDA GPU visible to torch")
    import tensorrt as trt  # optional heavy dependency, present on GPU machines only

    return engine_key(trt.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())
