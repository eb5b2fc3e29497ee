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


def zeros_of(b, x: ir.Value, shape: list[int] | None = None) -> ir.Value:
    """Zeros of ``x``'s dtype, in ``x``'s shape or in ``shape``."""
    zero = ir.tensor(np.zeros(1, dtype=np_dtype(x)))
    out = b.op("ConstantOfShape", shape_of(b, x) if shape is None else b.ints(shape), value=zero)
    out.shape = x.shape if shape is None else ir.Shape(shape)
    return out


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


def scatter_add(b, zeros: ir.Value, axis: int, indices: ir.Value, g: ir.Value) -> ir.Value:
    """``zeros`` with the slices of ``g`` added at ``indices`` (non-negative) along ``axis``:
    the gradient of a Gather. ``g`` has the dims zeros[:axis] + indices + zeros[axis+1:];
    repeated indices add up, in their order.

    One ScatterElements, its indices expanded over each slice. NOTE: not ScatterND of whole
    slices: ONNX Runtime's CPU ScatterND(reduction="add") updates slices on several threads at
    once, and two that hit one row race (an embedding's gradient over 1,024 tokens, 2 threads:
    20 runs gave 20 different results, up to 5.4 off); its ScatterElements adds in order.
    """
    shape = dims(zeros)
    rank, q = len(shape), len(dims(indices))
    if q != 1:  # the index dims become one (of size 1 for a scalar index)
        trailing = shape[axis + 1:]
        if not all(isinstance(d, int) for d in trailing):
            raise ValueError(f"the gradient of a gather over {q}-D indices needs the static "
                             f"sizes of the dims after its axis, got {shape}")
        g = b.op("Reshape", g, b.ints([0] * axis + [-1] + trailing))
    idx = b.op("Reshape", indices, b.ints([1] * axis + [-1] + [1] * (rank - axis - 1)))
    if rank > 1:
        idx = b.op("Expand", idx, b.op("Shape", g))
    return b.op("ScatterElements", zeros, idx, g, axis=axis, reduction="add")


def _scatter_add_on_axis(b, x, indices, g, axis):
    """Gradient of Gather(x, indices, axis): scatter-add ``g`` into zeros shaped like ``x``."""
    axis %= len(dims(x))
    size = b.const(np.asarray(dims(x)[axis], dtype=np.int64))
    idx = b.op("Where", b.op("Less", indices, b.const(np.int64(0))),
               b.op("Add", indices, size), indices)
    idx.shape = indices.shape
    return scatter_add(b, zeros_of(b, x), axis, idx, g)


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
