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
from .recurrent import GRU, LSTM, RNN
from .spatial import ConvTranspose2d, Upsample
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

__all__ = [
    "GELU", "GRU", "LSTM", "RNN", "AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm2d", "Conv1d",
    "Conv2d", "ConvTranspose2d", "Dropout", "Embedding", "Flatten", "GroupNorm", "Hardsigmoid",
    "Hardswish", "Identity", "LayerNorm", "Linear", "MaxPool2d", "Mish", "Module", "ModuleList",
    "MultiheadAttention", "OnnxModule", "Parameter", "ReLU", "ReLU6", "Sequential", "SiLU",
    "Sigmoid", "TransformerDecoderLayer", "TransformerEncoder", "TransformerEncoderLayer",
    "Upsample", "functional", "utils",
]
