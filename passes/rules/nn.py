"""Rules for linear algebra and neural-network ops."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx_ir as ir

from ..builder import dims, np_dtype, static_shape
from . import attr, rule


def _swap_last(b, x, rank):
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return b.op("Transpose", x, perm=perm)


@rule("MatMul")
def matmul(b, node, grads, needs):
    a, w = node.inputs
    g = grads[0]
    ad, wd = dims(a), dims(w)
    # Promote 1-D operands to matrices as MatMul itself does, then undo it on the gradients.
    # The trailing axis first: with two 1-D operands g is 0-d and only -1 is a valid axis.
    a2, w2 = a, w
    if len(wd) == 1:
        w2 = b.op("Unsqueeze", w, b.ints([1]))
        g = b.op("Unsqueeze", g, b.ints([-1]))
    if len(ad) == 1:
        a2 = b.op("Unsqueeze", a, b.ints([0]))
        g = b.op("Unsqueeze", g, b.ints([-2]))
    a2d = [1] + ad if len(ad) == 1 else ad
    w2d = wd + [1] if len(wd) == 1 else wd
    out_batch = _broadcast(a2d[:-2], w2d[:-2])
    da = dw = None
    if needs[0]:
        da = b.op("MatMul", g, _swap_last(b, w2, len(w2d)))
        da = b.sum_to(da, out_batch + a2d[-2:], a2d)
        if len(ad) == 1:
            da = b.op("Reshape", da, b.ints([-1]))
    if needs[1] and len(w2d) == 2 and len(a2d) > 2 \
            and isinstance(a2d[-1], int) and isinstance(w2d[-1], int):
        # A matrix applied to a batch of rows: dW = rows^T @ dY over every row at once, as
        # PyTorch's linear backward does (the Reshapes are free), not one product per batch
        # entry summed by a ReduceSum. NOTE: measured on the GPT step (A/B in one process,
        # alternating): 211 -> 198 and 198 -> 191 ms (medians).
        rows = b.op("Reshape", a2, b.ints([-1, a2d[-1]]))
        dw = b.op("Gemm", rows, b.op("Reshape", g, b.ints([-1, w2d[-1]])), transA=1)
    elif needs[1]:
        dw = b.op("MatMul", _swap_last(b, a2, len(a2d)), g)
        dw = b.sum_to(dw, out_batch + w2d[-2:], w2d)
    if dw is not None and len(wd) == 1:
        dw = b.op("Reshape", dw, b.ints([-1]))
    return [da, dw]


def _broadcast(x, y):
    n = max(len(x), len(y))
    x = [1] * (n - len(x)) + list(x)
    y = [1] * (n - len(y)) + list(y)
    return [a if b_ == 1 else b_ for a, b_ in zip(x, y)]


@rule("Gemm")
def gemm(b, node, grads, needs):
    a, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    g = grads[0]
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)
    ga = g if alpha == 1.0 else b.op("Mul", g, b.const_like(alpha, g))
    da = dw = dc = None
    if needs[0]:
        # A' = op(A): dA' = g B'^T; express with Gemm's transpose flags instead of Transpose nodes.
        da = (b.op("Gemm", w, ga, transA=tb, transB=1) if ta
              else b.op("Gemm", ga, w, transA=0, transB=1 - tb))
    if needs[1]:
        dw = (b.op("Gemm", ga, a, transA=1, transB=ta) if tb
              else b.op("Gemm", a, ga, transA=1 - ta, transB=0))
    if c is not None and needs[2]:
        gc = g if beta == 1.0 else b.op("Mul", g, b.const_like(beta, g))
        dc = b.sum_to(gc, dims(node.outputs[0]), dims(c))
    return [da, dw] + ([dc] if c is not None else [])


@rule("Softmax", same_shape=True)
def softmax(b, node, grads, needs):
    y = node.outputs[0]
    axis = attr(node, "axis", -1)
    gy = b.op("Mul", grads[0], y)
    # dx = y * (g - sum(g * y)) written as g*y - y*sum(g*y), PyTorch's _softmax_backward_data.
    s = b.op("ReduceSum", gy, b.ints([axis]), keepdims=1)
    return [b.op("Sub", gy, b.op("Mul", y, s))]


@rule("LogSoftmax", same_shape=True)
def log_softmax(b, node, grads, needs):
    y = node.outputs[0]
    axis = attr(node, "axis", -1)
    g = grads[0]
    s = b.op("ReduceSum", g, b.ints([axis]), keepdims=1)
    return [b.op("Sub", g, b.op("Mul", b.op("Exp", y), s))]


# =========================================================================== convolution
# The Conv rule below picks, per layer shape, one of several standard-ONNX formulations of the
# input and weight gradients. Every formulation is kept callable on its own (the tests check
# each against central differences; benchmarks/conv_grad.py times them); ``CONV_GRAD_OVERRIDE``
# forces one for tests and benchmarks.

@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Static sizes of one N-d ``Conv``: batch, channels, spatial sizes and attributes."""

    n: int
    c: int                       # input channels
    o: int                       # output channels
    groups: int
    size: tuple[int, ...]        # input spatial sizes
    out: tuple[int, ...]         # output spatial sizes
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.size)

    @property
    def taps(self) -> int:
        """Kernel positions: columns of the unfolded input per channel."""
        return int(np.prod(self.kernel))

    @property
    def length(self) -> int:
        """Output positions per image."""
        return int(np.prod(self.out))

    @property
    def pointwise(self) -> bool:
        """An unpadded 1x1 kernel, which reads a strided subsample of the input."""
        return self.kernel == (1, 1) and not any(self.pads_begin + self.pads_end)

    @property
    def matrix_form(self) -> bool:
        """2-D and ungrouped: what the unfold and Col2Im formulations handle."""
        return self.rank == 2 and self.groups == 1

    def attrs(self) -> dict:
        return {"kernel_shape": list(self.kernel), "strides": list(self.strides),
                "dilations": list(self.dilations), "pads": list(self.pads_begin + self.pads_end)}


