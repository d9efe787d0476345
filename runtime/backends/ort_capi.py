"""ONNX Runtime's C API through ctypes, for the one thing its Python API cannot do: share
pre-packed weights between sessions.

Pre-packed, every CPU MatMul/Gemm session keeps its own packed copy of each constant weight
(runtime/backends/ort.py `prepack_weights`): a bundle of T step graphs keeps T copies. ONNX
Runtime's C API has a `OrtPrepackedWeightsContainer`: sessions created with
`CreateSessionWithPrepackedWeightsContainer` keep the packed copy of every initializer the user
supplies (`AddInitializer`) in the container, keyed by the packed contents, so all sessions over
the same weights share one packed copy (onnxruntime PR #7421). The Python API has no container.

The onnxruntime wheel ships the C library (`onnxruntime/capi/libonnxruntime.so.<version>`) beside
its Python module; this module loads it with ctypes. That library is a second copy of ONNX Runtime
in the process, with its own environment and thread pool: sessions made here run only with other
sessions made here (a process mixes the two only at the cost of two thread pools on the cores).

Only what the ONNX Runtime backend needs is bound: environment with a global thread pool, session
options, session creation with the container, CPU tensors over numpy buffers (no copies), `Run`
with preallocated outputs, and profiling. Every call checks its `OrtStatus` and raises
`CApiError` with ONNX Runtime's message.

The function table (`OrtApi`) is a struct of function pointers that ONNX Runtime only ever
appends to; `_SLOTS` gives each bound function's index in it (from `onnxruntime_c_api.h`).
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import threading
from collections.abc import Mapping, Sequence

import numpy as np

#: index of each bound function in `struct OrtApi` (onnxruntime_c_api.h; append-only across versions)
_SLOTS = {
    "GetErrorMessage": 2, "Run": 9, "CreateSessionOptions": 10, "EnableProfiling": 14, "DisableMemPattern": 17,
    "SetSessionGraphOptimizationLevel": 23, "CreateTensorWithDataAsOrtValue": 49, "CreateCpuMemoryInfo": 69,
    "AllocatorFree": 76, "GetAllocatorWithDefaultOptions": 78, "ReleaseStatus": 93, "ReleaseMemoryInfo": 94,
    "ReleaseSession": 95, "ReleaseValue": 96, "ReleaseSessionOptions": 100, "SessionEndProfiling": 110,
    "CreateEnvWithGlobalThreadPools": 119, "CreateAndRegisterAllocator": 144, "CreateArenaCfg": 156,
    "ReleaseArenaCfg": 157, "DisablePerSessionThreads": 120, "CreateThreadingOptions": 121,
    "ReleaseThreadingOptions": 122, "AddSessionConfigEntry": 130, "SetGlobalIntraOpNumThreads": 147,
    "SetGlobalInterOpNumThreads": 148, "AddInitializer": 150, "CreatePrepackedWeightsContainer": 166,
    "ReleasePrepackedWeightsContainer": 167, "CreateSessionWithPrepackedWeightsContainer": 168,
}

#: the OrtApi version asked for: the oldest that has every slot above (the library serves any
#: version up to its own)
API_VERSION = 16

#: ONNXTensorElementDataType by numpy dtype
_ELEMENT_TYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.int32): 6,
                  np.dtype(np.int64): 7, np.dtype(np.bool_): 9, np.dtype(np.float16): 10, np.dtype(np.float64): 11}
_ORT_LOGGING_LEVEL_WARNING = 2
_ORT_ENABLE_ALL = 99
_ORT_ARENA_ALLOCATOR = 1
_ORT_MEM_TYPE_DEFAULT = 0

_p = ctypes.c_void_p
log = logging.getLogger(__name__)


class CApiError(RuntimeError):
    """An ONNX Runtime C API call failed, or the C library cannot be used here."""


def library_path() -> str:
    """The C library shipped inside the installed onnxruntime wheel (same version as the module)."""
    import onnxruntime

    folder = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
    found = sorted(glob.glob(os.path.join(folder, f"libonnxruntime.so.{onnxruntime.__version__}")) +
                   glob.glob(os.path.join(folder, "onnxruntime.dll")) +
                   glob.glob(os.path.join(folder, f"libonnxruntime.{onnxruntime.__version__}.dylib")))
    if not found:
        raise CApiError(f"the onnxruntime wheel in {folder} ships no C library (libonnxruntime) for version "
                        f"{onnxruntime.__version__}: shared pre-packing needs it; use prepack='on' or 'off'")
    return found[0]


class _Api:
    """The loaded library and its function table; one per process (`api()`)."""

    def __init__(self, path: str) -> None:
        self.lib = ctypes.CDLL(path)
        base_fn = self.lib.OrtGetApiBase
        base_fn.restype = ctypes.POINTER(_p * 2)
        base = base_fn().contents
        get_api = ctypes.CFUNCTYPE(_p, ctypes.c_uint32)(base[0])
        version_string = ctypes.CFUNCTYPE(ctypes.c_char_p)(base[1])
        self.version = version_string().decode()
        table = get_api(API_VERSION)
        if not table:
            raise CApiError(f"the onnxruntime C library {path} ({self.version}) does not serve API version {API_VERSION}")
        self._table = ctypes.cast(table, ctypes.POINTER(_p * (max(_SLOTS.values()) + 1))).contents
        self._fns: dict[tuple, ctypes._CFuncPtr] = {}

    def fn(self, name: str, restype, *argtypes):
        key = (name, restype, argtypes)
        if key not in self._fns:
            self._fns[key] = ctypes.CFUNCTYPE(restype, *argtypes)(self._table[_SLOTS[name]])
        return self._fns[key]

    def call(self, name: str, *args) -> None:
        """Call a function returning OrtStatus*; CApiError with ONNX Runtime's message on failure.
        Integers are passed as the ctypes integer they are given as, everything else as a pointer."""
        argtypes = tuple(type(a) if isinstance(a, (ctypes.c_int, ctypes.c_size_t)) else _p for a in args)
        status = self.fn(name, _p, *argtypes)(*args)
        if status:
            message = self.fn("GetErrorMessage", ctypes.c_char_p, _p)(status)
            self.fn("ReleaseStatus", None, _p)(status)
            raise CApiError(f"onnxruntime {name}: {message.decode(errors='replace')}")

    def release(self, kind: str, handle) -> None:
        if handle:
            self.fn(f"Release{kind}", None, _p)(handle)


_API: _Api | None = None
_ENV = None
_ENV_THREADS: int | None = None
_CONTAINER: PrepackedWeights | None = None
#: reentrant: api() is called while the environment and the container are created under it
_LOCK = threading.RLock()


def api() -> _Api:
    global _API
    with _LOCK:
        if _API is None:
            _API = _Api(library_path())
        return _API


def available() -> bool:
    """Whether shared pre-packing can run here (the wheel's C library loads)."""
    try:
        api()
    except (CApiError, OSError):
        return False
    return True


def environment(threads: int | None):
    """The process's OrtEnv of the C library, with one global intra-op thread pool (`threads`,
    None or 0: one per core) that every session made here runs on (ort.py `thread_options` has why)."""
    global _ENV, _ENV_THREADS
    a = api()
    with _LOCK:
        if _ENV is None:
            tp = _p()
            a.call("CreateThreadingOptions", ctypes.byref(tp))
            try:
                a.call("SetGlobalIntraOpNumThreads", tp, ctypes.c_int(threads or 0))
                a.call("SetGlobalInterOpNumThreads", tp, ctypes.c_int(1))
                env = _p()
                a.call("CreateEnvWithGlobalThreadPools", ctypes.c_int(_ORT_LOGGING_LEVEL_WARNING),
                       ctypes.c_char_p(b"diffsparse"), tp, ctypes.byref(env))
            finally:
                a.release("ThreadingOptions", tp)
            # one CPU arena in the environment, used by every session (`session.use_env_allocators`):
            # the step sessions share activation memory instead of keeping an arena each
            arena = _p()
            a.call("CreateArenaCfg", ctypes.c_size_t(0), ctypes.c_int(-1), ctypes.c_int(-1), ctypes.c_int(-1),
                   ctypes.byref(arena))
            try:
                a.call("CreateAndRegisterAllocator", env, Tensor.memory_info(), arena)
            finally:
                a.release("ArenaCfg", arena)
            _ENV, _ENV_THREADS = env, threads or 0
        elif (threads or 0) != _ENV_THREADS:
            log.info("onnxruntime's C-library thread pool of this process has %s threads; the %s asked for now is "
                     "not used", _ENV_THREADS or "default", threads)
        return _ENV


def shared_container() -> PrepackedWeights:
    """The process's one pre-packed weights container: sessions of different bundles over the same
    weights (a sparse bundle and its dense twin) share their packed copies too."""
    global _CONTAINER
    with _LOCK:
        if _CONTAINER is None:
            _CONTAINER = PrepackedWeights()
        return _CONTAINER


class Tensor:
    """An OrtValue over a numpy array's memory (CPU, no copy); keeps the array alive."""

    _memory_info = None

    def __init__(self, array: np.ndarray) -> None:
        if not array.flags.c_contiguous:
            raise CApiError("tensors over numpy memory must be C-contiguous")
        if array.dtype not in _ELEMENT_TYPES:
            raise CApiError(f"dtype {array.dtype} is not supported by the C API binding")
        a = api()
        self.array = array
        shape = (ctypes.c_int64 * max(1, array.ndim))(*array.shape)
        self.handle = _p()
        a.call("CreateTensorWithDataAsOrtValue", Tensor.memory_info(), _p(array.ctypes.data), ctypes.c_size_t(array.nbytes),
               shape, ctypes.c_size_t(array.ndim), ctypes.c_int(_ELEMENT_TYPES[array.dtype]), ctypes.byref(self.handle))

    @classmethod
    def memory_info(cls):
        """The CPU arena's OrtMemoryInfo (created once)."""
        if cls._memory_info is None:
            info = _p()
            api().call("CreateCpuMemoryInfo", ctypes.c_int(_ORT_ARENA_ALLOCATOR), ctypes.c_int(_ORT_MEM_TYPE_DEFAULT),
                       ctypes.byref(info))
            cls._memory_info = info
        return cls._memory_info

    def __del__(self) -> None:
        if _API is not None and getattr(self, "handle", None):
            _API.release("Value", self.handle)
            self.handle = None


class PrepackedWeights:
    """An OrtPrepackedWeightsContainer: the packed copies of the sessions created with it."""

    def __init__(self) -> None:
        self.handle = _p()
        api().call("CreatePrepackedWeightsContainer", ctypes.byref(self.handle))

    def __del__(self) -> None:
        if _API is not None and getattr(self, "handle", None):
            _API.release("PrepackedWeightsContainer", self.handle)
            self.handle = None


def _names(names: Sequence[str]):
    """A C array of the names (the array keeps the encoded bytes alive)."""
    return (ctypes.c_char_p * max(1, len(names)))(*(n.encode() for n in names))


class Session:
    """One ONNX model on the CPU, on the C library's global thread pool, its weights the given
    initializers (`Tensor`s, kept alive here) pre-packed into `container`.

    config: session config entries (AddSessionConfigEntry), e.g. the optimizers to disable.
    profile_prefix: record ONNX Runtime's per-node profile (`end_profiling` returns the file)."""

    def __init__(self, model_path: str, initializers: Mapping[str, Tensor], container: PrepackedWeights,
                 threads: int | None = None, config: Mapping[str, str] | None = None,
                 profile_prefix: str | None = None) -> None:
        a = api()
        env = environment(threads)
        opts = _p()
        a.call("CreateSessionOptions", ctypes.byref(opts))
        try:
            a.call("SetSessionGraphOptimizationLevel", opts, ctypes.c_int(_ORT_ENABLE_ALL))
            a.call("DisablePerSessionThreads", opts)
            a.call("DisableMemPattern", opts)
            a.call("AddSessionConfigEntry", opts, ctypes.c_char_p(b"session.use_env_allocators"), ctypes.c_char_p(b"1"))
            for key, value in (config or {}).items():
                a.call("AddSessionConfigEntry", opts, ctypes.c_char_p(key.encode()), ctypes.c_char_p(value.encode()))
            for name, tensor in initializers.items():
                a.call("AddInitializer", opts, ctypes.c_char_p(name.encode()), tensor.handle)
            if profile_prefix is not None:
                a.call("EnableProfiling", opts, ctypes.c_char_p(profile_prefix.encode()))
            self.handle = _p()
            a.call("CreateSessionWithPrepackedWeightsContainer", env, ctypes.c_char_p(os.fsencode(model_path)), opts,
                   container.handle, ctypes.byref(self.handle))
        finally:
            a.release("SessionOptions", opts)
        self._initializers = dict(initializers)   # the session reads these buffers: keep them alive
        self._container = container

    def run(self, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
        """Run with every output written into its preallocated tensor (shapes are static)."""
        in_names, out_names = _names(list(inputs)), _names(list(outputs))
        in_values = (_p * max(1, len(inputs)))(*(t.handle for t in inputs.values()))
        out_values = (_p * max(1, len(outputs)))(*(t.handle for t in outputs.values()))
        api().call("Run", self.handle, None, in_names, in_values, ctypes.c_size_t(len(inputs)), out_names,
                   ctypes.c_size_t(len(outputs)), out_values)

    def end_profiling(self) -> str:
        a = api()
        allocator, out = _p(), ctypes.c_char_p()
        a.call("GetAllocatorWithDefaultOptions", ctypes.byref(allocator))
        a.call("SessionEndProfiling", self.handle, allocator, ctypes.byref(out))
        path = out.value.decode() if out.value else ""
        a.call("AllocatorFree", allocator, ctypes.cast(out, _p))
        return path

    def __del__(self) -> None:
        if _API is not None and getattr(self, "handle", None):
            _API.release("Session", self.handle)
            self.handle = None
