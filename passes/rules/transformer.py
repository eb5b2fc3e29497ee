"""Rules for the ONNX ops of transformer models (og.nn's and imported files from exporters).

``LayerNormalization`` and ``Gelu`` follow PyTorch's ``native_layer_norm_backward`` and
``gelu_backward``; ``Einsum``'s gradient of each operand is another ``Einsum``.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from ..builder import dims, np_dtype, static_shape
from . import attr, const_ints, rule
from .reduce import _axes, _restore
from .shape import shape_of


def _f32_call(b, x, fn):
    """``fn(x)`` computed in float32 when ``x`` is float64 (ORT has no float64 Erf / Gelu)."""
    if np_dtype(x) != np.float64:
        return fn(x)
    y = fn(b.op("Cast", x, to=ir.DataType.FLOAT))
    return b.op("Cast", y, to=ir.DataType.DOUBLE)


@rule("LayerNormalization")
def layer_normalization(b, node, grads, needs):
    x, scale = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    xd = dims(x)
    if xd is None:
        raise ValueError(f"LayerNormalization node {node.name}: gradient needs the input's rank")
    rank = len(xd)
    axis = attr(node, "axis", -1) % rank
    axes = list(range(axis, rank))
    g = grads[0]
    if g is None:
        return [None] * len(node.inputs)
    outs = node.outputs
    if len(outs) >= 3 and outs[1].name and outs[2].name:
        mean, rstd = outs[1], outs[2]
    else:
        # Imported files keep only Y: the statistics are recomputed as the node computed them.
        eps = b.const_like(attr(node, "epsilon", 1e-5), x)
        mean = b.op("ReduceMean", x, b.ints(axes), keepdims=1)
        centered = b.op("Sub", x, mean)
        var = b.op("ReduceMean", b.op("Mul", centered, centered), b.ints(axes), keepdims=1)
        rstd = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, eps)))
    if mean.dtype != x.dtype:  # stash_type: statistics in float32 for a float16 input
        mean = b.op("Cast", mean, to=x.dtype)
        rstd = b.op("Cast", rstd, to=x.dtype)
    xhat = b.op("Mul", b.op("Sub", x, mean), rstd)
    out_dims = xd
    d_scale = d_bias = dx = None
    if needs[1]:
        d_scale = b.sum_to(b.op("Mul", g, xhat), out_dims, dims(scale))
    if bias is not None and needs[2]:
        d_bias = b.sum_to(g, out_dims, dims(bias))
    if needs[0]:
        # dx = rstd * (gx - mean(gx) - xhat * mean(gx * xhat)), gx = g * scale
        gx = b.op("Mul", g, scale)
        m1 = b.op("ReduceMean", gx, b.ints(axes), keepdims=1)
        m2 = b.op("ReduceMean", b.op("Mul", gx, xhat), b.ints(axes), keepdims=1)
        dx = b.op("Mul", rstd, b.op("Sub", b.op("Sub", gx, m1), b.op("Mul", xhat, m2)))
    result = [dx, d_scale]
    if len(node.inputs) > 2:
        result.append(d_bias)
    return result


@rule("Gelu", same_shape=True)
def gelu(b, node, grads, needs):
    x = node.inputs[0]
    g = grads[0]
    half = b.const_like(0.5, x)
    one = b.const_like(1.0, x)
    if attr(node, "approximate", "none") == "tanh":
        # PyTorch's gelu_backward (tanh): with u = k (x + c x^3), t = tanh(u),
        # d = 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2).
        k = b.const_like(math.sqrt(2.0 / math.pi), x)
        c = b.const_like(0.044715, x)
        x2 = b.op("Mul", x, x)
        inner = b.op("Mul", k, b.op("Add", x, b.op("Mul", c, b.op("Mul", x2, x))))
        t = b.op("Tanh", inner)
        left = b.op("Mul", half, b.op("Add", one, t))
        dinner = b.op("Mul", k, b.op("Add", one, b.op("Mul", b.const_like(3.0 * 0.044715, x), x2)))
        right = b.op("Mul", b.op("Mul", half, x),
                     b.op("Mul", b.op("Sub", one, b.op("Mul", t, t)), dinner))
        return [b.op("Mul", g, b.op("Add", left, right))]
    # Exact: d = Phi(x) + x phi(x), Phi(x) = 0.5 (1 + erf(x / sqrt 2)).
    erf = _f32_call(b, b.op("Mul", x, b.const_like(1.0 / math.sqrt(2.0), x)),
                    lambda v: b.op("Erf", v))
    cdf = b.op("Mul", half, b.op("Add", one, erf))
    pdf = b.op("Mul", b.const_like(1.0 / math.sqrt(2.0 * math.pi), x),
               b.op("Exp", b.op("Mul", b.const_like(-0.5, x), b.op("Mul", x, x))))
    return [b.op("Mul", g, b.op("Add", cdf, b.op("Mul", x, pdf)))]


@rule("Trilu", same_shape=True)
def trilu(b, node, grads, needs):
    k = node.inputs[1] if len(node.inputs) > 1 else None
    upper = attr(node, "upper", 1)
    args = [grads[0]] + ([k] if k is not None else [])
    return [b.op("Trilu", *args, upper=upper)] + [None] * (len(node.inputs) - 1)


@rule("CastLike")
def cast_like(b, node, grads, needs):
    x = node.inputs[0]
    if not np.issubdtype(np_dtype(x), np.floating):
        return [None, None]
    return [b.op("Cast", grads[0], to=x.dtype), None]


@rule("Tile")
def tile(b, node, grads, needs):
    x = node.inputs[0]
    shape = static_shape(x)
    reps = const_ints(node.inputs[1], "repeats", node)
    if shape is None:
        raise ValueError(f"Tile node {node.name}: gradient needs the input's static shape")
    if all(r == 1 for r in reps):
        return [grads[0], None]
    # The output splits as [r0, d0, r1, d1, ...]: sum over the repeat axes.
    split = [v for r, d in zip(reps, shape) for v in (r, d)]
    g = b.op("Reshape", grads[0], b.ints(split))
    g = b.op("ReduceSum", g, b.ints(range(0, 2 * len(shape), 2)), keepdims=0)
    return [g, None]


@rule("ReduceL2")
def reduce_l2(b, node, grads, needs):
    # NOTE: PyTorch's norm_backward: x * g / norm, and 0 where the norm is 0.
    x = node.inputs[0]
    axes = _axes(node)
    g = _restore(b, node, grads[0], axes)
    out = _restore(b, node, node.outputs[0], axes)
    zero = b.const_like(0, x)
    is_zero = b.op("Equal", out, zero)
    safe = b.op("Where", is_zero, b.const_like(1, x), out)
    dx = b.op("Mul", x, b.op("Div", g, safe))
    dx = b.op("Where", is_zero, b.op("Mul", dx, zero), dx)
    return [dx] + [None] * (len(node.inputs) - 1)


@rule("ReduceLogSumExp")
def reduce_log_sum_exp(b, node, grads, needs):
    x = node.inputs[0]
    axes = _axes(node)
    g = _restore(b, node, grads[0], axes)
    out = _restore(b, node, node.outputs[0], axes)
    return [b.op("Mul", g, b.op("Exp", b.op("Sub", x, out)))] + [None] * (len(node.inputs) - 1)


# --------------------------------------------------------------------------- Einsum
def _parse_einsum(node) -> tuple[list[str], str]:
    """The operand terms and the output term, with '...' spelled out as letters."""
    equation = attr(node, "equation")
    if isinstance(equation, bytes):
        equation = equation.decode()
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if not arrow:
        # Implicit output: '...' first, then the letters seen once, in alphabetical order.
        letters = "".join(t.replace("...", "") for t in terms)
        once = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
        rhs = ("..." if "..." in lhs else "") + once
    if "..." in equation:
        ranks = [None if dims(v) is None else len(dims(v)) for v in node.inputs]
        spans = {r - (len(t) - 3) for t, r in zip(terms, ranks) if "..." in t and r is not None}
        if None in [r for t, r in zip(terms, ranks) if "..." in t] or len(spans) != 1:
            raise ValueError(f"Einsum node {node.name}: gradient of '...' needs known ranks that "
                             f"span the same number of dims ({equation!r})")
        used = set(equation)
        sub = "".join([c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used][:spans.pop()])
        terms = [t.replace("...", sub) for t in terms]
        rhs = rhs.replace("...", sub)
    for t in terms:
        if len(set(t)) != len(t):
            raise ValueError(f"Einsum node {node.name}: gradient of a repeated index within one "
                             f"operand ({equation!r}, a diagonal) is not supported")
    return terms, rhs


@rule("Einsum")
def einsum(b, node, grads, needs):
    terms, out = _parse_einsum(node)
    g = grads[0]
    result = []
    for i, (term, x) in enumerate(zip(terms, node.inputs)):
        if not needs[i]:
            result.append(None)
            continue
        others = [out] + [t for j, t in enumerate(terms) if j != i]
        seen = set("".join(others))
        kept = "".join(c for c in term if c in seen)
        operands = [g] + [v for j, v in enumerate(node.inputs) if j != i]
        eq = ",".join(others) + "->" + kept
        dx = b.op("Einsum", *operands, equation=eq)
        if kept != term:
            # Letters summed away inside this operand alone: their gradient is broadcast back.
            missing = [k for k, c in enumerate(term) if c not in seen]
            dx = b.op("Unsqueeze", dx, b.ints(missing))
            dx = b.op("Expand", dx, shape_of(b, x))
        result.append(dx)
    return result
