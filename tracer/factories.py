"""Tensor factories (``og.zeros``, ``og.rand``...), ``og.from_numpy`` and the global random
generator (``og.manual_seed``).

Every factory takes PyTorch's ``dtype=``, ``device=`` and ``requires_grad=``; ``device`` is checked
(``tracer/device.py``: one compute device per process) only when given, so the default costs
nothing.
"""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from . import device as _device
from . import ops, random_stream, state
from .ops import _shape_args as _sizes
from .ops import _where
from .registry import op
from .tensor import Tensor
from .values import TraceError, Val, _contig, get_default_dtype, int64

_rng = np.random.default_rng()


def manual_seed(seed: int) -> None:
    global _rng
    _rng = np.random.default_rng(seed)
    random_stream.manual_seed(seed)  # the in-graph stream (dropout) too


def generator() -> np.random.Generator:
    return _rng


def _gen(generator: Any) -> np.random.Generator:
    """The random generator a ``generator=`` argument names (default: og.manual_seed's)."""
    if generator is None:
        return _rng
    if isinstance(generator, np.random.Generator):
        return generator
    inner = getattr(generator, "numpy_generator", None)  # an og.Generator-like object
    if isinstance(inner, np.random.Generator):
        return inner
    raise TypeError(f"generator must be a NumPy Generator, got {type(generator).__name__}")


def _shape_args_checked(size: tuple) -> tuple[int, ...]:
    """A factory's sizes (``zeros(2, 3)`` or ``zeros((2, 3))``), none negative."""
    shape = _sizes(size)
    if any(d < 0 for d in shape):
        bad = next(d for d in shape if d < 0)
        raise RuntimeError(f"Trying to create tensor with negative dimension {bad}: "
                           f"{list(shape)}{_where()}")
    return shape


def _make(array: np.ndarray, requires_grad: bool, device: Any = None) -> Tensor:
    if device is not None:
        _device.check(device)
    t = Tensor(Val(_contig(array)))
    t._v.owner = weakref.ref(t)
    if requires_grad:
        t.requires_grad_(True)
    return t


def _dtype(dtype: Any) -> np.dtype:
    return get_default_dtype() if dtype is None else np.dtype(dtype)


@op(og=True)
def zeros(*size: Any, dtype: Any = None, device: Any = None, requires_grad: bool = False,
          layout: Any = None, pin_memory: bool = False) -> Tensor:
    return _make(np.zeros(_shape_args_checked(size), _dtype(dtype)), requires_grad, device)


@op(og=True)
def ones(*size: Any, dtype: Any = None, device: Any = None, requires_grad: bool = False,
         layout: Any = None, pin_memory: bool = False) -> Tensor:
    return _make(np.ones(_shape_args_checked(size), _dtype(dtype)), requires_grad, device)


@op(og=True)
def full(size: Any, fill_value: Any, *, dtype: Any = None, device: Any = None,
         requires_grad: bool = False, layout: Any = None,
         pin_memory: bool = False) -> Tensor:
    if dtype is None and isinstance(fill_value, bool):
        dtype = np.bool_
    elif dtype is None and isinstance(fill_value, int):
        dtype = int64
    if dtype is None and isinstance(fill_value, Tensor):
        dtype = fill_value.dtype
    return _make(np.full(_shape_args_checked((size,)), fill_value, _dtype(dtype)), requires_grad, device)


@op(og=True)
def zeros_like(t: Tensor, dtype: Any = None, device: Any = None, requires_grad: bool = False,
               memory_format: Any = None) -> Tensor:
    return zeros(t.shape, dtype=dtype or t.dtype, device=device, requires_grad=requires_grad)


@op(og=True)
def ones_like(t: Tensor, dtype: Any = None, device: Any = None, requires_grad: bool = False,
              memory_format: Any = None) -> Tensor:
    return ones(t.shape, dtype=dtype or t.dtype, device=device, requires_grad=requires_grad)


