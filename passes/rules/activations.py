"""Rules for the mobile nets' activations and group normalization (``tracer/activations.py``,
and the ``HardSwish`` / ``HardSigmoid`` nodes of exported MobileNetV3s); formulas and kink
conventions follow PyTorch's CPU kernels (``hardswish_backward``, ``hardsigmoid_backward``,
``mish_backward``, ``native_group_norm_backward``)."""
from __future__ import annotations

from ..builder import static_shape
from . import attr, rule


@rule("HardSwish", same_shape=True)
def hardswish(b, node, grads, needs):
    # NOTE: PyTorch's convention at the kinks: 0 below -3, g * (x / 3 + 1/2) on [-3, 3] (so
    # -g/2 at -3 and 3g/2 at 3), g above 3.
    x = node.inputs[0]
    inner = b.op("Add", b.op("Div", x, b.const_like(3, x)), b.const_like(0.5, x))
    upper = b.op("Where", b.op("LessOrEqual", x, b.const_like(3, x)), inner, b.const_like(1, x))
    factor = b.op("Where", b.op("Less", x, b.const_like(-3, x)), b.const_like(0, x), upper)
    return [b.op("Mul", grads[0], factor)]


@rule("HardSigmoid", same_shape=True)
def hardsigmoid(b, node, grads, needs):
    # NOTE: alpha where 0 < alpha * x + beta < 1 (open: PyTorch's gradient is 0 at -3 and 3 for
    # its alpha 1/6, beta 1/2), 0 elsewhere.
    x = node.inputs[0]
    alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
    t = b.op("Add", b.op("Mul", x, b.const_like(alpha, x)), b.const_like(beta, x))
    inside = b.op("And", b.op("Greater", t, b.const_like(0, x)),
                  b.op("Less", t, b.const_like(1, x)))
    mask = b.op("Cast", inside, to=x.dtype)
    return [b.op("Mul", b.op("Mul", grads[0], b.const_like(alpha, x)), mask)]


@rule("Mish", same_shape=True)
def mish(b, node, grads, needs):
    # g * (tanh(sp) + x * sigmoid(x) * (1 - tanh(sp)^2)), sp = softplus(x): mish_backward.
    x = node.inputs[0]
    t = b.op("Tanh", b.op("Softplus", x))
    one = b.const_like(1, x)
    slope = b.op("Mul", b.op("Mul", x, b.op("Sigmoid", x)), b.op("Sub", one, b.op("Mul", t, t)))
    return [b.op("Mul", grads[0], b.op("Add", t, slope))]


@rule("GroupNormalization")
def group_normalization(b, node, grads, needs):
    """Opset-21 GroupNormalization: per-group statistics, per-channel scale and bias.

    The statistics are recomputed here in the input's dtype (onnxgrad's forward stashes in the
    input's dtype too), then dX = inv_std * (dXhat - mean(dXhat) - Xhat * mean(dXhat * Xhat))
    per group, as PyTorch's native_group_norm_backward.
    """
    x, scale = node.inputs[0], node.inputs[1]
    xs = static_shape(x)
    if xs is None or len(xs) < 3:
        raise ValueError(f"GroupNormalization node {node.name}: the gradient needs the static "
                         f"shape of a rank >= 3 input (got {xs})")
    c = xs[1]
    groups = attr(node, "num_groups")
    ss = static_shape(scale)
    if ss != (c,):
        raise ValueError(f"GroupNormalization node {node.name}: the gradient needs opset 21's "
                         f"per-channel scale of shape ({c},), got {ss} (an opset-18 per-group "
                         f"scale: convert the model to opset 21 first)")
    return normalization_grads(b, node, xs, groups, grads[0], needs)


def normalization_grads(b, node, xs, groups: int, g, needs) -> list:
    """dX, dScale, dBias of a normalization over ``groups`` groups of channels per sample
    (``node``: X, per-channel scale and bias, ``epsilon``): GroupNormalization, and
    InstanceNormalization as one group per channel."""
    x, scale = node.inputs[0], node.inputs[1]
    n, c = xs[0], xs[1]
    eps = b.const_like(attr(node, "epsilon", 1e-5), x)
    axes = b.ints([0] + list(range(2, len(xs))))
    per_channel = b.ints([1, c] + [1] * (len(xs) - 2))
    grouped = b.ints([n, groups, -1])
    last = b.ints([2])
    x3 = b.op("Reshape", x, grouped)
    centered = b.op("Sub", x3, b.op("ReduceMean", x3, last, keepdims=1))
    var = b.op("ReduceMean", b.op("Mul", centered, centered), last, keepdims=1)
    inv = b.op("Div", b.const_like(1, x), b.op("Sqrt", b.op("Add", var, eps)))
    xhat = b.op("Mul", centered, inv)
    d_x = d_scale = d_bias = None
    if needs[0]:
        dxhat = b.op("Reshape", b.op("Mul", g, b.op("Reshape", scale, per_channel)), grouped)
        mean_d = b.op("ReduceMean", dxhat, last, keepdims=1)
        mean_dx = b.op("ReduceMean", b.op("Mul", dxhat, xhat), last, keepdims=1)
        d3 = b.op("Sub", b.op("Sub", dxhat, mean_d), b.op("Mul", xhat, mean_dx))
        d_x = b.op("Reshape", b.op("Mul", inv, d3), b.ints(list(xs)))
    if needs[1]:
        full = b.op("Reshape", xhat, b.ints(list(xs)))
        d_scale = b.op("ReduceSum", b.op("Mul", g, full), axes, keepdims=0)
    if len(node.inputs) > 2 and needs[2]:
        d_bias = b.op("ReduceSum", g, axes, keepdims=0)
    return [d_x, d_scale, d_bias]
