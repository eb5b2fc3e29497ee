"""Activations, group normalization and 1-D convolution: ``og.nn.functional`` ops of the mobile
nets (MobileNetV2/V3, EfficientNet), with PyTorch's signatures and defaults.

Single standard ONNX nodes where opset 21 has one and ONNX Runtime's CPU provider runs it
(``HardSwish``, ``HardSigmoid``, ``Mish`` in float32; ``Conv``), whose gradients are the rules
in ``passes/rules/activations.py`` (``Conv``'s in ``passes/rules/nn.py``); compositions of
existing ops otherwise (``silu``, ``relu6``, ``group_norm`` and the float64 forms of the
activations), which need no gradient code.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import ops, state
from .nnops import check_conv_operands
from .ops import ShapeError, _float_input, _fmt, _where
from .registry import op
from .tensor import Tensor
from .values import const, emit, int64


def _check_input(what: str, x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a Tensor input, got {type(x).__name__}{_where()}")


def _maybe_inplace(what: str, x: Tensor, out: Tensor, inplace: bool) -> Tensor:
    """``inplace=True`` as PyTorch: the input handle takes the result (leaves guarded)."""
    if not inplace:
        return out
    if x.requires_grad and x.is_leaf and state.grad_enabled():
        raise RuntimeError(f"a leaf Variable that requires grad is being used in an in-place "
                           f"operation ({what}){_where()}")
    if out.dtype != x.dtype:
        raise TypeError(f"{what}: in-place on a {x.dtype} tensor would change its dtype to "
                        f"{out.dtype}{_where()}")
    x._write(out._v)
    return x


# --------------------------------------------------------------------------- activations
# NOTE: ONNX Runtime's CPU provider has no float64 HardSwish, HardSigmoid, Mish or Softplus
# kernel (onnxruntime 1.32). Rather than computing float64 in float32 between Casts (as erf
# does), the float64 forms below compose PyTorch's own formulas from ops that have float64
# kernels, with the same gradient conventions at the kinks; float32 emits the single node.

@op(functional=True)
def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """``x * sigmoid(x)``. NOTE: opset 21 has no Swish/SiLU op; autograd differentiates the
    product, which is PyTorch's ``sigmoid(x) * (1 + x * (1 - sigmoid(x)))`` regrouped."""
    _check_input("silu", input)
    x = Tensor(_float_input(input))
    return _maybe_inplace("silu", input, ops.mul(x, ops.sigmoid(x)), inplace)


@op(functional=True)
def relu6(input: Tensor, inplace: bool = False) -> Tensor:
    """``min(max(x, 0), 6)``: one ``Clip``, as PyTorch's exporter writes it.

    NOTE: at exactly 0 and 6 the gradient is Clip's (clamp's: bounds pass it) where PyTorch's
    relu6 (hardtanh) gives 0; everywhere else they agree. Exports of ReLU6 are this Clip too,
    so og.nn models and imported files train alike.
    """
    _check_input("relu6", input)
    return _maybe_inplace("relu6", input, ops.clamp(input, 0, 6), inplace)


@op(functional=True)
def hardswish(input: Tensor, inplace: bool = False) -> Tensor:
    """``x * relu6(x + 3) / 6``: ONNX ``HardSwish`` (alpha 1/6, beta 1/2)."""
    _check_input("hardswish", input)
    v = _float_input(input)
    if v.data.dtype == np.float64:
        x = Tensor(v)
        # Clamp's inclusive bounds give PyTorch's hardswish_backward at -3 and 3 (-1/2, 3/2).
        out = ops.div(ops.mul(x, ops.clamp(ops.add(x, 3.0), 0.0, 6.0)), 6.0)
    else:
        out = Tensor(emit("HardSwish", [v])[0])
    return _maybe_inplace("hardswish", input, out, inplace)


@op(functional=True)
def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """``relu6(x + 3) / 6``: ONNX ``HardSigmoid`` with alpha 1/6 (ONNX's default is 0.2)."""
    _check_input("hardsigmoid", input)
    v = _float_input(input)
    if v.data.dtype == np.float64:
        x = Tensor(v)
        # Selects, not a clamp: PyTorch's gradient is 0 at -3 and 3 (open interval).
        inner = ops.div(ops.add(x, 3.0), 6.0)
        out = ops.where(ops.le(x, -3.0), 0.0, ops.where(ops.ge(x, 3.0), 1.0, inner))
    else:
        out = Tensor(emit("HardSigmoid", [v], {"alpha": 1.0 / 6.0, "beta": 0.5})[0])
    return _maybe_inplace("hardsigmoid", input, out, inplace)


@op(functional=True)
def mish(input: Tensor, inplace: bool = False) -> Tensor:
    """``x * tanh(softplus(x))``: ONNX ``Mish``."""
    _check_input("mish", input)
    v = _float_input(input)
    if v.data.dtype == np.float64:
        x = Tensor(v)
        # softplus(x) = max(x, 0) + log(1 + exp(-|x|)): no overflow for large x. Its kink at 0
        # is multiplied by x in mish's derivative, so the gradient is exact there too.
        soft = ops.add(ops.relu(x), ops.log(ops.add(ops.exp(ops.neg(ops.abs(x))), 1.0)))
        out = ops.mul(x, ops.tanh(soft))
    else:
        out = Tensor(emit("Mish", [v])[0])
    return _maybe_inplace("mish", input, out, inplace)