def _draw(name: str, generator: Any, requires_grad: bool, stream: Any, numpy: Any) -> Tensor:
    """A random factory's result: from onnxgrad's counter-based stream (``og.manual_seed``'s,
    ``tracer/random_stream.py``), eagerly and inside compiled functions alike, so a compiled step
    draws the numbers the same code draws eagerly; from a NumPy generator when one is given.

    ``stream()`` makes the Val, ``numpy(generator)`` the array."""
    if generator is None:
        value = stream()
        if state.active_trace() is None:
            return _make(value.data, requires_grad)
        if requires_grad:
            raise TraceError(f"og.{name}(requires_grad=True) inside a compiled function makes a "
                             f"new leaf at every call, which the graph cannot hold; create it "
                             f"outside and pass it in{_where()}")
        return Tensor(value)
    if state.active_trace() is not None:
        raise TraceError(f"og.{name}(generator=...) inside a compiled function: an explicit "
                         f"generator's draws would be baked into the graph; draw with the "
                         f"default generator (og.manual_seed) or pass the values in{_where()}")
    return _make(numpy(_gen(generator)), requires_grad)


@op(og=True)
def rand(*size: Any, generator: Any = None, dtype: Any = None, device: Any = None,
         requires_grad: bool = False, layout: Any = None,
         pin_memory: bool = False) -> Tensor:
    if device is not None:
        _device.check(device)
    dt, shape = _dtype(dtype), _shape_args_checked(size)
    return _draw("rand", generator, requires_grad, lambda: random_stream.uniform(shape, dt),
                 lambda g: g.random(shape, dtype=np.float64).astype(dt))


@op(og=True)
def randn(*size: Any, generator: Any = None, dtype: Any = None, device: Any = None,
          requires_grad: bool = False, layout: Any = None,
         pin_memory: bool = False) -> Tensor:
    if device is not None:
        _device.check(device)
    dt, shape = _dtype(dtype), _shape_args_checked(size)
    return _draw("randn", generator, requires_grad, lambda: random_stream.normal(shape, dt),
                 lambda g: g.standard_normal(shape).astype(dt))


@op(og=True)
def randint(low: int, high: Any = None, size: Any = (), *, generator: Any = None,
            dtype: Any = None, device: Any = None, requires_grad: bool = False,
            layout: Any = None, pin_memory: bool = False) -> Tensor:
    if device is not None:
        _device.check(device)
    if requires_grad:
        raise RuntimeError("only floating point tensors can require gradients (randint)")
    if not isinstance(high, (int, np.integer)) and high is not None and size == ():
        high, size = None, high  # randint(high, size)
    if high is None:
        low, high = 0, low
    if low >= high:
        raise RuntimeError(f"random_ expects 'from' to be less than 'to', but got "
                           f"from={low} >= to={high}")
    shape, dt = _shape_args_checked((size,)), np.dtype(dtype or int64)
    return _draw("randint", generator, False,
                 lambda: random_stream.integers(int(low), int(high), shape, dt),
                 lambda g: g.integers(low, high, size=shape, dtype=dt))


@op(og=True)
def arange(start: Any, end: Any = None, step: Any = 1, *, dtype: Any = None, device: Any = None,
           requires_grad: bool = False, layout: Any = None,
         pin_memory: bool = False) -> Tensor:
    if device is not None:
        _device.check(device)
    if end is None:
        start, end = 0, start
    if step == 0:
        raise RuntimeError(f"step must be nonzero{_where()}")
    if (end - start) * step < 0:
        raise RuntimeError(f"upper bound and larger bound inconsistent with step sign"
                           f"{_where()}")
    if dtype is None:
        is_int = all(isinstance(v, (int, np.integer)) for v in (start, end, step))
        dtype = int64 if is_int else get_default_dtype()
    return _make(np.arange(start, end, step).astype(np.dtype(dtype)), requires_grad)


# --------------------------------------------------------------------------- more factories
def _float_dtype(dtype: Any) -> np.dtype:
    return get_default_dtype() if dtype is None else np.dtype(dtype)


def _check_steps(name: str, steps: Any) -> int:
    if isinstance(steps, Tensor):
        steps = steps.item()
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
        raise TypeError(f"{name}(): argument 'steps' must be int, not {type(steps).__name__}")
    if steps < 0:
        raise RuntimeError("number of steps must be non-negative")
    return int(steps)