def _explicit_pads(node, size, kernel, strides, dilations):
    """``pads`` as (begin, end), resolving the deprecated ``auto_pad`` of imported models."""
    auto_pad = attr(node, "auto_pad", "NOTSET")
    pads = attr(node, "pads", None)
    begin, end = resolve_pads(auto_pad, pads, size, kernel, strides, dilations)
    return tuple(begin), tuple(end)


def resolve_pads(auto_pad: str | bytes, pads: list[int] | None, size, kernel, strides,
                 dilations) -> tuple[list[int], list[int]]:
    """Begin and end pads of a convolution or pooling, ``auto_pad`` (deprecated) resolved."""
    rank = len(size)
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k, s, d in zip(size, kernel, strides, dilations):
            total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            small = total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin, end
    if auto_pad == "VALID":
        return [0] * rank, [0] * rank
    pads = list(pads if pads is not None else [0] * (2 * rank))
    return pads[:rank], pads[rank:]


def conv_geometry(node) -> ConvGeometry:
    x, w = node.inputs[0], node.inputs[1]
    xs, ws, ys = static_shape(x), static_shape(w), static_shape(node.outputs[0])
    if xs is None or ws is None or ys is None:
        raise ValueError(f"{node.op_type} node {node.name}: the gradient needs static shapes of "
                         f"input, weight and output (got {xs}, {ws}, {ys})")
    rank = len(xs) - 2
    kernel = tuple(attr(node, "kernel_shape", ws[2:]))
    strides = tuple(attr(node, "strides", [1] * rank))
    dilations = tuple(attr(node, "dilations", [1] * rank))
    begin, end = _explicit_pads(node, xs[2:], kernel, strides, dilations)
    return ConvGeometry(xs[0], xs[1], ws[0], attr(node, "group", 1), tuple(xs[2:]),
                        tuple(ys[2:]), kernel, strides, dilations, begin, end)


def _transpose_pads(size, out, kernel, strides, dilations, pads_begin):
    """End pads and output_padding making ``ConvTranspose`` of an ``out``-sized input yield
    exactly ``size``: the begin pads crop like the forward's, then the end is cropped
    (or, when the forward dropped a tail the windows never read, padded with zeros)."""
    ends, extra = [], []
    for n, o, k, s, d, pb in zip(size, out, kernel, strides, dilations, pads_begin):
        total = (o - 1) * s + d * (k - 1) + 1 - pb
        ends.append(max(total - n, 0))
        extra.append(max(n - total, 0))
    return ends, extra


def _permute(b, v, shape, perm):
    """Transpose ``v``; a Reshape when only size-1 axes move (same memory order, no copy)."""
    moved = [a for a in perm if shape[a] != 1]
    if moved == sorted(moved):
        return b.op("Reshape", v, b.ints([shape[a] for a in perm]))
    return b.op("Transpose", v, perm=list(perm))


