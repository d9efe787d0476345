"""TensorRT backend: the bundle's engine (one optimization profile per distinct step) over the same
static ping-pong device buffers as the CUDA PyTorch backend, with CUDA-graph capture per
(profile, parity).

One execution context per profile, all on one device-memory pool (steps run one after another on
one stream, so they can share activations); `set_tensor_address` binds the step's source and
destination buffers (never the same buffer as input and output: TensorRT gives wrong results when
they alias). The K carriers point at one zero buffer; only their lengths (the profile's shapes)
matter. The execution contexts and the activation pool are the engine's, shared: one generation
runs at a time (`max_contexts` 1; a pipeline serialises its calls).

NOT YET RUN on real TensorRT (it cannot be installed on our machines); written against the
TensorRT 10 Python API.
"""

from __future__ import annotations

import logging

import torch

from diffsparse.bundle_format import EngineUnavailable, current_engine_key
from diffsparse.cache_layout import carrier_name, is_carrier, output_name
from diffsparse.runtime.backends.base import BackendError
from diffsparse.runtime.backends.torch_backend import TorchBackend
from diffsparse.runtime.bundle import Bundle

log = logging.getLogger(__name__)


def find_engine(bundle: Bundle, key: str) -> dict:
    """The manifest entry of the engine built for `key`, or BackendError saying what was built."""
    entry = bundle.manifest.engine(key)
    if entry is not None:
        return entry
    built = ", ".join(e["key"] for e in bundle.manifest.engines) or "none"
    raise BackendError(f"bundle {bundle.folder} has no TensorRT engine for this machine ({key}); it has: {built}. "
                       "Engines only run on the TensorRT version and GPU model they were built with: rebuild "
                       "with dsexport --tensorrt on this machine")


class TensorRTBackend(TorchBackend):
    name = "tensorrt"

    @property
    def max_contexts(self) -> int:
        """One generation at a time (not yet supported: several would need an execution context
        and an activation pool each, and captured CUDA graphs per context)."""
        return 1

    def __init__(self, bundle: Bundle, device: str = "cuda") -> None:
        # the engine holds the weights: the spec is only the model's structure (its cache layout
        # checked against the bundle's when it was built, Bundle._meta_spec)
        super().__init__(bundle.spec, bundle.schedule, device=device, static=True, cuda_graphs=True,
                         layer_cache=bundle.manifest.layer_cache)
        self.bundle = bundle
        try:
            self.engine_entry = find_engine(bundle, current_engine_key())
        except EngineUnavailable as e:
            raise BackendError(str(e)) from None

    def load(self) -> None:
        import tensorrt as trt  # optional heavy dependency, present on GPU machines only

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        data = (self.bundle.folder / self.engine_entry["file"]).read_bytes()
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {self.engine_entry['file']}; rebuild the engine")
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.contexts = [self.engine.create_execution_context(strategy) for _ in range(self.engine.num_optimization_profiles)]
        size = max(self.engine.get_device_memory_size_for_profile(i) for i in range(len(self.contexts)))
        self._pool = torch.empty(max(size, 1), dtype=torch.uint8, device=self._device)
        self._io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._zeros = torch.zeros(max(self.spec.dense_keep()), device=self._device)
        stream = torch.cuda.current_stream(self._device).cuda_stream
        for i, (ctx, sig) in enumerate(zip(self.contexts, self.schedule.distinct_signatures())):
            ctx.device_memory = self._pool.data_ptr()
            ctx.set_optimization_profile_async(i, stream)
            for layer, k in zip(self.spec.layers, sig):
                ctx.set_input_shape(carrier_name(layer), (k,))
        log.info("loaded TensorRT engine %s: %d profiles", self.engine_entry["file"], len(self.contexts))

    def run_step_into(self, graph: int, inputs: dict[str, torch.Tensor], src: list[torch.Tensor],
                      dst: list[torch.Tensor]) -> None:
        ctx = self.contexts[graph]
        names = [self.latent_spec.name] + [s.name for s in self.cache_specs]
        addresses = {**{n: t.data_ptr() for n, t in inputs.items()},
                     **dict(zip(names, (t.data_ptr() for t in src))),
                     self.bundle.manifest.outputs[0].name: dst[0].data_ptr(),
                     **{output_name(s.name): t.data_ptr() for s, t in zip(self.cache_specs, dst[1:])}}
        for name in self._io:
            ptr = self._zeros.data_ptr() if is_carrier(name) else addresses.get(name)
            if ptr is None:
                raise BackendError(f"the engine has an input or output {name!r} the bundle does not describe")
            ctx.set_tensor_address(name, ptr)
        if not ctx.execute_async_v3(torch.cuda.current_stream(self._device).cuda_stream):
            raise BackendError(f"TensorRT failed to run step graph {graph}")
