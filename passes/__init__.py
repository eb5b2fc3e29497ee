"""Pure ``Graph -> Graph`` transforms on onnx_ir graphs; they know nothing of tensors."""
from __future__ import annotations

from .autodiff import NoGradientRule, gradient_graph, gradients
from .builder import Builder

__all__ = ["Builder", "NoGradientRule", "gradient_graph", "gradients"]
