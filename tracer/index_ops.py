"""Indexing ops: ``x[idx]``, ``x[idx] = v``, boolean masks, and the indexing functions.

``getitem`` follows PyTorch's order of operations, which is also how it is built here:

1. *basic* items (``None``, ints, slices, ``...``) become one ``Unsqueeze``, one ``Slice`` and one
   ``Squeeze`` (a 0-d integer tensor is an int too, a ``Gather`` that keeps the index in the graph);
2. *advanced* items (integer arrays, boolean masks as their ``NonZero`` coordinates) index what is
   left: one array is a ``Gather``; several are broadcast together and become one ``GatherND``,
   whose result dims stand where the first array was when the arrays are adjacent and in front
   otherwise (NumPy's rule, applied after the ints are gone, as PyTorch does).

``setitem`` is an in-place op: the tensor's handle takes a new value (``Tensor._write``) that is
``ScatterND`` of ``v`` into the flat tensor at the flat positions that ``getitem`` reads, which
``getitem`` of a ``Range`` tensor gives, so both share one definition of what an index means. A
lone boolean mask with a value that does not depend on the mask's count is a ``Where`` instead:
no data-dependent shape, so it also compiles.

Data-dependent shapes (``x[mask]``, ``nonzero``, ``masked_select``) run eagerly; inside
``og.compile`` they raise a :class:`TraceError` naming the user's line (a compiled step is one
graph of static shapes, as ``torch.compile`` without dynamic output shapes).
"""
from __future__ import annotations

import builtins
import warnings
from collections import namedtuple
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import ops, state
from .ops import (
    _TORCH_NAMES,
    Number,
    ShapeError,
    _fmt,
    _norm_dims,
    _shape_args,
    _val,
    _where,
    _wrap,
    expand,
    reshape,
    to,
)
from .registry import op
from .tensor import Tensor, TraceError
from .transformer_ops import repeat
from .values import Val, const, emit, int64

topk_result = namedtuple("topk", ["values", "indices"])
sort_result = namedtuple("sort", ["values", "indices"])

INT64_MIN = -(2 ** 63)

# dtype names as PyTorch prints them in these ops' messages (``mask with dtype float``).
_C_NAMES = {"float16": "c10::Half", "float32": "float", "float64": "double", "int8": "signed char",
            "uint8": "unsigned char", "int16": "short", "int32": "int", "int64": "long int",
            "bool": "bool"}


def _torch_name(dtype: np.dtype) -> str:
    return _TORCH_NAMES.get(np.dtype(dtype).name, np.dtype(dtype).name)


class IndexShapeError(ShapeError, RuntimeError):
    """Shapes that an indexing op cannot combine: PyTorch raises RuntimeError for these, onnxgrad's
    shape errors are ValueErrors (``ShapeError``); this is both."""


_MASK_HINT = ("Use og.where(mask, x, other) or x.masked_fill(~mask, value) (same shape as x), "
              "or call it outside the compiled function.")


def _data_dependent(what: str, hint: str = _MASK_HINT) -> None:
    """Refuse an op whose output shape depends on tensor values while og.compile traces."""
    if state.active_trace() is not None:
        where = state.format_frame(state.user_frame())
        raise TraceError(f"{what} has a shape that depends on tensor values, which og.compile "
                         f"cannot trace into one graph of static shapes ({where}). {hint}")


