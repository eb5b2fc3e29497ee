"""Architectures built with ``onnxgrad.nn``: torchvision's ResNets, MobileNetV2/V3, EfficientNet-B0,
DenseNets and ViT (same parameter names), a GPT-style decoder (GPT-2's names), an MLP, and local
weight files (``.npz`` / ``.safetensors``; nothing is ever downloaded)."""
from __future__ import annotations

from .densenet import DenseNet, densenet121, densenet161, densenet169, densenet201
from .efficientnet import EfficientNet, efficientnet_b0
from .gpt import GPT, gpt
from .mlp import mlp
from .mobilenet import (
                        MobileNetV2,
                        MobileNetV3,
                        mobilenet_v2,
                        mobilenet_v3_large,
                        mobilenet_v3_small,
)
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
__all__ += ["EfficientNet", "MobileNetV2", "MobileNetV3", "efficientnet_b0", "mobilenet_v2",
            "mobilenet_v3_large", "mobilenet_v3_small"]
__all__ += ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201"]
__all__ += ["GPT", "VisionTransformer", "gpt", "vit"]
