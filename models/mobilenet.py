"""MobileNetV2 (Sandler et al. 2018) and MobileNetV3 (Howard et al. 2019) with torchvision's
architecture, module tree and parameter names.

The module structure is torchvision's exactly (``features.0.0`` the stem convolution,
``features.1.conv.0.0`` / ``features.1.block.0.0``..., ``classifier.1``), so a torchvision state
dict maps onto these models key for key. The shared pieces (``Conv2dNormActivation``,
``SqueezeExcitation``, ``make_divisible``) are torchvision's ``ops.misc`` ones;
``models/efficientnet.py`` builds on them.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import nn
from ..tracer.factories import generator
from .weights import head_size, load_weights, read_state, resolve_weights

__all__ = ["Conv2dNormActivation", "InvertedResidual", "InvertedResidualConfig",
           "InvertedResidualV3", "MobileNetV2",
           "MobileNetV3", "SqueezeExcitation", "make_divisible", "mobilenet_v2",
           "mobilenet_v3_large", "mobilenet_v3_small"]

Layer = Callable[..., nn.Module]


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """The nearest multiple of ``divisor`` at least ``min_value``, never 10% below ``v``
    (torchvision's ``_make_divisible``)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    """Conv2d, then a norm layer, then an activation, as one Sequential (children 0, 1, 2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int | None = None, groups: int = 1,
                 norm_layer: Layer | None = nn.BatchNorm2d,
                 activation_layer: Layer | None = nn.ReLU, dilation: int = 1,
                 inplace: bool | None = True, bias: bool | None = None) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                                             padding, dilation=dilation, groups=groups,
                                             bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            params = {} if inplace is None else {"inplace": inplace}
            layers.append(activation_layer(**params))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """``x * scale_activation(fc2(activation(fc1(avgpool(x)))))`` (Hu et al. 2018)."""

    def __init__(self, input_channels: int, squeeze_channels: int,
                 activation: Layer = nn.ReLU, scale_activation: Layer = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, input: Any) -> Any:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(input))))
        return self.scale_activation(scale) * input


# --------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection (``conv``)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int,
                 norm_layer: Layer | None = None) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.stride = stride
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1,
                                               norm_layer=norm_layer,
                                               activation_layer=nn.ReLU6))
        layers += [
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim,
                                 norm_layer=norm_layer, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            norm_layer(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Any) -> Any:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


V2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
              [6, 160, 3, 2], [6, 320, 1, 1]]  # expansion t, channels c, repeats n, stride s


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 inverted_residual_setting: Sequence[Sequence[int]] | None = None,
                 round_nearest: int = 8, block: Layer | None = None,
                 norm_layer: Layer | None = None, dropout: float = 0.2) -> None:
        super().__init__()
        block = block or InvertedResidual
        norm_layer = norm_layer or nn.BatchNorm2d
        setting = V2_SETTING if inverted_residual_setting is None else inverted_residual_setting
        if len(setting) == 0 or any(len(s) != 4 for s in setting):
            raise ValueError(f"inverted_residual_setting should be non-empty and a 4-element "
                             f"list, got {setting}")
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2,
                                                          norm_layer=norm_layer,
                                                          activation_layer=nn.ReLU6)]
        for t, c, n, s in setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(block(input_channel, output_channel, s if i == 0 else 1,
                                      expand_ratio=t, norm_layer=norm_layer))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1,
                                             norm_layer=norm_layer, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout),
                                        nn.Linear(self.last_channel, num_classes))
        init_like_torchvision(self, linear="normal")

    def forward(self, x: Any) -> Any:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(nn.functional.flatten(x, 1))


# --------------------------------------------------------------------------- MobileNetV3
class InvertedResidualConfig:
    """One MobileNetV3 block: channels rounded to multiples of 8 after ``width_mult``."""

    def __init__(self, input_channels: int, kernel: int, expanded_channels: int,
                 out_channels: int, use_se: bool, activation: str, stride: int, dilation: int,
                 width_mult: float) -> None:
        self.input_channels = self.adjust_channels(input_channels, width_mult)
        self.kernel = kernel
        self.expanded_channels = self.adjust_channels(expanded_channels, width_mult)
        self.out_channels = self.adjust_channels(out_channels, width_mult)
        self.use_se = use_se
        self.use_hs = activation == "HS"
        self.stride = stride
        self.dilation = dilation

    @staticmethod
    def adjust_channels(channels: int, width_mult: float) -> int:
        return make_divisible(channels * width_mult, 8)


