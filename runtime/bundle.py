"""A loaded bundle: the validated manifest, the shared weights mapped once, and the model spec.

Everything a backend allocates or runs comes from here: the ONNX Runtime backend reads the
stored tensors the graphs name (`weights`), the torch backend the model's own parameters
(`model_tensors`, from the manifest's parameter map) — both views of the same weights.bin.

What the manifest alone cannot vouch for is checked here (diffsparse/manifest.py checks the rest):
when the bundle is opened, that its ONNX graphs read external data only from the bundle's own
weights file, at the places the weights index says, and that the cache entries each graph outputs
are those its steps must write; when the spec is built, that the step signature, cache layout,
schedule and sampler plan the manifest records are what this diffsparse builds for its model. A
mismatch is one `BundleError` naming the field and the fix, never an error from deep inside
diffusers, numpy or ONNX Runtime.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx.helper import tensor_dtype_to_np_dtype

from diffsparse.bundle_format import in_place_writes, step_cache_writes
from diffsparse.cache_layout import OUTPUT_PREFIX, output_name
from diffsparse.conditioning import ConditioningPlan
from diffsparse.manifest import BundleError, Manifest, bundle_file, is_plain_file_name
from diffsparse.models.base import ModelSpec
from diffsparse.models.zoo import families, spec_from_config
from diffsparse.schedule import ScheduleError

log = logging.getLogger(__name__)
#: operators that make a step graph quantized (QDQ): present exactly when precision.dtype is int8
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: how far the sampler plan a manifest records may be from the one this diffsparse computes from
#: its config (float32 rounding; a plan off by more was edited, or comes from another sampler)
PLAN_RTOL, PLAN_ATOL = 1e-5, 1e-6


def recorded_conditioning(spec: ModelSpec, manifest: Manifest) -> ConditioningPlan | None:
    """The conditioning plan a bundle's graphs were exported with: the spec's rule
    (`ModelSpec.conditioning_plan`) where the manifest's cache holds the hoisted rows, else None
    (exported with hoisting off, or before it existed). The bundle check compares the whole
    layout, so a cache entry the rule would not give is refused there."""
    if not manifest.cache.hoists_conditioning:
        return None
    return spec.conditioning_plan(manifest.schedule, universal=manifest.universal is not None)


class Bundle:
    """Lazy: the manifest is read (checksums verified) and the graphs checked at construction;
    weights and spec (checked against the manifest) on use."""

    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder, verify=verify)
        self._check_graphs()

    def _error(self, problem: str) -> BundleError:
        return BundleError(f"bundle {self.folder}: {problem}; re-export the bundle with dsexport")

    def _load_graph(self, name: str) -> onnx.ModelProto:
        try:
            return onnx.load(str(self.folder / name), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends: whatever the file holds, it is no graph
            raise self._error(f"{name} is not a readable ONNX graph ({type(e).__name__})") from None

    def _check_external_data(self, name: str, model: onnx.ModelProto) -> None:
        """Every tensor the graph keeps outside itself is a stored tensor of the weights index, read
        from the bundle's weights file at the offset, length, dtype and shape the index gives: ONNX
        Runtime would otherwise read whatever file and bytes the graph names (`../x.bin`)."""
        index, weights_file = self.manifest.weights["index"], self.manifest.weights["file"]
        for tensor in _all_tensors(model.graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            ref = {e.key: e.value for e in tensor.external_data}
            where = f"{name}: initializer {tensor.name!r} keeps its data in {ref.get('location')!r}"
            if not is_plain_file_name(ref.get("location")):
                raise self._error(f"{where}, not a plain file name inside the bundle")
            if ref["location"] != weights_file:
                raise self._error(f"{where}, not the bundle's weights file {weights_file!r}")
            entry = index.get(tensor.name)
            try:
                stored = (int(ref.get("offset", 0)), int(ref.get("length", -1)),
                          np.dtype(tensor_dtype_to_np_dtype(tensor.data_type)).str, list(tensor.dims))
            except (ValueError, KeyError, TypeError):
                stored = None
            if entry is None or stored != tuple(entry):
                raise self._error(f"{where} at {ref.get('offset')}+{ref.get('length')}, which is not the weights "
                                  f"index's entry for it ({entry})")

    def _check_graphs(self) -> None:
        """Open every graph (without its weights): external data as `_check_external_data`; inputs
        and outputs among the manifest's; each graph outputs the cache entries its `cache_writes`
        lists; and each step outputs every entry a later step reads that its sparsity pattern
        changes (prune.py's liveness rule, with the entries written by any graph of the same
        pattern as what the pattern changes), so that no graph swapped for another of the same K
        feeds a later step a stale cache."""
        m = self.manifest
        known_inputs = {t.name for t in m.inputs} | set(m.cache.names)
        known_outputs = {t.name for t in m.outputs} | set(m.cache.output_names)
        reads, writes = [], []
        any_quantized = False
        self._graphs = [self._load_graph(g.file) for g in m.graphs]
        self._in_place: list[frozenset[str] | None] = [None] * len(self._graphs)
        for i, (g, model) in enumerate(zip(m.graphs, self._graphs)):
            self._check_external_data(g.file, model)
            inputs = {v.name for v in model.graph.input}
            outputs = [v.name for v in model.graph.output]
            unknown = sorted((inputs - known_inputs) | (set(outputs) - known_outputs))
            missing = sorted({t.name for t in m.outputs} - set(outputs))
            if unknown or missing:
                raise self._error(f"graphs[{i}] ({g.file}) has inputs/outputs the manifest does not list "
                                  f"({unknown[:3]}) or lacks its outputs ({missing})")
            written = [n for n in m.cache.names if output_name(n) in outputs]
            if g.cache_writes is not None and g.cache_writes != written:
                raise self._error(f"graphs[{i}].cache_writes lists {g.cache_writes[:3]}..., but {g.file} outputs "
                                  f"{[n.removeprefix(OUTPUT_PREFIX) for n in written][:3]}...")
            reads.append(inputs & set(m.cache.names))
            writes.append(set(written))
            quantized = any(node.op_type in QDQ_OPS for node in model.graph.node)
            any_quantized = any_quantized or quantized
            if quantized and m.precision["dtype"] != "int8":
                raise self._error(f"graphs[{i}] ({g.file}) is quantized (QDQ), but precision.dtype is "
                                  f"{m.precision['dtype']!r}")
        # an int8 bundle may keep a graph fp32 (a step reusing every layer has nothing to quantize), not all
        if m.precision["dtype"] == "int8" and not any_quantized:
            raise self._error("no graph is quantized, but precision.dtype is 'int8'")
        by_pattern: dict[tuple[int, ...], set[str]] = {}
        for g, w in zip(m.graphs, writes):
            by_pattern.setdefault(tuple(g.keep), set()).update(w)
        changes = [by_pattern[tuple(g.keep)] for g in m.graphs]
        required = step_cache_writes(m.step_graphs, reads, changes)
        for t in reversed(range(len(m.steps))):   # the last offending step first, as the pass meets it
            g = m.step_graphs[t]
            stale = required[t] - writes[g]
            if stale:
                raise self._error(f"steps[{t}].graph runs graphs[{g}], which does not output {sorted(stale)[:3]}: a "
                                  "later step would read a stale cache (the steps' graph indices were edited)")
        if m.universal is not None:
            self._check_external_data(m.universal["file"], self._load_graph(m.universal["file"]))

    @property
    def schedule(self):
        return self.manifest.schedule

    @property
    def num_steps(self) -> int:
        return self.manifest.schedule.num_steps

    def graph_path(self, index: int) -> Path:
        return self.folder / self.manifest.graphs[index].file

    def in_place_writes(self, index: int) -> frozenset[str]:
        """The cache entries the `index`-th graph may write into the buffer it read them from
        (`diffsparse.bundle_format.in_place_writes`: a token scatter then writes only its K rows)."""
        if self._in_place[index] is None:
            self._in_place[index] = in_place_writes(self._graphs[index].graph, self.manifest.cache.names)
        return self._in_place[index]

    def graph_model(self, index: int) -> onnx.ModelProto:
        """The `index`-th step graph without its weights, as read (and checked) when the bundle was
        opened: backends and profilers read its structure from here instead of parsing the file again."""
        return self._graphs[index]

    def _meta_spec(self) -> ModelSpec:
        """The spec the manifest describes, checked against it: the step signature, the cache
        layout, the schedule and the sampler plan must be what this diffsparse builds for the
        model (a corrupted or edited manifest otherwise runs with numbers its graphs never saw)."""
        m = self.manifest
        if families().get(m.diffusers_class) != m.family:
            raise self._error(f"family {m.family!r} and diffusers_class {m.diffusers_class!r} do not go together "
                              f"(supported: {families()})")
        try:
            spec = spec_from_config(m.family, m.diffusers_class, m.model_config, m.batch_size, m.guidance,
                                    m.sampler.config, m.spec_options, m.guidance_scale)
        except Exception as e:  # the diffusers constructor can fail any way on a config it was not written for
            raise self._error(f"its model_config / spec_options do not build a {m.diffusers_class} "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
        for what, expected, recorded in (("inputs", spec.step_inputs(), m.inputs),
                                         ("outputs", spec.step_outputs(), m.outputs)):
            if expected != recorded:
                diff = next((i for i, (a, b) in enumerate(zip(expected, recorded)) if a != b),
                            min(len(expected), len(recorded)))
                raise self._error(f"{what}[{diff}] is {recorded[diff] if diff < len(recorded) else 'missing'}, but "
                                  f"the model's step takes {expected[diff] if diff < len(expected) else 'nothing there'}")
        try:
            spec.check_schedule(m.schedule)
        except ScheduleError as e:
            raise self._error(f"its schedule does not fit its model: {e}") from None
        layout = spec.cache_layout(m.schedule.selector, m.layer_cache, recorded_conditioning(spec, m))
        if layout != m.cache:
            diff = next((i for i, (a, b) in enumerate(zip(layout.tensors, m.cache.tensors)) if a != b),
                        min(len(layout), len(m.cache)))
            raise self._error(f"cache[{diff}] is not the entry this diffsparse builds for its model and schedule "
                              f"({layout.tensors[diff] if diff < len(layout) else 'none'})")
        try:
            plan = spec.schedule_plan(m.schedule)   # skipped steps folded in
        except Exception as e:  # diffusers' scheduler, on settings it was not written for
            raise self._error(f"sampler.config does not plan {m.schedule.num_steps} steps ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
        for name in ("timesteps", "coefficients"):
            expected, recorded = getattr(plan, name), getattr(m.sampler, name)
            if expected.shape != recorded.shape or not np.allclose(recorded, expected, rtol=PLAN_RTOL, atol=PLAN_ATOL):
                raise self._error(f"sampler.{name} is not what sampler.config computes for the schedule's steps")
        return spec

    @cached_property
    def spec(self) -> ModelSpec:
        """The model's spec with its structure only (the model on the meta device)."""
        return self._meta_spec()

    @cached_property
    def conditioning(self) -> ConditioningPlan | None:
        """Which steps compute whose conditioning rows (diffsparse/conditioning.py), None where
        every step computes its own (`recorded_conditioning`)."""
        return recorded_conditioning(self.spec, self.manifest)

    def _views(self, mode: str) -> dict[str, np.ndarray]:
        """Every stored tensor as a view of one memory map (the index is validated by the manifest;
        the file's size is checked here, as a bundle opened without verify may have been cut)."""
        w = self.manifest.weights
        path = bundle_file(self.folder, w["file"])
        size = path.stat().st_size
        end = max((offset + length for offset, length, _, _ in w["index"].values()), default=0)
        if end > size:
            raise BundleError(f"{path} has {size} bytes, shorter than the manifest's index says ({end}); "
                              "re-export the bundle")
        if size == 0:  # nothing to map (numpy cannot map an empty file)
            return {name: np.zeros(shape, dtype=np.dtype(dtype)) for name, (_, _, dtype, shape) in w["index"].items()}
        raw = np.memmap(path, dtype=np.uint8, mode=mode)
        return {name: raw[offset:offset + length].view(np.dtype(dtype)).reshape(shape)
                for name, (offset, length, dtype, shape) in w["index"].items()}

    @cached_property
    def weights(self) -> dict[str, np.ndarray]:
        """Every stored tensor as a read-only view of one memory map of weights.bin (no copies)."""
        return self._views("r")

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The model's parameters and buffers by name, as views of a copy-on-write memory map of
        weights.bin (no copy is made unless a tensor is written to); transposed where the graphs
        store the transpose."""
        stored = self._views("c")
        out = {}
        for name, (key, transposed) in self.manifest.parameters.items():
            tensor = torch.from_numpy(stored[key])
            out[name] = tensor.T if transposed else tensor
        return out

    def model_spec(self) -> ModelSpec:
        """A spec whose model holds this bundle's own weights (a fresh model each call): what the
        torch backend runs. BundleError if the parameter map does not fit the model."""
        spec = self._meta_spec()
        assign_tensors(spec.model, self.model_tensors(), str(self.folder))
        if self.manifest.precision["dtype"] != "fp32":
            log.warning("bundle %s has %s step graphs; the model rebuilt from its weights (torch backend) runs its "
                        "fp32 parameters", self.folder, self.manifest.precision["dtype"])
        return spec


def _all_tensors(graph: onnx.GraphProto):
    """Every tensor a graph holds: initializers, sparse ones, and node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def assign_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Give a model built on the meta device its parameters and buffers (no copies)."""
    expected = dict(model.named_parameters())
    expected.update(model.named_buffers())
    persistent = set(model.state_dict(keep_vars=True))
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise BundleError(f"bundle {source}: its parameter map does not fit the model (missing {missing[:3]}, "
                          f"unknown {unknown[:3]}); re-export the bundle")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise BundleError(f"bundle {source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                              f"{tuple(expected[name].shape)}; re-export the bundle")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in dict(module.named_parameters(recurse=False)):
            setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            module.register_buffer(attr, tensor, persistent=name in persistent)
