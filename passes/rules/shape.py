"""Rules for ops that move data without arithmetic: reshapes, transposes, slices, gathers."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..builder import dims, np_dtype, static_shape
from . import attr, const_ints, rule


def shape_of(b, x: ir.Value) -> ir.Value:
    d = dims(x)
    if d is not None and all(isinstance(v, int) for v in d):
        return b.ints(d)
    return b.op("Shape", x)


def zeros_of(b, x: ir.Value) -> ir.Value:
    zero = ir.tensor(np.zeros(1, dtype=np_dtype(x)))
    return b.op("ConstantOfShape", shape_of(b, x), value=zero)


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(b, node, grads, needs):
    x = node.inputs[0]
    zero = 0 in (dims(x) or ())  # a 0 in Reshape's shape means "copy the dim" without allowzero
    return [b.op("Reshape", grads[0], shape_of(b, x), allowzero=1 if zero else None)] + \
        [None] * (len(node.inputs) - 1)


@rule("Expand", broadcasting=True)
def expand(b, node, grads, needs):
    return [grads[0], None]


@rule("Transpose")
def transpose(b, node, grads, needs):
    perm = attr(node, "perm")
    if perm is None:
        perm = list(reversed(range(len(dims(node.inputs[0])))))
    inverse = list(np.argsort(perm))
    return [b.op("Transpose", grads[0], perm=[int(p) for p in inverse])]


@rule("Concat")
def concat(b, node, grads, needs):
    axis = attr(node, "axis")
    sizes = []
    for x in node.inputs:
        d = dims(x)
        size = d[axis]
        if not isinstance(size, int):
            raise ValueError(f"Concat node {node.name}: gradient needs static sizes on axis {axis}")
        sizes.append(size)
    parts = b.op("Split", grads[0], b.ints(sizes), axis=axis, _outputs=len(sizes))
    if len(sizes) == 1:
        parts = (parts,)
    return [p if need else None for p, need in zip(parts, needs)]


@rule("Split")
def split(b, node, grads, needs):
    axis = attr(node, "axis", 0)
    parts = [g if g is not None else zeros_of(b, out) for g, out in zip(grads, node.outputs)]
    return [b.op("Concat", *parts, axis=axis)] + [None] * (len(node.inputs) - 1)


@rule("Slice")
def slice_(b, node, grads, needs):
    x = node.inputs[0]
    shape = static_shape(x)
    if shape is None:
        raise ValueError(f"Slice node {node.name}: gradient needs the input's static shape")
    starts = const_ints(node.inputs[1], "starts", node)
    ends = const_ints(node.inputs[2], "ends", node)
    axes = const_ints(node.inputs[3], "axes", node) if len(node.inputs) > 3 else None
    steps = const_ints(node.inputs[4], "steps", node) if len(node.inputs) > 4 else None
    rank = len(shape)
    axes = [a % rank for a in (axes or range(len(starts)))]
    steps = steps or [1] * len(starts)
    index = [slice(None)] * rank
    for a, s, e, st in zip(axes, starts, ends, steps):
        # Python slices clamp exactly as ONNX Slice does (including INT64 max/min sentinels).
        index[a] = slice(s, e, st)
    index = tuple(index)
    g = grads[0]
    rest = [None] * (len(node.inputs) - 1)
    if all(st == 1 for st in steps):
        pads_begin, pads_end = [0] * rank, [0] * rank
        for a in axes:
            start, stop, _ = index[a].indices(shape[a])
            stop = max(stop, start)
            pads_begin[a], pads_end[a] = start, shape[a] - stop
        return [b.op("Pad", g, b.ints(pads_begin + pads_end))] + rest
    # Strided slices: scatter the gradient back to the flat positions it was read from.
    positions = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)[index]
    flat = b.op("ScatterND", b.op("Reshape", zeros_of(b, x), b.ints([-1])),
                b.const(positions.reshape(-1, 1)), b.op("Reshape", g, b.ints([-1])))
    return [b.op("Reshape", flat, b.ints(shape))] + rest


@rule("Pad")
def pad(b, node, grads, needs):
    mode = attr(node, "mode", "constant")
    if mode != "constant":
        from .spatial import pad_other_modes  # reflect, edge, wrap

        return pad_other_modes(b, node, grads, needs)
    x = node.inputs[0]
    shape = static_shape(x)
    pads = const_ints(node.inputs[1], "pads", node)
    if shape is None or (len(node.inputs) > 3 and node.inputs[3] is not None):
        raise ValueError(f"Pad node {node.name}: gradient needs a static shape and no axes input")
    rank = len(shape)
    starts = [pads[i] for i in range(rank)]
    ends = [pads[i] + shape[i] for i in range(rank)]
    if any(p < 0 for p in pads):
        raise ValueError(f"Pad node {node.name}: gradient of negative pads is not supported")
    return [b.op("Slice", grads[0], b.ints(starts), b.ints(ends))] + [None] * (len(node.inputs) - 1)


def _scatter_add_on_axis(b, x, indices, g, axis):
    """Gradient of Gather(x, indices, axis): scatter-add ``g`` into zeros shaped like ``x``."""
    xd = dims(x)
    rank = len(xd)
    axis %= rank
    q = len(dims(indices))
    size = b.const(np.asarray(xd[axis], dtype=np.int64))
    idx = b.op("Where", b.op("Less", indices, b.const(np.int64(0))),
               b.op("Add", indices, size), indices)
    if rank == 1:
        # A flat gather (max_pool2d's values at its indices): ScatterElements of the flat
        # indices, 0.65 ms against ScatterND's 1.0 ms for resnet18's 8x64 stem pool.
        flat = b.ints([-1])
        return b.op("ScatterElements", zeros_of(b, x), b.op("Reshape", idx, flat),
                    b.op("Reshape", g, flat), axis=0, reduction="add")
    # g has dims x[:axis] + idx + x[axis+1:]; bring the index dims first for ScatterND.
    g_perm = list(range(axis, axis + q)) + list(range(axis)) + list(range(axis + q, rank - 1 + q))
    gt = b.op("Transpose", g, perm=g_perm) if g_perm != sorted(g_perm) else g
    x_perm = [axis] + [i for i in range(rank) if i != axis]
    zeros = b.op("Transpose", zeros_of(b, x), perm=x_perm) if axis else zeros_of(b, x)
    scattered = b.op("ScatterND", zeros, b.op("Unsqueeze", idx, b.ints([-1])), gt, reduction="add")
    if not axis:
        return scattered
    return b.op("Transpose", scattered, perm=[int(p) for p in np.argsort(x_perm)])


@rule("Gather")
def gather(b, node, grads, needs):
    x, indices = node.inputs
    return [_scatter_add_on_axis(b, x, indices, grads[0], attr(node, "axis", 0)), None]


@rule("GatherElements")
def gather_elements(b, node, grads, needs):
    x, indices = node.inputs
    axis = attr(node, "axis", 0)
    dx = b.op("ScatterElements", zeros_of(b, x), indices, grads[0], axis=axis, reduction="add")
    return [dx, None]


@rule("Constant")
def constant(b, node, grads, needs):
    return []