def conv_input_grad_transpose(b, g, w, geo: ConvGeometry):
    """dX = ConvTranspose(dY, W) with the forward's strides, dilations and begin pads.

    NOTE: onnx's reference ConvTranspose (1.23) is wrong for group > 1 unless every group has one
    input and one output channel, so other grouped convolutions run one ConvTranspose per group.
    """
    ends, extra = _transpose_pads(geo.size, geo.out, geo.kernel, geo.strides, geo.dilations,
                                  geo.pads_begin)
    attrs = {"kernel_shape": list(geo.kernel), "strides": list(geo.strides),
             "dilations": list(geo.dilations), "pads": list(geo.pads_begin) + ends}
    if any(extra):
        attrs["output_padding"] = extra
    cg, og = geo.c // geo.groups, geo.o // geo.groups
    if geo.groups == 1 or (cg == 1 and og == 1):
        return b.op("ConvTranspose", g, w, group=geo.groups, **attrs)
    split = b.ints([og] * geo.groups)
    gs = b.op("Split", g, split, axis=1, _outputs=geo.groups)
    ws = b.op("Split", w, split, axis=0, _outputs=geo.groups)
    parts = [b.op("ConvTranspose", gj, wj, **attrs) for gj, wj in zip(gs, ws)]
    return b.op("Concat", *parts, axis=1)


def conv_input_grad_flipped(b, g, w, geo: ConvGeometry):
    """dX = Conv(dY, W flipped in space, each group's in and out channels swapped), padded by
    k - 1 - p: at stride 1 the adjoint of a convolution is a convolution. Stride and dilation 1,
    and pads up to k - 1 only (None otherwise)."""
    if any(s != 1 for s in geo.strides + geo.dilations):
        return None
    begin = [k - 1 - p for k, p in zip(geo.kernel, geo.pads_begin)]
    end = [k - 1 - p for k, p in zip(geo.kernel, geo.pads_end)]
    if any(p < 0 for p in begin + end):
        return None
    groups, cg, og, rank = geo.groups, geo.c // geo.groups, geo.o // geo.groups, geo.rank
    kernel = list(geo.kernel)
    if cg == 1 or og == 1:  # [G*og, cg, k...] -> [G*cg, og, k...] moves a size-1 axis only
        wt = b.op("Reshape", w, b.ints([groups * cg, og, *kernel]))
    else:
        five = b.op("Reshape", w, b.ints([groups, og, cg, *kernel]))
        wt = b.op("Transpose", five, perm=[0, 2, 1] + list(range(3, 3 + rank)))
        wt = b.op("Reshape", wt, b.ints([groups * cg, og, *kernel]))
    flipped = b.op("Slice", wt, b.ints([-1] * rank), b.ints([-k - 1 for k in kernel]),
                   b.ints(list(range(2, 2 + rank))), b.ints([-1] * rank))
    return b.op("Conv", g, flipped, group=groups, kernel_shape=kernel, pads=begin + end)


def conv_weight_grad_conv(b, x, g, geo: ConvGeometry):
    """dW as one Conv with batch and channels swapped: the input's channels become the batch,
    dY's channels the filters, and the forward stride becomes the dilation (and vice versa)."""
    rank, groups = geo.rank, geo.groups
    n, cg = geo.n, geo.c // groups
    spatial = list(range(2, 2 + rank))
    if groups == 1:
        xt = _permute(b, x, (n, geo.c) + geo.size, [1, 0] + spatial)
    else:
        # [N, G*Cg, ...] -> [Cg, G*N, ...]: group j's channels of image i become channel j*N+i,
        # so Conv's own grouping pairs them with group j's filters.
        five = b.op("Reshape", x, b.ints([n, groups, cg, *geo.size]))
        xt = _permute(b, five, (n, groups, cg) + geo.size, [2, 1, 0] + [a + 1 for a in spatial])
        xt = b.op("Reshape", xt, b.ints([cg, groups * n, *geo.size]))
    gt = _permute(b, g, (n, geo.o) + geo.out, [1, 0] + spatial)
    # The correlation yields k + floor(rest / d) taps where rest is what the forward's windows
    # never reached; trimming the end padding by it keeps the result at exactly k taps.
    ends, crop = [], False
    for size, o, k, s, d, pb, pe in zip(geo.size, geo.out, geo.kernel, geo.strides,
                                        geo.dilations, geo.pads_begin, geo.pads_end):
        rest = size + pb + pe - ((o - 1) * s + 1) - d * (k - 1)
        trim = min(pe, rest)
        ends.append(pe - trim)
        crop = crop or rest - trim >= d
    dw = b.op("Conv", xt, gt, kernel_shape=list(geo.out), strides=list(geo.dilations),
              dilations=list(geo.strides), pads=list(geo.pads_begin) + ends, group=groups)
    if crop:
        dw = b.op("Slice", dw, b.ints([0] * rank), b.ints(list(geo.kernel)), b.ints(spatial))
    return _permute(b, dw, (cg, geo.o) + geo.kernel, [1, 0] + spatial)


def _strided(b, x, geo: ConvGeometry):
    """What an unpadded 1x1 kernel reads of X: every stride-th position (X itself at stride 1)."""
    if all(s == 1 for s in geo.strides) and geo.out == geo.size:
        return x
    stop = [(out - 1) * s + 1 for out, s in zip(geo.out, geo.strides)]
    return b.op("Slice", x, b.ints([0, 0]), b.ints(stop), b.ints([2, 3]), b.ints(list(geo.strides)))


