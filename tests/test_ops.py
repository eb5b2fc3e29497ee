"""The op table: one row per op case, each checked three ways by ``opcheck.check_case``.

Add a row with ``case(id, onnxgrad_fn, numpy_ref, *input_specs, **options)``; see opcheck.py.
"""
from __future__ import annotations

import math

import numpy as np
from opcheck import OpCase, arg, case, fixed, index, pos, table_tests

import onnxgrad as og


# --------------------------------------------------------------------------- NumPy references
def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    s = x - x.max(axis=axis, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def np_max_dim(x: np.ndarray, axis: int, keepdims: bool = False, arg=np.argmax):
    i = np.expand_dims(arg(x, axis=axis), axis)
    v = np.take_along_axis(x, i, axis)
    return (v, i) if keepdims else (v.squeeze(axis), i.squeeze(axis))


def np_split(x: np.ndarray, size: int, axis: int) -> list[np.ndarray]:
    return np.split(x, range(size, x.shape[axis], size), axis=axis)


np_erf = np.vectorize(math.erf, otypes=[np.float64])


def f32(fn):
    """A reference whose NumPy result is float64 where torch (and onnxgrad) give float32."""
    return lambda *a: np.asarray(fn(*a), dtype=np.float32)


TIES = np.array([[1.0, 2.0, 2.0], [0.5, -1.0, 3.0]], dtype=np.float32)
TIES_B = np.array([[1.0, 0.0, 2.0], [0.5, 1.0, -3.0]], dtype=np.float32)
MASK = np.array([[True, False, True], [False, False, True]])

CASES: list[OpCase] = [
    # ------------------------------------------------------------------ arithmetic
    case("add", lambda a, b: a + b, np.add, (2, 3), (2, 3)),
    case("add/broadcast-row", lambda a, b: a + b, np.add, (2, 3), (3,)),
    case("add/broadcast-both", lambda a, b: a + b, np.add, (4, 1), (1, 3)),
    case("add/broadcast-rank", lambda a, b: a + b, np.add, (2, 1, 3), (4, 1)),
    case("add/0d", lambda a, b: a + b, np.add, (2, 3), ()),
    case("add/int-scalar", lambda a: a + 1, lambda a: a + 1, (2, 3)),
    case("radd/float-scalar", lambda a: 2.5 + a, lambda a: 2.5 + a, (2, 3)),
    case("add/same-tensor", lambda a: a + a, lambda a: a + a, (3,)),
    case("sub", lambda a, b: a - b, np.subtract, (2, 3), (3,)),
    case("rsub", lambda a: 1.5 - a, lambda a: 1.5 - a, (2, 3)),
    case("mul", lambda a, b: a * b, np.multiply, (2, 3), (2, 1)),
    case("rmul", lambda a: 3 * a, lambda a: 3 * a, (4,)),
    case("div", lambda a, b: a / b, np.divide, (2, 3), pos(3)),
    case("rdiv", lambda b: 2 / b, lambda b: 2 / b, pos(2, 3)),
    case("div/broadcast", lambda a, b: a / b, np.divide, (3,), pos(2, 1)),
    case("pow/int-exponent", lambda a: a ** 3, lambda a: a ** 3, (2, 3)),
    case("pow/float-exponent", lambda a: a ** 2.5, lambda a: a ** np.float32(2.5), pos(2, 3)),
    case("pow/zero-exponent", lambda a: a ** 0, lambda a: a ** 0, (3,)),
    case("pow/tensor-exponent", lambda a, b: a ** b, np.power, pos(2, 3), (2, 3)),
    case("pow/broadcast-exponent", lambda a, b: a ** b, np.power, pos(2, 3), (3,)),
    case("rpow", lambda a: 2 ** a, lambda a: np.float32(2) ** a, (2, 3)),
    case("neg", lambda a: -a, np.negative, (2, 3)),
    case("tutorial-Q", lambda a, b: 3 * a ** 3 - b ** 2, lambda a, b: 3 * a ** 3 - b ** 2, (2,), (2,)),
    # ------------------------------------------------------------------ matmul
    case("matmul/2d", lambda a, b: a @ b, np.matmul, (2, 3), (3, 4)),
    case("matmul/1d-1d", lambda a, b: a @ b, np.matmul, (3,), (3,)),
    case("matmul/1d-2d", lambda a, b: a @ b, np.matmul, (3,), (3, 4)),
    case("matmul/2d-1d", lambda a, b: a @ b, np.matmul, (2, 3), (3,)),
    case("matmul/batched", lambda a, b: a @ b, np.matmul, (2, 2, 3), (2, 3, 4)),
    case("matmul/batch-broadcast", lambda a, b: a @ b, np.matmul, (2, 1, 2, 3), (3, 3, 4)),
    case("matmul/batched-2d", lambda a, b: a @ b, np.matmul, (5, 2, 3), (3, 4)),
    case("matmul/batched4d-2d", lambda a, b: a @ b, np.matmul, (2, 3, 2, 3), (3, 4)),
    case("matmul/batched-1d", lambda a, b: a @ b, np.matmul, (2, 4, 3), (3,)),
    case("matmul/1d-batched", lambda a, b: og.matmul(a, b), np.matmul, (3,), (2, 3, 4)),
    # ------------------------------------------------------------------ unary
    case("exp", og.exp, np.exp, (2, 3)),
    case("log", og.log, np.log, pos(2, 3)),
    case("sqrt", og.sqrt, np.sqrt, pos(2, 3)),
    case("abs", og.abs, np.abs, (2, 3), avoid=(0.0,)),
    case("abs/builtin", lambda a: abs(a), np.abs, (4,), avoid=(0.0,)),
    case("sin", og.sin, np.sin, arg(2, 3, low=-4, high=4)),
    case("cos", og.cos, np.cos, arg(2, 3, low=-4, high=4)),
    case("sin-cos/methods", lambda a: a.sin() * a.cos(), lambda a: np.sin(a) * np.cos(a), (5,)),
    case("cos/int", og.cos, f32(np.cos), index([0, 1, -3]), grad=False),
    # NOTE: ONNX Runtime has no float64 Erf, so erf runs in float32 even on the VJP check's
    # float64 inputs: a wider step and tolerance keep float32 rounding out of the difference.
    case("erf", og.erf, f32(np_erf), (2, 3), eps=1e-3, grad_rtol=1e-4),
    case("erf/method", lambda a: a.erf().sum(0), lambda a: f32(np_erf)(a).sum(0), (3, 2),
         eps=1e-3, grad_rtol=1e-4),
    case("tanh", og.tanh, np.tanh, (2, 3)),
    case("sigmoid", og.sigmoid, lambda a: 1 / (1 + np.exp(-a)), (2, 3)),
    case("relu", og.relu, lambda a: np.maximum(a, 0), (2, 3), avoid=(0.0,)),
    case("relu/method", lambda a: a.relu(), lambda a: np.maximum(a, 0), (5,), avoid=(0.0,)),
    # ------------------------------------------------------------------ reductions
    case("sum", lambda a: a.sum(), np.sum, (2, 3)),
    case("sum/dim", lambda a: a.sum(1), lambda a: a.sum(1), (2, 3, 4)),
    case("sum/dims-keepdim", lambda a: a.sum((0, 2), keepdim=True),
         lambda a: a.sum((0, 2), keepdims=True), (2, 3, 4)),
    case("sum/neg-dim", lambda a: og.sum(a, dim=-1), lambda a: a.sum(-1), (2, 3)),
    case("mean", lambda a: a.mean(), np.mean, (2, 3)),
    case("mean/dim-keepdim", lambda a: a.mean(0, keepdim=True),
         lambda a: a.mean(0, keepdims=True), (2, 3)),
    case("mean/dims", lambda a: og.mean(a, (1, 2)), lambda a: a.mean((1, 2)), (2, 3, 4)),
    case("max", lambda a: a.max(), np.max, (2, 3), distinct=True),
    case("max/ties", lambda a: a.max(), np.max, fixed(TIES[:, :2] * 0 + 2), vjp=False),
    case("max/dim", lambda a: a.max(dim=1), lambda a: np_max_dim(a, 1), (3, 4), distinct=True),
    case("max/dim-keepdim", lambda a: a.max(0, keepdim=True),
         lambda a: np_max_dim(a, 0, True), (3, 4), distinct=True),
    case("max/dim-values", lambda a: og.max(a, -1).values,
         lambda a: a.max(-1), (2, 3, 4), distinct=True),
    case("amax/dim", lambda a: a.amax(1), lambda a: a.max(1), (3, 4), distinct=True),
    case("amax/dims-keepdim", lambda a: og.amax(a, (0, 1), keepdim=True),
         lambda a: a.max((0, 1), keepdims=True), (2, 3, 2), distinct=True),
    case("amax/ties", lambda a: a.amax(1), lambda a: a.max(1), fixed(TIES), vjp=False),
    case("amin/dim", lambda a: og.amin(a, 0), lambda a: a.min(0), (3, 4), distinct=True),
    case("amin/keepdim", lambda a: a.amin(-1, keepdim=True), lambda a: a.min(-1, keepdims=True),
         (3, 4), distinct=True),
    case("min", lambda a: og.min(a), np.min, (2, 3), distinct=True),
    case("min/dim-keepdim", lambda a: og.min(a, 0, keepdim=True),
         lambda a: np_max_dim(a, 0, True, arg=np.argmin), (3, 4), distinct=True),
    case("min/dim", lambda a: a.min(1),
         lambda a: np_max_dim(a, 1, arg=np.argmin), (3, 4), distinct=True),
    # ------------------------------------------------------------------ shapes
    case("reshape", lambda a: a.reshape(3, 4), lambda a: a.reshape(3, 4), (2, 6)),
    case("reshape/infer", lambda a: og.reshape(a, (-1, 2)), lambda a: a.reshape(-1, 2), (2, 3, 2)),
    case("view", lambda a: a.view(6), lambda a: a.reshape(6), (2, 3)),
    case("flatten", lambda a: a.flatten(), lambda a: a.reshape(-1), (2, 3, 4)),
    case("flatten/range", lambda a: og.flatten(a, 1), lambda a: a.reshape(2, -1), (2, 3, 4)),
    case("squeeze", lambda a: a.squeeze(), np.squeeze, (1, 3, 1, 2)),
    case("squeeze/dim", lambda a: a.squeeze(2), lambda a: a.squeeze(2), (1, 3, 1, 2)),
    case("unsqueeze", lambda a: a.unsqueeze(1), lambda a: a[:, None], (2, 3)),
    case("unsqueeze/neg", lambda a: og.unsqueeze(a, -1), lambda a: a[..., None], (2, 3)),
    case("transpose", lambda a: a.transpose(0, 2), lambda a: a.swapaxes(0, 2), (2, 3, 4)),
    case("permute", lambda a: a.permute(2, 0, 1), lambda a: a.transpose(2, 0, 1), (2, 3, 4)),
    case("T", lambda a: a.T, lambda a: a.T, (2, 3)),
    case("expand", lambda a: a.expand(3, 4), lambda a: np.broadcast_to(a, (3, 4)), (3, 1)),
    case("expand/new-dims", lambda a: a.expand(2, -1, 3),
         lambda a: np.broadcast_to(a, (2, 4, 3)), (4, 1)),
    # ------------------------------------------------------------------ indexing
    case("index/int", lambda a: a[1], lambda a: a[1], (3, 4)),
    case("index/neg-int", lambda a: a[-1, 2], lambda a: a[-1, 2], (3, 4)),
    case("index/slice", lambda a: a[1:3], lambda a: a[1:3], (4, 3)),
    case("index/step", lambda a: a[::2, 1::2], lambda a: a[::2, 1::2], (5, 4)),
    case("index/neg-slice", lambda a: a[-3:-1], lambda a: a[-3:-1], (5,)),
    case("index/none", lambda a: a[None, :, None], lambda a: a[None, :, None], (3, 2)),
    case("index/ellipsis", lambda a: a[..., 1], lambda a: a[..., 1], (2, 3, 4)),
    case("index/mixed", lambda a: a[1:, None, ::2, 0], lambda a: a[1:, None, ::2, 0], (3, 5, 2)),
    case("index/tensor", lambda a, i: a[i], lambda a, i: a[i], (4, 3), index([2, 0, 2])),
    case("index/tensor-neg", lambda a, i: a[:, i], lambda a, i: a[:, i], (2, 4), index([-1, 1])),
    case("index/tensor-2d", lambda a, i: a[i], lambda a, i: a[i], (4, 3), index([[0, 1], [3, 3]])),
    case("index/list", lambda a: a[:, [0, 2]], lambda a: a[:, [0, 2]], (2, 3)),
    case("index/int-and-tensor", lambda a, i: a[1, i], lambda a, i: a[1, i], (2, 4), index([3, 0])),
    # NOTE: torch, unlike NumPy, applies int indices first, so the tensor's dims stay in place.
    case("index/int-slice-tensor", lambda a, i: a[0, :, i], lambda a, i: a[0][:, i],
         (2, 3, 4), index([1, 3])),
    case("index/tensor-2d-none", lambda a, i: a[i, None], lambda a, i: a[i][:, :, None],
         (4, 3), index([[0, 1], [3, 2]])),
    case("index/tensor-0d", lambda a, i: a[i, 1:], lambda a, i: a[i, 1:], (4, 3), index(2)),
    case("index/empty-slice", lambda a: a[2:1], lambda a: a[2:1], (3, 2), grad=False),
    # ------------------------------------------------------------------ joining and splitting
    case("cat", lambda a, b: og.cat([a, b]), lambda a, b: np.concatenate([a, b]), (2, 3), (1, 3)),
    case("cat/dim1", lambda a, b, c: og.cat([a, b, c], dim=1),
         lambda a, b, c: np.concatenate([a, b, c], 1), (2, 1), (2, 3), (2, 2)),
    case("cat/neg-dim", lambda a, b: og.cat((a, b), -1),
         lambda a, b: np.concatenate([a, b], -1), (2, 2), (2, 3)),
    case("cat/same", lambda a: og.cat([a, a]), lambda a: np.concatenate([a, a]), (2,)),
    case("stack", lambda a, b: og.stack([a, b]), lambda a, b: np.stack([a, b]), (2, 3), (2, 3)),
    case("stack/dim-last", lambda a, b: og.stack([a, b], dim=-1),
         lambda a, b: np.stack([a, b], -1), (2, 3), (2, 3)),
    case("split", lambda a: a.split(2, dim=1), lambda a: np_split(a, 2, 1), (2, 5)),
    case("split/sizes", lambda a: og.split(a, [1, 3]), lambda a: np.split(a, [1]), (4, 2)),
    case("split/one-used", lambda a: a.split(2)[1] * 2, lambda a: a[2:4] * 2, (5, 2)),
    case("chunk", lambda a: a.chunk(3, dim=-1), lambda a: np_split(a, 2, -1), (2, 6)),
    case("chunk/uneven", lambda a: og.chunk(a, 2), lambda a: np_split(a, 3, 0), (5,)),
    # ------------------------------------------------------------------ selection
    case("where", lambda c, a, b: og.where(c, a, b), np.where, fixed(MASK), (2, 3), (2, 3)),
    case("where/broadcast", lambda c, a, b: og.where(c, a, b), np.where,
         fixed(MASK), (3,), (2, 1)),
    case("where/scalar", lambda a: og.where(a > 0, a, 0.5 * a),
         lambda a: np.where(a > 0, a, 0.5 * a), (2, 3), avoid=(0.0,)),
    case("maximum", og.maximum, np.maximum, (2, 3), (2, 3), distinct=True),
    case("maximum/broadcast", og.maximum, np.maximum, (2, 3), (3,), distinct=True),
    case("maximum/ties", og.maximum, np.maximum, fixed(TIES), fixed(TIES_B), vjp=False),
    case("minimum", og.minimum, np.minimum, (2, 3), (2, 1), distinct=True),
    case("max/binary", lambda a, b: og.max(a, b), np.maximum, (3,), (3,), distinct=True),
    case("clamp", lambda a: a.clamp(-0.5, 1.0), lambda a: np.clip(a, -0.5, 1.0), (3, 4),
         avoid=(-0.5, 1.0)),
    case("clamp/min", lambda a: og.clamp(a, min=0.25), lambda a: np.maximum(a, 0.25), (3, 4),
         avoid=(0.25,)),
    case("clamp/max", lambda a: a.clip(max=0.0), lambda a: np.minimum(a, 0.0), (3, 4),
         avoid=(0.0,)),
    case("clamp/tensor-bounds", lambda a, lo, hi: og.clamp(a, lo, hi), lambda a, lo, hi:
         np.minimum(np.maximum(a, lo), hi), (2, 3), arg(3, high=-0.5), arg(3, low=0.5),
         distinct=True),
    case("clamp/bounds-inclusive", lambda a: a.clamp(0.0, 1.0), lambda a: np.clip(a, 0, 1),
         fixed([-1.0, 0.0, 0.5, 1.0, 2.0]), grad=False),
    # ------------------------------------------------------------------ softmax family
    case("softmax", lambda a: og.softmax(a, -1), lambda a: np_softmax(a, -1), (2, 5)),
    case("softmax/dim0", lambda a: a.softmax(0), lambda a: np_softmax(a, 0), (3, 2, 2)),
    case("log_softmax", lambda a: og.log_softmax(a, 1), lambda a: np_log_softmax(a, 1), (2, 5)),
    case("log_softmax/dim0", lambda a: a.log_softmax(dim=0), lambda a: np_log_softmax(a, 0),
         (3, 2)),
    # ------------------------------------------------------------------ casts and dtypes
    case("cast/double", lambda a: a.double() * 2, lambda a: a.astype(np.float64) * 2, (2, 3)),
    case("cast/to", lambda a: a.to(og.float64).sum(0), lambda a: a.astype(np.float64).sum(0),
         (2, 3)),
    case("cast/long", lambda a: a.long(), lambda a: a.astype(np.int64), arg(2, 3, low=-5, high=5),
         grad=False),
    case("cast/bool", lambda a: a.bool(), lambda a: a.astype(bool), fixed([0.0, 1.5, -2.0]),
         grad=False),
    case("int-plus-float", lambda i: i + 0.5, lambda i: (i + 0.5).astype(np.float32),
         index([1, 2, 3]), grad=False),
    case("int-true-div", lambda i: i / 2, f32(lambda i: i / 2), index([1, 2, 3]), grad=False),
    case("int-times-float-tensor", lambda i, a: i * a, f32(np.multiply),
         index([1, 2, 3]), (3,)),
    case("bool-plus-int", lambda m, i: m + i, lambda m, i: m + i, fixed([True, False]),
         index([4, 5]), grad=False),
    case("bool-or", lambda m: m + True, lambda m: m | True, fixed([True, False]), grad=False),
    case("bool-and", lambda m, n: m * n, np.logical_and, fixed([True, False, True]),
         fixed([True, True, False]), grad=False),
    case("sum/int", lambda i: i.sum(), lambda i: i.sum(), index([[1, 2], [3, 4]]), grad=False),
    # ------------------------------------------------------------------ comparisons (no grad)
    case("eq", lambda a, b: a == b, np.equal, fixed(TIES), fixed(TIES_B), grad=False),
    case("ne", lambda a, b: a != b, np.not_equal, fixed(TIES), fixed(TIES_B), grad=False),
    case("lt", lambda a, b: a < b, np.less, fixed(TIES), fixed(TIES_B), grad=False),
    case("le", lambda a, b: a <= b, np.less_equal, fixed(TIES), fixed(TIES_B), grad=False),
    case("gt", lambda a, b: a > b, np.greater, fixed(TIES), fixed(TIES_B), grad=False),
    case("ge", lambda a, b: a >= b, np.greater_equal, fixed(TIES), fixed(TIES_B), grad=False),
    case("eq/scalar", lambda a: a == 2, lambda a: a == 2, fixed(TIES), grad=False),
    case("lt/reflected", lambda a: 1 < a, lambda a: 1 < a, fixed(TIES), grad=False),
    case("ge/broadcast", lambda a, b: a >= b, np.greater_equal, fixed(TIES), fixed(TIES_B[0]),
         grad=False),
    case("eq/int", lambda i, j: i == j, np.equal, index([1, 2, 3]), index([1, 0, 3]), grad=False),
    case("not", lambda a: ~(a > 1), lambda a: ~(a > 1), fixed(TIES), grad=False),
    case("relu/int", og.relu, lambda i: np.maximum(i, 0), index([-2, 0, 3]), grad=False),
    case("clamp/int-float-bounds", lambda i: i.clamp(0.5, 2), lambda i: np.clip(i, 0.5, 2)
         .astype(np.float32), index([-2, 1, 3]), grad=False),
    case("pow/bool-int", lambda m: m ** 2, lambda m: m.astype(np.int64) ** 2,
         fixed([True, False]), grad=False),
    # ------------------------------------------------------------------ in-place (non-leaf)
    case("add_", lambda a, b: (a * 1).add_(b), lambda a, b: a + b, (2, 3), (3,)),
    case("sub_", lambda a, b: (a * 1).sub_(b), lambda a, b: a - b, (2, 3), (2, 3)),
    case("mul_/chain", lambda a, b: (a * 2).mul_(b).mul_(a), lambda a, b: a * 2 * b * a,
         (2, 3), (2, 1)),
    case("div_", lambda a, b: (a + 0).div_(b), np.divide, (3,), pos(3)),
    case("add_/float64-into-float32", lambda a: (a * 1).add_(og.ones(3, dtype=og.float64)),
         lambda a: a + 1, (3,), grad=False),
    # ------------------------------------------------------------------ compositions
    case("chain/fanout", lambda a: a * og.exp(a) + a.sum(),
         lambda a: a * np.exp(a) + a.sum(), (2, 3)),
    case("chain/mlp", lambda x, w, b: og.tanh(x @ w + b).sum(1),
         lambda x, w, b: np.tanh(x @ w + b).sum(1), (4, 3), (3, 2), (2,)),
]


test_forward, test_vjp, test_runtimes, test_ids_are_unique = table_tests(CASES)