def _torch_broadcast(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """NumPy's broadcast of two shapes, refused with PyTorch's message."""
    n = builtins.max(len(a), len(b))
    pa, pb = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    for i, (da, db) in enumerate(zip(pa, pb)):
        if da != db and da != 1 and db != 1:
            raise IndexShapeError(f"The size of tensor a ({da}) must match the size of tensor b "
                                  f"({db}) at non-singleton dimension {i}{_where()}")
    return tuple(builtins.max(da, db) if 0 not in (da, db) else 0 for da, db in zip(pa, pb))


def _index_tensor(array: np.ndarray) -> Tensor:
    return Tensor(Val(np.ascontiguousarray(array)))


def _leaf_guard(x: Tensor, view: bool = False) -> None:
    if x.requires_grad and x.is_leaf and state.grad_enabled():
        what = "a view of a leaf Variable" if view else "a leaf Variable"
        raise RuntimeError(f"{what} that requires grad is being used in an in-place operation."
                           f"{_where()}")


def _write_inplace(x: Tensor, new: Tensor, name: str) -> Tensor:
    """The end of an in-place op: the result must have ``x``'s shape; it takes ``x``'s dtype."""
    if new.shape != x.shape:
        raise IndexShapeError(f"output with shape {_fmt(x.shape)} doesn't match the broadcast "
                              f"shape {_fmt(new.shape)} ({name}){_where()}")
    x._write(to(new, x.dtype)._v)
    return x


# =========================================================================== parsing an index
# An index is a list of items (kind, value): "new" (None), "bool" (a Python bool), "int" (a Python
# int or a 0-d integer tensor), "slice", "adv" (an integer array) and "mask" (a bool array).
Item = tuple[str, Any]


def _parse(x: Tensor, index: Any) -> list[Item]:
    if not isinstance(index, tuple):
        index = (index,)
    items: list[Item] = []
    for it in index:
        if it is None:
            items.append(("new", None))
        elif it is Ellipsis:
            items.append(("ellipsis", None))
        elif isinstance(it, (bool, np.bool_)):
            items.append(("bool", bool(it)))
        elif isinstance(it, (int, np.integer)):
            items.append(("int", int(it)))
        elif isinstance(it, slice):
            items.append(("slice", it))
        elif isinstance(it, Tensor):
            items.append(_tensor_item(it))
        elif isinstance(it, (list, tuple, np.ndarray)):
            array = np.asarray(it)
            if array.dtype == np.bool_:
                items.append(("mask", _index_tensor(array)))
            elif array.dtype.kind in "iu" or array.size == 0:
                items.append(("adv", _index_tensor(array.astype(np.int64))))
            else:
                raise IndexError(f"tensors used as indices must be long, int, byte or bool tensors"
                                 f"{_where()}")
        else:
            raise IndexError("only integers, slices (`:`), ellipsis (`...`), None and long or byte "
                             f"Variables are valid indices (got {type(it).__name__}){_where()}")
    # NOTE: identity and kind tests only: `in` and .count would call Tensor.__eq__ on tensors.
    ellipses = [k for k, (kind, _) in enumerate(items) if kind == "ellipsis"]
    if len(ellipses) > 1:
        raise IndexError(f"an index can only have a single ellipsis ('...'){_where()}")
    used = builtins.sum(v.ndim if kind == "mask" else 1 for kind, v in items
                        if kind in ("int", "slice", "adv", "mask"))
    if used > x.ndim:
        raise IndexError(f"too many indices for tensor of dimension {x.ndim}{_where()}")
    at = ellipses[0] if ellipses else len(items)
    fill = [("slice", slice(None))] * (x.ndim - used)
    return items[:at] + fill + items[at + 1:]


def _tensor_item(t: Tensor) -> Item:
    if t.dtype == np.uint8:
        warnings.warn("indexing with dtype torch.uint8 is now deprecated, please use a dtype "
                      "torch.bool instead.", UserWarning, stacklevel=4)
        t = to(t, np.bool_)
    if t.dtype == np.bool_:
        return ("mask", t)
    if t.dtype.kind not in "iu":
        raise IndexError(f"tensors used as indices must be long, int, byte or bool tensors"
                         f"{_where()}")
    # NOTE: as PyTorch, a 0-d integer tensor selects like an int (which decides where the
    # result dims of the other arrays go); it stays a graph value, so a compiled step reads it.
    return ("int", t) if t.ndim == 0 else ("adv", t)


def _has_advanced(items: list[Item]) -> bool:
    return any(kind in ("adv", "mask", "bool") for kind, _ in items)


def _check_bounds(idx: Tensor, axis: int, size: int) -> None:
    data = idx._v.data
    bad = (data >= size) | (data < -size)
    if bad.any():
        raise IndexError(f"index {int(data[bad].reshape(-1)[0])} is out of bounds for dimension "
                         f"{axis} with size {size}{_where()}")


# =========================================================================== getitem
def _basic(x: Tensor, items: list[Item]) -> tuple[Val, list[tuple[int, Any]], tuple[int, ...]]:
    """Apply None, ints and slices; return the value, the advanced items by their axis in it (a
    mask once, at its first axis) and its shape."""
    new_axes, squeeze_axes, selects = [], [], []
    starts, ends, axes, steps = [], [], [], []
    rest: list[tuple[int, Any]] = []  # (axis in the unsqueezed value, advanced item)
    shape: list[int] = []  # of the unsqueezed, sliced value
    axis = 0  # in x
    for kind, v in items:
        u = len(shape)
        if kind in ("new", "bool"):
            new_axes.append(u)
            shape.append(1)
            if kind == "bool":  # PyTorch: x[True] is x[None][[0]], x[False] is x[None][[]]
                rest.append((u, ("adv", _index_tensor(np.zeros(1 if v else 0, np.int64)))))
            continue
        if kind == "mask":
            rest.append((u, (kind, v)))
            shape.extend(x.shape[axis:axis + v.ndim])
            axis += v.ndim
            continue
        size = x.shape[axis]
        if kind == "int" and isinstance(v, Tensor):
            _check_bounds(v, axis, size)
            selects.append((u, v))
        elif kind == "int":
            if not -size <= v < size:
                raise IndexError(f"index {v} is out of bounds for dimension {axis} with size "
                                 f"{size}{_where()}")
            i = v % size
            starts.append(i), ends.append(i + 1), axes.append(u), steps.append(1)
            squeeze_axes.append(u)
        elif kind == "slice":
            if v.step is not None and v.step <= 0:
                raise ValueError(f"step must be greater than zero{_where()}")
            if (v.start, v.stop, v.step) != (None, None, None):
                s, e, st = slice(v.start, v.stop, v.step).indices(size)
                e = builtins.max(e, s)
                starts.append(s), ends.append(e), axes.append(u), steps.append(st)
                size = len(range(s, e, st))
        else:  # adv
            rest.append((u, (kind, v)))
        shape.append(size)
        axis += 1

    val = x._v
    if new_axes:
        val = emit("Unsqueeze", [val, const(new_axes, int64)])[0]
    if starts:
        val = emit("Slice", [val, const(starts, int64), const(ends, int64), const(axes, int64),
                             const(steps, int64)])[0]
    if squeeze_axes:
        val = emit("Squeeze", [val, const(squeeze_axes, int64)])[0]
    gone = sorted(squeeze_axes)

    def after_squeeze(u: int) -> int:
        return u - builtins.sum(1 for a in gone if a < u)

    # Selects by 0-d tensors, the last first so that earlier axes keep their numbers.
    for u, idx in sorted(selects, key=lambda s: -s[0]):
        val = emit("Gather", [val, idx._v], {"axis": after_squeeze(u)})[0]
    gone = sorted(gone + [u for u, _ in selects])
    out_shape = tuple(d for u, d in enumerate(shape) if u not in gone)
    return val, [(after_squeeze(u), item) for u, item in rest], out_shape


def _check_mask(mask: Tensor, axis: int, shape: tuple[int, ...]) -> None:
    for j, d in enumerate(mask.shape):
        if axis + j >= len(shape) or shape[axis + j] != d:
            raise IndexError(f"The shape of the mask {_fmt(mask.shape)} at index {j} does not "
                             f"match the shape of the indexed tensor {_fmt(shape)} at index "
                             f"{axis + j}{_where()}")


def _mask_coordinates(mask: Tensor, axis: int, shape: tuple[int, ...]) -> list[Tensor]:
    """The mask's NonZero coordinates, one int64 vector per mask dim, after PyTorch's check."""
    _check_mask(mask, axis, shape)
    _data_dependent("Boolean-mask indexing (x[mask])")
    if mask.ndim == 0:  # a 0-d mask is a Python bool: x[None][[0]] or x[None][[]]
        return [_index_tensor(np.zeros(1 if bool(mask._v.data) else 0, np.int64))]
    coords = emit("NonZero", [mask._v], differentiable=False)[0]  # [k, n]
    if mask.ndim == 1:
        return [_wrap(emit("Reshape", [coords, const([-1], int64)])[0])]
    rows = emit("Split", [coords, const([1] * mask.ndim, int64)], {"axis": 0}, n_out=mask.ndim)
    return [_wrap(emit("Reshape", [r, const([-1], int64)])[0]) for r in rows]


def _advanced(val: Val, shape: tuple[int, ...], adv: list[tuple[int, Tensor]]) -> Val:
    for axis, idx in adv:
        _check_bounds(idx, axis, shape[axis])
    if len(adv) == 1:
        axis, idx = adv[0]
        return emit("Gather", [val, idx._v], {"axis": axis})[0]
    try:
        batch = np.broadcast_shapes(*(idx.shape for _, idx in adv))
    except ValueError:
        listed = ", ".join(_fmt(idx.shape) for _, idx in adv)
        raise IndexError(f"shape mismatch: indexing tensors could not be broadcast together with "
                         f"shapes {listed}{_where()}") from None
    axes = [a for a, _ in adv]
    others = [a for a in range(len(shape)) if a not in axes]
    perm = axes + others
    if perm != sorted(perm):
        val = emit("Transpose", [val], {"perm": perm})[0]
    columns = []
    for _, idx in adv:
        v = idx._v if idx.dtype == int64 else _val(idx, np.dtype(int64))
        if idx.shape != batch:
            v = emit("Expand", [v, const(batch, int64)])[0]
        columns.append(emit("Unsqueeze", [v, const([-1], int64)])[0])
    coords = emit("Concat", columns, {"axis": -1})[0]
    val = emit("GatherND", [val, coords])[0]
    # Adjacent arrays put their result dims where the first one was; others leave them first.
    first = axes[0]
    if axes == list(range(first, first + len(axes))) and first > 0:
        nb, r = len(batch), len(others)
        perm = [nb + i for i in range(first)] + list(range(nb)) + [nb + i for i in range(first, r)]
        val = emit("Transpose", [val], {"perm": perm})[0]
    return val


def _index(x: Tensor, items: list[Item]) -> Tensor:
    val, rest, shape = _basic(x, items)
    adv: list[tuple[int, Tensor]] = []
    for axis, (kind, v) in rest:
        if kind == "mask":
            adv.extend((axis + j, c) for j, c in enumerate(_mask_coordinates(v, axis, shape)))
        else:
            adv.append((axis, v))
    if adv:
        val = _advanced(val, shape, adv)
    if val is x._v:
        val = emit("Identity", [val])[0]
    return _wrap(val)


@op(method="__getitem__")
def getitem(x: Tensor, index: Any) -> Tensor:
    """``x[index]`` with PyTorch's semantics for every index kind (see the module docstring)."""
    return _index(x, _parse(x, index))


# =========================================================================== setitem
def _strip_leading_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    k = 0
    while k < len(shape) and shape[k] == 1:
        k += 1
    return shape[k:]


def _value_tensor(x: Tensor, value: Any, advanced: bool) -> Tensor:
    if isinstance(value, Tensor):
        if advanced and value.dtype != x.dtype and value.ndim > 0:
            raise RuntimeError(f"Index put requires the source and destination dtypes match, got "
                               f"{_torch_name(x.dtype)} for the destination and "
                               f"{_torch_name(value.dtype)} for the source.{_where()}")
        return to(value, x.dtype)
    if isinstance(value, Number):
        return _wrap(const(np.asarray(value).astype(x.dtype)))
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"can't assign a {type(value).__name__} to a tensor{_where()}")
    return _wrap(Val(array.astype(x.dtype)))