def conv_weight_grad_unfold(b, x, g, geo: ConvGeometry):
    """dW = sum over images of dY_n @ unfold(X_n)^T: im2col as a Conv with one-hot kernels over
    X viewed as [N*C, 1, H, W] (a strided Slice for an unpadded 1x1 kernel), then one batched
    MatMul and a ReduceSum over N. 2-D, groups=1 only (None otherwise)."""
    if not geo.matrix_form:
        return None
    n, c, o, taps, length = geo.n, geo.c, geo.o, geo.taps, geo.length
    if geo.pointwise:
        cols = _strided(b, x, geo)
    else:
        eye = np.eye(taps, dtype=np_dtype(x)).reshape(taps, 1, *geo.kernel)
        planes = b.op("Reshape", x, b.ints([n * c, 1, *geo.size]))
        cols = b.op("Conv", planes, b.const(eye), **geo.attrs())     # [N*C, k*k, Ho, Wo]
    cols3 = b.op("Reshape", cols, b.ints([n, c * taps, length]))
    g3t = _permute(b, b.op("Reshape", g, b.ints([n, o, length])), (n, o, length), [0, 2, 1])
    # [N, C*k*k, L] @ [N, L, O]: transposing dY rather than the k*k-times larger columns.
    prod = b.op("MatMul", cols3, g3t)
    dw = b.op("Transpose", b.op("ReduceSum", prod, b.ints([0]), keepdims=0), perm=[1, 0])
    return b.op("Reshape", dw, b.ints([o, c, *geo.kernel]))


def conv_weight_grad_unfold_nl(b, x, g, geo: ConvGeometry):
    """dW = dY[O, N*L] @ unfold(X)[C*k*k, N*L]^T as one Gemm: the unfold is a Conv over X with
    batch and channels swapped and one-hot kernels [k*k*N, N, kh, kw], whose output channels
    (tap, image) come out in the order the Gemm wants. 2-D, groups=1 only."""
    if not geo.matrix_form:
        return None
    n, c, o, taps, length = geo.n, geo.c, geo.o, geo.taps, geo.length
    if geo.pointwise:
        # A 1x1 kernel reads a strided subsample of X: a Slice and a Transpose, no Conv.
        cols = _strided(b, x, geo)
        cols = _permute(b, cols, (n, c) + geo.out, [1, 0, 2, 3])
    else:
        eye = np.zeros((taps, n, n, taps), dtype=np_dtype(x))
        for t in range(taps):
            eye[t, :, :, t] = np.eye(n)
        eye = eye.reshape(taps * n, n, *geo.kernel)
        xt = _permute(b, x, (n, c) + geo.size, [1, 0, 2, 3])
        cols = b.op("Conv", xt, b.const(eye), **geo.attrs())      # [C, k*k*N, Ho, Wo]
    cols2 = b.op("Reshape", cols, b.ints([c * taps, n * length]))
    gt = _permute(b, g, (n, o) + geo.out, [1, 0, 2, 3])
    dw = b.op("Gemm", b.op("Reshape", gt, b.ints([o, n * length])), cols2, transB=1)
    return b.op("Reshape", dw, b.ints([o, c, *geo.kernel]))


def _unfold_sliced(b, x, geo: ConvGeometry):
    """unfold(X) as [C, k*k*N, Ho, Wo], channels in (tap, image) order: X with batch and
    channels swapped, padded, and one strided Slice per kernel tap, concatenated (copies only:
    no multiplication, so an inf stays inf where a one-hot kernel's 0 * inf made it nan)."""
    n, c = geo.n, geo.c
    xt = _permute(b, x, (n, c) + geo.size, [1, 0, 2, 3])
    if any(geo.pads_begin + geo.pads_end):
        xt = b.op("Pad", xt, b.ints([0, 0, *geo.pads_begin, 0, 0, *geo.pads_end]))
    taps = []
    for offset in itertools.product(*(range(k) for k in geo.kernel)):
        start = [i * d for i, d in zip(offset, geo.dilations)]
        stop = [s0 + (o - 1) * st + 1 for s0, o, st in zip(start, geo.out, geo.strides)]
        taps.append(b.op("Slice", xt, b.ints(start), b.ints(stop), b.ints([2, 3]),
                         b.ints(list(geo.strides))))
    return taps[0] if len(taps) == 1 else b.op("Concat", *taps, axis=1)


