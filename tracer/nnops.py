"""Convolution and pooling builders: PyTorch's argument conventions, standard ONNX nodes.

Each builder checks shapes before ONNX Runtime sees anything and raises :class:`ShapeError`
naming both shapes and the user's line; ``onnxgrad.nn`` layers catch it and prefix the layer name.
Gradients come from the rules in ``passes/rules/nn.py`` (``Conv``, ``MaxPool``, ``AveragePool``,
``GlobalAveragePool``); nothing here has gradient code of its own.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from . import state
from .ops import ShapeError, _fmt, _where
from .registry import op
from .tensor import Tensor
from .values import Val, const, emit, int64

IntPair = int | Sequence[int]


def _pair(value: IntPair, name: str, op: str, minimum: int) -> tuple[int, int]:
    """An int or a 1-/2-sequence of ints as (height, width), each at least ``minimum``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and len(value) in (1, 2) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        pair = (int(value[0]), int(value[-1]))
    else:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}{_where()}")
    if min(pair) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}{_where()}")
    return pair


def _batched(x: Any, op: str) -> tuple[Val, bool]:
    """The input as an NCHW Val; 3-D (unbatched CHW) input gets a batch axis, as in PyTorch."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a Tensor input, got {type(x).__name__}{_where()}")
    if x.dtype.kind != "f":
        raise TypeError(f"{op}: expected a floating-point input, got {x.dtype}{_where()}")
    if x.ndim == 4:
        return x._v, False
    if x.ndim == 3:
        return emit("Unsqueeze", [x._v, const([0], int64)])[0], True
    raise ShapeError(f"{op}: expected 3-D (unbatched) or 4-D (batched) input [N, C, H, W], got "
                     f"{x.ndim}-D input of shape {_fmt(x.shape)}{_where()}")


def _unbatched(v: Val, squeeze: bool) -> Tensor:
    if squeeze:
        v = emit("Squeeze", [v, const([0], int64)])[0]
    return Tensor(v)


# --------------------------------------------------------------------------- convolution
_KERNEL_DIMS = {1: "k", 2: "kH, kW"}


def check_conv_operands(op: str, x: Tensor, channels: int, weight: Tensor, bias: Any,
                        groups: Any, spatial: int) -> tuple[int, ...]:
    """The weight, groups and bias of a convolution over ``spatial`` dims of ``x`` (with
    ``channels`` input channels), checked with PyTorch's errors; returns the kernel size."""
    if weight.ndim != spatial + 2:
        raise ShapeError(f"{op}: weight must be {spatial + 2}-D [out_channels, "
                         f"in_channels/groups, {_KERNEL_DIMS[spatial]}], got shape "
                         f"{_fmt(weight.shape)}{_where()}")
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}{_where()}")
    out_ch, in_per_group = weight.shape[:2]
    if out_ch % groups:
        raise ShapeError(f"{op}: given groups={groups}, expected weight to be divisible by "
                         f"{groups} at dimension 0, but got weight of shape "
                         f"{_fmt(weight.shape)}{_where()}")
    if channels != in_per_group * groups:
        raise ShapeError(f"{op}: given groups={groups}, weight of shape {_fmt(weight.shape)}, "
                         f"expected input {_fmt(x.shape)} to have {in_per_group * groups} "
                         f"channels, but got {channels} channels instead{_where()}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: input dtype {x.dtype} and weight dtype {weight.dtype} differ "
                        f"(input {_fmt(x.shape)}, weight {_fmt(weight.shape)}){_where()}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"{op}: bias must be a Tensor or None{_where()}")
        if bias.shape != (out_ch,):
            raise ShapeError(f"{op}: bias must have shape [{out_ch}], got {_fmt(bias.shape)} "
                             f"(weight of shape {_fmt(weight.shape)}){_where()}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: input dtype {x.dtype} and bias dtype {bias.dtype} "
                            f"differ{_where()}")
    return tuple(weight.shape[2:])


@op(functional=True)
def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: IntPair = 1,
           padding: IntPair | str = 0, dilation: IntPair = 1, groups: int = 1) -> Tensor:
    """``torch.nn.functional.conv2d`` as one ONNX ``Conv``.

    ``padding`` is an int, a pair, or ``"valid"`` / ``"same"`` (stride 1 only, as in PyTorch;
    an odd total padding puts the extra row/column at the end, as PyTorch does).
    """
    op = "conv2d"
    if not isinstance(weight, Tensor):
        raise TypeError(f"{op}: weight must be a Tensor, got {type(weight).__name__}{_where()}")
    xv, squeeze = _batched(x, op)
    xs = tuple(xv.data.shape)
    kh, kw = check_conv_operands(op, x, xs[1], weight, bias, groups, spatial=2)
    strides = _pair(stride, "stride", op, 1)
    dilations = _pair(dilation, "dilation", op, 1)
    kernel = (kh, kw)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [0, 0, 0, 0]
        elif padding == "same":
            if strides != (1, 1):
                raise ValueError(f"{op}: padding='same' is not supported for strided "
                                 f"convolutions (stride={strides}){_where()}")
            total = [d * (k - 1) for d, k in zip(dilations, kernel)]
            # NOTE: PyTorch puts the odd extra padding at the end (bottom/right).
            pads = [total[0] // 2, total[1] // 2, total[0] - total[0] // 2,
                    total[1] - total[1] // 2]
        else:
            raise ValueError(f"{op}: padding must be 'valid', 'same', an int or a pair, got "
                             f"{padding!r}{_where()}")
    else:
        ph, pw = _pair(padding, "padding", op, 0)
        pads = [ph, pw, ph, pw]
    padded = (xs[2] + pads[0] + pads[2], xs[3] + pads[1] + pads[3])
    span = tuple(d * (k - 1) + 1 for d, k in zip(dilations, kernel))
    if padded[0] < span[0] or padded[1] < span[1]:
        raise ShapeError(f"{op}: kernel {kh}x{kw} (dilated to {span[0]}x{span[1]}) is larger "
                         f"than the padded input {padded[0]}x{padded[1]} (input "
                         f"{_fmt(x.shape)}, padding {tuple(pads)}){_where()}")
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "pads": pads,
             "dilations": list(dilations), "group": int(groups)}
    inputs = [xv, weight._v] + ([bias._v] if bias is not None else [])
    return _unbatched(emit("Conv", inputs, attrs)[0], squeeze)