def _check_value_shape(value: Tensor, target: tuple[int, ...], advanced: bool) -> None:
    vs = _strip_leading_ones(value.shape)
    try:
        if np.broadcast_shapes(vs, target) == tuple(target):
            return
    except ValueError:
        pass
    if advanced:
        raise IndexShapeError(f"shape mismatch: value tensor of shape {_fmt(value.shape)} cannot "
                              f"be broadcast to indexing result of shape {_fmt(target)}{_where()}")
    if len(vs) > len(target):
        raise IndexShapeError(f"expand({_fmt(value.shape)}, size={_fmt(target)}): the number of "
                              f"sizes provided ({len(target)}) must be greater or equal to the "
                              f"number of dimensions in the tensor ({len(vs)}){_where()}")
    lead = len(target) - len(vs)
    dim = next(i for i, d in enumerate(vs) if d != 1 and d != target[lead + i])
    raise IndexShapeError(f"The expanded size of the tensor ({target[lead + dim]}) must match the "
                          f"existing size ({vs[dim]}) at non-singleton dimension {lead + dim}.  "
                          f"Target sizes: {_fmt(target)}.  Tensor sizes: {_fmt(vs)}{_where()}")


def _lone_mask(x: Tensor, items: list[Item]) -> tuple[int, Tensor] | None:
    """(first axis, mask) when the index is one mask and full slices, else None."""
    masks = [(k, v) for k, (kind, v) in enumerate(items) if kind == "mask"]
    if len(masks) != 1 or masks[0][1].ndim == 0:
        return None
    full = all(kind == "mask" or (kind == "slice" and (v.start, v.stop, v.step) ==
                                  (None, None, None)) for kind, v in items)
    return (masks[0][0], masks[0][1]) if full else None


