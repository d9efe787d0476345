"""PyTorch backend: the same token-cached step modules that are exported, over static buffers.

Two modes:
  * eager (`static=False`): each step's outputs become the next step's inputs. This is how
    token-cache research code runs, and the reference the exported graphs are checked against.
  * static (default): every tensor a step reads or writes lives in preallocated buffers. The latent
    and the cache are ping-ponged between two sets (a step reads one set and writes the other,
    never the same buffer in and out); a step's few constants (timestep, sampler coefficients,
    guidance scale) go to the device asynchronously from pinned host buffers, and the batch's
    conditioning once. Nothing is copied to the host and nothing waits for the device between the
    first and the last step.
    On CUDA each (distinct step graph, ping-pong parity) is captured once as a CUDA graph and
    replayed (`cuda_graphs=True`): static shapes per step are what make capture possible.

The step modules (and the model's weights) are shared; the buffers, pinned staging memory and
captured graphs of one generation are a `TorchContext`. Without CUDA graphs several contexts may
run from several threads at once (inference only reads the modules); with CUDA graphs one context
runs at a time (`max_contexts`).

`dtype` "bfloat16"/"float16" runs the transformer under autocast (matmuls in low precision); the
latent, the sampler update and the stored cache stay float32; "float32" is the reference.

`compile=True` runs each step module through `torch.compile` (whole graph, static shapes: one
compilation per distinct step graph, on its first call). A token-cached step is many small ops
per layer (selection, gather, scatter, scores, cache writes); on a GPU at small batch each is a
kernel launch of a few µs whatever K is, so a partial step launched more kernels than a dense one
and cost more (H200, DiT-XL/2 at 256²: README "Measured", On a GPU). Compilation fuses them. It
is checked against the uncompiled modules on the CPU (tests); its speed on a GPU is not yet measured.
"""

from __future__ import annotations

import functools
import inspect
import logging
import shutil

import numpy as np
import torch

from diffsparse.bundle_format import needs_layer_cache
from diffsparse.models.base import ModelSpec
from diffsparse.runtime.backends.base import Backend, BackendContext, BackendError, check_latent
from diffsparse.schedule import Schedule

log = logging.getLogger(__name__)
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: the backend's ways to run steps, by name, as keyword arguments of TorchBackend / Pipeline.from_spec:
#: eager (outputs become the next inputs, as research code runs), static (ping-pong buffers, no host
#: sync between steps), graphed (static + CUDA graphs), compiled (graphed, or static on the CPU, over
#: steps run through torch.compile). The benchmarks compare them by these names.
MODES = {"eager": dict(static=False), "static": dict(static=True, cuda_graphs=False),
         "graphed": dict(static=True, cuda_graphs=True), "compiled": dict(static=True, compile=True)}

#: the compilers torch.compile's code generation calls: C++ for the CPU's kernels, C for Triton's launchers
COMPILERS = {"cpu": ("a C++ compiler (g++ or clang++)", ("c++", "g++", "clang++")),
             "cuda": ("a C compiler (gcc or clang)", ("cc", "gcc", "clang"))}


def compiler_missing(device_type: str) -> str:
    """'' when a compiler torch.compile needs on this device type is on PATH, else what to install."""
    what, names = COMPILERS.get(device_type, COMPILERS["cpu"])
    return "" if any(shutil.which(n) for n in names) else what


#: the shared per-code-object compile cache on a torch without isolate_recompiles (see compile_step)
OLD_TORCH_RECOMPILE_LIMIT = 256


def compile_step(step):
    """torch.compile for one step graph: whole graph (fullgraph: a graph break would leave Python
    between the pieces and most small ops unfused), static shapes (a step's are fixed).

    Every step graph runs the same code object (`TorchBackend._step_into`, the step module's
    forward), and by default torch.compile keeps one cache per code object, 8 entries at most: a
    process whose pipelines have more than 8 distinct step graphs in all would fail (fullgraph).
    So each call keeps its own (`isolate_recompiles`, torch 2.13); an older torch instead gets a
    larger shared limit."""
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        return torch.compile(step, fullgraph=True, dynamic=False, isolate_recompiles=True)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, OLD_TORCH_RECOMPILE_LIMIT)
    return torch.compile(step, fullgraph=True, dynamic=False)


def copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for every i, in few calls: the pairs that share a (source dtype,
    destination dtype) and have equal shapes and strides go through one `torch._foreach_copy_`
    per group, which CUDA runs as one multi-tensor kernel for many tensors at a time instead of a
    kernel each (a refresh step writes every cache entry: ~200 of them for DiT-XL/2); any other
    pair (a transposed view, a broadcast) is copied on its own."""
    groups: dict[tuple, tuple[list, list]] = {}
    for d, s in zip(dst, src, strict=True):
        if d.shape == s.shape and d.stride() == s.stride():
            ds, ss = groups.setdefault((s.dtype, d.dtype), ([], []))
            ds.append(d)
            ss.append(s)
        else:
            d.copy_(s)
    for ds, ss in groups.values():
        torch._foreach_copy_(ds, ss)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, spec: ModelSpec, schedule: Schedule, device: str = "cpu", dtype: str = "float32",
                 static: bool = True, cuda_graphs: bool | None = None, layer_cache: bool | None = None,
                 compile: bool = False) -> None:
        """layer_cache: whether the steps carry the layer cache; None = the bundle rule for this
        schedule (`bundle_format.needs_layer_cache`); a bundle's backend passes its manifest's.
        compile: torch.compile each step module (see the module's docstring)."""
        super().__init__()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("the torch backend was asked for CUDA but torch.cuda.is_available() is False: "
                               "install a CUDA build of torch on a machine with an NVIDIA GPU")
        if dtype not in DTYPES:
            raise BackendError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self._device = torch.device(device)
        if cuda_graphs and self._device.type != "cuda":
            raise BackendError("CUDA graphs need device='cuda'")
        spec.check_schedule(schedule)
        self.spec = spec
        self.schedule = schedule
        self.dtype = dtype
        self.static = static
        self.cuda_graphs = (self._device.type == "cuda" and static) if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not static:
            raise BackendError("CUDA graphs need static buffers (static=True)")
        missing = compiler_missing(self._device.type) if compile else ""
        if missing:
            raise BackendError(f"compile=True needs {missing} (torch.compile builds its kernels with it on "
                               f"{self._device.type}): install one, or run without compile")
        self.compile = compile
        self.input_specs = spec.step_inputs()
        self.latent_spec = self.input_specs[0]
        self.layer_cache = needs_layer_cache(schedule) if layer_cache is None else layer_cache
        #: refresh steps compute the conditioning of the partial steps they serve (diffsparse/conditioning.py)
        self.conditioning = spec.conditioning_plan(schedule) if self.layer_cache else None
        self.cache_layout = spec.cache_layout(schedule.selector, self.layer_cache, self.conditioning)
        self.cache_specs = self.cache_layout.tensors

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def max_contexts(self) -> int | None:
        """Contexts that may run at once: any number over eager or uncaptured static buffers (the
        step modules only read their weights), one with CUDA graphs (not yet supported: capture
        in one thread while another launches work on the device is invalid) or compiled modules
        (not yet supported: two threads' first calls would compile the same module at once)."""
        return 1 if self.cuda_graphs or self.compile else None

    @property
    def context_limit_reason(self) -> str:
        return " and ".join(why for why, on in (("with CUDA graphs", self.cuda_graphs),
                                                ("with torch.compile", self.compile)) if on)

    # ---- load -> allocate ----------------------------------------------------------------------
    def load(self) -> None:
        self.spec.model.to(self._device)
        # .to: a step's own buffers (the hoisted conditioning's tables) go where the model is
        self.modules = [self.spec.build_step(list(sig), self.schedule.selector, self.layer_cache, self.conditioning)
                        .to(self._device)
                        for sig in self.schedule.distinct_signatures()]
        # what a static step runs: the module and the writes of its outputs into the other buffer set
        self._runners = [functools.partial(self._step_into, graph) for graph in range(len(self.modules))]
        if self.compile:
            # static: the writes are compiled with the step, so they fuse into the kernels producing
            # the outputs instead of one copy kernel per cache entry (both buffer sets have the same
            # shapes, so one compilation serves both)
            if self.static:
                self._runners = [compile_step(r) for r in self._runners]
            else:
                self.modules = [compile_step(m) for m in self.modules]

    def new_context(self) -> TorchContext:
        return TorchContext(self)

    # ---- a step, for any context -----------------------------------------------------------
    def _step(self, graph: int, inputs: dict[str, torch.Tensor], src: list[torch.Tensor]) -> list[torch.Tensor]:
        args = [inputs[s.name] for s in self.input_specs[1:]]
        autocast = DTYPES[self.dtype]
        with torch.no_grad(), torch.autocast(self._device.type, dtype=autocast, enabled=autocast is not None):
            return list(self.modules[graph](src[0], *args, *src[1:]))

    def run_step_into(self, graph: int, inputs: dict[str, torch.Tensor], src: list[torch.Tensor],
                      dst: list[torch.Tensor]) -> None:
        """One step reading the latent and cache in `src` (and the step inputs in `inputs`) and
        writing them into `dst` (compiled as one with compile=True). The extension point of
        backends that run the step some other way over the same buffers (TensorRT: an engine);
        contexts and CUDA-graph capture call it."""
        self._runners[graph](inputs, src, dst)

    def _step_into(self, graph: int, inputs: dict[str, torch.Tensor], src: list[torch.Tensor],
                   dst: list[torch.Tensor]) -> None:
        copy_all(dst, self._step(graph, inputs, src))  # casts low-precision outputs back to the float32 buffers

    def _capture(self, graph: int, inputs: dict[str, torch.Tensor], src: list[torch.Tensor], dst: list[torch.Tensor]):
        """Capture one step (reading `src`, writing `dst`) as a CUDA graph. The step runs once on
        a side stream first (warm-up, as torch.cuda.graphs requires); it writes only `dst`, which
        the replay that follows overwrites, so the warm-up changes no result."""
        stream = torch.cuda.Stream(self._device)
        stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(stream):
            self.run_step_into(graph, inputs, src, dst)
        torch.cuda.current_stream(self._device).wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            self.run_step_into(graph, inputs, src, dst)
        log.info("captured step graph %d as a CUDA graph", graph)
        return cuda_graph

    def synchronize(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)


class TorchContext(BackendContext):
    """One generation's buffers over a TorchBackend's shared step modules: the ping-pong latent
    and cache, the step's other inputs, pinned host staging buffers and (CUDA graphs) the steps
    captured over these buffers."""

    def __init__(self, backend: TorchBackend) -> None:
        self.backend = b = backend
        dev = b._device

        def state():
            return [torch.zeros(b.latent_spec.shape, device=dev)] + [
                torch.zeros(s.shape, dtype=s.torch_dtype, device=dev) for s in b.cache_specs]

        self._sets = [state(), state()]
        self._src = 0
        # the step's other inputs, filled on the device from per-run tables or per-batch values
        self._inputs = {s.name: torch.zeros(s.shape, dtype=s.torch_dtype, device=dev) for s in b.input_specs[1:]}
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pinned: dict[tuple[int, str], torch.Tensor] = {}
        self._eager_state: list[torch.Tensor] | None = None
        self._step_no = 0
        self._last_fed: dict[str, np.ndarray] = {}

    def start(self, latent: np.ndarray) -> None:
        b = self.backend
        latent = torch.from_numpy(check_latent(latent, b.latent_spec))
        self._step_no = 0
        self._last_fed = {}
        if not b.static:
            self._eager_state = [latent.to(b._device)] + [t.zero_() for t in self._sets[0][1:]]
            return
        self._src = 0
        for buffers in self._sets:
            for t in buffers[1:]:
                t.zero_()
        self._sets[0][0].copy_(latent)

    def _host(self, step_no: int, name: str, value: np.ndarray) -> torch.Tensor:
        """A host tensor holding `value`: on CUDA a pinned buffer per (step, input), so the copy
        to the device is truly asynchronous (from pageable memory it would wait for the device)
        and no buffer is rewritten while an earlier copy from it may still be pending."""
        host = torch.as_tensor(np.asarray(value), dtype=self._inputs[name].dtype)
        if self.backend._device.type != "cuda":
            return host
        key = (step_no, name)
        pinned = self._pinned.get(key)
        if pinned is None or pinned.shape != host.shape:
            pinned = self._pinned[key] = torch.empty(host.shape, dtype=host.dtype).pin_memory()
        pinned.copy_(host)
        return pinned

    def run_step(self, graph: int, feeds: dict[str, np.ndarray]) -> None:
        b = self.backend
        if not b.static:
            inputs = {n: torch.as_tensor(np.asarray(v), dtype=self._inputs[n].dtype).to(b._device)
                      for n, v in feeds.items()}
            # stored as the static buffers store them (float32 latent and cache under autocast):
            # otherwise low-precision outputs would feed the next step and eager would drift from static
            self._eager_state = [o.to(buf.dtype) for o, buf in zip(b._step(graph, inputs, self._eager_state), self._sets[0])]
            return
        for name, value in feeds.items():
            # the batch's conditioning is the same array at every step: uploaded once
            if self._last_fed.get(name) is value:
                continue
            self._inputs[name].copy_(self._host(self._step_no, name, value), non_blocking=True)
            self._last_fed[name] = value
        self._step_no += 1
        src, dst = self._sets[self._src], self._sets[1 - self._src]
        if b.cuda_graphs:
            key = (graph, self._src)
            if key not in self._graphs:
                self._graphs[key] = b._capture(graph, self._inputs, src, dst)
            self._graphs[key].replay()
        else:
            b.run_step_into(graph, self._inputs, src, dst)
        self._src = 1 - self._src

    def _current(self) -> list[torch.Tensor]:
        return self._eager_state if not self.backend.static else self._sets[self._src]

    def latent(self) -> np.ndarray:
        return self._current()[0].detach().float().cpu().numpy().copy()

    def cache(self) -> dict[str, np.ndarray]:
        return {s.name: c.detach().cpu().numpy().copy() for s, c in zip(self.backend.cache_specs, self._current()[1:])}

    def synchronize(self) -> None:
        self.backend.synchronize()
