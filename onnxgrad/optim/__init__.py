"""``onnxgrad.optim``: PyTorch's optimizers, whose updates are standard ONNX nodes.

Every optimizer is an :class:`Optimizer` (PyTorch's base class plus one graph method, ``update``);
the eager ``step()``, compiled training steps, exported files and imported models all run its
nodes. See ``optimizer.py`` and CONTRIBUTING.md ("Adding an optimizer").
"""
from __future__ import annotations

from .adam import Adam, AdamW
from .optimizer import Optimizer
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Optimizer"]