@op(method="__setitem__")
def setitem(x: Tensor, index: Any, value: Any) -> None:
    """``x[index] = value``: in place, with gradients to ``x``'s history and to ``value``."""
    items = _parse(x, index)
    advanced = _has_advanced(items)
    _leaf_guard(x, view=not advanced and any(kind in ("int", "slice") for kind, _ in items))
    v = _value_tensor(x, value, advanced)
    masked = _lone_mask(x, items)
    if masked is not None:
        p, mask = masked
        rest = x.shape[p + mask.ndim:]
        _check_mask(mask, p, x.shape)
        vs = _strip_leading_ones(v.shape)
        if len(vs) <= len(rest):
            # The value does not depend on how many elements the mask selects: a Where.
            try:
                ok = np.broadcast_shapes(vs, rest) == tuple(rest)
            except ValueError:
                ok = False
            if ok:
                m = reshape(mask, (1,) * p + mask.shape + (1,) * len(rest))
                if v.shape != vs:
                    v = reshape(v, vs)
                x._write(emit("Where", [m._v, v._v, x._v])[0])
                return
    positions = _index(_positions(x), items)
    target = positions.shape
    _check_value_shape(v, target, advanced)
    vs = _strip_leading_ones(v.shape)
    if v.shape != vs:
        v = reshape(v, vs)
    updates = expand(v, target) if v.shape != target else v
    flat = emit("Reshape", [x._v, const([-1], int64)])[0]
    coords = emit("Reshape", [positions._v, const([-1, 1], int64)])[0]
    updates = emit("Reshape", [updates._v, const([-1], int64)])[0]
    out = emit("ScatterND", [flat, coords, updates])[0]
    x._write(_reshape_to(out, x.shape))


def _reshape_to(val: Val, shape: tuple[int, ...], differentiable: bool = True) -> Val:
    # NOTE: without allowzero, ONNX Reshape reads a 0 in the shape as "copy the input's dim".
    attrs = {"allowzero": 1} if 0 in shape else None
    return emit("Reshape", [val, const(shape, int64)], attrs, differentiable=differentiable)[0]


def _positions(x: Tensor) -> Tensor:
    """``arange(x.numel()).reshape(x.shape)`` as graph values (Range, no constant of x's size)."""
    n = x.numel()
    flat = emit("Range", [const(np.int64(0)), const(np.int64(n)), const(np.int64(1))],
                differentiable=False)[0]
    return _wrap(_reshape_to(flat, x.shape, differentiable=False))


# =========================================================================== masks
def _mask_dtype_name(dtype: np.dtype) -> str:
    return _C_NAMES.get(np.dtype(dtype).name, np.dtype(dtype).name)


def _fill_value(x: Tensor, value: Any, name: str) -> Val:
    if isinstance(value, Tensor):
        if value.ndim != 0:
            raise RuntimeError(f"{name} only supports a 0-dimensional value tensor, but got "
                               f"tensor with {value.ndim} dimension(s).{_where()}")
        return _val(value, x.dtype)
    if not isinstance(value, Number):
        raise TypeError(f"{name}(): value must be a number or a 0-d tensor, got "
                        f"{type(value).__name__}{_where()}")
    return const(np.asarray(value).astype(x.dtype))


def _check_bool_mask(mask: Any, name: str) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}(): mask must be a Tensor, got {type(mask).__name__}{_where()}")
    if mask.dtype != np.bool_:
        raise RuntimeError(f"{name} only supports boolean masks, but got mask with dtype "
                           f"{_mask_dtype_name(mask.dtype)}{_where()}")


