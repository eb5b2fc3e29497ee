"""Rules for reductions: the gradient is the seed broadcast back over the reduced axes."""
from __future__ import annotations

import numpy as np

from ..builder import dims
from . import attr, const_ints, rule
from .shape import zeros_of


def _axes(node) -> list[int]:
    rank = len(dims(node.inputs[0]))
    axes = const_ints(node.inputs[1], "axes", node) if len(node.inputs) > 1 else None
    if not axes:
        if attr(node, "noop_with_empty_axes", 0):
            return []
        return list(range(rank))
    return sorted(a % rank for a in axes)


def _restore(b, node, g, axes):
    """The output gradient with the reduced axes put back as size-1 dims."""
    if attr(node, "keepdims", 1) or not axes:
        return g
    return b.op("Unsqueeze", g, b.ints(axes))


def _no_axes_grad(node) -> list[None]:
    # The axes input is optional (a full reduction has none): one None per extra input, so the
    # driver's arity check holds either way.
    return [None] * (len(node.inputs) - 1)


def _shape(b, x):
    d = dims(x)
    if d is not None and all(isinstance(v, int) for v in d):
        return b.ints(d)
    return b.op("Shape", x)


def _expand(b, g, x):
    """``g`` broadcast to ``x``'s shape. NOTE: an empty ``x`` (a batch of 0) gets zeros of its
    shape directly: ONNX Runtime's Expand of a [1] gradient to a shape holding 0 gives [1]."""
    d = dims(x)
    if d is not None and 0 in d:
        return zeros_of(b, x)
    return b.op("Expand", g, _shape(b, x))


@rule("ReduceSum")
def reduce_sum(b, node, grads, needs):
    x = node.inputs[0]
    g = _restore(b, node, grads[0], _axes(node))
    return [_expand(b, g, x)] + _no_axes_grad(node)


@rule("ReduceMean")
def reduce_mean(b, node, grads, needs):
    x = node.inputs[0]
    axes = _axes(node)
    d = dims(x)
    count = int(np.prod([d[a] for a in axes])) if all(isinstance(d[a], int) for a in axes) else None
    g = _restore(b, node, grads[0], axes)
    if count is None:
        size = b.op("ReduceProd", b.op("Gather", b.op("Shape", x), b.ints(axes)), keepdims=0)
        g = b.op("Div", g, b.op("Cast", size, to=x.dtype))
    else:
        g = b.op("Div", g, b.const_like(count, x))
    return [_expand(b, g, x)] + _no_axes_grad(node)


@rule("ReduceMax", "ReduceMin")
def reduce_max(b, node, grads, needs):
    # NOTE: ties share the gradient evenly, as torch.amax / torch.amin.
    x = node.inputs[0]
    axes = _axes(node)
    g = _restore(b, node, grads[0], axes)
    out = _restore(b, node, node.outputs[0], axes)
    mask = b.op("Cast", b.op("Equal", x, out), to=x.dtype)
    count = b.op("ReduceSum", mask, b.ints(axes), keepdims=1)
    return [b.op("Mul", b.op("Div", g, count), mask)] + _no_axes_grad(node)
