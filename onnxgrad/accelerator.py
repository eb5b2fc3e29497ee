"""``og.accelerator``: PyTorch's device-agnostic accelerator queries. onnxgrad's one accelerator is
CUDA through ONNX Runtime's CUDAExecutionProvider (see ``og.cuda`` and ``tracer/device.py``)."""
from __future__ import annotations

from .tracer import device as _device

__all__ = ["current_accelerator", "device_count", "is_available"]


def is_available() -> bool:
    return _device.cuda_available()


def current_accelerator(check_available: bool = False) -> _device.device | None:
    """``og.device("cuda")`` where CUDA is available, else None (PyTorch's answer without one)."""
    return _device.device("cuda") if _device.cuda_available() else None


def device_count() -> int:
    return _device.cuda_device_count()
