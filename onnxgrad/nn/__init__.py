"""``onnxgrad.nn``: modules and layers with PyTorch's names, defaults and initialisation."""
from __future__ import annotations

from . import functional, utils
from .activation_layers import (
                                Conv1d,
                                GroupNorm,
                                Hardsigmoid,
                                Hardswish,
                                Mish,
                                ReLU6,
                                Sigmoid,
                                SiLU,
)
from .modules import (
                      AdaptiveAvgPool2d,
                      AvgPool2d,
                      BatchNorm2d,
                      Conv2d,
                      Dropout,
                      Flatten,
                      Identity,
                      Linear,
                      MaxPool2d,
                      Module,
                      Parameter,
                      ReLU,
                      Sequential,
)
from .onnx_module import OnnxModule
from .transformer import (
                          GELU,
                          Embedding,
                          LayerNorm,
                          ModuleList,
                          MultiheadAttention,
                          TransformerDecoderLayer,
                          TransformerEncoder,
                          TransformerEncoderLayer,
)

__all__ = ["AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm2d", "Conv2d", "Dropout", "Flatten",
           "Identity", "Linear", "MaxPool2d", "Module", "OnnxModule", "Parameter", "ReLU",
           "Sequential", "functional", "utils"]
__all__ += ["Conv1d", "GroupNorm", "Hardsigmoid", "Hardswish", "Mish", "ReLU6", "SiLU", "Sigmoid"]
__all__ += ["GELU", "Embedding", "LayerNorm", "ModuleList", "MultiheadAttention",
            "TransformerDecoderLayer", "TransformerEncoder", "TransformerEncoderLayer"]
