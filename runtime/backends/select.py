"""Which backend runs a bundle: `backend="auto"` picks the fastest one available on the device,
and an explicit choice that cannot run here fails with what to install."""

from __future__ import annotations

import importlib.util

import onnxruntime
import torch

from diffsparse.runtime.backends.base import BackendError

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("polygraphy") is not None


def ort_providers() -> list[str]:
    return list(onnxruntime.get_available_providers())


def check_ort_device(device: str) -> None:
    """BackendError with the fix when ONNX Runtime cannot run on `device` here."""
    if device == "cuda" and "CUDAExecutionProvider" not in ort_providers():
        raise BackendError("onnxruntime on CUDA needs onnxruntime-gpu: pip uninstall onnxruntime && "
                           "pip install onnxruntime-gpu (the two packages share a module name: never both)")


def resolve(backend: str, device: str) -> tuple[str, str]:
    """(backend, device) to run with, or BackendError naming the problem and the fix.

    auto on the CPU: ONNX Runtime. auto on CUDA: the PyTorch backend with static buffers and CUDA
    graphs; Pipeline.from_bundle upgrades that to TensorRT when it is installed and the bundle has
    an engine for this TensorRT and GPU (ONNX Runtime CUDA is chosen explicitly until measured)."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose one of {DEVICES}")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cuda" and backend in ("auto", "torch") and not cuda_available():
        raise BackendError("device 'cuda' was asked for but torch sees no CUDA GPU: install a CUDA build of "
                           "torch (https://pytorch.org/get-started/locally/) on a machine with an NVIDIA GPU, "
                           "or use device='cpu'")
    if backend == "auto":
        backend = "torch" if device == "cuda" else "onnxruntime"
    if backend == "tensorrt":
        if not tensorrt_installed():
            raise BackendError("the tensorrt backend needs TensorRT and Polygraphy: pip install tensorrt polygraphy "
                               "(NVIDIA GPU machines only)")
        if device != "cuda" or not cuda_available():
            raise BackendError("the tensorrt backend runs on CUDA only: use device='cuda' on a machine with an "
                               "NVIDIA GPU and a CUDA build of torch")
    if backend == "onnxruntime":
        check_ort_device(device)
    return backend, device
