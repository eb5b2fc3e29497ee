"""EfficientNet-B0 (Tan & Le 2019) with torchvision's architecture, module tree and parameter
names (``features.1.0.block.0.0``, ``features.1.0.block.1.fc1``..., ``classifier.1``), so a
torchvision state dict maps onto it key for key."""
from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import nn
from ..tracer.tensor import Tensor, Val
from .mobilenet import (
    Conv2dNormActivation,
    Layer,
    SqueezeExcitation,
    build,
    init_like_torchvision,
    make_divisible,
)

__all__ = ["EfficientNet", "MBConv", "MBConvConfig", "StochasticDepth", "efficientnet_b0",
           "stochastic_depth"]


def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    """torchvision's ``ops.stochastic_depth``: zero whole rows (``"row"``: per sample) or the
    whole batch (``"batch"``) with probability ``p``, scaling survivors by 1 / (1 - p).

    NOTE: the noise is an ONNX ``Dropout`` (training mode) of ones shaped [N, 1, 1, ...] or
    [1, ...]: 0 or 1 / (1 - p), a fresh draw on every run, compiled steps included.
    """
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    ones = Tensor(Val(np.ones(size, input.dtype)))
    return input * nn.functional.dropout(ones, p, True)


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input: Tensor) -> Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, mode={self.mode})"


class MBConvConfig:
    """One EfficientNet stage: channels rounded to multiples of 8 after ``width_mult``, the
    block count scaled by ``depth_mult`` (rounded up)."""

    def __init__(self, expand_ratio: float, kernel: int, stride: int, input_channels: int,
                 out_channels: int, num_layers: int, width_mult: float = 1.0,
                 depth_mult: float = 1.0, block: Layer | None = None) -> None:
        self.expand_ratio, self.kernel, self.stride = expand_ratio, kernel, stride
        self.input_channels = self.adjust_channels(input_channels, width_mult)
        self.out_channels = self.adjust_channels(out_channels, width_mult)
        self.num_layers = math.ceil(num_layers * depth_mult)
        self.block = block or MBConv

    @staticmethod
    def adjust_channels(channels: float, width_mult: float, min_value: int | None = None) -> int:
        return make_divisible(channels * width_mult, 8, min_value)


class MBConv(nn.Module):
    """EfficientNet's block: expansion, depthwise, squeeze-excitation (SiLU, sigmoid),
    projection, and a residual with stochastic depth."""

    def __init__(self, cnf: MBConvConfig, stochastic_depth_prob: float, norm_layer: Layer,
                 se_layer: Layer = SqueezeExcitation) -> None:
        super().__init__()
        if not 1 <= cnf.stride <= 2:
            raise ValueError("illegal stride value")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: list[nn.Module] = []
        expanded = cnf.adjust_channels(cnf.input_channels, cnf.expand_ratio)
        if expanded != cnf.input_channels:
            layers.append(Conv2dNormActivation(cnf.input_channels, expanded, kernel_size=1,
                                               norm_layer=norm_layer, activation_layer=nn.SiLU))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel_size=cnf.kernel,
                                           stride=cnf.stride, groups=expanded,
                                           norm_layer=norm_layer, activation_layer=nn.SiLU))
        squeeze_channels = max(1, cnf.input_channels // 4)
        layers.append(se_layer(expanded, squeeze_channels,
                               activation=functools.partial(nn.SiLU, inplace=True)))
        layers.append(Conv2dNormActivation(expanded, cnf.out_channels, kernel_size=1,
                                           norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cnf.out_channels

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result) + input
        return result


class EfficientNet(nn.Module):
    def __init__(self, inverted_residual_setting: Sequence[MBConvConfig], dropout: float,
                 stochastic_depth_prob: float = 0.2, num_classes: int = 1000,
                 norm_layer: Callable[..., nn.Module] | None = None,
                 last_channel: int | None = None) -> None:
        super().__init__()
        if not inverted_residual_setting:
            raise ValueError("The inverted_residual_setting should not be empty")
        norm_layer = norm_layer or nn.BatchNorm2d
        first = inverted_residual_setting[0].input_channels
        layers: list[nn.Module] = [Conv2dNormActivation(3, first, kernel_size=3, stride=2,
                                                        norm_layer=norm_layer,
                                                        activation_layer=nn.SiLU)]
        total = sum(cnf.num_layers for cnf in inverted_residual_setting)
        block_id = 0
        for cnf in inverted_residual_setting:
            stage: list[nn.Module] = []
            for _ in range(cnf.num_layers):
                block_cnf = copy.copy(cnf)
                if stage:  # every block after a stage's first keeps its width and stride 1
                    block_cnf.input_channels = block_cnf.out_channels
                    block_cnf.stride = 1
                # Deeper blocks are dropped more often (linear in the block's index).
                sd_prob = stochastic_depth_prob * float(block_id) / total
                stage.append(block_cnf.block(block_cnf, sd_prob, norm_layer))
                block_id += 1
            layers.append(nn.Sequential(*stage))
        last_in = inverted_residual_setting[-1].out_channels
        last_out = last_channel if last_channel is not None else 4 * last_in
        layers.append(Conv2dNormActivation(last_in, last_out, kernel_size=1,
                                           norm_layer=norm_layer, activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True),
                                        nn.Linear(last_out, num_classes))
        init_like_torchvision(self, linear="uniform")

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(nn.functional.flatten(x, 1))


def efficientnet_conf(width_mult: float, depth_mult: float) -> list[MBConvConfig]:
    """torchvision's EfficientNet-B stage table (expand, kernel, stride, in, out, layers)."""
    conf = functools.partial(MBConvConfig, width_mult=width_mult, depth_mult=depth_mult)
    return [conf(1, 3, 1, 32, 16, 1), conf(6, 3, 2, 16, 24, 2), conf(6, 5, 2, 24, 40, 2),
            conf(6, 3, 2, 40, 80, 3), conf(6, 5, 1, 80, 112, 3), conf(6, 5, 2, 112, 192, 4),
            conf(6, 3, 1, 192, 320, 1)]


def efficientnet_b0(num_classes: int | None = None, weights: Any = None, *,
                    pretrained: bool | None = None, **kwargs: Any) -> EfficientNet:
    """EfficientNet-B0 (torchvision's ``efficientnet_b0``: dropout 0.2, stochastic depth 0.2);
    ``weights``: a local ``.npz`` / ``.safetensors``; ``kwargs``: ``EfficientNet``'s
    (``dropout``, ``stochastic_depth_prob``, ``norm_layer``)."""
    dropout = kwargs.pop("dropout", 0.2)
    return build("efficientnet_b0",
                 lambda n: EfficientNet(efficientnet_conf(1.0, 1.0), dropout, num_classes=n,
                                        **kwargs),
                 "classifier.1.weight", num_classes, weights, pretrained)
