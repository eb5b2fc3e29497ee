"""Rules for indexing ops: scatters, N-d gathers, TopK, scans, and the index-only ops.

Every rule here also serves imported files (``OnnxModule`` replays their nodes), so each reads
only what the ONNX node itself says (attributes, input shapes), not how onnxgrad emits it.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..builder import dims, static_shape
from . import attr, rule
from .shape import scatter_add, zeros_of


def _reduction(node) -> str:
    red = attr(node, "reduction", "none")
    return red.decode() if isinstance(red, bytes) else red


def _unsupported(node, red: str) -> NotImplementedError:
    return NotImplementedError(
        f"{node.op_type} node {node.name}: no gradient for reduction={red!r} "
        "(the rule covers 'none' and 'add')")


@rule("ScatterND")
def scatter_nd(b, node, grads, needs):
    # out = data with updates written (or added) at indices. reduction="none": written positions
    # take no gradient from data; each update gets the gradient at its position, repeated
    # indices each reading it, as PyTorch's index_put_ backward.
    _, indices, updates = node.inputs
    g = grads[0]
    red = _reduction(node)
    if red not in ("none", "add"):
        raise _unsupported(node, red)
    d_data = d_updates = None
    if needs[0]:
        d_data = g if red == "add" else b.op("ScatterND", g, indices, zeros_of(b, updates))
    if needs[2]:
        d_updates = b.op("GatherND", g, indices)
    return [d_data, None, d_updates]


def _int64(b, indices: ir.Value) -> ir.Value:
    return indices if np.dtype(indices.dtype.numpy()) == np.int64 else \
        b.op("Cast", indices, to=ir.DataType.INT64)


def _batch_coordinates(b, node, indices, batch_dims: int):
    """GatherND's indices with its ``batch_dims`` leading coordinates spelled out (as int64), so
    that each coordinate tuple names a position of the whole data."""
    shape = static_shape(indices)
    if shape is None:
        raise ValueError(f"GatherND node {node.name}: gradient with batch_dims needs the indices' "
                         "static shape")
    batch, middle = shape[:batch_dims], shape[batch_dims:-1]
    grid = np.stack(np.indices(batch), axis=-1).astype(np.int64)  # batch + [batch_dims]
    grid = grid.reshape(batch + (1,) * len(middle) + (batch_dims,))
    grid = np.broadcast_to(grid, batch + middle + (batch_dims,))
    return b.op("Concat", b.const(np.ascontiguousarray(grid)), _int64(b, indices), axis=-1)


@rule("GatherND")
def gather_nd(b, node, grads, needs):
    # Repeated coordinates gather the same element: their gradients add up.
    data, indices = node.inputs
    batch_dims = attr(node, "batch_dims", 0)
    # Each coordinate tuple addresses a row of the data with its first k dims made one:
    # a Gather's gradient there (see scatter_add: not ScatterND, which races).
    shape, lookups = static_shape(data), static_shape(indices)
    if shape is None or lookups is None:
        raise ValueError(f"GatherND node {node.name}: gradient needs the static shapes of the "
                         "data and the indices")
    k = batch_dims + lookups[-1]
    if batch_dims:
        indices = _batch_coordinates(b, node, indices, batch_dims)
    idx = _int64(b, indices)
    lead = np.asarray(shape[:k], dtype=np.int64)
    idx = b.op("Where", b.op("Less", idx, b.const(np.int64(0))), b.op("Add", idx, b.const(lead)),
               idx)
    strides = np.asarray([int(np.prod(lead[j + 1:])) for j in range(k)], dtype=np.int64)
    rows = b.op("ReduceSum", b.op("Mul", idx, b.const(strides)), b.ints([-1]), keepdims=0)
    rows.shape = ir.Shape(list(lookups[:-1]))
    flat = [int(np.prod(lead))] + list(shape[k:])
    dx = b.op("Reshape", scatter_add(b, zeros_of(b, data, flat), 0, rows, grads[0]),
              b.ints(list(shape)))
    return [dx, None]


@rule("ScatterElements")
def scatter_elements(b, node, grads, needs):
    _, indices, updates = node.inputs
    axis = attr(node, "axis", 0)
    g = grads[0]
    red = _reduction(node)
    if red not in ("none", "add"):
        raise _unsupported(node, red)
    d_data = d_updates = None
    if needs[0]:
        d_data = g if red == "add" else b.op("ScatterElements", g, indices,
                                             zeros_of(b, updates), axis=axis)
    if needs[2]:
        d_updates = b.op("GatherElements", g, indices, axis=axis)
    return [d_data, None, d_updates]


@rule("TopK")
def topk(b, node, grads, needs):
    # The values are x at the indices output: the gradient goes back to those positions.
    x = node.inputs[0]
    g = grads[0]
    if g is None:
        return [None, None]
    axis = attr(node, "axis", -1)
    dx = b.op("ScatterElements", zeros_of(b, x), node.outputs[1], g, axis=axis,
              reduction="add")
    return [dx, None]


@rule("CumSum", same_shape=True)
def cumsum(b, node, grads, needs):
    # y_i = sum_{j <= i} x_j, so dx_j = sum_{i >= j} g_i: the same scan in the other direction.
    _, axis = node.inputs
    dx = b.op("CumSum", grads[0], axis, exclusive=attr(node, "exclusive", 0),
              reverse=1 - attr(node, "reverse", 0))
    return [dx, None]


@rule("ReverseSequence", same_shape=True)
def reverse_sequence(b, node, grads, needs):
    # A permutation that is its own inverse.
    _, lengths = node.inputs
    dx = b.op("ReverseSequence", grads[0], lengths, batch_axis=attr(node, "batch_axis", 1),
              time_axis=attr(node, "time_axis", 0))
    return [dx, None]


@rule("NonZero")
def nonzero(b, node, grads, needs):
    return [None]  # integer coordinates: no gradient flows back


@rule("OneHot")
def one_hot(b, node, grads, needs):
    # out = values[1] where the class matches, values[0] elsewhere: no gradient to the
    # indices or the depth; the two values get the sums of the gradient over their positions.
    indices, depth, values = node.inputs
    if not needs[2]:
        return [None, None, None]
    g = grads[0]
    ones = b.const(np.array([0, 1], dtype=values.dtype.numpy()))
    hot = b.op("OneHot", indices, depth, ones, axis=attr(node, "axis", -1))
    hot.dtype = values.dtype
    rank = dims(node.outputs[0])
    axes = b.ints(range(len(rank))) if rank is not None else None
    on = b.op("ReduceSum", b.op("Mul", g, hot), axes, keepdims=0)
    total = b.op("ReduceSum", g, axes, keepdims=0)
    off = b.op("Sub", total, on)
    pair = b.op("Concat", b.op("Unsqueeze", off, b.ints([0])), b.op("Unsqueeze", on, b.ints([0])),
                axis=0)
    return [None, None, pair]
