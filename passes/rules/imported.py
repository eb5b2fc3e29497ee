"""Rules for ONNX ops that only imported files emit: ``InstanceNormalization`` and ``Range``.

``InstanceNormalization`` follows PyTorch's ``instance_norm`` backward (batch norm over each
sample's spatial positions, per channel): the ``GroupNormalization`` rule's gradient with one
group per channel, the statistics recomputed from the node's input in its dtype. ``Range`` is
usually folded before it is differentiated (its inputs come from ``Shape``), but a float
``Range`` whose start or delta are computed from parameters is linear in them:
``out[i] = start + i * delta``.
"""
from __future__ import annotations

import numpy as np

from ..builder import np_dtype, static_shape
from . import rule
from .activations import normalization_grads


@rule("InstanceNormalization")
def instance_normalization(b, node, grads, needs):
    xs = static_shape(node.inputs[0])
    if xs is None or len(xs) < 3:
        raise ValueError(f"InstanceNormalization node {node.name}: the gradient needs the static "
                         f"shape of a rank >= 3 input [N, C, D1, ...] (got {xs})")
    g = grads[0]
    if g is None:
        return [None, None, None]
    return normalization_grads(b, node, xs, xs[1], g, needs)  # one group per channel


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

