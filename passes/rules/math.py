"""Rules for the math ops of ``tracer/math_ops.py``: inverse trigonometric and hyperbolic
functions, rounding (zero gradients), ``Mod`` and ``ReduceProd``. Formulas follow PyTorch's
derivatives.yaml."""
from __future__ import annotations

import onnx_ir as ir

from ..builder import np_dtype
from . import rule
from .elementwise import one_minus_square
from .reduce import _axes, _no_axes_grad, _restore, _shape
from .shape import zeros_of


def _float32_between_casts(b, op_type: str, x: ir.Value) -> ir.Value:
    # NOTE: ONNX Runtime has no float64 Sinh/Cosh kernels: a float64 graph (an imported one; the
    # ops of math_ops.py cast themselves) computes them in float32 between two Casts.
    if np_dtype(x).itemsize != 8:
        return b.op(op_type, x)
    f32 = b.op("Cast", x, to=ir.DataType.FLOAT)
    return b.op("Cast", b.op(op_type, f32), to=ir.DataType.DOUBLE)


@rule("Tan", same_shape=True)
def tan(b, node, grads, needs):
    out = node.outputs[0]
    one = b.const_like(1, out)
    return [b.op("Mul", grads[0], b.op("Add", one, b.op("Mul", out, out)))]


@rule("Asin", same_shape=True)
def asin(b, node, grads, needs):
    x = node.inputs[0]
    return [b.op("Div", grads[0], b.op("Sqrt", one_minus_square(b, x)))]


@rule("Acos", same_shape=True)
def acos(b, node, grads, needs):
    x = node.inputs[0]
    return [b.op("Neg", b.op("Div", grads[0], b.op("Sqrt", one_minus_square(b, x))))]


@rule("Atan", same_shape=True)
def atan(b, node, grads, needs):
    x = node.inputs[0]
    return [b.op("Div", grads[0], b.op("Add", b.const_like(1, x), b.op("Mul", x, x)))]


@rule("Sinh", same_shape=True)
def sinh(b, node, grads, needs):
    return [b.op("Mul", grads[0], _float32_between_casts(b, "Cosh", node.inputs[0]))]


@rule("Cosh", same_shape=True)
def cosh(b, node, grads, needs):
    return [b.op("Mul", grads[0], _float32_between_casts(b, "Sinh", node.inputs[0]))]


@rule("Asinh", same_shape=True)
def asinh(b, node, grads, needs):
    x = node.inputs[0]
    return [b.op("Div", grads[0],
                 b.op("Sqrt", b.op("Add", b.op("Mul", x, x), b.const_like(1, x))))]


@rule("Acosh", same_shape=True)
def acosh(b, node, grads, needs):
    x = node.inputs[0]
    return [b.op("Div", grads[0],
                 b.op("Sqrt", b.op("Sub", b.op("Mul", x, x), b.const_like(1, x))))]


@rule("Atanh", same_shape=True)
def atanh(b, node, grads, needs):
    x = node.inputs[0]
    return [b.op("Div", grads[0], one_minus_square(b, x))]


@rule("Sign", "Floor", "Ceil", "Round", same_shape=True)
def zero_gradient(b, node, grads, needs):
    # NOTE: piecewise constant: PyTorch's gradient is zeros (also at the jumps), not None, so
    # the input's .grad exists and is 0.
    return [zeros_of(b, node.inputs[0])]


@rule("Mod", broadcasting=True)
def mod(b, node, grads, needs):
    # fmod(a, b) = a - trunc(a / b) * b: d/da = 1, d/db = -trunc(a / b) (PyTorch's fmod rule).
    (g,) = grads
    a, d = node.inputs
    db = None
    if needs[1]:
        q = b.op("Div", a, d)
        whole = b.op("Where", b.op("Less", q, b.const_like(0, q)), b.op("Ceil", q),
                     b.op("Floor", q))
        db = b.op("Neg", b.op("Mul", g, whole))
    return [g if needs[0] else None, db]


@rule("ReduceProd")
def reduce_prod(b, node, grads, needs):
    """The product of the other elements of each slice, as PyTorch's prod_backward: result / x
    without zeros; with one zero, the product of the rest at the zero and 0 elsewhere; with two or
    more, 0 everywhere."""
    x = node.inputs[0]
    axes = _axes(node)
    g = _restore(b, node, grads[0], axes)
    zero = b.const_like(0, x)
    is_zero = b.op("Equal", x, zero)
    safe = b.op("Where", is_zero, b.const_like(1, x), x)
    nonzero_prod = b.op("ReduceProd", safe, b.ints(axes), keepdims=1)
    zeros = b.op("ReduceSum", b.op("Cast", is_zero, to=x.dtype), b.ints(axes), keepdims=1)
    no_zero = b.op("Equal", zeros, zero)
    one_zero = b.op("Equal", zeros, b.const_like(1, x))
    at_zero = b.op("Where", one_zero, nonzero_prod, zero)
    elsewhere = b.op("Where", no_zero, b.op("Div", nonzero_prod, safe), zero)
    others = b.op("Where", is_zero, at_zero, elsewhere)
    return [b.op("Mul", b.op("Expand", g, _shape(b, x)), others)] + _no_axes_grad(node)
