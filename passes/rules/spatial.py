"""Rules for ``Resize``, ``ConvTranspose`` and the non-constant modes of ``Pad``.

``Resize`` (nearest and linear) and reflect/edge/wrap ``Pad`` are linear maps that act on each
axis separately, each axis by a constant matrix built here from the static shapes and the
attributes: the gradient applies the transposed matrices, one MatMul per changed axis.
``ConvTranspose`` is the adjoint of ``Conv``: its input gradient is a ``Conv`` with the same
weight, its weight gradient a ``Conv`` with batch and channel axes swapped.
"""
from __future__ import annotations

import numpy as np

from ..builder import static_shape
from . import attr, const_ints, rule


def _contract(b, g, axis: int, rank: int, matrix: np.ndarray):
    """``g`` with axis ``axis`` (of size matrix.shape[0]) mapped by ``g @ matrix`` to size
    matrix.shape[1]: the transpose of the forward's per-axis map, applied to a gradient."""
    last = rank - 1
    perm = list(range(rank))
    perm[axis], perm[last] = perm[last], perm[axis]
    if axis != last:
        g = b.op("Transpose", g, perm=perm)
    g = b.op("MatMul", g, b.const_like(matrix, g))
    return b.op("Transpose", g, perm=perm) if axis != last else g


def _need_shapes(node):
    xs, ys = static_shape(node.inputs[0]), static_shape(node.outputs[0])
    if xs is None or ys is None:
        raise ValueError(f"{node.op_type} node {node.name}: the gradient needs static input and "
                         f"output shapes (got {xs} and {ys})")
    return xs, ys


# --------------------------------------------------------------------------- Pad
def _pad_source(j: int, n: int, before: int, mode: str) -> int:
    """The input index output position ``j`` reads along an axis padded by ``mode``."""
    p = j - before
    if mode == "edge":
        return min(max(p, 0), n - 1)
    if mode == "wrap":
        return p % n
    # reflect (the edge itself is not repeated)
    period = 2 * (n - 1) if n > 1 else 1
    p %= period
    return p if p < n else period - p


def pad_other_modes(b, node, grads, needs):
    """Pad in ``reflect``, ``edge`` or ``wrap`` mode: each output reads one input element."""
    mode = attr(node, "mode", "constant")
    if mode not in ("reflect", "edge", "wrap"):
        raise ValueError(f"Pad node {node.name}: gradient of mode {mode!r} is not supported")
    xs, _ = _need_shapes(node)
    rank = len(xs)
    pads = const_ints(node.inputs[1], "pads", node)
    axes = const_ints(node.inputs[3], "axes", node) if len(node.inputs) > 3 else None
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    if any(p < 0 for p in pads):
        raise ValueError(f"Pad node {node.name}: gradient of negative pads in mode {mode!r} is "
                         f"not supported")
    g = grads[0]
    for k, axis in enumerate(axes):
        before, after = pads[k], pads[k + len(axes)]
        if not before and not after:
            continue
        n = xs[axis]
        matrix = np.zeros((n + before + after, n), np.float64)
        for j in range(n + before + after):
            matrix[j, _pad_source(j, n, before, mode)] += 1.0
        g = _contract(b, g, axis, rank, matrix)
    return [g] + [None] * (len(node.inputs) - 1)


# --------------------------------------------------------------------------- Resize
def _source_coordinates(n_in: int, n_out: int, scale: float, mode: str,
                        f: type = np.float32) -> np.ndarray:
    """ONNX's coordinate_transformation_mode, computed in ``f`` (ONNX Runtime: float32)."""
    x = np.arange(n_out, dtype=f)
    scale = f(scale)
    if mode == "half_pixel":
        return (x + f(0.5)) / scale - f(0.5)
    if mode == "pytorch_half_pixel":
        return (x + f(0.5)) / scale - f(0.5) if n_out > 1 else np.zeros(n_out, f)
    if mode == "align_corners":
        return x * f(n_in - 1) / f(n_out - 1) if n_out > 1 else np.zeros(n_out, f)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel_symmetric":
        adjustment = f(n_out) / (scale * f(n_in))
        offset = f(n_in) / f(2) * (f(1) - adjustment)
        return offset + (x + f(0.5)) / scale - f(0.5)
    raise ValueError(f"coordinate_transformation_mode {mode!r} is not supported")


