"""Architectures built with ``onnxgrad.nn``: torchvision's ResNets (same parameter names), an MLP,
and local weight files (``.npz`` / ``.safetensors``; nothing is ever downloaded)."""
from __future__ import annotations

from .gpt import GPT, gpt
from .mlp import mlp
from .resnet import (
                     BasicBlock,
                     Bottleneck,
                     ResNet,
                     resnet18,
                     resnet34,
                     resnet50,
                     resnet101,
                     resnet152,
)
from .vit import VisionTransformer, vit
from .weights import load_weights, read_state, save_weights

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "load_weights", "mlp", "read_state",
           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "save_weights"]
__all__ += ["GPT", "VisionTransformer", "gpt", "vit"]
