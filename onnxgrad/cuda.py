"""``og.cuda``: PyTorch's ``torch.cuda`` queries, answered by ONNX Runtime's CUDA execution provider.

CUDA is available when onnxruntime-gpu finds a GPU (``CUDAExecutionProvider`` among ONNX Runtime's
providers); onnxgrad then runs every op there by default (``og.get_providers()``). Devices follow
one rule, in ``tracer/device.py``: one compute device per process.
"""
from __future__ import annotations

from typing import Any

from .tracer import device as _device
from .tracer.device import CudaUnavailableError

__all__ = ["CudaUnavailableError", "current_device", "device_count", "get_device_name",
           "is_available", "manual_seed", "manual_seed_all", "synchronize"]


def is_available() -> bool:
    """Whether ops can run on CUDA: onnxruntime-gpu with a GPU (its CUDAExecutionProvider)."""
    return _device.cuda_available()


def device_count() -> int:
    """1 where CUDA is available (onnxgrad runs on CUDA device 0), else 0."""
    return _device.cuda_device_count()


def current_device() -> int:
    _device.require_cuda()
    return 0


def get_device_name(device: Any = None) -> str:
    _device.require_cuda(None if device is None else _device.as_device(device).index)
    return "CUDA device 0 (ONNX Runtime CUDAExecutionProvider)"


def synchronize(device: Any = None) -> None:
    """Nothing to wait for: every ONNX Runtime run returns when its results are ready."""
    _device.require_cuda()


def manual_seed(seed: int) -> None:
    """Silently ignored, as PyTorch's without CUDA: onnxgrad draws every random number from one
    generator, which ``og.manual_seed`` seeds."""


def manual_seed_all(seed: int) -> None:
    """Silently ignored (see :func:`manual_seed`)."""
