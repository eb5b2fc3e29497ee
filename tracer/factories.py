"""Tensor factories (``og.zeros``, ``og.rand``...) and the global random generator
(``og.manual_seed``)."""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import onnx_ir as ir

from . import ops, random_stream, state
from .ops import _shape_args
from .registry import op
from .tensor import Tensor
from .values import Val, _contig, emit, get_default_dtype, int64

_rng = np.random.default_rng()


def manual_seed(seed: int) -> None:
    global _rng
    _rng = np.random.default_rng(seed)
    random_stream.manual_seed(seed)  # the in-graph stream (dropout) too


def generator() -> np.random.Generator:
    return _rng


def _make(array: np.ndarray, requires_grad: bool) -> Tensor:
    t = Tensor(Val(_contig(array)))
    t._v.owner = weakref.ref(t)
    if requires_grad:
        t.requires_grad_(True)
    return t


def _dtype(dtype: Any) -> np.dtype:
    return get_default_dtype() if dtype is None else np.dtype(dtype)


@op(og=True)
def zeros(*size: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return _make(np.zeros(_shape_args(size), _dtype(dtype)), requires_grad)


@op(og=True)
def ones(*size: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return _make(np.ones(_shape_args(size), _dtype(dtype)), requires_grad)


@op(og=True)
def full(size: Any, fill_value: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    if dtype is None and isinstance(fill_value, bool):
        dtype = np.bool_
    elif dtype is None and isinstance(fill_value, int):
        dtype = int64
    return _make(np.full(_shape_args((size,)), fill_value, _dtype(dtype)), requires_grad)


@op(og=True)
def zeros_like(t: Tensor, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return zeros(t.shape, dtype=dtype or t.dtype, requires_grad=requires_grad)


@op(og=True)
def ones_like(t: Tensor, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return ones(t.shape, dtype=dtype or t.dtype, requires_grad=requires_grad)


def _traced_random(op: str, shape: tuple[int, ...], dtype: np.dtype, **attrs: Any) -> Tensor | None:
    """Inside a compiled function, random values are an ONNX random node (fresh every call),
    not numbers drawn once while tracing and baked in. None outside a trace."""
    if state.active_trace() is None:
        return None
    attrs = {"shape": list(shape), "dtype": int(ir.DataType.from_numpy(np.dtype(dtype))), **attrs}
    return Tensor(emit(op, [], attrs, differentiable=False)[0])


@op(og=True)
def rand(*size: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    dt, shape = _dtype(dtype), _shape_args(size)
    traced = None if requires_grad else _traced_random("RandomUniform", shape, dt)
    if traced is not None:
        return traced
    return _make(_rng.random(shape, dtype=np.float64).astype(dt), requires_grad)


@op(og=True)
def randn(*size: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    dt, shape = _dtype(dtype), _shape_args(size)
    traced = None if requires_grad else _traced_random("RandomNormal", shape, dt)
    if traced is not None:
        return traced
    return _make(_rng.standard_normal(shape).astype(dt), requires_grad)


@op(og=True)
def randint(low: int, high: int | None = None, size: Any = (), dtype: Any = None) -> Tensor:
    if high is None:
        low, high = 0, low
    shape, dt = _shape_args((size,)), np.dtype(dtype or int64)
    traced = _traced_random("RandomUniform", shape, np.dtype(np.float32), low=float(low),
                            high=float(high))
    if traced is not None:
        # floor(U[low, high)) is uniform over the integers low..high-1.
        return ops.to(Tensor(emit("Floor", [traced._v], differentiable=False)[0]), dt)
    return _make(_rng.integers(low, high, size=shape, dtype=dt), False)


@op(og=True)
def arange(start: Any, end: Any = None, step: Any = 1, dtype: Any = None,
           requires_grad: bool = False) -> Tensor:
    if end is None:
        start, end = 0, start
    if dtype is None:
        is_int = all(isinstance(v, (int, np.integer)) for v in (start, end, step))
        dtype = int64 if is_int else get_default_dtype()
    return _make(np.arange(start, end, step).astype(np.dtype(dtype)), requires_grad)