def conv_weight_grad_sliced(b, x, g, geo: ConvGeometry):
    """dW = dY[O, N*L] @ unfold(X)[C*k*k, N*L]^T as one Gemm (unfold_nl's product), the unfold
    made of Slices instead of a one-hot Conv. 2-D, groups=1 only."""
    if not geo.matrix_form:
        return None
    n, c, o, taps, length = geo.n, geo.c, geo.o, geo.taps, geo.length
    cols2 = b.op("Reshape", _unfold_sliced(b, x, geo), b.ints([c * taps, n * length]))
    gt = _permute(b, g, (n, o) + geo.out, [1, 0, 2, 3])
    dw = b.op("Gemm", b.op("Reshape", gt, b.ints([o, n * length])), cols2, transB=1)
    return b.op("Reshape", dw, b.ints([o, c, *geo.kernel]))


def conv_input_grad_col2im(b, g, w, geo: ConvGeometry):
    """dX = Col2Im(W^T dY): the transposed convolution spelled as one matrix product over every
    image's columns, dY^T[N*L, O] @ W[O, C*k*k], and Col2Im. 2-D, groups=1 only (None
    otherwise).

    NOTE: one 2-D product, not a MatMul batched over images, which ONNX Runtime runs as one
    product per image, reading the weight each time (resnet18 layer4 at 8x64: 9.4 MB eight
    times). Whole steps, one process, alternating: resnet18 8x64 87.0 -> 79.5 and 87.1 -> 80.4
    ms, 4x224 347.6 -> 335.0 ms, densenet121 8x96 590 -> 582 ms, 1x64 equal (25.2 / 24.8 ms).
    The weight as the product's left operand (W^T dY, transA) measured 1.5 ms slower at 1x64."""
    if not geo.matrix_form:
        return None
    n, c, o, taps, length = geo.n, geo.c, geo.o, geo.taps, geo.length
    w2 = b.op("Reshape", w, b.ints([o, c * taps]))
    rows = _permute(b, b.op("Reshape", g, b.ints([n, o, length])), (n, o, length), [0, 2, 1])
    cols_t = b.op("MatMul", b.op("Reshape", rows, b.ints([n * length, o])), w2)
    cols_t = b.op("Reshape", cols_t, b.ints([n, length, c * taps]))
    cols = _permute(b, cols_t, (n, length, c * taps), [0, 2, 1])      # [N, C*k*k, L]
    return b.op("Col2Im", cols, b.ints(list(geo.size)), b.ints(list(geo.kernel)),
                dilations=list(geo.dilations), pads=list(geo.pads_begin + geo.pads_end),
                strides=list(geo.strides))


CONV_INPUT_GRADS = {"transpose": conv_input_grad_transpose, "col2im": conv_input_grad_col2im,
                    "flipped": conv_input_grad_flipped}
CONV_WEIGHT_GRADS = {"conv": conv_weight_grad_conv, "unfold": conv_weight_grad_unfold,
                     "unfold_nl": conv_weight_grad_unfold_nl, "sliced": conv_weight_grad_sliced}
# {"input": name, "weight": name} forces a formulation (tests, benchmarks); empty: measured choice.
CONV_GRAD_OVERRIDE: dict[str, str] = {}


# NOTE: the per-shape choice below is measured (benchmarks/conv_grad.py, one run, resnet18's conv
# shapes at batch 1 and 8 at 64x64 and batch 4 at 224x224; CPU time of one ORT thread on this
# 2-core host, whose load average of 60-360 made wall-clock times swing 10x), as ratios to the
# forward Conv of the same shape:
# - dX: ConvTranspose costs 0.98-1.35x the forward wherever the output has >= 8x8 positions,
#   but 2.0-3.2x on the 4x4 and 2x2 outputs of layer3/4 at 64x64 (ORT packs the transposed
#   weight on every call). MatMul + Col2Im, which reads the weight in its stored layout, costs
#   0.69-2.25x there (7x7 at 224: 1.15-1.47x against 1.34-1.47x). A Conv with flipped weights
#   (stride 1 only) measured 1.0-18x and never won: dropped.
# - dW: a Conv with batch and channels swapped re-reads dY once per input channel: 1.7-5.9x on
#   3x3 layers (1.1-1.6x only on layer4 at batch 8), 6-18x on 1x1 downsamples. It stays for the
#   3-channel stem (1.3-1.8x; the unfolds 1.7-5.5x) and for grouped or non-2-D convs.
#   unfold + one Gemm over [C*k*k, N*L] (unfold_nl): 0.95-1.96x at batch 1, 0.67-1.41x on 1x1
#   kernels, 0.60-1.72x on outputs up to 14x14 at batch > 1. Its one-hot unfold repeats the
#   work N times, so on larger outputs at batch > 1 the per-image unfold + batched MatMul
#   (unfold) wins: 1.31-1.64x against 1.45-2.34x.
# Over all of resnet18's convs (with multiplicity), the chosen dW costs 1.57x / 1.12x / 1.29x the
# forward (batch 1@64 / 8@64 / 4@224) where the swapped Conv alone costs 4.51x / 1.82x / 2.22x;
# the chosen dX costs 1.55x / 1.31x / 1.24x. resnet18's whole gradient graph (--resnet) takes
# 20.9 / 124 / 484 ms with this choice against 42.4 / 164 / 612 ms with ConvTranspose and the
# swapped Conv everywhere.