# --------------------------------------------------------------------------- pooling
def _pool_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output length (``pooling_output_shape``)."""
    span = d * (k - 1) + 1
    num = size + 2 * p - span
    out = (-(-num // s) if ceil_mode else num // s) + 1
    # In ceil mode the last window must start inside the input or its left padding.
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_attrs(op: str, x: Tensor, xs: tuple[int, ...], kernel_size: IntPair,
                stride: IntPair | None, padding: IntPair, dilation: IntPair,
                ceil_mode: bool) -> dict[str, Any]:
    kernel = _pair(kernel_size, "kernel_size", op, 1)
    strides = kernel if stride is None or (isinstance(stride, Sequence) and not stride) \
        else _pair(stride, "stride", op, 1)
    pads = _pair(padding, "padding", op, 0)
    dilations = _pair(dilation, "dilation", op, 1)
    if pads[0] > kernel[0] // 2 or pads[1] > kernel[1] // 2:
        raise ValueError(f"{op}: pad should be at most half of kernel size, but got padding "
                         f"{pads} for kernel_size {kernel}{_where()}")
    out = [_pool_size(n, k, s, p, d, ceil_mode)
           for n, k, s, p, d in zip(xs[2:], kernel, strides, pads, dilations)]
    if min(out) < 1:
        raise ShapeError(f"{op}: kernel {kernel[0]}x{kernel[1]} (dilation {dilations}, "
                         f"padding {pads}) is larger than the padded input: input "
                         f"{_fmt(x.shape)} gives an output of {out[0]}x{out[1]}{_where()}")
    floor = [_pool_size(n, k, s, p, d, False)
             for n, k, s, p, d in zip(xs[2:], kernel, strides, pads, dilations)]
    attrs: dict[str, Any] = {"kernel_shape": list(kernel), "strides": list(strides),
                             "pads": [pads[0], pads[1], pads[0], pads[1]]}
    # NOTE: ceil_mode=1 is emitted only where it changes the output size. Where it does not,
    # ONNX shape inference (which lacks PyTorch's "last window starts inside" rule) disagrees
    # with ONNX Runtime and check_model(full_check=True) rejects the graph, and the onnx
    # reference evaluator miscomputes stride-1 windows; floor mode is then the same op.
    if out != floor:
        attrs["ceil_mode"] = 1
    if dilations != (1, 1):
        attrs["dilations"] = list(dilations)
    return attrs


def _nan_windows(y: Val, xv: Val, attrs: dict[str, Any]) -> Val:
    """``y`` with NaN where the window holds a NaN, as PyTorch's max_pool2d.

    NOTE: ONNX Runtime's MaxPool keeps a NaN only where it comes first in its window. A pool of
    the NaN flags finds the windows (four cheap elementwise nodes and a Y-only MaxPool); the
    gradient of such a window still goes to the element ONNX Runtime picked, where PyTorch's
    goes to the NaN (a finite gradient through a NaN output, rarely looked at).
    """
    flags = emit("Cast", [emit("IsNaN", [xv], differentiable=False)[0]],
                 {"to": int(ir.DataType.from_numpy(xv.data.dtype))}, differentiable=False)[0]
    found = emit("Cast", [emit("MaxPool", [flags], attrs, differentiable=False)[0]],
                 {"to": int(ir.DataType.BOOL)}, differentiable=False)[0]
    dtype = xv.data.dtype
    bias = emit("Where", [found, const(np.asarray(np.nan, dtype)), const(np.asarray(0, dtype))],
                differentiable=False)[0]
    return emit("Add", [y, bias])[0]


def _max_pool_nan_first(xv: Val, attrs: dict[str, Any]) -> tuple[Val, Val]:
    """MaxPool's values and indices where a NaN is the maximum of its window, as PyTorch's.

    NOTE: the indices come from pooling the input with NaN read as +inf (no gradient), and the
    values are the input's elements at those indices (``Gather`` from the flat input), so a NaN
    window gives NaN and its gradient goes to the NaN, as in PyTorch; the gather's gradient is
    a scatter-add, as the MaxPool rule's. Cost, measured on a loaded 2-core machine on
    resnet18's stem pool (4x64x112x112, forward + backward): ~185 ms against ~115 ms for the
    plain MaxPool + rule; without gradients the cheaper ``_nan_windows`` fix is used.
    """
    dtype = xv.data.dtype
    nan = emit("IsNaN", [xv], differentiable=False)[0]
    key = emit("Where", [nan, const(np.asarray(np.inf, dtype)), xv], differentiable=False)[0]
    _, indices = emit("MaxPool", [key], attrs, n_out=2, differentiable=False)
    flat = emit("Reshape", [xv, const([-1], int64)])[0]
    return emit("Gather", [flat, indices], {"axis": 0})[0], indices


@op(functional=True)
def max_pool2d(x: Tensor, kernel_size: IntPair, stride: IntPair | None = None,
               padding: IntPair = 0, dilation: IntPair = 1, ceil_mode: bool = False,
               return_indices: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``torch.nn.functional.max_pool2d`` as one ONNX ``MaxPool``.

    Its ``Indices`` output (int64, no gradient) is produced whenever a gradient can flow: the
    rule scatters through it. With ``return_indices=True`` they are returned in PyTorch's
    convention (flat within each H*W plane).
    """
    op = "max_pool2d"
    xv, squeeze = _batched(x, op)
    xs = tuple(xv.data.shape)
    attrs = _pool_attrs(op, x, xs, kernel_size, stride, padding, dilation, ceil_mode)
    # NOTE: ONNX Runtime's MaxPool with Indices runs a generic kernel, ~20x slower than the
    # Y-only one (0.8 vs 20.7 ms CPU on resnet18's stem pool at 4x64x112x112), so Indices are
    # only asked for when backward may need them.
    if not (return_indices or (x.requires_grad and state.grad_enabled())):
        return _unbatched(_nan_windows(emit("MaxPool", [xv], attrs)[0], xv, attrs), squeeze)
    y, indices = _max_pool_nan_first(xv, attrs)
    if not return_indices:
        return _unbatched(y, squeeze)
    # ONNX Runtime's indices are flat over N*C*H*W; PyTorch's are flat over each H*W plane.
    plane = emit("Mod", [indices, const(xs[2] * xs[3], int64)], differentiable=False)[0]
    return _unbatched(y, squeeze), _unbatched(plane, squeeze)


