"""DenseNet-BC (Huang et al. 2017) with torchvision's architecture, module tree and parameter
names.

The module structure is torchvision's exactly (``features.conv0`` / ``norm0`` / ``relu0`` /
``pool0``, ``features.denseblock1.denselayer1.norm1`` ... ``conv2``, ``features.transition1.norm``
/ ``relu`` / ``conv`` / ``pool``, ``features.norm5``, ``classifier``), its private class names
included (``_DenseLayer``, ``_DenseBlock``, ``_Transition``), so a torchvision state dict maps onto
these models key for key and ``repr`` reads like torchvision's.

NOTE: torchvision's ``memory_efficient=True`` recomputes each layer's concatenation, norm1, relu1
and conv1 in the backward pass (``torch.utils.checkpoint``). onnxgrad's gradient graph has no
recomputation, so the argument is not accepted rather than accepted and ignored.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import nn
from ..tracer import ops
from ..tracer.factories import generator
from ..tracer.tensor import Tensor
from .mobilenet import build

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201"]


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (to ``bn_size * growth_rate`` channels), BN-ReLU-Conv3x3 (to
    ``growth_rate``) over the concatenation of every earlier feature map of its block."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int,
                 drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1,
                               stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1,
                               padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = ops.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        prev_features = [input] if isinstance(input, Tensor) else list(input)
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = nn.functional.dropout(new_features, p=self.drop_rate,
                                                  training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    """``denselayer1``...: layer i sees the block input and the i - 1 earlier layers' outputs;
    the block returns all of them concatenated, oldest first."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate,
                                bn_size=bn_size, drop_rate=drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return ops.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 then a 2x2 average pool: halves the channels and the resolution."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(num_input_features, num_output_features,
                                          kernel_size=1, stride=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(nn.Module):
    """torchvision's ``DenseNet``: ``growth_rate`` (k), ``block_config`` (layers per dense
    block), ``num_init_features`` (the stem's channels), ``bn_size`` (bottleneck width in units
    of k), ``drop_rate`` (dropout after each dense layer), ``num_classes``."""

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3,
                                bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers=num_layers, num_input_features=num_features,
                                bn_size=bn_size, growth_rate=growth_rate, drop_rate=drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features,
                                    num_output_features=num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        _init_like_torchvision(self)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = nn.functional.relu(features)
        out = nn.functional.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(nn.functional.flatten(out, 1))


def _init_like_torchvision(model: DenseNet) -> None:
    """torchvision's DenseNet init: conv ``kaiming_normal_`` with its defaults (fan_in, gain
    sqrt(2)), norm weight 1 and bias 0, Linear bias 0; the Linear weight keeps ``nn.Linear``'s
    default (PyTorch's), drawn at construction. Draws come from onnxgrad's generator."""
    rng = generator()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            _, in_ch, kh, kw = m.weight.shape
            std = math.sqrt(2.0) / math.sqrt(in_ch * kh * kw)  # gain / sqrt(fan_in)
            m.weight.data = rng.normal(0.0, std, size=m.weight.shape).astype(m.weight.dtype)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data = np.ones(m.weight.shape, m.weight.dtype)
            m.bias.data = np.zeros(m.bias.shape, m.bias.dtype)
        elif isinstance(m, nn.Linear):
            m.bias.data = np.zeros(m.bias.shape, m.bias.dtype)


# NOTE: torchvision's published DenseNet checkpoints predate the ban on '.' in module names:
# they hold ``denselayer1.norm.1.weight`` where the module is ``denselayer1.norm1``. torchvision
# renames them on load with this pattern, and so does this, so such a .pth file loads as is.
_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _renamed(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        match = _OLD_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _densenet(name: str, growth_rate: int, block_config: tuple[int, ...],
              num_init_features: int, num_classes: int | None, weights: Any,
              pretrained: bool | None, kwargs: dict[str, Any]) -> DenseNet:
    return build(name,
                 lambda n: DenseNet(growth_rate, block_config, num_init_features, num_classes=n,
                                    **kwargs),
                 "classifier.weight", num_classes, weights, pretrained, rename=_renamed)


def densenet121(num_classes: int | None = None, weights: Any = None, *,
                pretrained: bool | None = None, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (k 32, blocks (6, 12, 24, 16), 64 stem channels); ``weights``: a local
    ``.npz`` / ``.safetensors`` / ``.pth`` (torchvision's old key names are accepted);
    ``kwargs``: ``DenseNet``'s (``bn_size``, ``drop_rate``).

    ``num_classes`` defaults to 1000, or to the head of the weights file when one is given.
    """
    return _densenet("densenet121", 32, (6, 12, 24, 16), 64, num_classes, weights, pretrained,
                     kwargs)


def densenet161(num_classes: int | None = None, weights: Any = None, *,
                pretrained: bool | None = None, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (k 48, blocks (6, 12, 36, 24), 96 stem channels); arguments as
    :func:`densenet121`."""
    return _densenet("densenet161", 48, (6, 12, 36, 24), 96, num_classes, weights, pretrained,
                     kwargs)


def densenet169(num_classes: int | None = None, weights: Any = None, *,
                pretrained: bool | None = None, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (k 32, blocks (6, 12, 32, 32), 64 stem channels); arguments as
    :func:`densenet121`."""
    return _densenet("densenet169", 32, (6, 12, 32, 32), 64, num_classes, weights, pretrained,
                     kwargs)


def densenet201(num_classes: int | None = None, weights: Any = None, *,
                pretrained: bool | None = None, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (k 32, blocks (6, 12, 48, 32), 64 stem channels); arguments as
    :func:`densenet121`."""
    return _densenet("densenet201", 32, (6, 12, 48, 32), 64, num_classes, weights, pretrained,
                     kwargs)
