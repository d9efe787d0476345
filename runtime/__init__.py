"""diffsparse.runtime: load a bundle and generate on ONNX Runtime (default) or PyTorch."""

from diffsparse.runtime.backends.base import BackendError  # noqa: F401
from diffsparse.runtime.pipeline import GenerationResult, NonFiniteOutputError, Pipeline  # noqa: F401
