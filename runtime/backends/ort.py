"""ONNX Runtime backend: one session per distinct step graph, one copy of the weights.

Weights: every session gets the same OrtValues through `SessionOptions.add_initializer`: T sessions
share one copy of the weights. Pre-packing (`prepack_weights`) trades memory for speed on the CPU:
through the Python API each session keeps its own packed copy of every matmul weight; sessions
made through the C API (`ort_capi`, `shares_prepacked_weights`: the default where the wheel's C
library loads) share one packed copy, and run with `CApiContext`. On the CPU the OrtValues are
views of one memory map of weights.bin;
on CUDA (onnxruntime-gpu) each weight is uploaded once as a device OrtValue, which ORT uses in
place when the initializer is planned on the same device (onnxruntime PR #5092).
Cache (per `OrtContext`, one per generation running at a time; the sessions and weights are
shared by all contexts): two preallocated buffers per entry (and for the latent) on the device,
bound with IO binding. A step reads each entry from the buffer holding its latest value and
writes the entries it outputs into the other one, which then holds the latest value: an entry a
graph does not output (export/prune.py: not read later, or carried over unchanged) costs nothing
and keeps its buffer. On the CPU an entry the graph updates by a token scatter that nothing else
reads after it (`Bundle.in_place_writes`) is written into the buffer it was read from: ONNX
Runtime's ScatterND then writes the K fresh rows and skips copying the other N - K (not on CUDA:
not yet run on a GPU). Every other output goes to a buffer no input of the step is bound to. On
CUDA the steps run without synchronising the stream after each one
(`disable_synchronize_execution_providers`); `synchronize` waits once.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Sequence

import numpy as np

from diffsparse.cache_layout import output_name
from diffsparse.runtime.backends import ort_capi
from diffsparse.runtime.backends.base import Backend, BackendContext, BackendError, check_latent
from diffsparse.runtime.backends.select import check_ort_device
from diffsparse.runtime.bundle import Bundle

log = logging.getLogger(__name__)


_ENV_ALLOCATOR = False
#: held while a backend sets up what is process-wide (the shared thread pool, the environment's
#: CPU arena) and creates its sessions: pipelines of two bundles may load from two threads at once
_PROCESS_SETUP = threading.RLock()
#: ONNX Runtime graph optimizers left off on the CPU. MatMulAddFusion rewrites a 3-D MatMul + Add as
#: Reshape -> Gemm -> Reshape; where the result is a graph output (every cache entry a step writes)
#: the last Reshape becomes a copy into the bound buffer. Without it the MatMul writes the output
#: in place and the bias Add is fused elsewhere: demo (ORT 1.32, 2 cores, interleaved medians of 5)
#: dense step 63 -> 60 ms, refresh step 82 -> 73 ms.
CPU_DISABLED_OPTIMIZERS = ("MatMulAddFusion",)
_GLOBAL_THREADS: int | None = None   # size of the process-wide intra-op pool, once created
#: "0" keeps a thread pool per session (with spinning off) instead of the process-wide one
SHARED_THREADS_ENV = "DIFFSPARSE_ORT_SHARED_THREADS"


def shared_threads_default() -> bool:
    return os.environ.get(SHARED_THREADS_ENV, "1") != "0"


def thread_options(ort, opts, threads: int | None, shared: bool) -> None:
    """How a step session gets its threads.

    shared (default): one intra-op thread pool for the whole process (ONNX Runtime's global thread
    pool; sessions set `use_per_session_threads = False`). With a pool per session, the threads
    of the step that just ran keep spinning while the next step's session runs on its own pool:
    on 2 cores that made a sparse bundle's refresh steps 1.3-1.9x and its partial steps up to 2x
    slower than alone (demo, interleaved medians of 5: 10 steps 683 -> 469 ms; the one-session
    dense bundle 685 -> 624 ms). The first backend of a process sizes the pool (threads None: one
    per core). ONNX Runtime then requires every session of the process to use it: other sessions
    must set `use_per_session_threads = False` (`session_options()` does).
    Not shared: a pool per session with spinning off, which avoids the contention but wakes
    threads per op (demo: 483 vs 755 ms, both slower than shared)."""
    global _GLOBAL_THREADS
    if not shared:
        if _GLOBAL_THREADS is not None:
            raise BackendError("this process already uses onnxruntime's shared thread pool; per-session "
                               f"threads are no longer possible in it (unset {SHARED_THREADS_ENV}=0 or use a new process)")
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return
    if _GLOBAL_THREADS is None:
        ort.capi._pybind_state.set_global_thread_pool_sizes(threads or 0, 1)
        _GLOBAL_THREADS = threads or 0
    elif (threads or 0) != _GLOBAL_THREADS:
        # (export verification, for one, creates the first sessions with the default)
        log.info("onnxruntime's thread pool of this process has %s threads; the %s asked for now is not used",
                 _GLOBAL_THREADS or "default", threads)
    opts.use_per_session_threads = False


#: prepack="auto" pre-packs while the packed copies of all sessions fit in this share of the
#: machine's physical memory
PREPACK_MEMORY_SHARE = 0.4
PREPACK_MODES = ("auto", "on", "off", "shared")


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def prepack_weights(mode: str, graph_steps: Sequence[int], weight_bytes: int, device: str = "cpu") -> list[bool]:
    """Which sessions of a bundle pre-pack their weights, one flag per step graph.

    ONNX Runtime's CPU matmuls (MLAS) work on weights packed into panels. Pre-packed, a session
    packs each constant weight once, when it loads, and keeps the packed copy; not pre-packed,
    every MatMul call packs its weight again. That repacking costs the weight's bytes per call
    whatever the number of rows, so it is a fixed cost per layer and step that a sparse step at K
    tokens does not shrink: DiT-XL/2 on 2 cores (ORT 1.32, 2 rows) — dense step 2.05 -> 1.60 s,
    a [128, 4608] x [4608, 1152] matmul at 0.83 of the dense one's efficiency -> 1.0. The price
    is a packed copy of the weights per session (ONNX Runtime's Python API cannot share packed
    weights across sessions), T copies for a bundle of T step graphs.
    graph_steps: how many steps run each graph. mode: "on", "off", or "auto": as many sessions as
    have their copies (weight_bytes each) fit in `PREPACK_MEMORY_SHARE` of physical memory, those
    that run the most steps first (ties: graph order), so a bundle too large to pack whole still
    packs part of it (DiT-XL/2 on 2 cores, 2026-12-03: 56-102 ms saved per step whose graph is
    packed, 8-16% of a partial step). Other devices than the CPU: always on (ONNX Runtime's GPU
    kernels do not pre-pack fp32 matmul weights)."""
    if mode not in PREPACK_MODES:
        raise BackendError(f"prepack must be one of {', '.join(PREPACK_MODES)}, got {mode!r}")
    graphs = len(graph_steps)
    if mode != "auto" or device != "cpu" or shares_prepacked_weights(mode, weight_bytes, device):
        return [mode != "off"] * graphs
    fits = int(PREPACK_MEMORY_SHARE * physical_memory() // max(1, weight_bytes))
    chosen = set(sorted(range(graphs), key=lambda g: -graph_steps[g])[:fits])
    return [g in chosen for g in range(graphs)]


def shares_prepacked_weights(mode: str, weight_bytes: int, device: str = "cpu") -> bool:
    """Whether a bundle's sessions pre-pack into one shared copy (`ort_capi`: ONNX Runtime's C API
    through the wheel's own C library; the Python API cannot share packed weights).

    "shared": always (BackendError with the fix where it cannot run: CPU only, and the wheel must
    ship its C library). "auto": on the CPU whenever the C library loads and one packed copy fits
    in `PREPACK_MEMORY_SHARE` of physical memory: every graph is then pre-packed for the memory of
    one (DiT-XL/2's 5-graph sparse bundle: 3.3 GB private after load instead of 5 x 2.9 GB).
    "on"/"off": never (a packed copy per session, or none)."""
    if mode not in PREPACK_MODES:
        raise BackendError(f"prepack must be one of {', '.join(PREPACK_MODES)}, got {mode!r}")
    if mode == "shared":
        if device != "cpu":
            raise BackendError(f"prepack='shared' runs on the CPU only (device {device!r}): use prepack='on'")
        if not ort_capi.available():
            raise BackendError("prepack='shared' needs the C library that the onnxruntime wheel ships "
                               "(onnxruntime/capi/libonnxruntime.*), which is not loadable here: reinstall "
                               "onnxruntime from PyPI, or use prepack='on' (a packed copy per session) or 'off'")
        return True
    return (mode == "auto" and device == "cpu" and weight_bytes <= PREPACK_MEMORY_SHARE * physical_memory()
            and ort_capi.available())


def uniform_prepack(mode: str, graph_steps: Sequence[int], weight_bytes: int, device: str = "cpu") -> str:
    """`mode` as "shared", "on" or "off" for every graph alike: "auto" is "shared" where it would share
    one packed copy, "on" where it would pack every graph, else "off". For measurements that must
    hold for every graph of a bundle (a latency table's entries come from different graphs of one
    calibration bundle)."""
    if shares_prepacked_weights(mode, weight_bytes, device):
        return "shared"
    return "on" if all(prepack_weights(mode, graph_steps, weight_bytes, device)) else "off"


def prepack_summary(flags: Sequence[bool], shared: bool = False) -> bool | str:
    """True (every session pre-packed, a copy each), "shared" (every session, one copy), False
    (none), or "<k> of <n> graphs"."""
    if shared:
        return "shared"
    if all(flags) or not any(flags):
        return all(flags)
    return f"{sum(flags)} of {len(flags)} graphs"


def session_options():
    """SessionOptions for any other ONNX Runtime session in a process that runs bundles: on the
    shared thread pool once one exists (ONNX Runtime refuses per-session threads then)."""
    ort = import_ort()
    opts = ort.SessionOptions()
    if _GLOBAL_THREADS is not None:
        opts.use_per_session_threads = False
    return opts


def share_cpu_allocator(ort) -> None:
    """Register one CPU arena in ORT's environment, used by every session that opts in, so the
    step sessions share activation memory instead of each keeping its own arena."""
    global _ENV_ALLOCATOR
    if not _ENV_ALLOCATOR:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _ENV_ALLOCATOR = True


def import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
        raise BackendError("onnxruntime is not installed: pip install onnxruntime "
                           "(or onnxruntime-gpu for CUDA; never both)") from e
    return ort


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None,
                 device_id: int = 0, profile_prefix: str | None = None, shared_threads: bool | None = None,
                 prepack: str = "auto") -> None:
        """threads: intra-op threads (None: one per core). shared_threads: one thread pool for the
        whole process (`thread_options`; None: the $DIFFSPARSE_ORT_SHARED_THREADS default, on).
        prepack: "auto", "on" or "off" (`prepack_weights`; `self.prepacked_graphs` says what was
        chosen per graph, `self.prepacked` in short: `prepack_summary`).
        profile_prefix: record ONNX Runtime's own per-node profile of every session (trace files
        `<prefix>_<graph>_*.json`, returned by `end_profiling`)."""
        self.shared_threads = shared_threads_default() if shared_threads is None else shared_threads
        super().__init__()
        self.profile_prefix = profile_prefix
        ort = import_ort()
        self.ort = ort
        self.bundle = bundle
        if device not in ("cpu", "cuda"):
            raise BackendError(f"onnxruntime device must be 'cpu' or 'cuda', got {device!r}")
        check_ort_device(device)
        self._device = device
        self.device_id = device_id
        self.threads = threads
        self.sessions: list = []
        m = bundle.manifest
        self.prepack = prepack
        #: one packed copy shared by all sessions, through ONNX Runtime's C API (`ort_capi`)
        self.shared_prepack = shares_prepacked_weights(prepack, int(m.weights["bytes"]), device)
        self.prepacked_graphs = prepack_weights(prepack, m.steps_per_graph, int(m.weights["bytes"]), device)
        self.prepacked = prepack_summary(self.prepacked_graphs, self.shared_prepack)
        self.inputs = {t.name: t for t in m.inputs}
        self.latent_spec = m.inputs[0]
        self.cache_specs = m.cache.tensors
        self.output_latent = m.outputs[0].name

    @property
    def device(self) -> str:
        return self._device

    @property
    def max_contexts(self) -> int | None:
        """Contexts that may run at once: any number on the CPU (sessions run concurrently with
        distinct IO bindings, tested); one on CUDA (not yet supported: untested there)."""
        return None if self._device == "cpu" else 1

    def _providers(self):
        if self._device == "cuda":
            return [("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _ortvalue(self, array: np.ndarray):
        if self._device == "cuda":
            return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self.device_id)
        return self.ort.OrtValue.ortvalue_from_numpy(array)

    def load(self) -> None:
        ort = self.ort
        with _PROCESS_SETUP:  # pipelines of other bundles may be loading in other threads
            if self.shared_prepack:
                self._load_capi_sessions()
            else:
                shared = {name: self._ortvalue(array) for name, array in self.bundle.weights.items()}
                self._shared = shared  # the sessions borrow these buffers: keep them alive
                if self._device == "cpu":
                    share_cpu_allocator(ort)
                self._load_sessions(ort, shared)
        # the exporter drops inputs a graph does not read (e.g. reuse counts of a full step), and
        # graphs output only the cache entries a later step reads
        self.written = [[s.name for s in self.cache_specs if output_name(s.name) in outs] for outs in self.outputs]
        self.in_place = [self.bundle.in_place_writes(i) if self._device == "cpu" else frozenset()
                         for i in range(len(self.sessions))]
        log.info("loaded %d onnxruntime sessions on %s (weights pre-packed: %s)", len(self.sessions),
                 self._device, self.prepacked)

    def _load_capi_sessions(self) -> None:
        """Sessions through ONNX Runtime's C API (`ort_capi`) that pre-pack into one process-wide
        container: every graph of every bundle of the same weights shares one packed copy."""
        weights = {name: ort_capi.Tensor(np.ascontiguousarray(array)) for name, array in self.bundle.weights.items()}
        self._shared = weights
        config = {"optimization.disable_specified_optimizers": ",".join(CPU_DISABLED_OPTIMIZERS)}
        self.declared, self.outputs = [], []
        for i in range(len(self.bundle.manifest.graphs)):
            path, graph = self.bundle.graph_path(i), self.bundle.graph_model(i).graph
            prefix = None if self.profile_prefix is None else f"{self.profile_prefix}_{i:03d}"
            try:
                self.sessions.append(ort_capi.Session(
                    str(path), {init.name: weights[init.name] for init in graph.initializer if init.name in weights},
                    ort_capi.shared_container(), threads=self.threads, config=config, profile_prefix=prefix))
            except ort_capi.CApiError as e:
                raise BackendError(f"onnxruntime could not load {path}: {e}") from e
            self.declared.append({t.name for t in graph.input})
            self.outputs.append({t.name for t in graph.output})

    def _load_sessions(self, ort, shared: dict) -> None:
        for i in range(len(self.bundle.manifest.graphs)):
            path = self.bundle.graph_path(i)
            graph = self.bundle.graph_model(i).graph
            opts = ort.SessionOptions()
            opts.add_session_config_entry("session.disable_prepacking", "0" if self.prepacked_graphs[i] else "1")
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self._device == "cpu":
                opts.add_session_config_entry("session.use_env_allocators", "1")
                # a memory pattern is one planned block per session, kept after its first run: with
                # one session per distinct step it grew a 6-graph dit-small bundle's run memory by
                # 37% (and the demo's dense one by 125 MB) at no measured speed gain
                opts.enable_mem_pattern = False
            thread_options(ort, opts, self.threads, self.shared_threads)
            if self.profile_prefix is not None:
                opts.enable_profiling = True
                opts.profile_file_prefix = f"{self.profile_prefix}_{i:03d}"
            for init in graph.initializer:
                if init.name in shared:
                    opts.add_initializer(init.name, shared[init.name])
            try:
                disabled = list(CPU_DISABLED_OPTIMIZERS) if self._device == "cpu" else []
                self.sessions.append(ort.InferenceSession(str(path), opts, providers=self._providers(),
                                                          disabled_optimizers=disabled))
            except Exception as e:
                raise BackendError(f"onnxruntime could not load {path}: {e}") from e
        self.declared = [{i.name for i in s.get_inputs()} for s in self.sessions]
        self.outputs = [{o.name for o in sess.get_outputs()} for sess in self.sessions]

    def run_once(self, graph: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one step graph on host arrays outside any generation -> every output of the graph by
        name (export verification and calibration). Inputs the graph does not read are ignored."""
        feeds = {n: np.ascontiguousarray(v, dtype=self.inputs[n].numpy_dtype) if n in self.inputs
                 else np.ascontiguousarray(v) for n, v in feeds.items() if n in self.declared[graph]}
        names = sorted(self.outputs[graph])
        if not self.shared_prepack:
            return dict(zip(names, self.sessions[graph].run(names, feeds)))
        shapes = {self.output_latent: self.latent_spec, **{output_name(s.name): s for s in self.cache_specs}}
        outputs = {n: ort_capi.Tensor(shapes[n].zeros()) for n in names}
        try:
            self.sessions[graph].run({n: ort_capi.Tensor(v) for n, v in feeds.items()}, outputs)
        except ort_capi.CApiError as e:
            raise BackendError(str(e)) from e
        return {n: t.array for n, t in outputs.items()}

    def end_profiling(self) -> list[str]:
        """Stop profiling; the trace file of each session, in graph order."""
        if self.profile_prefix is None:
            raise BackendError("this backend was not created with profile_prefix")
        return [s.end_profiling() for s in self.sessions]

    def new_context(self) -> OrtContext:
        return CApiContext(self) if self.shared_prepack else OrtContext(self)


