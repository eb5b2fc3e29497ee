"""``onnxgrad.optim``: PyTorch's optimizers, whose updates are standard ONNX nodes.

Every optimizer is an :class:`Optimizer` (PyTorch's base class plus one graph method, ``update``);
the eager ``step()``, compiled training steps, exported files and imported models all run its
nodes. See ``optimizer.py`` and CONTRIBUTING.md ("Adding an optimizer").
"""
from __future__ import annotations

from . import lr_scheduler
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .optimizer import Optimizer
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "Optimizer", "RMSprop", "lr_scheduler"]