def choose_conv_input_grad(geo: ConvGeometry) -> str:
    # NOTE: depthwise, stride 1 (mobilenet_v2's and efficientnet_b0's shapes at batch 8): the
    # flipped Conv costs 0.55-0.8x the ConvTranspose (1.08 against 1.43 ms at 32x48x48, 0.75
    # against 1.56 ms at 576x6x6, 3.9 against 4.8 ms for 5x5 at 672x6x6; wall, 2 threads).
    if geo.groups > 1 and geo.c == geo.groups and all(s == 1 for s in geo.strides) \
            and all(d == 1 for d in geo.dilations):
        return "flipped"
    if geo.matrix_form and geo.length < 64:
        return "col2im"
    return "transpose"


# Set while export(dynamic_batch=True) traces: formulations whose nodes are the same at every
# batch size (unfold_nl's one-hot kernel is sized by the batch, and chosen by it).
BATCH_INDEPENDENT: dict[str, bool] = {"on": False}


def choose_conv_weight_grad(geo: ConvGeometry) -> str:
    if not geo.matrix_form or geo.c <= 4:
        return "conv"
    if BATCH_INDEPENDENT["on"]:
        return "unfold"
    if geo.n == 1 or geo.pointwise:
        return "unfold_nl"
    # One Gemm over all images pays against the per-image batched MatMul on outputs up to
    # 14x14 where unfold_nl's one-hot Conv (N*k*k MACs per column element) costs no more than
    # the Gemm (O per element). At batch > 1 that Gemm is fed by Slices (copies) instead of the
    # one-hot Conv: resnet18 8x64 101.0 -> 95.9 and 105.9 -> 103.3 ms, densenet121 8x96
    # 352.9 -> 342.3 ms, resnet18 4x224 equal (whole steps, one process, alternating). At
    # batch 1 the one-hot Conv, one node against k*k Slices and a Concat, measured 0.4 ms
    # faster a resnet18 1x64 step.
    if geo.length <= 196 and geo.n * geo.taps <= geo.o:
        return "sliced"
    return "unfold"


@rule("Conv")
def conv(b, node, grads, needs):
    x, w = node.inputs[0], node.inputs[1]
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    g = grads[0]
    geo = conv_geometry(node)
    dx = dw = db = None
    if needs[0]:
        name = CONV_GRAD_OVERRIDE.get("input") or choose_conv_input_grad(geo)
        dx = CONV_INPUT_GRADS[name](b, g, w, geo)
        if dx is None:  # that formulation does not apply to this shape
            dx = conv_input_grad_transpose(b, g, w, geo)
    if needs[1]:
        name = CONV_GRAD_OVERRIDE.get("weight") or choose_conv_weight_grad(geo)
        dw = CONV_WEIGHT_GRADS[name](b, x, g, geo)
        if dw is None:
            dw = conv_weight_grad_conv(b, x, g, geo)
    if has_bias and needs[2]:
        db = b.op("ReduceSum", g, b.ints([0] + list(range(2, 2 + geo.rank))), keepdims=0)
    return [dx, dw] + ([db] if len(node.inputs) > 2 else [])


# =========================================================================== pooling
def _pool_geometry(node, xs, ys):
    rank = len(xs) - 2
    kernel = tuple(attr(node, "kernel_shape"))
    strides = tuple(attr(node, "strides", [1] * rank))
    dilations = tuple(attr(node, "dilations", [1] * rank))
    begin, end = _explicit_pads(node, xs[2:], kernel, strides, dilations)
    return kernel, strides, dilations, begin, end


def _static_io(node):
    xs, ys = static_shape(node.inputs[0]), static_shape(node.outputs[0])
    if xs is None or ys is None:
        raise ValueError(f"{node.op_type} node {node.name}: the gradient needs static input and "
                         f"output shapes (got {xs}, {ys})")
    return xs, ys


