"""The bottom layer: ONNX Runtime sessions, export, checkpoints, and the one atomic file writer.

Knows nothing of tensors or passes. Inspection (text dump, summary, DOT) only reads graphs and
lives in ``onnxgrad.inspector``.
"""
from __future__ import annotations

from .opset import IR_VERSION, OPSET
from .session import add_model_check, get_providers, make_session, run_node, set_providers

__all__ = ["IR_VERSION", "OPSET", "add_model_check", "get_providers", "make_session", "run_node",
           "set_providers"]