class OrtContext(BackendContext):
    """One generation's state over an OrtBackend's shared sessions: two buffers per cache entry
    and for the latent, which of the two holds each one's latest value, and one IOBinding per
    session. ONNX Runtime allows concurrent `run_with_iobinding` calls on one session with
    distinct bindings, so contexts of one backend may run in different threads at once.

    Extension points (a context over other session objects overrides these four): `new_buffer`,
    `write_buffer`, `read_buffer` and `run_graph`; the buffer bookkeeping above them is shared."""

    def __init__(self, backend: OrtBackend) -> None:
        self.backend = b = backend
        if not b.sessions:
            raise BackendError("the onnxruntime backend is not loaded: call prepare() before new_context()")

        def buffers():
            bufs = {s.name: self.new_buffer(s.zeros()) for s in b.cache_specs}
            bufs["latent"] = self.new_buffer(b.latent_spec.zeros())
            return bufs
        self._sets = [buffers(), buffers()]
        self._latest = self._zero_parity()
        self._last_binding = None   # the Python API's binding of the last step (CUDA synchronises on it)

    # ---- extension points ----------------------------------------------------------------
    def new_buffer(self, array: np.ndarray):
        """A device buffer holding a copy of `array`."""
        return self.backend._ortvalue(array)

    def write_buffer(self, buffer, array: np.ndarray) -> None:
        buffer.update_inplace(array)

    def read_buffer(self, buffer) -> np.ndarray:
        """A host copy of the buffer."""
        return buffer.numpy().copy()

    def run_graph(self, graph: int, feeds: dict[str, np.ndarray], inputs: dict, outputs: dict) -> None:
        """Run step graph `graph`: numpy `feeds` and buffer `inputs` by input name, each output
        written into its buffer in `outputs` (a buffer may be both an input and an output: the
        in-place scatters)."""
        b = self.backend
        bindings, run_options = self._io
        binding = bindings[graph]
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, buffer in inputs.items():
            binding.bind_ortvalue_input(name, buffer)
        for name, buffer in outputs.items():
            binding.bind_ortvalue_output(name, buffer)
        b.sessions[graph].run_with_iobinding(binding, run_options)
        self._last_binding = binding

    @functools.cached_property
    def _io(self):
        """(one IOBinding per session, the RunOptions) for the Python API's sessions."""
        b = self.backend
        run_options = b.ort.RunOptions()
        if b.device == "cuda":
            # no stream synchronisation after each step; `synchronize` waits once
            run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return [s.io_binding() for s in b.sessions], run_options

    # ---- the generation ------------------------------------------------------------------
    def _zero_parity(self) -> dict[str, int]:
        """Which of the two buffers holds each entry's (and the latent's) latest value."""
        return {name: 0 for name in ["latent", *(s.name for s in self.backend.cache_specs)]}

    def start(self, latent: np.ndarray) -> None:
        b = self.backend
        latent = check_latent(latent, b.latent_spec)
        for bufs in self._sets:
            for spec in b.cache_specs:
                self.write_buffer(bufs[spec.name], spec.zeros())
        self._latest = self._zero_parity()
        self.write_buffer(self._sets[0]["latent"], latent)

    def run_step(self, graph: int, feeds: dict[str, np.ndarray]) -> None:
        b, latest, sets = self.backend, self._latest, self._sets
        declared = b.declared[graph]
        arrays = {name: np.ascontiguousarray(value, dtype=b.inputs[name].numpy_dtype)
                  for name, value in feeds.items() if name in declared}
        inputs = {b.latent_spec.name: sets[latest["latent"]]["latent"]}
        outputs = {b.output_latent: sets[1 - latest["latent"]]["latent"]}
        for spec in b.cache_specs:
            if spec.name in declared:
                inputs[spec.name] = sets[latest[spec.name]][spec.name]
        written, in_place = b.written[graph], b.in_place[graph]
        flipped = [name for name in written if name not in in_place]
        for name in written:
            target = latest[name] if name in in_place else 1 - latest[name]
            outputs[output_name(name)] = sets[target][name]
        self.run_graph(graph, arrays, inputs, outputs)
        for name in ["latent", *flipped]:
            latest[name] = 1 - latest[name]

    def synchronize(self) -> None:
        if self.backend.device == "cuda" and self._last_binding is not None:
            self._last_binding.synchronize_outputs()

    def latent(self) -> np.ndarray:
        return self.read_buffer(self._sets[self._latest["latent"]]["latent"])

    def cache(self) -> dict[str, np.ndarray]:
        """The latest value of every cache entry on the host (for tests and debugging); an entry
        no graph writes any more holds its last written value."""
        return {s.name: self.read_buffer(self._sets[self._latest[s.name]][s.name]) for s in self.backend.cache_specs}