def _round(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "floor":
        return np.floor(x)
    if mode == "ceil":
        return np.ceil(x)
    frac = x - np.floor(x)
    if mode == "round_prefer_floor":
        return np.where(frac == 0.5, np.floor(x), np.round(x))
    if mode == "round_prefer_ceil":
        return np.where(frac == 0.5, np.ceil(x), np.round(x))
    raise ValueError(f"nearest_mode {mode!r} is not supported")


def resize_matrix(n_in: int, n_out: int, scale: float, mode: str, coordinates: str,
                  nearest_mode: str) -> np.ndarray:
    """The [n_out, n_in] matrix of a 1-D Resize along one axis (nearest or linear).

    NOTE: nearest picks its source index from float32 coordinates, as ONNX Runtime does, so
    the gradient goes where the forward read; linear weights are computed in float64, the exact
    derivative of the op (ONNX Runtime's float32 coordinates differ from it by rounding only).
    """
    matrix = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    if mode == "nearest":
        src = _source_coordinates(n_in, n_out, scale, coordinates, np.float32)
        idx = np.clip(_round(src.astype(np.float64), nearest_mode), 0, n_in - 1)
        matrix[rows, idx.astype(np.int64)] = 1.0
        return matrix
    src = _source_coordinates(n_in, n_out, scale, coordinates, np.float64)
    src = np.clip(src, 0, n_in - 1)
    low = np.floor(src).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


@rule("Resize")
def resize(b, node, grads, needs):
    mode = attr(node, "mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("nearest", "linear"):
        raise ValueError(f"Resize node {node.name}: gradient of mode {mode!r} is not supported "
                         f"(nearest, linear)")
    if attr(node, "antialias", 0):
        raise ValueError(f"Resize node {node.name}: gradient with antialias=1 is not supported")
    coordinates = attr(node, "coordinate_transformation_mode", "half_pixel")
    if coordinates == "tf_crop_and_resize":
        raise ValueError(f"Resize node {node.name}: gradient of tf_crop_and_resize is not "
                         f"supported")
    nearest_mode = attr(node, "nearest_mode", "round_prefer_floor")
    xs, ys = _need_shapes(node)
    rank = len(xs)
    axes = attr(node, "axes", None)
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    scales_in = node.inputs[2] if len(node.inputs) > 2 else None
    scales = None
    if scales_in is not None:
        if scales_in.const_value is None:
            raise ValueError(f"Resize node {node.name}: its scales input must be a constant to "
                             f"differentiate it")
        scales = [float(s) for s in scales_in.const_value.numpy().reshape(-1)] or None
    g = grads[0]
    for k, axis in enumerate(axes):
        n_in, n_out = xs[axis], ys[axis]
        # NOTE: with sizes, ONNX's scale is out/in; with scales, the given one (which the
        # coordinates use even where floor(in * scale) rounded the output size).
        scale = scales[k] if scales is not None else n_out / n_in
        if n_in == n_out and scale == 1.0:
            continue
        matrix = resize_matrix(n_in, n_out, scale, mode, coordinates, nearest_mode)
        g = _contract(b, g, axis, rank, matrix)
    return [g] + [None] * (len(node.inputs) - 1)


# --------------------------------------------------------------------------- ConvTranspose
def _transpose_pads_of(node, xs, ws) -> tuple[list[int], list[int], list[int]]:
    """Begin pads, end pads and output_padding of a ConvTranspose node (explicit, or derived
    from auto_pad / output_shape as the ONNX specification says)."""
    rank = len(xs) - 2
    kernel = list(attr(node, "kernel_shape", ws[2:]))
    strides = list(attr(node, "strides", [1] * rank))
    dilations = list(attr(node, "dilations", [1] * rank))
    out_pad = list(attr(node, "output_padding", [0] * rank))
    auto_pad = attr(node, "auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    output_shape = attr(node, "output_shape", None)
    pads = attr(node, "pads", None)
    if output_shape is None and auto_pad in ("NOTSET", "VALID"):
        pads = list(pads) if pads is not None and auto_pad == "NOTSET" else [0] * (2 * rank)
        return pads[:rank], pads[rank:], out_pad
    shape = list(output_shape)[-rank:] if output_shape is not None else \
        [n * s for n, s in zip(xs[2:], strides)]
    begin, end = [], []
    for n, o, k, s, d, op in zip(xs[2:], shape, kernel, strides, dilations, out_pad):
        total = s * (n - 1) + op + ((k - 1) * d + 1) - o
        if auto_pad == "SAME_UPPER":
            begin.append(total // 2)
            end.append(total - total // 2)
        else:
            begin.append(total - total // 2)
            end.append(total // 2)
    return begin, end, out_pad


@rule("ConvTranspose")
def conv_transpose(b, node, grads, needs):
    x, w = node.inputs[0], node.inputs[1]
    xs, ws, ys = static_shape(x), static_shape(w), static_shape(node.outputs[0])
    if xs is None or ws is None or ys is None:
        raise ValueError(f"ConvTranspose node {node.name}: the gradient needs static shapes of "
                         f"input, weight and output (got {xs}, {ws}, {ys})")
    rank = len(xs) - 2
    strides = list(attr(node, "strides", [1] * rank))
    dilations = list(attr(node, "dilations", [1] * rank))
    group = attr(node, "group", 1)
    begin, end, _ = _transpose_pads_of(node, xs, ws)
    if any(p < 0 for p in begin + end):
        raise ValueError(f"ConvTranspose node {node.name}: gradient of negative pads is not "
                         f"supported")
    kernel = list(ws[2:])
    g = grads[0]
    spatial = list(range(2, 2 + rank))
    dx = dw = db = None
    if needs[0]:
        # The adjoint: a Conv of the output gradient with the same weight and geometry.
        dx = b.op("Conv", g, w, kernel_shape=kernel, strides=strides, dilations=dilations,
                  pads=begin + end, group=group)
        got = [(o + pb + pe - d * (k - 1) - 1) // s + 1 for o, pb, pe, d, k, s in
               zip(ys[2:], begin, end, dilations, kernel, strides)]
        if got != list(xs[2:]):  # output_padding >= stride: a tail no window of x wrote
            dx = b.op("Slice", dx, b.ints([0] * rank), b.ints(list(xs[2:])), b.ints(spatial))
    if needs[1]:
        # dw[ci, co, k] = sum_{n, h} x[n, ci, h] g[n, co, h * s + k * d - pad]: a Conv over the
        # batch axis with g as input and x as weight (stride and dilation swap roles).
        cin_g, cout_g = xs[1] // group, ws[1]
        parts = []
        for gi in range(group):
            xg, gg = x, g
            if group > 1:
                xg = b.op("Slice", x, b.ints([gi * cin_g]), b.ints([(gi + 1) * cin_g]),
                          b.ints([1]))
                gg = b.op("Slice", g, b.ints([gi * cout_g]), b.ints([(gi + 1) * cout_g]),
                          b.ints([1]))
            swap = [1, 0] + spatial
            out = b.op("Conv", b.op("Transpose", gg, perm=swap),
                       b.op("Transpose", xg, perm=swap), kernel_shape=list(xs[2:]),
                       strides=dilations, dilations=strides, pads=begin + end)
            out = b.op("Slice", out, b.ints([0] * rank), b.ints(kernel), b.ints(spatial))
            parts.append(b.op("Transpose", out, perm=swap))
        dw = parts[0] if group == 1 else b.op("Concat", *parts, axis=0)
    if len(node.inputs) > 2 and node.inputs[2] is not None and needs[2]:
        db = b.op("ReduceSum", g, b.ints([0] + spatial), keepdims=0)
    return [dx, dw] + ([db] if len(node.inputs) > 2 else [])