@op(og=True, method=True)
def masked_fill(input: Tensor, mask: Tensor, value: Any) -> Tensor:
    """``value`` where ``mask`` is True (broadcast), ``input`` elsewhere: one ``Where``."""
    _check_bool_mask(mask, "masked_fill_")
    fill = _fill_value(input, value, "masked_fill_")
    _torch_broadcast(input.shape, mask.shape)
    return _wrap(emit("Where", [mask._v, fill, input._v])[0])


@op(method=True)
def masked_fill_(input: Tensor, mask: Tensor, value: Any) -> Tensor:
    _leaf_guard(input)
    return _write_inplace(input, masked_fill(input, mask, value), "masked_fill_")


@op(og=True, method=True)
def masked_select(input: Tensor, mask: Tensor) -> Tensor:
    """The elements of ``input`` where ``mask`` is True (both broadcast), as a 1-D tensor."""
    if not isinstance(mask, Tensor) or mask.dtype != np.bool_:
        raise RuntimeError(f"masked_select: expected BoolTensor for mask{_where()}")
    shape = _torch_broadcast(input.shape, mask.shape)
    x = expand(input, shape) if input.shape != shape else input
    m = expand(mask, shape) if mask.shape != shape else mask
    if x.ndim == 0:
        x, m = reshape(x, (1,)), reshape(m, (1,))
    return _index(x, [("mask", m)])


@op(og=True, method=True)
def nonzero(input: Tensor, *, as_tuple: bool = False) -> Any:
    """Coordinates of the non-zero elements: ``[n, ndim]`` int64, or a tuple of ``ndim`` vectors."""
    _data_dependent("nonzero()")
    x = reshape(input, (1,)) if input.ndim == 0 else input
    if x.dtype != np.bool_:
        x = ops.ne(x, 0)  # NOTE: ORT's NonZero has no float64 kernel; NaN != 0 stays selected
    coords = emit("NonZero", [x._v], differentiable=False)[0]  # [ndim, n]
    if as_tuple:
        rows = (emit("Split", [coords, const([1] * x.ndim, int64)], {"axis": 0}, n_out=x.ndim)
                if x.ndim > 1 else [coords])
        return tuple(_wrap(emit("Reshape", [r, const([-1], int64)])[0]) for r in rows)
    out = emit("Transpose", [coords], {"perm": [1, 0]})[0]
    if input.ndim == 0:  # PyTorch: [n, 0]
        out = emit("Slice", [out, const([0], int64), const([0], int64), const([1], int64)])[0]
    return _wrap(out)


# =========================================================================== scatter family
def _check_index(name: str, index: Any, int32: bool = False) -> None:
    if not isinstance(index, Tensor):
        raise TypeError(f"{name}(): index must be a Tensor, got {type(index).__name__}{_where()}")
    ok = index.dtype == int64 or (int32 and index.dtype == np.int32)
    if not ok:
        want = "int32 or int64" if int32 else "int64"
        raise RuntimeError(f"{name}(): Expected dtype {want} for index{_where()}")


def _check_scatter(name: str, x: Tensor, d: int, index: Tensor, src: Tensor | None) -> None:
    _check_index(name, index)
    if index.ndim != x.ndim and not (index.ndim <= 1 and x.ndim <= 1):
        raise RuntimeError(f"Index tensor must have the same number of dimensions as self tensor"
                           f"{_where()}")
    if src is not None and src.ndim != index.ndim and not (src.ndim <= 1 and index.ndim <= 1):
        raise RuntimeError(f"Index tensor must have the same number of dimensions as src tensor"
                           f"{_where()}")
    too_big = any(index.shape[k] > x.shape[k] for k in range(index.ndim) if k != d)
    if src is not None:
        too_big |= any(index.shape[k] > src.shape[k] for k in range(index.ndim))
    if too_big:
        extra = f" and to be no larger size than src {_fmt(src.shape)}" if src is not None else ""
        raise RuntimeError(f"Expected index {_fmt(index.shape)} to be no larger than self "
                           f"{_fmt(x.shape)} apart from dimension {d}{extra}{_where()}")
    size = x.shape[d] if x.ndim else 1
    data = index._v.data
    bad = (data < 0) | (data >= size)
    if bad.any():
        raise RuntimeError(f"index {int(data[bad].reshape(-1)[0])} is out of bounds for dimension "
                           f"{d} with size {size}{_where()}")


def _scatter(name: str, x: Tensor, dim: int, index: Tensor, src: Any, reduction: str) -> Tensor:
    d = _norm_dims(x, dim)[0] if x.ndim else 0
    if isinstance(src, Tensor):
        _check_scatter(name, x, d, index, src)
        if src.dtype != x.dtype:
            raise RuntimeError(f"{name}(): Expected self.dtype to be equal to src.dtype{_where()}")
        updates = src
        if src.shape != index.shape:  # PyTorch reads only src's leading index.shape block
            updates = _wrap(emit("Slice", [src._v, const([0] * src.ndim, int64),
                                           const(index.shape, int64),
                                           const(list(range(src.ndim)), int64)])[0])
        upd = updates._v
    elif isinstance(src, Number):
        _check_scatter(name, x, d, index, None)
        upd = emit("Expand", [const(np.asarray(src).astype(x.dtype)),
                              const(index.shape, int64)])[0]
    else:
        raise TypeError(f"{name}(): src must be a Tensor or a number, got {type(src).__name__}"
                        f"{_where()}")
    if index.numel() == 0:
        return _wrap(emit("Identity", [x._v])[0])
    attrs = {"axis": d} if reduction == "none" else {"axis": d, "reduction": reduction}
    if x.ndim == 0:
        flat = reshape(x, (1,))
        out = emit("ScatterElements", [flat._v, reshape(index, (1,))._v,
                                       emit("Reshape", [upd, const([1], int64)])[0]], attrs)[0]
        return _wrap(emit("Reshape", [out, const([], int64)])[0])
    return _wrap(emit("ScatterElements", [x._v, index._v, upd], attrs)[0])