def _linspace_values(start: float, end: float, steps: int, dtype: np.dtype) -> np.ndarray:
    """PyTorch's CPU kernel: the first half counts up from ``start`` and the second half down
    from ``end`` (so both ends are exact), in the result's float type."""
    work = dtype if dtype.kind == "f" else np.dtype(np.float64)
    if steps == 0:
        return np.zeros(0, work)
    if steps == 1:
        return np.full(1, start, work)
    start_w, end_w = work.type(start), work.type(end)
    step = (end_w - start_w) / work.type(steps - 1)
    # NOTE: PyTorch's kernel is compiled with fused multiply-adds (start + step * i rounded once):
    # a wider type computes the product and sum before the one rounding to the result's type.
    wide = np.dtype(np.float64) if work.itemsize < 8 else np.dtype(np.longdouble)
    i = np.arange(steps, dtype=wide)
    half = steps // 2
    low = wide.type(start_w) + wide.type(step) * i[:half]
    high = wide.type(end_w) - wide.type(step) * (steps - 1 - i[half:])
    return np.concatenate([low, high]).astype(work)


@op(og=True)
def linspace(start: Any, end: Any, steps: int, *, dtype: Any = None, device: Any = None,
             requires_grad: bool = False, layout: Any = None) -> Tensor:
    steps = _check_steps("linspace", steps)
    dt = _float_dtype(dtype)
    values = _linspace_values(float(start), float(end), steps, dt)
    # NOTE: integer results truncate toward zero, as PyTorch's cast of the float values.
    return _make(values.astype(dt), requires_grad, device)


@op(og=True)
def logspace(start: Any, end: Any, steps: int, base: float = 10.0, *, dtype: Any = None,
             device: Any = None, requires_grad: bool = False, layout: Any = None) -> Tensor:
    steps = _check_steps("logspace", steps)
    dt = _float_dtype(dtype)
    exponents = _linspace_values(float(start), float(end), steps, dt)
    with np.errstate(over="ignore"):
        values = np.power(np.float64(base), exponents.astype(np.float64))
    return _make(values.astype(dt), requires_grad, device)


@op(og=True)
def eye(n: int, m: int | None = None, *, dtype: Any = None, device: Any = None,
        requires_grad: bool = False, layout: Any = None) -> Tensor:
    m = n if m is None else m
    for name, value in (("n", n), ("m", m)):
        if value < 0:
            raise RuntimeError(f"{name} must be greater or equal to 0, got {value}")
    return _make(np.eye(n, m, dtype=_dtype(dtype)), requires_grad, device)


@op(og=True)
def empty(*size: Any, dtype: Any = None, device: Any = None, requires_grad: bool = False,
          layout: Any = None, pin_memory: bool = False, memory_format: Any = None) -> Tensor:
    # NOTE: zeros, not uninitialized memory: the values of an uninitialized tensor are
    # unspecified, and zeros make programs that read them by mistake deterministic.
    return zeros(*size, dtype=dtype, device=device, requires_grad=requires_grad)


def _like(t: Any, dtype: Any) -> tuple[tuple[int, ...], np.dtype]:
    if not isinstance(t, Tensor):
        raise TypeError(f"expected a Tensor as input, got {type(t).__name__}")
    return t.shape, np.dtype(t.dtype if dtype is None else dtype)


@op(og=True)
def empty_like(input: Tensor, *, dtype: Any = None, device: Any = None,
               requires_grad: bool = False, layout: Any = None,
               memory_format: Any = None) -> Tensor:
    shape, dt = _like(input, dtype)
    return zeros(shape, dtype=dt, device=device, requires_grad=requires_grad)


@op(og=True)
def full_like(input: Tensor, fill_value: Any, *, dtype: Any = None,
              device: Any = None, requires_grad: bool = False, layout: Any = None,
              memory_format: Any = None) -> Tensor:
    shape, dt = _like(input, dtype)
    return full(shape, fill_value, dtype=dt, device=device, requires_grad=requires_grad)


