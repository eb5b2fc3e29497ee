"""``og.autograd``: PyTorch's ``torch.autograd`` surface over onnxgrad's ONNX recording.

``grad`` and ``backward`` (``create_graph=True`` gives gradients that are themselves recorded
ONNX nodes, so they can be differentiated again), ``Function`` (an op with a user-written
backward, traced into ONNX nodes), the grad modes, and ``functional`` (``vjp``, ``hvp``...).
"""
from __future__ import annotations

from ..tracer.autograd import (
    AccumulateGrad,
    Node,
    RemovableHandle,
    backward,
    grad,
    inference_mode,
    is_inference_mode_enabled,
)
from ..tracer.state import enable_grad, no_grad, set_grad_enabled
from . import functional
from .function import Function, FunctionCtx, once_differentiable

__all__ = ["AccumulateGrad", "Function", "FunctionCtx", "Node", "RemovableHandle", "backward",
           "enable_grad", "functional", "grad", "inference_mode", "is_inference_mode_enabled",
           "no_grad", "once_differentiable", "set_grad_enabled"]
