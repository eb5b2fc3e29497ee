"""Spatial layers built on ``tracer/spatial_ops.py``: ``ConvTranspose2d`` and ``Upsample``."""
from __future__ import annotations

import math
from typing import Any

from ..tracer import spatial_ops
from ..tracer.tensor import Tensor
from .modules import Module, Parameter, _kaiming_uniform_a_sqrt5, _pair, _uniform

__all__ = ["ConvTranspose2d", "Upsample"]


class ConvTranspose2d(Module):
    """``torch.nn.ConvTranspose2d``: weight [in_channels, out_channels / groups, kH, kW],
    PyTorch's init (fan_in from the weight's second dim, as torch computes it)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, output_padding: Any = 0, groups: int = 1, bias: bool = True,
                 dilation: Any = 1) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"ConvTranspose2d: in_channels ({in_channels}) and out_channels "
                             f"({out_channels}) must be divisible by groups ({groups})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding = _pair(stride), _pair(padding)
        self.output_padding, self.dilation = _pair(output_padding), _pair(dilation)
        self.groups = groups
        shape = (in_channels, out_channels // groups, *self.kernel_size)
        fan_in = shape[1] * self.kernel_size[0] * self.kernel_size[1]
        self.weight = Parameter(_kaiming_uniform_a_sqrt5(shape, fan_in))
        self.bias = Parameter(_uniform((out_channels,), 1 / math.sqrt(fan_in))) if bias \
            else None

    def forward(self, x: Tensor) -> Tensor:
        return spatial_ops.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding,
                                            self.output_padding, self.groups, self.dilation)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.output_padding != (0, 0):
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class Upsample(Module):
    """``torch.nn.Upsample``: ``interpolate`` with fixed arguments."""

    def __init__(self, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                 align_corners: bool | None = None) -> None:
        super().__init__()
        self.size, self.scale_factor = size, scale_factor
        self.mode, self.align_corners = mode, align_corners

    def forward(self, x: Tensor) -> Tensor:
        return spatial_ops.interpolate(x, self.size, self.scale_factor, self.mode,
                                       self.align_corners)

    def extra_repr(self) -> str:
        what = f"size={self.size}" if self.size is not None else \
            f"scale_factor={float(self.scale_factor)}"
        return f"{what}, mode='{self.mode}'"
