"""ResNet (He et al. 2015) with torchvision's architecture, module tree and parameter names.

The module structure is torchvision's exactly (``conv1``, ``bn1``, ``relu``, ``maxpool``,
``layer1.0.conv1``, ``layer1.0.downsample.0``, ..., ``fc``), so a torchvision state dict maps
onto these models key for key and the parameters keep those names all the way into exported ONNX.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import nn
from ..tracer.factories import generator
from .weights import head_size, load_weights, read_state, resolve_weights

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50",
           "resnet101", "resnet152"]

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (no bias: a BatchNorm always follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        # Registration order is torchvision's: it fixes the order of state_dict keys.
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Any) -> Any:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet V1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Any) -> Any:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Sequence[bool] | None = None,
                 norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must list 4 block counts, got {list(layers)}")
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, "
                             f"got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2,
                                       dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2,
                                       dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2,
                                       dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        _init_like_torchvision(self, zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: Any) -> Any:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = nn.functional.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _init_like_torchvision(model: ResNet, zero_init_residual: bool) -> None:
    """torchvision's init: conv kaiming_normal_(mode="fan_out", nonlinearity="relu"), norm
    weight 1 and bias 0; ``fc`` keeps ``nn.Linear``'s default (PyTorch's), drawn at construction.

    Draws come from onnxgrad's generator, so ``og.manual_seed`` makes models reproducible.
    """
    rng = generator()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            out_ch, _, kh, kw = m.weight.shape
            std = math.sqrt(2.0) / math.sqrt(out_ch * kh * kw)  # gain(relu) / sqrt(fan_out)
            m.weight.data = rng.normal(0.0, std, size=m.weight.shape).astype(m.weight.dtype)
        elif isinstance(m, nn.BatchNorm2d) and m.weight is not None:
            m.weight.data = np.ones(m.weight.shape, m.weight.dtype)
            m.bias.data = np.zeros(m.bias.shape, m.bias.dtype)
    if zero_init_residual:
        # Each residual branch starts as the identity, which helps very deep nets (Goyal et al.).
        for m in model.modules():
            last = (m.bn3 if isinstance(m, Bottleneck)
                    else m.bn2 if isinstance(m, BasicBlock) else None)
            if last is not None and last.weight is not None:
                last.weight.data = np.zeros(last.weight.shape, last.weight.dtype)


def _resnet(block: Block, layers: Sequence[int], name: str, num_classes: int | None,
            weights: Any, pretrained: bool | None, kwargs: dict[str, Any]) -> ResNet:
    path = resolve_weights(weights, pretrained, name)
    state = read_state(path) if path is not None else None
    if num_classes is None:
        # Like torchvision, a weights file decides the head's size unless one is asked for; an
        # explicit num_classes that disagrees with the file fails in load_state_dict, naming
        # fc.weight with both shapes.
        num_classes = head_size(state, "fc.weight") if state is not None else 1000
    model = ResNet(block, layers, num_classes=num_classes, **kwargs)
    if state is not None:
        try:
            load_weights(model, state)
        except RuntimeError as exc:
            raise RuntimeError(f"{name}: loading weights from {path!r}: {exc}") from None
    return model


def resnet18(num_classes: int | None = None, weights: Any = None, *,
             pretrained: bool | None = None, **kwargs: Any) -> ResNet:
    """ResNet-18 (BasicBlocks [2, 2, 2, 2]); ``weights``: a local ``.npz`` / ``.safetensors``.

    ``num_classes`` defaults to 1000, or to the head of the weights file when one is given.
    """
    return _resnet(BasicBlock, [2, 2, 2, 2], "resnet18", num_classes, weights, pretrained, kwargs)


def resnet34(num_classes: int | None = None, weights: Any = None, *,
             pretrained: bool | None = None, **kwargs: Any) -> ResNet:
    """ResNet-34 (BasicBlocks [3, 4, 6, 3]); arguments as :func:`resnet18`."""
    return _resnet(BasicBlock, [3, 4, 6, 3], "resnet34", num_classes, weights, pretrained, kwargs)


def resnet50(num_classes: int | None = None, weights: Any = None, *,
             pretrained: bool | None = None, **kwargs: Any) -> ResNet:
    """ResNet-50 (Bottlenecks [3, 4, 6, 3]); arguments as :func:`resnet18`."""
    return _resnet(Bottleneck, [3, 4, 6, 3], "resnet50", num_classes, weights, pretrained, kwargs)


def resnet101(num_classes: int | None = None, weights: Any = None, *,
              pretrained: bool | None = None, **kwargs: Any) -> ResNet:
    """ResNet-101 (Bottlenecks [3, 4, 23, 3]); arguments as :func:`resnet18`."""
    return _resnet(Bottleneck, [3, 4, 23, 3], "resnet101", num_classes, weights, pretrained,
                   kwargs)


def resnet152(num_classes: int | None = None, weights: Any = None, *,
              pretrained: bool | None = None, **kwargs: Any) -> ResNet:
    """ResNet-152 (Bottlenecks [3, 8, 36, 3]); arguments as :func:`resnet18`."""
    return _resnet(Bottleneck, [3, 8, 36, 3], "resnet152", num_classes, weights, pretrained,
                   kwargs)
