"""Tensors recorded as ONNX nodes, eager evaluation, backward, and compile."""
from __future__ import annotations

from . import ops
from .autograd import backward, grad
from .state import enable_grad, no_grad, set_grad_enabled
from .tensor import Tensor, TraceError, Val, as_tensor, tensor

__all__ = ["Tensor", "TraceError", "Val", "as_tensor", "backward", "enable_grad", "grad",
           "no_grad", "ops", "set_grad_enabled", "tensor"]
