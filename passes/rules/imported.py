"""Rules for ONNX ops that only imported files emit: ``InstanceNormalization`` and ``Range``.

``InstanceNormalization`` follows PyTorch's ``instance_norm`` backward (batch norm over each
sample's spatial positions, per channel): the statistics are recomputed from the node's input in
its dtype, as the ``GroupNormalization`` rule does. ``Range`` is usually folded before it is
differentiated (its inputs come from ``Shape``), but a float ``Range`` whose start or delta are
computed from parameters is linear in them: ``out[i] = start + i * delta``.
"""
from __future__ import annotations

import numpy as np

from ..builder import np_dtype, static_shape
from . import attr, rule


@rule("InstanceNormalization")
def instance_normalization(b, node, grads, needs):
    x, scale = node.inputs[0], node.inputs[1]
    xs = static_shape(x)
    if xs is None or len(xs) < 3:
        raise ValueError(f"InstanceNormalization node {node.name}: the gradient needs the static "
                         f"shape of a rank >= 3 input [N, C, D1, ...] (got {xs})")
    g = grads[0]
    if g is None:
        return [None, None, None]
    c = xs[1]
    spatial = b.ints(list(range(2, len(xs))))
    per_channel = b.ints([1, c] + [1] * (len(xs) - 2))
    eps = b.const_like(attr(node, "epsilon", 1e-5), x)
    centered = b.op("Sub", x, b.op("ReduceMean", x, spatial, keepdims=1))
    var = b.op("ReduceMean", b.op("Mul", centered, centered), spatial, keepdims=1)
    inv = b.op("Div", b.const_like(1, x), b.op("Sqrt", b.op("Add", var, eps)))
    xhat = b.op("Mul", centered, inv)
    d_x = d_scale = d_bias = None
    if needs[0]:
        # dx = inv * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) over each (n, c)
        dxhat = b.op("Mul", g, b.op("Reshape", scale, per_channel))
        mean_d = b.op("ReduceMean", dxhat, spatial, keepdims=1)
        mean_dx = b.op("ReduceMean", b.op("Mul", dxhat, xhat), spatial, keepdims=1)
        d_x = b.op("Mul", inv, b.op("Sub", b.op("Sub", dxhat, mean_d),
                                    b.op("Mul", xhat, mean_dx)))
    others = b.ints([0] + list(range(2, len(xs))))
    if needs[1]:
        d_scale = b.op("ReduceSum", b.op("Mul", g, xhat), others, keepdims=0)
    if len(node.inputs) > 2 and needs[2]:
        d_bias = b.op("ReduceSum", g, others, keepdims=0)
    return [d_x, d_scale, d_bias]


@rule("Range")
def range_(b, node, grads, needs):
    # out[i] = start + i * delta: d start = sum(g), d delta = sum(i * g); limit only sets the
    # length (piecewise constant: no gradient, as torch.arange has none).
    g = grads[0]
    if g is None:
        return [None, None, None]
    n = static_shape(node.outputs[0])
    if n is None:
        raise ValueError(f"Range node {node.name}: the gradient needs the output's static length")
    axis = b.ints([0])
    d_start = d_delta = None
    if needs[0]:
        d_start = b.op("ReduceSum", g, axis, keepdims=0)
    if needs[2]:
        steps = b.const(np.arange(n[0], dtype=np_dtype(node.outputs[0])))
        d_delta = b.op("ReduceSum", b.op("Mul", g, steps), axis, keepdims=0)
    return [d_start, None, d_delta]