@rule("MaxPool")
def max_pool(b, node, grads, needs):
    g = grads[0]
    if g is None:  # only Indices was used: it has no gradient
        return [None]
    x = node.inputs[0]
    xs, _ = _static_io(node)
    if len(node.outputs) > 1 and attr(node, "storage_order", 0) == 0:
        indices = node.outputs[1]
    else:
        # An imported MaxPool without Indices (or column-major ones): recompute row-major ones.
        attrs = {k: a.value for k, a in node.attributes.items() if k != "storage_order"}
        _, indices = b.op("MaxPool", x, _outputs=2, **attrs)
        indices.dtype = ir.DataType.INT64
    # Indices are flat over the whole N*C*H*W input (the spec; ONNX Runtime agrees), so one
    # ScatterElements into the flattened input routes every window's gradient to its element.
    zeros = b.op("ConstantOfShape", b.ints([int(np.prod(xs))]),
                 value=ir.tensor(np.zeros(1, dtype=np_dtype(x))))
    # Overlapping windows that picked the same element accumulate, as in PyTorch; ties were
    # broken by the forward (the first maximum in window order, as in PyTorch).
    flat = b.ints([-1])
    dx = b.op("ScatterElements", zeros, b.op("Reshape", indices, flat),
              b.op("Reshape", g, flat), axis=0, reduction="add")
    return [b.op("Reshape", dx, b.ints(xs))]


def average_pool_divisors(size, out, kernel, stride, dilation, pad_begin, pad_end,
                          count_include_pad) -> np.ndarray:
    """Per-output-position window sizes along one axis, as ONNX Runtime and PyTorch divide:
    taps inside the input, plus (count_include_pad) those in the padding, never those that ceil
    mode lets run past the end padding."""
    low, high = (-pad_begin, size + pad_end) if count_include_pad else (0, size)
    taps = np.arange(out)[:, None] * stride - pad_begin + np.arange(kernel)[None, :] * dilation
    return ((taps >= low) & (taps < high)).sum(axis=1)


@rule("AveragePool")
def average_pool(b, node, grads, needs):
    g = grads[0]
    xs, ys = _static_io(node)
    kernel, strides, dilations, begin, end = _pool_geometry(node, xs, ys)
    cip = attr(node, "count_include_pad", 0)
    counts = [average_pool_divisors(n, o, k, s, d, pb, pe, cip)
              for n, o, k, s, d, pb, pe in zip(xs[2:], ys[2:], kernel, strides, dilations,
                                               begin, end)]
    divisor = counts[0].astype(np.float64)
    for more in counts[1:]:
        divisor = np.multiply.outer(divisor, more)
    dtype = np_dtype(node.inputs[0])
    # dX is a transposed convolution of dY / divisor with a kernel of ones, run on [N*C, 1, ...]
    # so one single-channel kernel serves every channel.
    planes = b.op("Reshape", g, b.ints([xs[0] * xs[1], 1, *ys[2:]]))
    if np.all(divisor == divisor.flat[0]):
        weight = np.full((1, 1, *kernel), 1.0 / divisor.flat[0], dtype=dtype)
    else:
        weight = np.ones((1, 1, *kernel), dtype=dtype)
        planes = b.op("Mul", planes, b.const((1.0 / divisor).astype(dtype)))
    ends, extra = _transpose_pads(xs[2:], ys[2:], kernel, strides, dilations, begin)
    attrs = {"kernel_shape": list(kernel), "strides": list(strides),
             "dilations": list(dilations), "pads": list(begin) + ends}
    if any(extra):
        attrs["output_padding"] = extra
    dx = b.op("ConvTranspose", planes, b.const(weight), **attrs)
    return [b.op("Reshape", dx, b.ints(xs))]


@rule("GlobalAveragePool")
def global_average_pool(b, node, grads, needs):
    xs, _ = _static_io(node)
    scale = b.const(np.asarray(1.0 / np.prod(xs[2:]), dtype=np_dtype(node.inputs[0])))
    return [b.op("Expand", b.op("Mul", grads[0], scale), b.ints(xs))]


