"""``onnxgrad.nn``: modules and layers with PyTorch's names, defaults and initialisation."""
from __future__ import annotations

from . import functional, utils
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

__all__ = ["GRU", "LSTM", "RNN", "AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm2d", "Conv2d",
           "ConvTranspose2d", "Dropout", "Flatten", "Identity", "Linear", "MaxPool2d", "Module",
           "OnnxModule", "Parameter", "ReLU", "Sequential", "Upsample", "functional", "utils"]
