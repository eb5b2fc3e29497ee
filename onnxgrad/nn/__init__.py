"""``onnxgrad.nn``: modules and layers with PyTorch's names, defaults and initialisation."""
from __future__ import annotations

from . import functional, init, parallel, utils
from .activation_layers import (
                                ELU,
                                Conv1d,
                                GroupNorm,
                                Hardsigmoid,
                                Hardswish,
                                LeakyReLU,
                                LogSoftmax,
                                Mish,
                                PReLU,
                                ReLU6,
                                Sigmoid,
                                SiLU,
                                Softmax,
                                Softplus,
                                Softsign,
                                Tanh,
                                Tanhshrink,
)
from .containers import ModuleDict, ModuleList, ParameterDict, ParameterList
from .losses import (
                     BCELoss,
                     BCEWithLogitsLoss,
                     CrossEntropyLoss,
                     HuberLoss,
                     KLDivLoss,
                     L1Loss,
                     MSELoss,
                     NLLLoss,
                     SmoothL1Loss,
)
from .modules import (
                      AdaptiveAvgPool2d,
                      AvgPool2d,
                      BatchNorm1d,
                      BatchNorm2d,
                      Conv2d,
                      Dropout,
                      Dropout1d,
                      Dropout2d,
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
                          MultiheadAttention,
                          TransformerDecoder,
                          TransformerDecoderLayer,
                          TransformerEncoder,
                          TransformerEncoderLayer,
)

__all__ = [
    "ELU", "GELU", "GRU", "LSTM", "RNN", "AdaptiveAvgPool2d", "AvgPool2d", "BCELoss",
    "BCEWithLogitsLoss", "BatchNorm1d", "BatchNorm2d", "Conv1d", "Conv2d", "ConvTranspose2d",
    "CrossEntropyLoss", "Dropout", "Dropout1d", "Dropout2d", "Embedding", "Flatten", "GroupNorm",
    "Hardsigmoid", "Hardswish", "HuberLoss", "Identity", "KLDivLoss", "L1Loss", "LayerNorm",
    "LeakyReLU", "Linear", "LogSoftmax", "MSELoss", "MaxPool2d", "Mish", "Module", "ModuleDict",
    "ModuleList", "MultiheadAttention", "NLLLoss", "OnnxModule", "PReLU", "Parameter",
    "ParameterDict", "ParameterList", "ReLU", "ReLU6", "Sequential", "SiLU", "Sigmoid",
    "SmoothL1Loss", "Softmax", "Softplus", "Softsign", "Tanh", "Tanhshrink",
    "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder", "TransformerEncoderLayer", "Upsample",
    "functional", "init", "parallel", "utils",
]
