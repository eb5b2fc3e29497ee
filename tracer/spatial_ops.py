"""Padding, resizing and transposed convolution: PyTorch's functions as standard ONNX nodes.

``pad`` is one ``Pad`` (constant, reflect, replicate = ONNX ``edge``, circular = ``wrap``),
``interpolate`` one ``Resize`` (nearest, bilinear, with ``align_corners``), and
``conv_transpose2d`` one ``ConvTranspose``. Their gradients are the rules in
``passes/rules/shape.py`` (constant ``Pad``) and ``passes/rules/spatial.py`` (other pad modes,
``Resize``, ``ConvTranspose``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .nnops import IntPair, _batched, _pair, _unbatched
from .ops import ShapeError, _fmt, _where
from .registry import op
from .tensor import Tensor
from .values import Val, const, emit, int64

PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge",
             "circular": "wrap"}


@op(functional=True)
def pad(input: Tensor, pad: Sequence[int], mode: str = "constant",
        value: float | None = None) -> Tensor:
    """``torch.nn.functional.pad``: ``pad`` lists (before, after) pairs from the last dim back."""
    x = input
    if not isinstance(x, Tensor):
        raise TypeError(f"pad: expected a Tensor input, got {type(x).__name__}{_where()}")
    pads = [int(p) for p in pad]
    if len(pads) % 2 or len(pads) // 2 > x.ndim:
        raise ValueError(f"pad: padding length must be even and at most twice the number of "
                         f"dimensions ({x.ndim}), got {len(pads)}{_where()}")
    if mode not in PAD_MODES:
        raise ValueError(f"pad: mode must be one of {sorted(PAD_MODES)}, got {mode!r}{_where()}")
    n = len(pads) // 2
    begin, end = [0] * x.ndim, [0] * x.ndim
    for k in range(n):
        axis = x.ndim - 1 - k
        begin[axis], end[axis] = pads[2 * k], pads[2 * k + 1]
        size = x.shape[axis]
        if mode == "reflect" and max(begin[axis], end[axis]) >= size:
            raise ValueError(f"pad: padding size should be less than the corresponding input "
                             f"dimension in reflect mode, but got padding ({begin[axis]}, "
                             f"{end[axis]}) at dimension {axis} of input {_fmt(x.shape)}{_where()}")
        if mode != "constant" and min(begin[axis], end[axis]) < 0:
            raise ValueError(f"pad: negative padding is only supported in constant mode{_where()}")
        if mode == "circular" and max(begin[axis], end[axis]) > size:
            raise ValueError(f"pad: padding value causes wrapping around more than once "
                             f"(dimension {axis} of input {_fmt(x.shape)}){_where()}")
        if size + begin[axis] + end[axis] < 0:
            raise ShapeError(f"pad: padding ({begin[axis]}, {end[axis]}) at dimension {axis} "
                             f"makes input {_fmt(x.shape)} negative-sized{_where()}")
    if mode != "constant" and value:
        raise ValueError(f"pad: padding mode {mode!r} doesn't take in value argument{_where()}")
    if x.ndim and mode in ("reflect", "replicate", "circular") and n > x.ndim - 1 and x.ndim > 1:
        # NOTE: as PyTorch, non-constant modes never pad the batch dimension.
        raise ValueError(f"pad: {mode} padding of a {x.ndim}-D input takes at most "
                         f"{2 * (x.ndim - 1)} values, got {len(pads)}{_where()}")
    inputs = [x._v, const(begin + end, int64)]
    if mode == "constant":
        inputs.append(Val(np.asarray(0 if value is None else value, x.dtype), const=True))
    return Tensor(emit("Pad", inputs, {"mode": PAD_MODES[mode]})[0])


INTERPOLATE_MODES = {"nearest": "nearest", "bilinear": "linear", "linear": "linear"}


@op(functional=True)
def interpolate(input: Tensor, size: int | Sequence[int] | None = None,
                scale_factor: float | Sequence[float] | None = None, mode: str = "nearest",
                align_corners: bool | None = None, recompute_scale_factor: bool | None = None,
                antialias: bool = False) -> Tensor:
    """``torch.nn.functional.interpolate`` for ``nearest``, ``linear`` (3-D) and ``bilinear``
    (4-D) as one ONNX ``Resize`` over the spatial dims."""
    x = input
    if not isinstance(x, Tensor):
        raise TypeError(f"interpolate: expected a Tensor input, got {type(x).__name__}{_where()}")
    if mode not in INTERPOLATE_MODES:
        raise NotImplementedError(f"interpolate: mode {mode!r} is not supported (nearest, "
                                  f"linear, bilinear){_where()}")
    spatial = x.ndim - 2
    if spatial < 1 or (mode == "bilinear" and spatial != 2) or (mode == "linear" and spatial != 1):
        raise ValueError(f"interpolate: mode {mode!r} got a {x.ndim}-D input "
                         f"{_fmt(x.shape)}{_where()}")
    if x.dtype.kind != "f":
        raise TypeError(f"interpolate: expected a floating-point input, got {x.dtype}{_where()}")
    if antialias:
        raise NotImplementedError(f"interpolate: antialias=True is not supported{_where()}")
    if mode == "nearest" and align_corners is not None:
        raise ValueError(f"interpolate: align_corners option can only be set with the "
                         f"interpolating modes: linear | bilinear{_where()}")
    if (size is None) == (scale_factor is None):
        raise ValueError(f"interpolate: only one of size or scale_factor should be "
                         f"defined{_where()}")
    attrs: dict[str, Any] = {"mode": INTERPOLATE_MODES[mode]}
    if mode == "nearest":
        attrs.update(coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    else:
        # NOTE: PyTorch's align_corners=False clamps source coordinates below 0 and maps a
        # length-1 output to 0: ONNX's pytorch_half_pixel.
        attrs["coordinate_transformation_mode"] = ("align_corners" if align_corners
                                                   else "pytorch_half_pixel")
    spatial_shape = x.shape[2:]
    if size is not None:
        sizes = [int(size)] * spatial if isinstance(size, (int, np.integer)) else \
            [int(s) for s in size]
        if len(sizes) != spatial or min(sizes) < 1:
            raise ValueError(f"interpolate: size {size!r} does not fit input {_fmt(x.shape)} "
                             f"({spatial} spatial dims, each >= 1){_where()}")
        target = list(x.shape[:2]) + sizes
        inputs = [x._v, None, None, const(target, int64)]
    else:
        factors = [float(scale_factor)] * spatial if isinstance(scale_factor, (int, float)) \
            else [float(s) for s in scale_factor]
        if len(factors) != spatial or min(factors) <= 0:
            raise ValueError(f"interpolate: scale_factor {scale_factor!r} does not fit input "
                             f"{_fmt(x.shape)}{_where()}")
        sizes = [math.floor(n * f) for n, f in zip(spatial_shape, factors)]
        if recompute_scale_factor:
            inputs = [x._v, None, None, const(list(x.shape[:2]) + sizes, int64)]
        else:
            scales = np.asarray([1.0, 1.0] + factors, np.float32)
            inputs = [x._v, None, Val(scales, const=True)]
        if min(sizes) < 1:
            raise ValueError(f"interpolate: scale_factor {scale_factor!r} gives an empty "
                             f"output for input {_fmt(x.shape)}{_where()}")
    return Tensor(emit("Resize", inputs, attrs)[0])


@op(functional=True)
def conv_transpose2d(input: Tensor, weight: Tensor, bias: Tensor | None = None,
                     stride: IntPair = 1, padding: IntPair = 0, output_padding: IntPair = 0,
                     groups: int = 1, dilation: IntPair = 1) -> Tensor:
    """``torch.nn.functional.conv_transpose2d`` as one ONNX ``ConvTranspose``."""
    name = "conv_transpose2d"
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name}: weight must be a Tensor, got {type(weight).__name__}{_where()}")
    xv, squeeze = _batched(input, name)
    xs = tuple(xv.data.shape)
    if weight.ndim != 4:
        raise ShapeError(f"{name}: weight must be 4-D [in_channels, out_channels/groups, kH, kW]"
                         f", got {_fmt(weight.shape)}{_where()}")
    if not isinstance(groups, (int, np.integer)) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"{name}: groups={groups!r} must be a positive int dividing the weight's "
                         f"{weight.shape[0]} input channels{_where()}")
    if xs[1] != weight.shape[0]:
        raise ShapeError(f"{name}: input {_fmt(input.shape)} has {xs[1]} channels, weight "
                         f"{_fmt(weight.shape)} expects {weight.shape[0]}{_where()}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{name}: input dtype {input.dtype} and weight dtype {weight.dtype} "
                        f"differ{_where()}")
    out_ch = weight.shape[1] * groups
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (out_ch,)):
        raise ShapeError(f"{name}: bias must be a Tensor of shape [{out_ch}]{_where()}")
    strides = _pair(stride, "stride", name, 1)
    dilations = _pair(dilation, "dilation", name, 1)
    ph, pw = _pair(padding, "padding", name, 0)
    out_pad = _pair(output_padding, "output_padding", name, 0)
    if any(o >= max(s, d) for o, s, d in zip(out_pad, strides, dilations)):
        raise ValueError(f"{name}: output padding must be smaller than either stride or "
                         f"dilation, got output_padding={out_pad}, stride={strides}, "
                         f"dilation={dilations}{_where()}")
    kernel = weight.shape[2:]
    out = [(n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, s, p, d, k, o in
           zip(xs[2:], strides, (ph, pw), dilations, kernel, out_pad)]
    if min(out) < 1:
        raise ShapeError(f"{name}: input {_fmt(input.shape)} and weight {_fmt(weight.shape)} "
                         f"give an output of size {out}{_where()}")
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "pads": [ph, pw, ph, pw],
             "dilations": list(dilations), "group": int(groups),
             "output_padding": list(out_pad)}
    inputs = [xv, weight._v] + ([bias._v] if bias is not None else [])
    return _unbatched(emit("ConvTranspose", inputs, attrs)[0], squeeze)