# =========================================================================== batch normalization
@rule("BatchNormalization")
def batch_normalization(b, node, grads, needs):
    """Inference-form BatchNormalization: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    Mean and variance are inputs here; in training they are the batch statistics computed by
    the nodes before it (``og.nn.functional.batch_norm``), and the driver carries their
    gradients on through those reductions.
    """
    if attr(node, "training_mode", 0):
        raise ValueError(f"BatchNormalization node {node.name}: no gradient rule for "
                         f"training_mode=1 (its running variance is not PyTorch's); onnxgrad "
                         f"feeds batch statistics to an inference-mode node instead")
    x, scale, _bias, mean, var = node.inputs[:5]
    g = grads[0]
    rank = len(dims(x))
    axes = [0] + list(range(2, rank))
    shape = [1, -1] + [1] * (rank - 2)
    eps = b.const_like(attr(node, "epsilon", 1e-5), var)
    inv = b.op("Div", b.const_like(1, var), b.op("Sqrt", b.op("Add", var, eps)))
    batch_mean = _batch_statistics(x, mean, var, axes)
    if batch_mean is not None and (needs[3] or needs[4]):
        return _batch_norm_training_grads(b, node, g, batch_mean, inv, axes, needs)
    d_x = d_scale = d_bias = d_mean = d_var = None
    k = b.op("Mul", scale, inv)  # dy/dx per channel
    if needs[0]:
        d_x = b.op("Mul", g, b.op("Reshape", k, b.ints(shape)))
    sum_g = b.op("ReduceSum", g, b.ints(axes), keepdims=0) if needs[2] or needs[3] else None
    if needs[1] or needs[4]:
        centered = b.op("Sub", x, b.op("Reshape", mean, b.ints(shape)))
        sum_gc = b.op("ReduceSum", b.op("Mul", g, centered), b.ints(axes), keepdims=0)
        if needs[1]:
            d_scale = b.op("Mul", sum_gc, inv)
        if needs[4]:
            # d/dvar (var + eps)^-1/2 = -1/2 inv^3
            cube = b.op("Mul", inv, b.op("Mul", inv, inv))
            d_var = b.op("Mul", sum_gc, b.op("Mul", scale, b.op("Mul", cube,
                                                                b.const_like(-0.5, var))))
    if needs[2]:
        d_bias = sum_g
    if needs[3]:
        d_mean = b.op("Neg", b.op("Mul", sum_g, k))
    return [d_x, d_scale, d_bias, d_mean, d_var] + [None] * (len(node.inputs) - 5)


def _batch_statistics(x: ir.Value, mean: ir.Value, var: ir.Value,
                      axes: list[int]) -> ir.Value | None:
    """The keepdims batch mean of ``x`` when ``mean`` and ``var`` are ``x``'s batch mean and
    biased variance over ``axes`` as ``og.nn.functional.batch_norm`` computes them in training
    (``Reshape(ReduceMean(x))`` and ``ReduceMean(Mul(c, c))``, ``c = Sub(x, ReduceMean(x))``),
    else None."""

    def made(v: ir.Value | None, op_type: str) -> ir.Node | None:
        node = None if v is None else v.producer()
        return node if node is not None and node.op_type == op_type else None

    def reduces(node: ir.Node | None, keepdims: int) -> bool:
        return (node is not None and len(node.inputs) == 2 and attr(node, "keepdims", 1) == keepdims
                and node.inputs[1] is not None and node.inputs[1].const_value is not None
                and sorted(int(a) % len(dims(x)) for a in node.inputs[1].const_value.numpy())
                == axes)

    reshape = made(mean, "Reshape")
    kept = made(reshape.inputs[0], "ReduceMean") if reshape is not None else None
    if not reduces(kept, 1) or kept.inputs[0] is not x:
        return None
    reduced = made(var, "ReduceMean")
    square = made(reduced.inputs[0], "Mul") if reduces(reduced, 0) else None
    if square is None or square.inputs[0] is not square.inputs[1]:
        return None
    centered = made(square.inputs[0], "Sub")
    if centered is None or list(centered.inputs) != [x, kept.outputs[0]]:
        return None
    return kept.outputs[0]


def _batch_norm_training_grads(b, node, g, batch_mean, inv, axes, needs):
    """dX, dScale, dBias of a BatchNormalization fed its input's own batch statistics, with the
    statistics' part of dX included (so none flows through them: their nodes' saved ``c`` is not
    kept for the backward pass, and 4 elementwise passes replace their ~10):
    ``dX = (dY - c * k - mean(dY)) * inv * scale``, ``k = sum(dY * c) * inv^2 / N``, c = x - mean,
    PyTorch's ``batch_norm_backward`` in training."""
    x, scale = node.inputs[0], node.inputs[1]
    xs = dims(x)
    count = int(np.prod([xs[a] for a in axes]))
    shape = b.ints([1, -1] + [1] * (len(xs) - 2))
    axes_value = b.ints(axes)
    centered = b.op("Sub", x, batch_mean)
    sum_g = b.op("ReduceSum", g, axes_value, keepdims=0)
    sum_gc = b.op("ReduceSum", b.op("Mul", g, centered), axes_value, keepdims=0)
    d_scale = b.op("Mul", sum_gc, inv)
    d_x = None
    if needs[0]:
        n = b.const_like(count, inv)
        k = b.op("Div", b.op("Mul", d_scale, inv), n)
        grad_mean = b.op("Div", sum_g, n)
        projected = b.op("Sub", g, b.op("Mul", centered, b.op("Reshape", k, shape)))
        d_x = b.op("Mul", b.op("Sub", projected, b.op("Reshape", grad_mean, shape)),
                   b.op("Reshape", b.op("Mul", inv, scale), shape))
    return [d_x, d_scale if needs[1] else None, sum_g if needs[2] else None, None, None] + \
        [None] * (len(node.inputs) - 5)