_REDUCE = {None: "none", "add": "add", "multiply": "mul"}


@op(og=True, method=True)
def scatter(input: Tensor, dim: int, index: Tensor, src: Any = None, *, value: Any = None,
            reduce: str | None = None) -> Tensor:
    """``torch.scatter``: ``src`` (a tensor or a number) written along ``dim`` at ``index``
    (ONNX ``ScatterElements``); ``reduce="add" | "multiply"`` combines instead."""
    if src is None:
        src = value
    if src is None:
        raise TypeError(f"scatter() missing the src tensor or value{_where()}")
    if reduce not in _REDUCE:
        raise RuntimeError(f"reduce argument must be either add or multiply.{_where()}")
    return _scatter("scatter", input, dim, index, src, _REDUCE[reduce])


@op(method=True)
def scatter_(input: Tensor, dim: int, index: Tensor, src: Any = None, *, value: Any = None,
             reduce: str | None = None) -> Tensor:
    _leaf_guard(input)
    return _write_inplace(input, scatter(input, dim, index, src, value=value, reduce=reduce),
                          "scatter_")


@op(og=True, method=True)
def scatter_add(input: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    """``torch.scatter_add``: ``src`` summed into ``input`` along ``dim`` at ``index``."""
    if not isinstance(src, Tensor):
        raise TypeError(f"scatter_add(): src must be a Tensor, got {type(src).__name__}"
                        f"{_where()}")
    return _scatter("scatter_add", input, dim, index, src, "add")


@op(method=True)
def scatter_add_(input: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    _leaf_guard(input)
    return _write_inplace(input, scatter_add(input, dim, index, src), "scatter_add_")


@op(og=True, method=True)
def index_select(input: Tensor, dim: int, index: Tensor) -> Tensor:
    """The slices of ``input`` along ``dim`` at the 1-D ``index``: ONNX ``Gather``."""
    if not isinstance(index, Tensor):
        raise TypeError(f"index_select(): index must be a Tensor{_where()}")
    if index.ndim > 1:
        raise IndexError(f"index_select(): Index is supposed to be a vector{_where()}")
    _check_index("index_select", index, int32=True)
    d = _norm_dims(input, dim)[0]
    size = input.shape[d] if input.ndim else 1
    data = index._v.data
    if ((data < 0) | (data >= size)).any():
        raise IndexError(f"index out of range in self{_where()}")
    idx = reshape(index, (1,)) if index.ndim == 0 else index
    if input.ndim == 0:
        return _wrap(emit("Gather", [reshape(input, (1,))._v, idx._v], {"axis": 0})[0])
    return _wrap(emit("Gather", [input._v, idx._v], {"axis": d})[0])


@op(og=True, method=True)
def index_add(input: Tensor, dim: int, index: Tensor, source: Tensor, *,
              alpha: Any = 1) -> Tensor:
    """``source`` (times ``alpha``) added into ``input`` at ``index`` along ``dim``, repeated
    indices accumulating in order: ONNX ``ScatterElements(reduction="add")``, the index
    expanded over ``source`` (not ScatterND of slices, which ONNX Runtime's CPU kernel adds on
    several threads at once, racing on repeated indices: see passes/rules/shape.scatter_add)."""
    if index.ndim > 1:
        raise IndexError(f"index_add_(): Index is supposed to be a vector{_where()}")
    _check_index("index_add_", index, int32=True)
    if source.dtype != input.dtype:
        raise RuntimeError(f"index_add_(): self ({_torch_name(input.dtype)}) and source "
                           f"({_torch_name(source.dtype)}) must have the same scalar type"
                           f"{_where()}")
    x = reshape(input, (1,)) if input.ndim == 0 else input
    src = reshape(source, (1,)) if source.ndim == 0 else source
    idx = reshape(index, (1,)) if index.ndim == 0 else index
    d = _norm_dims(x, dim)[0]
    if (src.ndim != x.ndim or src.shape[:d] + src.shape[d + 1:] != x.shape[:d] + x.shape[d + 1:]
            or src.shape[d] != idx.numel()):
        raise RuntimeError(f"source tensor shape must match self tensor shape, excluding the "
                           f"specified dimension. Got self.shape = {_fmt(input.shape)} "
                           f"source.shape = {_fmt(source.shape)}{_where()}")
    data = idx._v.data
    if ((data < -x.shape[d]) | (data >= x.shape[d])).any():
        raise IndexError(f"index out of range in self{_where()}")
    if alpha != 1:
        src = ops.mul(src, alpha)
    along = [1] * x.ndim
    along[d] = -1
    coords = emit("Reshape", [_val(idx, np.dtype(int64)), const(along, int64)])[0]
    coords = emit("Expand", [coords, const(list(src.shape), int64)])[0]
    out = emit("ScatterElements", [x._v, coords, src._v], {"axis": d, "reduction": "add"})[0]
    if input.ndim == 0:
        out = emit("Reshape", [out, const([], int64)])[0]
    return _wrap(out)


@op(method=True)
def index_add_(input: Tensor, dim: int, index: Tensor, source: Tensor, *,
               alpha: Any = 1) -> Tensor:
    _leaf_guard(input)
    return _write_inplace(input, index_add(input, dim, index, source, alpha=alpha), "index_add_")


@op(og=True, method=True)
def take_along_dim(input: Tensor, indices: Tensor, dim: int | None = None) -> Tensor:
    """``input`` gathered at ``indices`` along ``dim`` (both broadcast apart from ``dim``;
    flattened when ``dim`` is None): ONNX ``GatherElements``."""
    _check_index("torch.take_along_dim", indices)
    if dim is None:
        x, idx, d = reshape(input, (-1,)), reshape(indices, (-1,)), 0
    else:
        if input.ndim != indices.ndim:
            raise RuntimeError(f"torch.take_along_dim(): input and indices should have the same "
                               f"number of dimensions, but got {input.ndim} dimensions for input, "
                               f"and {indices.ndim} dimensions for indices{_where()}")
        d = _norm_dims(input, dim)[0]
        x, idx = input, indices
        if x.ndim:
            sx, si = list(x.shape), list(idx.shape)
            sx[d] = si[d] = 1
            batch = list(_torch_broadcast(sx, si))
            bx, bi = list(batch), list(batch)
            bx[d], bi[d] = x.shape[d], idx.shape[d]
            x = expand(x, tuple(bx)) if tuple(bx) != x.shape else x
            idx = expand(idx, tuple(bi)) if tuple(bi) != idx.shape else idx
        else:
            x, idx = reshape(x, (1,)), reshape(idx, (1,))
    _check_bounds(idx, d, x.shape[d])
    out = _wrap(emit("GatherElements", [x._v, idx._v], {"axis": d})[0])
    return reshape(out, ()) if dim is not None and input.ndim == 0 else out


# =========================================================================== rearranging
@op(og=True, method=True)
def tile(input: Tensor, dims: Any) -> Tensor:
    """``torch.tile``: ``repeat`` with missing leading repeats taken as 1."""
    reps = _shape_args((dims,)) if not isinstance(dims, int) else (int(dims),)
    reps = (1,) * (input.ndim - len(reps)) + tuple(reps)
    return repeat(input, reps)


@op(og=True, method=True)
def flip(input: Tensor, *dims: Any) -> Tensor:
    """The order of the elements reversed along ``dims``: ONNX ``Slice`` with step -1."""
    if not dims:
        raise TypeError(f"flip() missing 1 required positional arguments: \"dims\"{_where()}")
    wanted = list(_shape_args(dims))
    rank = builtins.max(input.ndim, 1)
    normed = []
    for d in wanted:
        if not -rank <= d < rank:
            raise IndexError(f"Dimension out of range (expected to be in range of [{-rank}, "
                             f"{rank - 1}], but got {d}){_where()}")
        if d % rank in normed:
            raise RuntimeError(f"dim {d % rank} appears multiple times in the list of dims"
                               f"{_where()}")
        normed.append(d % rank)
    axes = [d for d in normed if input.ndim and input.shape[d] > 1]
    if not axes:
        return _wrap(emit("Identity", [input._v])[0])
    k = len(axes)
    return _wrap(emit("Slice", [input._v, const([-1] * k, int64), const([INT64_MIN] * k, int64),
                                const(axes, int64), const([-1] * k, int64)])[0])


@op(og=True, method=True)
def roll(input: Tensor, shifts: Any, dims: Any = None) -> Tensor:
    """Elements shifted along ``dims`` with wrap-around (flattened when ``dims`` is None)."""
    shifts = [shifts] if isinstance(shifts, (int, np.integer)) else list(shifts)
    if dims is None:
        if len(shifts) != 1:
            raise RuntimeError(f"roll: shifts and dimensions must align. shifts: {len(shifts)}, "
                               f"dims:0{_where()}")
        return reshape(roll(reshape(input, (-1,)), shifts, 0), input.shape)
    dims = [dims] if isinstance(dims, (int, np.integer)) else list(dims)
    if len(shifts) != len(dims):
        raise RuntimeError(f"shifts and dimensions must align. shifts: {len(shifts)}, dims:"
                           f"{len(dims)}{_where()}")
    val = input._v
    for shift, dim in zip(shifts, dims):
        d = _norm_dims(input, dim)[0]
        n = input.shape[d] if input.ndim else 1
        s = int(shift) % n if n else 0
        if not s or not input.ndim:
            continue
        tail = emit("Slice", [val, const([n - s], int64), const([n], int64), const([d], int64)])[0]
        head = emit("Slice", [val, const([0], int64), const([n - s], int64), const([d], int64)])[0]
        val = emit("Concat", [tail, head], {"axis": d})[0]
    if val is input._v:
        val = emit("Identity", [val])[0]
    return _wrap(val)


# =========================================================================== sorting
def _topk(x: Tensor, k: int, dim: int, largest: bool, sorted_: bool) -> tuple[Tensor, Tensor]:
    src = reshape(x, (1,)) if x.ndim == 0 else x
    d = _norm_dims(src, dim)[0]
    values, indices = emit("TopK", [src._v, const([k], int64)],
                           {"axis": d, "largest": int(largest), "sorted": int(sorted_)}, n_out=2)
    values, indices = _wrap(values), _wrap(indices)
    if x.ndim == 0:
        values, indices = reshape(values, ()), reshape(indices, ())
    return values, indices


@op(og=True, method=True)
def topk(input: Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """The ``k`` largest (or smallest) elements along ``dim`` and their indices: ONNX ``TopK``."""
    size = input.shape[_norm_dims(input, dim)[0]] if input.ndim else 1
    if not 0 <= int(k) <= size:
        raise RuntimeError(f"selected index k out of range{_where()}")
    if input.dtype == np.bool_:
        raise RuntimeError(f"\"topk_cpu\" not implemented for 'Bool'{_where()}")
    return topk_result(*_topk(input, int(k), dim, largest, sorted))


@op(og=True, method=True)
def sort(input: Tensor, dim: int = -1, descending: bool = False, *, stable: bool = False):
    """Sorted values along ``dim`` and their indices: ONNX ``TopK`` of every element.

    NOTE: ONNX Runtime's TopK orders equal elements by index, so the sort is always stable
    (PyTorch's ``stable=True``); NaN sorts as the largest value, as in PyTorch.
    """
    if input.dtype == np.bool_:  # TopK has no bool kernel
        values, indices = sort(to(input, int64), dim, descending, stable=stable)
        return sort_result(to(values, np.bool_), indices)
    size = input.shape[_norm_dims(input, dim)[0]] if input.ndim else 1
    return sort_result(*_topk(input, size, dim, descending, True))


@op(og=True, method=True)
def argsort(input: Tensor, dim: int = -1, descending: bool = False, *,
            stable: bool = False) -> Tensor:
    """The indices that sort ``input`` along ``dim`` (stable, see ``sort``)."""
    return sort(input, dim, descending, stable=stable).indices


# =========================================================================== scans
def _scan_dtype(x: Tensor, dtype: Any) -> np.dtype:
    if dtype is not None:
        return np.dtype(dtype)
    return x.dtype if x.dtype.kind == "f" else np.dtype(int64)  # PyTorch: integers -> int64


@op(og=True, method=True)
def cumsum(input: Tensor, dim: int, *, dtype: Any = None) -> Tensor:
    """Cumulative sums along ``dim``: ONNX ``CumSum`` (integers and bools sum in int64)."""
    target = _scan_dtype(input, dtype)
    x = reshape(input, (1,)) if input.ndim == 0 else input
    d = _norm_dims(x, dim)[0]
    out = _wrap(emit("CumSum", [_val(x, target), const(np.int64(d))])[0])
    return reshape(out, ()) if input.ndim == 0 else out


@op(og=True, method=True)
def cumprod(input: Tensor, dim: int, *, dtype: Any = None) -> Tensor:
    """Cumulative products along ``dim``.

    NOTE: ONNX (opset 21) has no CumProd: a Hillis-Steele scan, ``log2(n)`` steps of
    ``y = y * shift(y, 2^k)`` with ones shifted in (``Slice`` + ``Pad`` + ``Mul``), so values
    and gradients (zeros included, unlike ``exp(cumsum(log(x)))``) come from existing rules.
    """
    target = _scan_dtype(input, dtype)
    x = reshape(input, (1,)) if input.ndim == 0 else input
    d = _norm_dims(x, dim)[0]
    y = _val(x, target)
    n = x.shape[d]
    one = const(np.asarray(1, dtype=target))
    step = 1
    while step < n:
        head = emit("Slice", [y, const([0], int64), const([n - step], int64), const([d], int64)])[0]
        pads = [0] * (2 * x.ndim)
        pads[d] = step
        shifted = emit("Pad", [head, const(pads, int64), one])[0]
        y = emit("Mul", [y, shifted])[0]
        step *= 2
    if y is input._v:
        y = emit("Identity", [y])[0]
    out = _wrap(y)
    return reshape(out, ()) if input.ndim == 0 else out


# =========================================================================== one_hot
@op(functional=True)
def one_hot(tensor: Tensor, num_classes: int = -1) -> Tensor:
    """``F.one_hot``: int64 one-hot vectors along a new last dim: ONNX ``OneHot``."""
    if not isinstance(tensor, Tensor) or tensor.dtype != int64:
        raise RuntimeError(f"one_hot is only applicable to index tensor of type LongTensor."
                           f"{_where()}")
    data = tensor._v.data
    if num_classes == -1:
        if data.size == 0:
            raise RuntimeError(f"Can not infer total number of classes from empty tensor."
                               f"{_where()}")
        _data_dependent("one_hot() without num_classes",
                        "Pass num_classes, or call it outside the compiled function.")
        num_classes = int(data.max()) + 1
    if data.size and data.min() < 0:
        raise RuntimeError(f"Class values must be non-negative.{_where()}")
    if data.size and data.max() >= num_classes:
        raise RuntimeError(f"Class values must be smaller than num_classes.{_where()}")
    out = emit("OneHot", [tensor._v, const(np.int64(num_classes)), const(np.array([0, 1], int64))],
               {"axis": -1})[0]
    return _wrap(out)

