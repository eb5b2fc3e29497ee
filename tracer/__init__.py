"""Tensors recorded as ONNX nodes, eager evaluation, backward, and compile."""
from __future__ import annotations

# The op modules register their ops (tracer/registry.py) as they are imported.
from . import (  # noqa: F401
    activations,
    conversions,
    factories,
    math_ops,
    index_ops,
    nnops,
    ops,
    registry,
    spatial_ops,
    transformer_ops,
)
from .autograd import backward, grad
from .state import enable_grad, no_grad, set_grad_enabled
from .tensor import Tensor, TraceError, Val, as_tensor, tensor

__all__ = ["Tensor", "TraceError", "Val", "as_tensor", "backward", "enable_grad", "factories",
           "grad", "index_ops", "nnops", "no_grad", "ops", "registry", "set_grad_enabled",
           "spatial_ops", "tensor", "transformer_ops"]
