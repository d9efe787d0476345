"""ONNX Runtime backend: one session per distinct step graph, one copy of the weights.

Weights: every session gets the same OrtValues through `SessionOptions.add_initializer`, with
pre-packing disabled so ORT does not make per-session packed copies: T sessions cost about one
copy of the weights, not T. On the CPU the OrtValues are views of one memory map of weights.bin;
on CUDA (onnxruntime-gpu) each weight is uploaded once as a device OrtValue, which ORT uses in
place when the initializer is planned on the same device (onnxruntime PR #5092).
Cache: two preallocated sets of OrtValues on the device, bound with IO binding, swapped after
every step. On CUDA the steps run without synchronising the stream after each one
(`disable_synchronize_execution_providers`); `synchronize` waits once.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx

from diffsparse.cache_layout import output_name
from diffsparse.runtime.backends.base import Backend, BackendError, check_latent
from diffsparse.runtime.backends.select import check_ort_device
from diffsparse.runtime.bundle import Bundle

log = logging.getLogger(__name__)


_ENV_ALLOCATOR = False


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
                 device_id: int = 0) -> None:
        super().__init__()
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
        self.inputs = {t.name: t for t in m.inputs}
        self.latent_spec = m.inputs[0]
        self.cache_specs = m.cache.tensors
        self.output_latent = m.outputs[0].name

    @property
    def device(self) -> str:
        return self._device

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
        shared = {name: self._ortvalue(array) for name, array in self.bundle.weights.items()}
        self._shared = shared  # the sessions borrow these buffers: keep them alive
        if self._device == "cpu":
            share_cpu_allocator(ort)
        for i in range(len(self.bundle.manifest.graphs)):
            path = self.bundle.graph_path(i)
            graph = onnx.load(str(path), load_external_data=False).graph
            opts = ort.SessionOptions()
            opts.add_session_config_entry("session.disable_prepacking", "1")
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self._device == "cpu":
                opts.add_session_config_entry("session.use_env_allocators", "1")
                # a memory pattern is one planned block per session, kept after its first run: with
                # one session per distinct step it grew a 6-graph dit-small bundle's run memory by
                # 37% (and the demo's dense one by 125 MB) at no measured speed gain
                opts.enable_mem_pattern = False
            if self.threads:
                opts.intra_op_num_threads = self.threads
            for init in graph.initializer:
                if init.name in shared:
                    opts.add_initializer(init.name, shared[init.name])
            try:
                self.sessions.append(ort.InferenceSession(str(path), opts, providers=self._providers()))
            except Exception as e:
                raise BackendError(f"onnxruntime could not load {path}: {e}") from e
        log.info("loaded %d onnxruntime sessions on %s", len(self.sessions), self._device)

    def allocate(self) -> None:
        def buffers():
            bufs = {s.name: self._ortvalue(s.zeros()) for s in self.cache_specs}
            bufs["latent"] = self._ortvalue(self.latent_spec.zeros())
            return bufs
        self._sets = [buffers(), buffers()]
        self._src = 0
        self._bindings = [s.io_binding() for s in self.sessions]
        self._run_options = self.ort.RunOptions()
        if self._device == "cuda":
            # no stream synchronisation after each step; `synchronize` waits once
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._last_binding = None
        # the exporter drops inputs a graph does not read (e.g. reuse counts of a full step)
        self._declared = [{i.name for i in s.get_inputs()} for s in self.sessions]

    def start(self, latent: np.ndarray) -> None:
        latent = check_latent(latent, self.latent_spec)
        for bufs in self._sets:
            for spec in self.cache_specs:
                bufs[spec.name].update_inplace(spec.zeros())
        self._src = 0
        self._sets[0]["latent"].update_inplace(latent)

    def run_step(self, graph: int, feeds: dict[str, np.ndarray]) -> None:
        src, dst = self._sets[self._src], self._sets[1 - self._src]
        binding = self._bindings[graph]
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        declared = self._declared[graph]
        for name, value in feeds.items():
            if name in declared:
                binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=self.inputs[name].numpy_dtype))
        binding.bind_ortvalue_input(self.latent_spec.name, src["latent"])
        binding.bind_ortvalue_output(self.output_latent, dst["latent"])
        for spec in self.cache_specs:
            if spec.name in declared:
                binding.bind_ortvalue_input(spec.name, src[spec.name])
            binding.bind_ortvalue_output(output_name(spec.name), dst[spec.name])
        self.sessions[graph].run_with_iobinding(binding, self._run_options)
        self._last_binding = binding
        self._src = 1 - self._src

    def synchronize(self) -> None:
        if self._device == "cuda" and self._last_binding is not None:
            self._last_binding.synchronize_outputs()

    def latent(self) -> np.ndarray:
        return self._sets[self._src]["latent"].numpy().copy()

    def cache(self) -> dict[str, np.ndarray]:
        """The current cache on the host (for tests and debugging)."""
        return {s.name: self._sets[self._src][s.name].numpy().copy() for s in self.cache_specs}


def default_threads() -> int | None:
    value = os.environ.get("DIFFSPARSE_ORT_THREADS")
    return int(value) if value else None