class CApiContext(OrtContext):
    """A generation over sessions made through ONNX Runtime's C API (shared pre-packing,
    `ort_capi`): buffers are numpy arrays wrapped as OrtValues once; each step passes them to
    `Run` as inputs and as preallocated outputs. Run is thread-safe, so contexts may run at once."""

    def __init__(self, backend: OrtBackend) -> None:
        super().__init__(backend)
        #: one host tensor per step input fed from numpy, refilled each step
        self._feeds: dict[str, ort_capi.Tensor] = {}

    def new_buffer(self, array: np.ndarray) -> ort_capi.Tensor:
        return ort_capi.Tensor(np.array(array, order="C"))

    def write_buffer(self, buffer: ort_capi.Tensor, array: np.ndarray) -> None:
        buffer.array[...] = array

    def read_buffer(self, buffer: ort_capi.Tensor) -> np.ndarray:
        return buffer.array.copy()

    def run_graph(self, graph: int, feeds: dict[str, np.ndarray], inputs: dict, outputs: dict) -> None:
        for name, value in feeds.items():
            if name not in self._feeds or self._feeds[name].array.shape != value.shape:
                self._feeds[name] = ort_capi.Tensor(np.array(value, order="C"))
            else:
                self._feeds[name].array[...] = value
        try:
            self.backend.sessions[graph].run({**{n: self._feeds[n] for n in feeds}, **inputs}, outputs)
        except ort_capi.CApiError as e:
            raise BackendError(str(e)) from e


def default_threads() -> int | None:
    value = os.environ.get("DIFFSPARSE_ORT_THREADS")
    return int(value) if value else None