class InvertedResidualV3(nn.Module):
    """MobileNetV3's block (``block``): expansion, depthwise, squeeze-excitation with a
    hard sigmoid, projection; Hardswish or ReLU."""

    def __init__(self, cnf: InvertedResidualConfig, norm_layer: Layer,
                 se_layer: Layer | None = None) -> None:
        super().__init__()
        se_layer = se_layer or functools.partial(SqueezeExcitation,
                                                 scale_activation=nn.Hardsigmoid)
        if not 1 <= cnf.stride <= 2:
            raise ValueError("illegal stride value")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: list[nn.Module] = []
        activation_layer = nn.Hardswish if cnf.use_hs else nn.ReLU
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(Conv2dNormActivation(cnf.input_channels, cnf.expanded_channels,
                                               kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=activation_layer))
        stride = 1 if cnf.dilation > 1 else cnf.stride
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.expanded_channels,
                                           kernel_size=cnf.kernel, stride=stride,
                                           dilation=cnf.dilation, groups=cnf.expanded_channels,
                                           norm_layer=norm_layer,
                                           activation_layer=activation_layer))
        if cnf.use_se:
            squeeze_channels = make_divisible(cnf.expanded_channels // 4, 8)
            layers.append(se_layer(cnf.expanded_channels, squeeze_channels))
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.out_channels,
                                           kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels

    def forward(self, input: Any) -> Any:
        result = self.block(input)
        if self.use_res_connect:
            result = result + input
        return result


class MobileNetV3(nn.Module):
    def __init__(self, inverted_residual_setting: Sequence[InvertedResidualConfig],
                 last_channel: int, num_classes: int = 1000, block: Layer | None = None,
                 norm_layer: Layer | None = None, dropout: float = 0.2) -> None:
        super().__init__()
        if not inverted_residual_setting:
            raise ValueError("The inverted_residual_setting should not be empty")
        block = block or InvertedResidualV3
        # NOTE: torchvision's MobileNetV3 BatchNorms: eps 1e-3, momentum 0.01.
        norm_layer = norm_layer or functools.partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        first = inverted_residual_setting[0].input_channels
        layers: list[nn.Module] = [Conv2dNormActivation(3, first, kernel_size=3, stride=2,
                                                        norm_layer=norm_layer,
                                                        activation_layer=nn.Hardswish)]
        layers += [block(cnf, norm_layer) for cnf in inverted_residual_setting]
        last_in = inverted_residual_setting[-1].out_channels
        last_out = 6 * last_in
        layers.append(Conv2dNormActivation(last_in, last_out, kernel_size=1,
                                           norm_layer=norm_layer,
                                           activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_out, last_channel),
                                        nn.Hardswish(inplace=True),
                                        nn.Dropout(p=dropout, inplace=True),
                                        nn.Linear(last_channel, num_classes))
        init_like_torchvision(self, linear="normal")

    def forward(self, x: Any) -> Any:
        x = self.avgpool(self.features(x))
        return self.classifier(nn.functional.flatten(x, 1))


def mobilenet_v3_conf(arch: str, width_mult: float = 1.0, reduced_tail: bool = False,
                      dilated: bool = False) -> tuple[list[InvertedResidualConfig], int]:
    """torchvision's block table and last channel count of ``mobilenet_v3_large`` / ``_small``."""
    div = 2 if reduced_tail else 1
    dil = 2 if dilated else 1
    conf = functools.partial(InvertedResidualConfig, width_mult=width_mult)
    if arch == "mobilenet_v3_large":
        rows = [(16, 3, 16, 16, False, "RE", 1, 1), (16, 3, 64, 24, False, "RE", 2, 1),
                (24, 3, 72, 24, False, "RE", 1, 1), (24, 5, 72, 40, True, "RE", 2, 1),
                (40, 5, 120, 40, True, "RE", 1, 1), (40, 5, 120, 40, True, "RE", 1, 1),
                (40, 3, 240, 80, False, "HS", 2, 1), (80, 3, 200, 80, False, "HS", 1, 1),
                (80, 3, 184, 80, False, "HS", 1, 1), (80, 3, 184, 80, False, "HS", 1, 1),
                (80, 3, 480, 112, True, "HS", 1, 1), (112, 3, 672, 112, True, "HS", 1, 1),
                (112, 5, 672 // div, 160 // div, True, "HS", 2, dil),
                (160 // div, 5, 960 // div, 160 // div, True, "HS", 1, dil),
                (160 // div, 5, 960 // div, 160 // div, True, "HS", 1, dil)]
        last = 1280 // div
    elif arch == "mobilenet_v3_small":
        rows = [(16, 3, 16, 16, True, "RE", 2, 1), (16, 3, 72, 24, False, "RE", 2, 1),
                (24, 3, 88, 24, False, "RE", 1, 1), (24, 5, 96, 40, True, "HS", 2, 1),
                (40, 5, 240, 40, True, "HS", 1, 1), (40, 5, 240, 40, True, "HS", 1, 1),
                (40, 5, 120, 48, True, "HS", 1, 1), (48, 5, 144, 48, True, "HS", 1, 1),
                (48, 5, 288 // div, 96 // div, True, "HS", 2, dil),
                (96 // div, 5, 576 // div, 96 // div, True, "HS", 1, dil),
                (96 // div, 5, 576 // div, 96 // div, True, "HS", 1, dil)]
        last = 1024 // div
    else:
        raise ValueError(f"Unsupported model type {arch}")
    return [conf(*row) for row in rows], InvertedResidualConfig.adjust_channels(last, width_mult)


# --------------------------------------------------------------------------- init and builders
def init_like_torchvision(model: nn.Module, linear: str) -> None:
    """torchvision's init of these nets: conv kaiming_normal_(mode="fan_out"), bias 0; norm
    weight 1, bias 0; Linear N(0, 0.01) (``"normal"``, MobileNets) or U(+-1/sqrt(out_features))
    (``"uniform"``, EfficientNet), bias 0. Draws come from onnxgrad's generator."""
    rng = generator()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            out_ch, _, kh, kw = m.weight.shape
            std = math.sqrt(2.0) / math.sqrt(out_ch * kh * kw)
            m.weight.data = rng.normal(0.0, std, size=m.weight.shape).astype(m.weight.dtype)
            if m.bias is not None:
                m.bias.data = np.zeros(m.bias.shape, m.bias.dtype)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            m.weight.data = np.ones(m.weight.shape, m.weight.dtype)
            if m.bias is not None:
                m.bias.data = np.zeros(m.bias.shape, m.bias.dtype)
        elif isinstance(m, nn.Linear):
            shape, dt = m.weight.shape, m.weight.dtype
            if linear == "normal":
                m.weight.data = rng.normal(0.0, 0.01, size=shape).astype(dt)
            else:
                bound = 1.0 / math.sqrt(m.out_features)
                m.weight.data = rng.uniform(-bound, bound, size=shape).astype(dt)
            m.bias.data = np.zeros(m.bias.shape, m.bias.dtype)


def build(name: str, make: Callable[[int], nn.Module], head: str, num_classes: int | None,
          weights: Any, pretrained: bool | None,
          rename: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> nn.Module:
    """A model with ``num_classes`` outputs, loaded from a local weights file when given
    (whose classifier decides the head size unless ``num_classes`` is asked for); ``rename``
    maps the file's keys first (DenseNet's old checkpoints)."""
    path = resolve_weights(weights, pretrained, name)
    state = read_state(path) if path is not None else None
    if state is not None and rename is not None:
        state = rename(state)
    if num_classes is None:
        num_classes = head_size(state, head) if state is not None else 1000
    model = make(num_classes)
    if state is not None:
        try:
            load_weights(model, state)
        except RuntimeError as exc:
            raise RuntimeError(f"{name}: loading weights from {path!r}: {exc}") from None
    return model


def mobilenet_v2(num_classes: int | None = None, weights: Any = None, *,
                 pretrained: bool | None = None, **kwargs: Any) -> MobileNetV2:
    """MobileNetV2 (torchvision's ``mobilenet_v2``); ``weights``: a local ``.npz`` /
    ``.safetensors``; ``kwargs``: ``MobileNetV2``'s (``width_mult``, ``dropout``...)."""
    return build("mobilenet_v2", lambda n: MobileNetV2(num_classes=n, **kwargs),
                 "classifier.1.weight", num_classes, weights, pretrained)


def _v3(arch: str, num_classes: int | None, weights: Any, pretrained: bool | None,
        kwargs: dict[str, Any]) -> MobileNetV3:
    conf = {k: kwargs.pop(k) for k in ("width_mult", "reduced_tail", "dilated") if k in kwargs}
    setting, last = mobilenet_v3_conf(arch, **conf)
    return build(arch, lambda n: MobileNetV3(setting, last, num_classes=n, **kwargs),
                 "classifier.3.weight", num_classes, weights, pretrained)


def mobilenet_v3_small(num_classes: int | None = None, weights: Any = None, *,
                       pretrained: bool | None = None, **kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Small (torchvision's ``mobilenet_v3_small``); arguments as
    :func:`mobilenet_v2`, plus ``width_mult``, ``reduced_tail``, ``dilated``."""
    return _v3("mobilenet_v3_small", num_classes, weights, pretrained, kwargs)


def mobilenet_v3_large(num_classes: int | None = None, weights: Any = None, *,
                       pretrained: bool | None = None, **kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Large (torchvision's ``mobilenet_v3_large``); arguments as
    :func:`mobilenet_v3_small`."""
    return _v3("mobilenet_v3_large", num_classes, weights, pretrained, kwargs)
