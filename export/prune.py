"""Write only the cache entries a later step reads.

A step graph as traced returns every cache entry: the ones it recomputes and, for a layer it
skips (K = 0), the ones it carries over unchanged (Identity copies of whole (R, N, D) tensors).
Neither need be an output when no later step reads it, and a carried-over entry never needs to
be: the runtime keeps binding the buffer that holds its latest value (runtime/backends/ort.py).
So after export and verification each graph keeps only the outputs some step it serves must
write, and the nodes that compute nothing else are removed.

Which entries a step must write is a backward liveness pass over the schedule
(`diffsparse.bundle_format.step_cache_writes`, which the runtime's bundle check shares): an entry
is live after step t if some later step reads it before a step changes it again; step t writes
the entries it changes that are live after it; an entry it updates by a scatter the runtime may
write in place (`diffsparse.bundle_format.in_place_writes`) stays an output even when dead, which
costs nothing there and spares ONNX Runtime a copy of the whole entry. Steps that share a
sparsity pattern but must write different entries get their own copy of the graph (the last,
full step of a schedule writes nothing and runs as the plain dense step): pruning copies a traced
graph, it does not trace again.
"""

from __future__ import annotations

import onnx

from diffsparse.cache_layout import CacheLayout, output_name


def graph_cache_io(model: onnx.ModelProto, layout: CacheLayout) -> tuple[set[str], set[str]]:
    """(entries the graph reads, entries it changes): the cache inputs it declares (the exporter
    drops inputs a graph never reads), and the cache outputs that are not a copy of the same
    entry's input."""
    graph = model.graph
    declared = {i.name for i in graph.input}
    producer = {out: node for node in graph.node for out in node.output}
    reads, changes = set(), set()
    for name in layout.names:
        if name in declared:
            reads.add(name)
        node = producer.get(output_name(name))
        carried = node is not None and node.op_type == "Identity" and list(node.input) == [name]
        if not carried:
            changes.add(name)
    return reads, changes


def prune_outputs(model: onnx.ModelProto, keep: set[str]) -> onnx.ModelProto:
    """The model with only the graph outputs named in `keep`, without the nodes and initializers
    nothing kept depends on (in place; returned for convenience)."""
    graph = model.graph
    outputs = [o for o in graph.output if o.name in keep]
    needed = {o.name for o in outputs}
    kept_nodes = []
    for node in reversed(graph.node):  # ONNX graphs are topologically sorted
        if any(out in needed for out in node.output) or _has_subgraph(node):
            kept_nodes.append(node)
            needed.update(i for i in node.input if i)
    kept_nodes.reverse()
    del graph.output[:]
    graph.output.extend(outputs)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return model


def _has_subgraph(node: onnx.NodeProto) -> bool:
    """Nodes with subgraphs (If, Loop) may read outer values implicitly: always kept."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
