"""The op table of indexing: getitem/setitem of every index kind and the indexing functions.

Each row is checked three ways by ``opcheck.check_case`` (forward against NumPy, float64 VJP
against central differences, ONNX Runtime against the reference evaluator); see opcheck.py.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from opcheck import OpCase, arg, case, fixed, index, table_tests

import onnxgrad as og
import onnxgrad.nn.functional as F

MASK_ROWS = np.array([True, False, True, True])
MASK_COLS = np.array([True, False, True])
MASK_2D = np.array([[True, False, True], [False, False, True], [True, True, False],
                    [False, True, False]])


# --------------------------------------------------------------------------- helpers
def og_set(index: Any):
    """``b = a.clone(); b[index] = v; return b`` as an onnxgrad function of ``a`` (and ``v``)."""

    def fn(a, v=2.5):
        b = a.clone()
        b[index] = v
        return b

    return fn


def np_set(index: Any):
    def ref(a, v=2.5):
        b = a.copy()
        b[index] = v
        return b

    return ref


def og_set_tensor_index(a, i, v):
    b = a.clone()
    b[i] = v
    return b


def og_set_two(a, i, j, v):
    b = a.clone()
    b[i, j] = v
    return b


def np_set_two(a, i, j, v):
    b = a.copy()
    b[i, j] = v
    return b


def np_scatter(x, dim, idx, src):
    out = x.copy()
    src = np.broadcast_to(src, idx.shape) if np.ndim(src) == 0 else \
        src[tuple(slice(0, n) for n in idx.shape)]
    np.put_along_axis(out, idx, src, axis=dim)
    return out


def np_scatter_add(x, dim, idx, src):
    out = x.copy()
    coords = list(np.indices(idx.shape))
    coords[dim] = idx
    np.add.at(out, tuple(coords), src[tuple(slice(0, n) for n in idx.shape)])
    return out


def np_index_add(x, dim, idx, src, alpha=1):
    out = x.copy()
    np.add.at(np.moveaxis(out, dim, 0), idx, np.moveaxis(src * np.float32(alpha), dim, 0))
    return out


def np_topk(x, k, axis=-1, largest=True):
    order = np.argsort(-x if largest else x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    return np.take_along_axis(x, idx, axis), idx


def np_sort(x, axis=-1, descending=False):
    idx = np.argsort(-x if descending else x, axis=axis, kind="stable")
    return np.take_along_axis(x, idx, axis), idx


def np_one_hot(i, n):
    return np.eye(n, dtype=np.int64)[i]


def np_masked_select(x, m):
    x, m = np.broadcast_arrays(x, m)
    return x[m]


CASES: list[OpCase] = [
    # ------------------------------------------------------------------ getitem: integer arrays
    case("getitem/array-repeated", lambda a, i: a[i], lambda a, i: a[i], (4, 3),
         index([1, 1, 2, 1])),
    case("getitem/1d-negative-repeated", lambda a, i: a[i], lambda a, i: a[i], (5,),
         index([-1, 0, -1, 4, 2])),
    case("getitem/two-arrays", lambda a, i, j: a[i, j], lambda a, i, j: a[i, j], (4, 3),
         index([1, 1, 2]), index([0, 2, 2])),
    case("getitem/two-arrays-repeated", lambda a, i, j: a[i, j], lambda a, i, j: a[i, j], (4, 3),
         index([3, 3, 0]), index([1, 1, -1])),
    case("getitem/two-arrays-broadcast", lambda a, i, j: a[i, j], lambda a, i, j: a[i, j],
         (4, 3), index([[0], [3]]), index([0, 2, 1])),
    case("getitem/arrays-after-slice", lambda a, i, j: a[:, i, j], lambda a, i, j: a[:, i, j],
         (2, 4, 3), index([1, 3]), index([0, 2])),
    case("getitem/arrays-around-slice", lambda a, i, j: a[i, :, j], lambda a, i, j: a[i, :, j],
         (4, 2, 3), index([1, 3, 3]), index([0, 2, -3])),
    case("getitem/arrays-around-none", lambda a, i, j: a[i, None, j],
         lambda a, i, j: a[i, None, j], (4, 2, 3), index([1, 3]), index([0, 1])),
    # NOTE: PyTorch applies ints first (a select), so here the arrays are adjacent...
    case("getitem/arrays-around-int", lambda a, i, j: a[i, 0, j], lambda a, i, j: a[i, 0, j],
         (4, 2, 3), index([1, 3]), index([0, 2])),
    # ...and a 0-d integer tensor is such an int: the array's dims stay in place (NumPy: first).
    case("getitem/0d-tensor-select", lambda a, i, j: a[i, :, j],
         lambda a, i, j: a[int(i)][:, j], (4, 2, 3), index(2), index([0, 2, 2])),
    case("getitem/three-arrays-2d", lambda a, i, j, k: a[i, j, k],
         lambda a, i, j, k: a[i, j, k], (2, 3, 4), index([[0, 1], [1, 1]]), index([[2, 0]]),
         index([[3], [-1]])),
    case("getitem/array-and-steps", lambda a, i: a[::2, i, 1:],
         lambda a, i: a[::2, i, 1:], (3, 4, 3), index([[3, 0], [1, 1]])),
    # ------------------------------------------------------------------ getitem: boolean masks
    case("getitem/mask", lambda a, m: a[m], lambda a, m: a[m], (4, 3), fixed(MASK_ROWS)),
    case("getitem/mask-2d", lambda a, m: a[m], lambda a, m: a[m], (4, 3), fixed(MASK_2D)),
    case("getitem/mask-dim1", lambda a, m: a[:, m], lambda a, m: a[:, m], (4, 3),
         fixed(MASK_COLS)),
    case("getitem/mask-ellipsis", lambda a, m: a[..., m], lambda a, m: a[..., m], (2, 4, 3),
         fixed(MASK_COLS)),
    case("getitem/mask-list", lambda a: a[[True, False, True, True]], lambda a: a[MASK_ROWS],
         (4, 3)),
    case("getitem/mask-numpy", lambda a: a[MASK_ROWS, 1:], lambda a: a[MASK_ROWS, 1:], (4, 3)),
    case("getitem/mask-and-array", lambda a, m, i: a[m, i], lambda a, m, i: a[m, i], (4, 3),
         fixed(MASK_ROWS), index([0, 2, 2])),
    case("getitem/mask-empty", lambda a, m: a[m], lambda a, m: a[m], (4, 3),
         fixed(np.zeros(4, bool))),
    case("getitem/bool-true", lambda a: a[True], lambda a: a[None], (4, 3)),
    case("getitem/bool-false", lambda a: a[False, 1:], lambda a: a[None][:0, 1:], (4, 3),
         grad=False),
    # ------------------------------------------------------------------ setitem
    case("setitem/int-scalar", og_set(1), np_set(1), (4, 3)),
    case("setitem/column-broadcast", og_set((slice(None), 1)), np_set((slice(None), 1)),
         (4, 3), (1,)),
    case("setitem/steps", og_set((slice(None, None, 2), slice(1, None))),
         np_set((slice(None, None, 2), slice(1, None))), (5, 3), (3, 2)),
    case("setitem/leading-ones", og_set(0), lambda a, v: np_set(0)(a, v[0, 0]), (4, 3), (1, 1, 3)),
    case("setitem/none-ellipsis", og_set((None, Ellipsis, 0)), np_set((None, Ellipsis, 0)),
         (4, 3), (4,)),
    case("setitem/array", og_set_tensor_index, lambda a, i, v: np_set(i)(a, v), (4, 3),
         index([2, 0]), (2, 3)),
    case("setitem/array-row-value", og_set_tensor_index, lambda a, i, v: np_set(i)(a, v), (4, 3),
         index([-1, 1]), (3,)),
    case("setitem/two-arrays", og_set_two, np_set_two, (4, 3), index([0, 3, 2]),
         index([1, 1, 0]), (3,)),
    case("setitem/two-arrays-scalar-value", og_set_two, np_set_two, (4, 3), index([0, 3]),
         index([2, 0]), ()),
    case("setitem/0d-int-tensor", og_set_tensor_index, lambda a, i, v: np_set(int(i))(a, v),
         (4, 3), index(2), (3,)),
    case("setitem/mask-scalar", og_set(MASK_2D), np_set(MASK_2D), (4, 3)),
    case("setitem/mask-row-value", og_set(MASK_ROWS), np_set(MASK_ROWS), (4, 3), (3,)),
    case("setitem/mask-dim1", og_set((slice(None), MASK_COLS)), np_set((slice(None), MASK_COLS)),
         (4, 3), (4, 1)),
    case("setitem/mask-values", og_set(MASK_2D), np_set(MASK_2D), (4, 3), (6,)),
    case("setitem/mask-rows-values", og_set(MASK_ROWS), np_set(MASK_ROWS), (4, 3), (3, 3)),
    case("setitem/mask-list", og_set([True, False, False, True]),
         np_set(np.array([True, False, False, True])), (4, 3), (2, 1)),
    # ------------------------------------------------------------------ masks
    case("masked_fill", lambda a, m: a.masked_fill(m, -1.5), lambda a, m: np.where(m, -1.5, a),
         (4, 3), fixed(MASK_2D)),
    case("masked_fill/broadcast-mask", lambda a, m: og.masked_fill(a, m, 0.0),
         lambda a, m: np.where(m, 0, a).astype(np.float32), (4, 3), fixed(MASK_COLS)),
    case("masked_fill/tensor-value", lambda a, m, v: a.masked_fill(m, v),
         lambda a, m, v: np.where(m, v, a), (4, 3), fixed(MASK_2D), ()),
    case("masked_fill/int", lambda i, m: i.masked_fill(m, 7), lambda i, m: np.where(m, 7, i),
         index([[1, 2, 3], [4, 5, 6]]), fixed(MASK_2D[:2]), grad=False),
    case("masked_select", og.masked_select, lambda a, m: a[m], (4, 3), fixed(MASK_2D)),
    case("masked_select/broadcast", lambda a, m: a.masked_select(m), np_masked_select, (4, 3),
         fixed(MASK_COLS)),
    case("nonzero", lambda a: og.nonzero(a > 0), lambda a: np.argwhere(a > 0), (3, 4),
         grad=False),
    case("nonzero/float64", lambda a: og.nonzero(a.double()), lambda a: np.argwhere(a),
         fixed([[0.0, 1.5], [-2.0, 0.0]]), grad=False),
    case("nonzero/as-tuple", lambda a: og.nonzero(a > 0, as_tuple=True),
         lambda a: np.nonzero(a > 0), (3, 4), grad=False),
    case("where/one-arg", lambda a: og.where(a > 0), lambda a: np.nonzero(a > 0), (3, 4),
         grad=False),
    # ------------------------------------------------------------------ gather and scatter
    case("gather/og", lambda a, i: og.gather(a, 1, i), lambda a, i: np.take_along_axis(a, i, 1),
         (3, 4), index([[0, 0], [3, 1], [2, 2]])),
    case("scatter/src", lambda a, i, s: a.scatter(0, i, s), lambda a, i, s: np_scatter(a, 0, i, s),
         (4, 3), index([[3, 0, 1], [1, 2, 0]]), (2, 3)),
    case("scatter/src-larger", lambda a, i, s: og.scatter(a, 1, i, s),
         lambda a, i, s: np_scatter(a, 1, i, s), (3, 4), index([[3], [0], [2]]), (3, 2)),
    case("scatter/value", lambda a, i: a.scatter(1, i, 5.0), lambda a, i: np_scatter(a, 1, i, 5.0),
         (4, 3), index([[0], [2], [1], [0]])),
    case("scatter/reduce-add", lambda a, i, s: a.scatter(1, i, s, reduce="add"),
         lambda a, i, s: np_scatter_add(a, 1, i, s), (2, 3), index([[0, 0], [2, 2]]), (2, 2)),
    case("scatter_add", lambda a, i, s: a.scatter_add(0, i, s),
         lambda a, i, s: np_scatter_add(a, 0, i, s), (4, 3), index([[3, 3, 1], [3, 3, 3]]),
         (2, 3)),
    case("scatter_add/og", lambda a, i, s: og.scatter_add(a, -1, i, s),
         lambda a, i, s: np_scatter_add(a, 1, i, s), (2, 3), index([[1, 1, 1], [0, 2, 0]]),
         (2, 3)),
    case("index_select", lambda a, i: a.index_select(1, i), lambda a, i: a[:, i], (2, 4),
         index([3, 0, 3])),
    case("index_select/og-dim0", lambda a, i: og.index_select(a, 0, i), lambda a, i: a[i],
         (4, 2), index([1, 1])),
    case("index_add", lambda a, i, s: a.index_add(0, i, s, alpha=2),
         lambda a, i, s: np_index_add(a, 0, i, s, 2), (4, 3), index([1, 3, 1]), (3, 3)),
    case("index_add/dim1", lambda a, i, s: og.index_add(a, 1, i, s),
         lambda a, i, s: np_index_add(a, 1, i, s), (2, 4), index([0, 0]), (2, 2)),
    case("take_along_dim", lambda a, i: og.take_along_dim(a, i, 1),
         lambda a, i: np.take_along_axis(a, i, 1), (3, 4), index([[0, 3], [1, 1], [2, 0]])),
    case("take_along_dim/broadcast", lambda a, i: a.take_along_dim(i, 0),
         lambda a, i: np.take_along_axis(a, np.broadcast_to(i, (2, 3)), 0), (4, 3),
         index([[0], [3]])),
    case("take_along_dim/flat", lambda a, i: og.take_along_dim(a, i),
         lambda a, i: a.reshape(-1)[i], (3, 4), index([11, 0, 5, 5])),
    # ------------------------------------------------------------------ rearranging
    case("tile", lambda a: a.tile((2,)), lambda a: np.tile(a, 2), (2, 3)),
    case("tile/more-dims", lambda a: og.tile(a, (2, 1, 3)), lambda a: np.tile(a, (2, 1, 3)),
         (2, 3)),
    case("flip", lambda a: a.flip(0), lambda a: np.flip(a, 0), (3, 4)),
    case("flip/dims", lambda a: og.flip(a, (0, -1)), lambda a: np.flip(a, (0, 2)), (2, 3, 4)),
    case("roll", lambda a: a.roll(2), lambda a: np.roll(a, 2), (3, 4)),
    case("roll/dims", lambda a: og.roll(a, (1, -2), (0, 1)), lambda a: np.roll(a, (1, -2), (0, 1)),
         (3, 4)),
    # ------------------------------------------------------------------ sorting
    case("topk", lambda a: a.topk(2), lambda a: np_topk(a, 2), (3, 5), distinct=True),
    case("topk/smallest-dim0", lambda a: og.topk(a, 3, dim=0, largest=False),
         lambda a: np_topk(a, 3, 0, largest=False), (4, 2), distinct=True),
    case("sort", lambda a: a.sort(), np_sort, (3, 4), distinct=True),
    case("sort/descending-dim0", lambda a: og.sort(a, 0, descending=True),
         lambda a: np_sort(a, 0, descending=True), (4, 3), distinct=True),
    case("sort/stable-ties", lambda a: og.sort(a, stable=True), lambda a: np_sort(a),
         fixed([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0]]), vjp=False),
    case("sort/int", lambda i: og.sort(i, descending=True),
         lambda i: np_sort(i, descending=True), index([[3, 1, 2], [0, 5, 5]]), grad=False),
    case("argsort", lambda a: a.argsort(dim=0, descending=True),
         lambda a: np_sort(a, 0, descending=True)[1], (4, 3), distinct=True, grad=False),
    # ------------------------------------------------------------------ scans
    case("cumsum", lambda a: a.cumsum(0), lambda a: np.cumsum(a, 0), (4, 3)),
    case("cumsum/neg-dim", lambda a: og.cumsum(a, -1), lambda a: np.cumsum(a, -1), (2, 5)),
    case("cumsum/int", lambda i: og.cumsum(i, 0), lambda i: np.cumsum(i, 0),
         fixed(np.array([1, 2, 3], dtype=np.int32)), grad=False, check_dtype=False),
    case("cumprod", lambda a: a.cumprod(1), lambda a: np.cumprod(a, 1), (3, 4)),
    case("cumprod/long", lambda a: og.cumprod(a, 0), lambda a: np.cumprod(a, 0),
         arg(9, 2, low=0.5, high=1.5)),
    case("cumprod/zeros", lambda a: og.cumprod(a, 0), lambda a: np.cumprod(a, 0),
         fixed([1.5, -0.5, 0.0, 2.0, 0.0, 1.25])),
    case("cumprod/int", lambda i: og.cumprod(i, 0), lambda i: np.cumprod(i, 0),
         index([1, 2, -3, 4]), grad=False),
    # ------------------------------------------------------------------ one_hot
    case("one_hot", lambda i: F.one_hot(i, 4), lambda i: np_one_hot(i, 4), index([0, 3, 1]),
         grad=False),
    case("one_hot/inferred", lambda i: F.one_hot(i), lambda i: np_one_hot(i, 4),
         index([[0, 3], [1, 1]]), grad=False),
]

test_forward, test_vjp, test_runtimes, test_ids_are_unique = table_tests(CASES)