@op(functional=True)
def avg_pool2d(x: Tensor, kernel_size: IntPair, stride: IntPair | None = None,
               padding: IntPair = 0, ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Tensor:
    """``torch.nn.functional.avg_pool2d`` as one ONNX ``AveragePool`` (same divisors as PyTorch,
    including windows that ceil mode lets run past the padding)."""
    op = "avg_pool2d"
    if divisor_override is not None:
        raise NotImplementedError(f"{op}: divisor_override is not supported{_where()}")
    xv, squeeze = _batched(x, op)
    xs = tuple(xv.data.shape)
    attrs = _pool_attrs(op, x, xs, kernel_size, stride, padding, 1, ceil_mode)
    attrs["count_include_pad"] = int(bool(count_include_pad))
    return _unbatched(emit("AveragePool", [xv], attrs)[0], squeeze)


def _adaptive_bins(size: int, out: int) -> np.ndarray:
    """The [out, size] averaging matrix of PyTorch's adaptive pooling bins along one axis."""
    m = np.zeros((out, size))
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


@op(functional=True)
def adaptive_avg_pool2d(x: Tensor, output_size: int | None | Sequence[int | None]) -> Tensor:
    """``torch.nn.functional.adaptive_avg_pool2d``.

    (1, 1) is a ``GlobalAveragePool``; sizes that divide the input are an ``AveragePool``; any
    other size averages PyTorch's (possibly overlapping) bins with two ``MatMul`` by constant
    averaging matrices, so every case is standard ONNX with an exact gradient.
    """
    op = "adaptive_avg_pool2d"
    xv, squeeze = _batched(x, op)
    xs = tuple(xv.data.shape)
    if output_size is None or isinstance(output_size, (int, np.integer)):
        output_size = (output_size, output_size)
    if not isinstance(output_size, Sequence) or len(output_size) != 2:
        raise TypeError(f"{op}: output_size must be an int or a pair, got "
                        f"{output_size!r}{_where()}")
    out = tuple(n if o is None else int(o) for n, o in zip(xs[2:], output_size))
    if min(out) < 1:
        raise ValueError(f"{op}: output_size must be positive, got {output_size!r}{_where()}")
    if min(xs[2:]) < 1:
        raise ShapeError(f"{op}: input {_fmt(x.shape)} has an empty spatial dimension{_where()}")
    if out == (1, 1):
        return _unbatched(emit("GlobalAveragePool", [xv])[0], squeeze)
    if xs[2] % out[0] == 0 and xs[3] % out[1] == 0:
        kernel = [xs[2] // out[0], xs[3] // out[1]]
        if kernel == [1, 1]:
            return _unbatched(emit("Identity", [xv])[0], squeeze)
        attrs = {"kernel_shape": kernel, "strides": kernel}
        return _unbatched(emit("AveragePool", [xv], attrs)[0], squeeze)
    # y = A_h @ x @ A_w^T; the constants are tiny ([out, in] per axis) and baked into the graph.
    v = xv
    if out[1] != xs[3]:
        v = emit("MatMul", [v, const(_adaptive_bins(xs[3], out[1]).T, x.dtype)])[0]
    if out[0] != xs[2]:
        v = emit("MatMul", [const(_adaptive_bins(xs[2], out[0]), x.dtype), v])[0]
    return _unbatched(v, squeeze)


def batch_normalization(x: Tensor, scale: Tensor | None, bias: Tensor | None, mean: Tensor,
                        var: Tensor, eps: float = 1e-5) -> Tensor:
    """ONNX ``BatchNormalization`` in inference form: ``(x - mean) / sqrt(var + eps) * scale + bias``
    with per-channel ``mean`` and ``var`` given (running statistics, or the batch's in training)."""
    if x.ndim < 2:
        raise ShapeError(f"batch_norm: expected at least 2-D input, got {_fmt(x.shape)}{_where()}")
    channels = x.shape[1]
    dt = x.dtype
    scale = scale if scale is not None else Tensor(Val(np.ones(channels, dt)))
    bias = bias if bias is not None else Tensor(Val(np.zeros(channels, dt)))
    for what, t in (("weight", scale), ("bias", bias), ("mean", mean), ("variance", var)):
        if t.shape != (channels,):
            raise ShapeError(f"batch_norm: {what} of shape {_fmt(t.shape)} does not match the "
                             f"{channels} channels of input {_fmt(x.shape)}{_where()}")
        if t.dtype != dt:
            raise TypeError(f"batch_norm: {what} dtype {t.dtype} does not match input dtype "
                            f"{dt}{_where()}")
    inputs = [x._v, scale._v, bias._v, mean._v, var._v]
    return Tensor(emit("BatchNormalization", inputs, {"epsilon": float(eps)})[0])