def _random_like(name: str, input: Any, dtype: Any) -> tuple[tuple[int, ...], np.dtype]:
    shape, dt = _like(input, dtype)
    if dt.kind != "f":
        torch_name = {"i": "Long", "u": "Byte", "b": "Bool"}.get(dt.kind, dt.name)
        if dt == np.int32:
            torch_name = "Int"
        raise RuntimeError(f"\"{name}\" not implemented for '{torch_name}'")
    return shape, dt


@op(og=True)
def rand_like(input: Tensor, *, dtype: Any = None, device: Any = None,
              requires_grad: bool = False, layout: Any = None,
              memory_format: Any = None) -> Tensor:
    shape, dt = _random_like("check_uniform_bounds", input, dtype)
    return rand(shape, dtype=dt, device=device, requires_grad=requires_grad)


@op(og=True)
def randn_like(input: Tensor, *, dtype: Any = None, device: Any = None,
               requires_grad: bool = False, layout: Any = None,
               memory_format: Any = None) -> Tensor:
    shape, dt = _random_like("normal_kernel_cpu", input, dtype)
    return randn(shape, dtype=dt, device=device, requires_grad=requires_grad)


@op(og=True)
def randint_like(input: Tensor, low: int = 0, high: int | None = None, *,
                 dtype: Any = None, device: Any = None, requires_grad: bool = False,
                 layout: Any = None, memory_format: Any = None) -> Tensor:
    """``randint_like(input, high)`` or ``randint_like(input, low, high)``; the result has
    ``input``'s dtype (floats hold whole numbers), as PyTorch's."""
    shape, dt = _like(input, dtype)
    if high is None:
        low, high = 0, low
    if low >= high:
        raise RuntimeError(f"random_ expects 'from' to be less than 'to', but got "
                           f"from={low} >= to={high}")
    values = randint(low, high, shape, device=device)
    out = ops.to(values, dt) if dt != np.int64 else values
    if requires_grad:
        out = _make(out._v.data, True)
    return out


@op(og=True)
def randperm(n: int, *, generator: Any = None, dtype: Any = None, device: Any = None,
             requires_grad: bool = False, layout: Any = None, pin_memory: bool = False) -> Tensor:
    if n < 0:
        raise RuntimeError(f"n must be non-negative, got{n}")
    if device is not None:
        _device.check(device)
    dt = int64 if dtype is None else np.dtype(dtype)
    return _draw("randperm", generator, requires_grad, lambda: random_stream.permutation(n, dt),
                 lambda g: g.permutation(n).astype(dt))


# The dtypes from_numpy takes, by PyTorch's names in its message.
_FROM_NUMPY = ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8",
               "bool")


@op(og=True)
def from_numpy(ndarray: np.ndarray) -> Tensor:
    """A tensor sharing ``ndarray``'s memory, as PyTorch's: writes to the array are seen by the
    tensor, and in-place ops on the tensor (``add_``, ``copy_``, ``zero_``...) by the array.

    The rule where memory cannot be shared: onnxgrad's data must be C-contiguous (ONNX Runtime
    reads C order), so any other layout is refused like PyTorch's negative strides; an in-place
    op on a tensor whose current value a recorded graph saved (an input of an op that requires
    grad) gives the tensor new memory, so the gradient sees the values it saved and the array keeps
    the old ones. Ops never write into their inputs otherwise.
    """
    if not isinstance(ndarray, np.ndarray):
        raise TypeError(f"expected np.ndarray (got {type(ndarray).__name__})")
    if ndarray.dtype.name not in _FROM_NUMPY:
        raise TypeError(f"can't convert np.ndarray of type numpy.{ndarray.dtype.name}. The only "
                        f"supported types are: {', '.join(_FROM_NUMPY)}.")
    if not ndarray.flags.c_contiguous:
        raise ValueError("og.from_numpy needs a C-contiguous array (onnxgrad keeps data in C "
                         "order for ONNX Runtime); pass np.ascontiguousarray(a), which copies")
    if not ndarray.dtype.isnative:
        raise ValueError("og.from_numpy needs an array in the machine's byte order")
    val = Val(ndarray)
    val.shared = True
    t = Tensor(val)
    val.owner = weakref.ref(t)
    return t