# --------------------------------------------------------------------------- group norm
@op(functional=True)
def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.group_norm``: per-(sample, group) statistics (biased variance),
    per-channel ``weight`` and ``bias``.

    NOTE: composed (Reshape, ReduceMean, Sqrt...), not one opset-21 ``GroupNormalization``:
    onnx 1.23's shape inference leaves that node's output untyped (a context-dependent function
    without an inference function), which single-node sessions and ``check_model(full_check)``
    need. Imported ``GroupNormalization`` nodes have their rule (passes/rules/activations.py).
    """
    what = "group_norm"
    _check_input(what, input)
    if input.ndim < 2:
        raise ShapeError(f"{what}: expected at least 2-D input [N, C, *], got "
                         f"{_fmt(input.shape)}{_where()}")
    if input.dtype.kind != "f":
        raise TypeError(f"{what}: expected a floating-point input, got {input.dtype}{_where()}")
    channels = input.shape[1]
    if not isinstance(num_groups, (int, np.integer)) or num_groups < 1 or channels % num_groups:
        raise ShapeError(f"{what}: expected number of channels in input to be divisible by "
                         f"num_groups, but got input of shape {_fmt(input.shape)} and "
                         f"num_groups={num_groups}{_where()}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: {name} must be a Tensor or None{_where()}")
        if t.shape != (channels,):
            raise ShapeError(f"{what}: expected {name} of shape [{channels}] for input "
                             f"{_fmt(input.shape)}, got {_fmt(t.shape)}{_where()}")
        if t.dtype != input.dtype:
            raise TypeError(f"{what}: {name} dtype {t.dtype} does not match input dtype "
                            f"{input.dtype}{_where()}")
    x3 = ops.reshape(input, [input.shape[0], int(num_groups), -1])
    centered = ops.sub(x3, ops.mean(x3, 2, keepdim=True))
    var = ops.mean(ops.mul(centered, centered), 2, keepdim=True)
    rstd = ops.div(1.0, ops.sqrt(ops.add(var, float(eps))))
    y = ops.reshape(ops.mul(centered, rstd), input.shape)
    per_channel = [1, channels] + [1] * (input.ndim - 2)
    if weight is not None:
        y = ops.mul(y, ops.reshape(weight, per_channel))
    if bias is not None:
        y = ops.add(y, ops.reshape(bias, per_channel))
    return y


# --------------------------------------------------------------------------- conv1d
def _single(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 1:
        value = value[0]
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"conv1d: {name} must be an int or a 1-tuple of ints, got "
                        f"{value!r}{_where()}")
    if value < minimum:
        raise ValueError(f"conv1d: {name} must be >= {minimum}, got {value!r}{_where()}")
    return int(value)


@op(functional=True)
def conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
           padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
    """``torch.nn.functional.conv1d`` as one 1-D ONNX ``Conv`` ([N, C, L] or unbatched [C, L]).

    ``padding`` is an int, a 1-tuple, ``"valid"`` or ``"same"`` (stride 1; odd extra at the end,
    as PyTorch). Gradients: the rank-generic formulations of the ``Conv`` rule.
    """
    what = "conv1d"
    _check_input(what, input)
    if not isinstance(weight, Tensor):
        raise TypeError(f"{what}: weight must be a Tensor, got {type(weight).__name__}{_where()}")
    if input.dtype.kind != "f":
        raise TypeError(f"{what}: expected a floating-point input, got {input.dtype}{_where()}")
    if input.ndim not in (2, 3):
        raise ShapeError(f"{what}: expected 2-D (unbatched) or 3-D (batched) input [N, C, L], "
                         f"got {input.ndim}-D input of shape {_fmt(input.shape)}{_where()}")
    (k,) = check_conv_operands(what, input, input.shape[-2], weight, bias, groups, spatial=1)
    s = _single(stride, "stride", 1)
    d = _single(dilation, "dilation", 1)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [0, 0]
        elif padding == "same":
            if s != 1:
                raise ValueError(f"{what}: padding='same' is not supported for strided "
                                 f"convolutions (stride={s}){_where()}")
            total = d * (k - 1)
            pads = [total // 2, total - total // 2]
        else:
            raise ValueError(f"{what}: padding must be 'valid', 'same', an int or a 1-tuple, "
                             f"got {padding!r}{_where()}")
    else:
        p = _single(padding, "padding", 0)
        pads = [p, p]
    length = input.shape[-1] + pads[0] + pads[1]
    span = d * (k - 1) + 1
    if length < span:
        raise ShapeError(f"{what}: kernel {k} (dilated to {span}) is larger than the padded "
                         f"input {length} (input {_fmt(input.shape)}, padding {tuple(pads)})"
                         f"{_where()}")
    x = input._v
    if input.ndim == 2:
        x = emit("Unsqueeze", [x, const([0], int64)])[0]
    attrs = {"kernel_shape": [k], "strides": [s], "pads": pads, "dilations": [d],
             "group": int(groups)}
    inputs = [x, weight._v] + ([bias._v] if bias is not None else [])
    y = emit("Conv", inputs, attrs)[0]
    if input.ndim == 2:
        y = emit("Squeeze", [y, const([0], int64)])[0]
    return Tensor(y)
