"""The op definitions: every tensor operation emits standard ONNX node(s) through ``emit``.

Each op is defined once, here: its builder, whose signature is the public one, and an ``@op``
declaring where it is public (``og.`` function, ``og.nn.functional`` function, Tensor method,
operator; see ``tracer/registry.py``). Shapes and dtypes are checked before ONNX Runtime sees
anything, so errors name the op, both shapes and the user's line. Composite ops (losses,
``batch_norm``) live in ``onnxgrad/nn/functional.py`` as plain compositions of these.
"""
from __future__ import annotations

import builtins
from collections import namedtuple
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from . import autograd, random_stream, state
from .registry import inplace_variant, op
from .tensor import Tensor
from .values import Val, const, emit, get_default_dtype, int64

Number = (bool, int, float, np.number, np.bool_)
MaxResult = namedtuple("MaxResult", ["values", "indices"])


class ShapeError(ValueError):
    """Operand shapes that an op cannot combine."""


def _where() -> str:
    text = state.format_frame(state.user_frame())
    return f" (at {text})" if text else ""


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# --------------------------------------------------------------------------- dtype promotion
def _category(dtype: np.dtype) -> int:
    return {"b": 0, "i": 1, "u": 1, "f": 2}[dtype.kind]


def _scalar_category(x: Any) -> int:
    if isinstance(x, (bool, np.bool_)):
        return 0
    if isinstance(x, (int, np.integer)):
        return 1
    return 2


def result_type(*operands: Any) -> np.dtype:
    """PyTorch's promotion: tensors of higher category win; Python scalars only lift the category;
    0-d tensors only decide among themselves."""
    if len(operands) == 2:  # the common cases, first: one dtype, or a tensor and a scalar
        a, b = operands
        if isinstance(a, Tensor):
            if isinstance(b, Tensor):
                if a._v.data.dtype == b._v.data.dtype:
                    return a.dtype
            elif isinstance(b, (int, float)) and a._v.data.dtype.kind == "f":
                return a.dtype
        elif isinstance(b, Tensor) and isinstance(a, (int, float)) \
                and b._v.data.dtype.kind == "f":
            return b.dtype
    tensors = [t for t in operands if isinstance(t, Tensor)]
    dims = [t for t in tensors if t.ndim > 0]
    zero_d = [t for t in tensors if t.ndim == 0]
    scalars = [s for s in operands if not isinstance(s, Tensor)]

    def promote(group: list[Tensor]) -> np.dtype | None:
        out = None
        for t in group:
            out = t.dtype if out is None else _promote_pair(out, t.dtype)
        return out

    result = promote(dims)
    z = promote(zero_d)
    if result is None:
        result = z
    elif z is not None and _category(z) > _category(result):
        result = z if _category(z) == 2 and _category(result) < 2 else _promote_pair(result, z)
    for s in scalars:
        cat = _scalar_category(s)
        if result is None:
            result = [np.dtype(bool), int64, get_default_dtype()][cat]
        elif cat > _category(result):
            result = [np.dtype(bool), int64, get_default_dtype()][cat]
    return result


def _promote_pair(a: np.dtype, b: np.dtype) -> np.dtype:
    ca, cb = _category(a), _category(b)
    if ca != cb:
        return a if ca > cb else b
    return np.promote_types(a, b)


def _val(x: Any, dtype: np.dtype) -> Val:
    """The Val of ``x`` as ``dtype``: tensors are cast with an ONNX Cast, scalars become constants."""
    if isinstance(x, Tensor):
        if x.dtype == dtype:
            return x._v
        return emit("Cast", [x._v], {"to": int(ir.DataType.from_numpy(dtype))})[0]
    if isinstance(x, Number):
        return const(x, dtype)
    raise TypeError(f"expected a Tensor or a number, got {type(x).__name__}")


def _wrap(val: Val) -> Tensor:
    return Tensor(val)


def _check_broadcast(op: str, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    if len(shapes) == 2 and (shapes[0] == shapes[1] or not shapes[1]):
        return shapes[0]
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError:
        listed = " and ".join(_fmt(s) for s in shapes)
        raise ShapeError(f"{op}: shapes {listed} cannot be broadcast together{_where()}") from None


def _binary(op: str, a: Any, b: Any, *, out_bool: bool = False) -> Tensor:
    dtype = result_type(a, b)
    if op in ("Div",) and dtype.kind != "f":
        dtype = get_default_dtype()  # true division, as torch
    _check_broadcast(op, np.shape(a._v.data if isinstance(a, Tensor) else a),
                     np.shape(b._v.data if isinstance(b, Tensor) else b))
    va, vb = _val(a, dtype), _val(b, dtype)
    return _wrap(emit(op, [va, vb], differentiable=not out_bool)[0])


def _logical(op: str, a: Any, b: Any) -> Tensor:
    _check_broadcast(op, np.shape(a._v.data if isinstance(a, Tensor) else a),
                     np.shape(b._v.data if isinstance(b, Tensor) else b))
    bool_ = np.dtype(np.bool_)
    return _wrap(emit(op, [_val(a, bool_), _val(b, bool_)], differentiable=False)[0])


# --------------------------------------------------------------------------- in-place semantics
_TORCH_NAMES = {"float16": "Half", "float32": "Float", "float64": "Double", "int8": "Char",
                "uint8": "Byte", "int32": "Int", "int64": "Long", "bool": "Bool"}


def _can_cast(src: np.dtype, dst: np.dtype) -> bool:
    """torch.can_cast: no float -> integer and nothing but bool -> bool; widths may shrink."""
    return _category(src) <= _category(dst)


@inplace_variant
def _inplace(fn: Any, name: str) -> Any:
    """``self op= other`` as PyTorch: same handle, same dtype and shape, leaves guarded.

    The in-place names of every op (``@op(inplace=("add_", "__iadd__"))``) are made by this.

    A Tensor is a handle on an immutable Val, so the update swaps the handle's Val; records that
    read the old value keep it, which is what autograd's saved tensors need.
    """

    def method(self: Tensor, other: Any) -> Tensor:
        if self.requires_grad and self.is_leaf and state.grad_enabled():
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place "
                               f"operation ({name}){_where()}")
        # Checked before anything runs: the result's dtype and shape follow from the operands.
        dtype = result_type(self, other)
        if fn is div and dtype.kind != "f":
            dtype = get_default_dtype()
        if not _can_cast(dtype, self.dtype):
            raise TypeError(f"result type {_TORCH_NAMES.get(dtype.name, dtype.name)} "
                            f"can't be cast to the desired output type "
                            f"{_TORCH_NAMES.get(self.dtype.name, self.dtype.name)} ({name})"
                            f"{_where()}")
        other_shape = other.shape if isinstance(other, Tensor) else np.shape(other)
        shape = _check_broadcast(name, self.shape, other_shape)
        if shape != self.shape:
            raise ShapeError(f"output with shape {_fmt(self.shape)} doesn't match the broadcast "
                             f"shape {_fmt(shape)} ({name}){_where()}")
        self._write(to(fn(self, other), self.dtype)._v)
        return self

    method.__name__ = method.__qualname__ = name
    return method


@op(og=True, method=("add", "__add__"), reflected="__radd__", inplace=("add_", "__iadd__"))
def add(a: Any, b: Any, *, alpha: Any = 1) -> Tensor:
    if alpha != 1:
        b = mul(b, alpha)
    if result_type(a, b) == np.bool_:  # torch: bool + bool is logical or (ONNX Add has no bool)
        return _logical("Or", a, b)
    return _binary("Add", a, b)


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_)) or (isinstance(x, Tensor) and x.dtype == np.bool_)


@op(og=("sub", "subtract"), method=("sub", "subtract", "__sub__"), reflected="__rsub__",
    inplace=("sub_", "__isub__"))
def sub(a: Any, b: Any, *, alpha: Any = 1) -> Tensor:
    # NOTE: PyTorch's checks and wording; ONNX Sub has no bool kernel, so ORT would fail later.
    if _is_bool(a) and _is_bool(b):
        raise TypeError("Subtraction, the `-` operator, with two bool tensors is not supported. "
                        f"Use the `^` or `logical_xor()` operator instead{_where()}")
    if _is_bool(a) or _is_bool(b):
        raise TypeError("Subtraction, the `-` operator, with a bool tensor is not supported. If you "
                        "are trying to invert a mask, use the `~` or `logical_not()` operator "
                        f"instead{_where()}")
    if alpha != 1:
        b = mul(b, alpha)
    return _binary("Sub", a, b)


@op(og=("mul", "multiply"), method=("mul", "multiply", "__mul__"), reflected="__rmul__",
    inplace=("mul_", "__imul__"))
def mul(a: Any, b: Any) -> Tensor:
    if result_type(a, b) == np.bool_:  # torch: bool * bool is logical and
        return _logical("And", a, b)
    return _binary("Mul", a, b)


@op(og=("div", "divide", "true_divide"), method=("div", "divide", "true_divide", "__truediv__"),
    reflected="__rtruediv__", inplace=("div_", "__itruediv__"))
def div(a: Any, b: Any, *, rounding_mode: str | None = None) -> Tensor:
    if rounding_mode is not None:
        from .math_ops import rounded_div  # math_ops imports this module
        return rounded_div(a, b, rounding_mode)
    return _binary("Div", a, b)


@op(og=True, method=("pow", "__pow__"), reflected="__rpow__", inplace=("pow_", "__ipow__"))
def pow(a: Any, b: Any) -> Tensor:  # noqa: A001  (torch.pow)
    if (isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b < 0
            and result_type(a, b).kind in "iub"):
        # ONNX Pow would silently give 0 (1/x truncated); PyTorch refuses.
        raise ValueError(f"Integers to negative integer powers are not allowed{_where()}")
    return _binary("Pow", a, b)


@op(method=("neg", "__neg__"))
def neg(a: Tensor) -> Tensor:
    if a.dtype == np.bool_:
        raise TypeError("Negation, the `-` operator, on a bool tensor is not supported. If you are "
                        "trying to invert a mask, use the `~` or `logical_not()` operator "
                        f"instead{_where()}")
    return _wrap(emit("Neg", [a._v])[0])


def _compare(op: str, a: Any, b: Any, negate: bool = False) -> Tensor:
    out = _binary(op, a, b, out_bool=True)
    if negate:
        out = _wrap(emit("Not", [out._v], differentiable=False)[0])
    return out


@op(method=("eq", "__eq__"))
def eq(a: Any, b: Any) -> Tensor:
    return _compare("Equal", a, b)


@op(method=("ne", "__ne__"))
def ne(a: Any, b: Any) -> Tensor:
    return _compare("Equal", a, b, negate=True)


@op(method=("lt", "__lt__"))
def lt(a: Any, b: Any) -> Tensor:
    return _compare("Less", a, b)


@op(method=("le", "__le__"))
def le(a: Any, b: Any) -> Tensor:
    return _compare("LessOrEqual", a, b)


@op(method=("gt", "__gt__"))
def gt(a: Any, b: Any) -> Tensor:
    return _compare("Greater", a, b)


@op(method=("ge", "__ge__"))
def ge(a: Any, b: Any) -> Tensor:
    return _compare("GreaterOrEqual", a, b)


@op(og=True, method="logical_not")
def logical_not(a: Tensor) -> Tensor:
    if a.dtype != np.bool_:
        a = to(a, np.bool_)
    return _wrap(emit("Not", [a._v], differentiable=False)[0])


# --------------------------------------------------------------------------- unary
def _float_input(x: Tensor) -> Val:
    return x._v if x.dtype.kind == "f" else _val(x, get_default_dtype())


def _unary(op: str, x: Tensor, attrs: dict | None = None) -> Tensor:
    return _wrap(emit(op, [_float_input(x)], attrs)[0])


@op(og=True, method=True)
def exp(x: Tensor) -> Tensor:
    return _unary("Exp", x)


@op(og=True, method=True)
def log(x: Tensor) -> Tensor:
    return _unary("Log", x)


@op(og=True, method=True)
def sqrt(x: Tensor) -> Tensor:
    return _unary("Sqrt", x)


@op(og=True, method=True)
def sin(x: Tensor) -> Tensor:
    return _unary("Sin", x)


@op(og=True, method=True)
def cos(x: Tensor) -> Tensor:
    return _unary("Cos", x)


@op(og=True, method=True)
def erf(x: Tensor) -> Tensor:
    v = _float_input(x)
    if v.data.dtype != np.float64:
        return _wrap(emit("Erf", [v])[0])
    # NOTE: ONNX Runtime has no float64 Erf kernel (CPU provider), so float64 erf is computed
    # in float32 between two Casts: values and gradients have float32 accuracy (~1e-7).
    f32 = emit("Cast", [v], {"to": int(ir.DataType.FLOAT)})[0]
    return _wrap(emit("Cast", [emit("Erf", [f32])[0]], {"to": int(ir.DataType.DOUBLE)})[0])


@op(og=True, functional=True, method=True)
def tanh(x: Tensor) -> Tensor:
    return _unary("Tanh", x)


@op(og=True, functional=True, method=True)
def sigmoid(x: Tensor) -> Tensor:
    return _unary("Sigmoid", x)


@op(og=True, functional=True, method=True)
def relu(x: Tensor) -> Tensor:
    if x.dtype.kind != "f":
        # ONNX Relu is float-only; torch.relu keeps integer dtypes, as Max(x, 0) does.
        return maximum(x, 0)
    return _wrap(emit("Relu", [x._v])[0])


@op(og=True, method=("abs", "__abs__"))
def abs(x: Tensor) -> Tensor:  # noqa: A001
    return _wrap(emit("Abs", [x._v])[0])


@op(method="clone")
def identity(x: Tensor) -> Tensor:
    return _wrap(emit("Identity", [x._v])[0])


@op()  # the Tensor method ``to`` (devices, dtypes, other tensors) is in conversions.py
def to(x: Tensor, dtype: Any) -> Tensor:
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    return _wrap(_val(x, dtype))


@op(og=("clamp", "clip"), method=("clamp", "clip"))
def clamp(x: Tensor, min: Any = None, max: Any = None) -> Tensor:  # noqa: A002
    if min is None and max is None:
        raise ValueError(f"clamp: at least one of min and max must be given{_where()}")
    if any(isinstance(v, Tensor) for v in (min, max)):
        out = x
        if min is not None:
            out = maximum(out, min)
        if max is not None:
            out = minimum(out, max)
        return out
    # As torch: an int tensor clamped to float bounds becomes float.
    dtype = result_type(x, *(v for v in (min, max) if v is not None))
    bounds = [None if v is None else _val(v, dtype) for v in (min, max)]
    return _wrap(emit("Clip", [_val(x, dtype), *bounds])[0])


@op(og=True, method=True)
def maximum(a: Any, b: Any) -> Tensor:
    return _binary("Max", a, b)


@op(og=True, method=True)
def minimum(a: Any, b: Any) -> Tensor:
    return _binary("Min", a, b)


@op(og=True)
def where(cond: Any, a: Any = None, b: Any = None) -> Tensor:
    if a is None and b is None:  # torch.where(cond): nonzero(cond, as_tuple=True)
        from .index_ops import nonzero

        return nonzero(cond, as_tuple=True)
    if not isinstance(cond, Tensor) or cond.dtype != np.bool_:
        raise TypeError(f"where: condition must be a bool tensor{_where()}")
    dtype = result_type(a, b)
    _check_broadcast("Where", cond.shape, np.shape(a._v.data if isinstance(a, Tensor) else a),
                     np.shape(b._v.data if isinstance(b, Tensor) else b))
    return _wrap(emit("Where", [cond._v, _val(a, dtype), _val(b, dtype)])[0])


# --------------------------------------------------------------------------- matmul
_MATMUL_DTYPES = {np.dtype(t) for t in ("float16", "float32", "float64", "int32", "int64",
                                         "uint32", "uint64")}

@op(og=True, method=("matmul", "__matmul__"), reflected="__rmatmul__")
def matmul(a: Tensor, b: Tensor) -> Tensor:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError("matmul: both operands must be tensors")
    if a.dtype != b.dtype:
        raise TypeError(f"matmul: expected both operands to have the same dtype, "
                        f"but got {a.dtype} and {b.dtype}{_where()}")
    if a.dtype == np.bool_ or a.dtype not in _MATMUL_DTYPES:
        # NOTE: ONNX MatMul has no bool kernel (PyTorch has none either: "addmm_impl_cpu_" not
        # implemented for 'Bool'); ONNX Runtime's CPU MatMul covers the dtypes listed.
        raise NotImplementedError(f"matmul: not implemented for {a.dtype} tensors (shapes "
                                  f"{_fmt(a.shape)} and {_fmt(b.shape)}); cast them, e.g. "
                                  f"a.float() @ b.float(){_where()}")
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"matmul: both arguments need at least 1 dimension, got shapes "
                         f"{_fmt(a.shape)} and {_fmt(b.shape)}{_where()}")
    k_a = a.shape[-1]
    k_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if k_a != k_b:
        raise ShapeError(f"matmul: inner dimensions differ: {_fmt(a.shape)} @ {_fmt(b.shape)} "
                         f"({k_a} != {k_b}){_where()}")
    if a.ndim > 2 and b.ndim > 2:
        _check_broadcast("MatMul batch", a.shape[:-2], b.shape[:-2])
    return _wrap(emit("MatMul", [a._v, b._v])[0])


# --------------------------------------------------------------------------- reductions
def _norm_dims(x: Tensor, dim: Any) -> list[int] | None:
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, (int, np.integer)) else list(dim)
    # NOTE: builtins.max, since this module defines torch-style max/min/sum/abs.
    rank = builtins.max(x.ndim, 1)
    out = []
    for d in dims:
        if not -rank <= d < rank:
            raise IndexError(f"dimension {d} out of range for a tensor of shape "
                             f"{_fmt(x.shape)}{_where()}")
        out.append(int(d) % rank)
    return sorted(set(out))


def _reduce(op: str, x: Tensor, dim: Any, keepdim: bool, val: Val | None = None) -> Tensor:
    dims = _norm_dims(x, dim)
    v = x._v if val is None else val
    if x.ndim == 0:
        return _wrap(emit("Identity", [v])[0])
    inputs = [v] if dims is None else [v, const(dims, int64)]
    return _wrap(emit(op, inputs, {"keepdims": int(bool(keepdim))})[0])


@op(og=True, method=True)
def sum(x: Tensor, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Tensor:  # noqa: A001
    target = np.dtype(dtype) if dtype is not None else (x.dtype if x.dtype.kind == "f" else int64)
    return _reduce("ReduceSum", x, dim, keepdim, _val(x, target))


@op(og=True, method=True)
def mean(x: Tensor, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Tensor:
    if dtype is not None:
        x = to(x, dtype)
    if x.dtype.kind != "f":
        raise TypeError(f"mean(): could not infer output dtype. Input dtype must be floating "
                        f"point, got {x.dtype}{_where()}")
    dims = _norm_dims(x, dim)
    if x.ndim and 0 in (x.shape if dims is None else [x.shape[d] for d in dims]):
        # NOTE: ONNX ReduceMean of nothing is 0 on ONNX Runtime; PyTorch's is nan (0 / 0).
        return div(_reduce("ReduceSum", x, dim, keepdim), 0.0)
    return _reduce("ReduceMean", x, dim, keepdim)


def _check_nonempty(name: str, x: Tensor, dim: Any, error: type = RuntimeError) -> None:
    """PyTorch's errors for a max-like reduction over nothing (it has no identity)."""
    if dim is None and x.numel() == 0:
        extra = (" Specify the reduction dim with the 'dim' argument."
                 if error is RuntimeError else "")
        raise error(f"{name}(): Expected reduction dim to be specified for input.numel() == 0."
                    f"{extra} (input shape {_fmt(x.shape)}){_where()}")
    for d in _norm_dims(x, dim) or []:
        if x.ndim and x.shape[d] == 0:
            raise IndexError(f"{name}(): Expected reduction dim {d} to have non-zero size "
                             f"(input shape {_fmt(x.shape)}){_where()}")


def _any_nan(x: Tensor, dim: Any, keepdim: bool) -> Tensor:
    """Whether each reduced slice holds a NaN (bool, the reduction's shape); no gradient."""
    nan = _wrap(emit("IsNaN", [x._v], differentiable=False)[0])
    flags = _wrap(emit("Cast", [nan._v], {"to": int(ir.DataType.FLOAT)}, differentiable=False)[0])
    found = _reduce("ReduceMax", flags, dim, keepdim)
    return _wrap(emit("Cast", [found._v], {"to": int(ir.DataType.BOOL)}, differentiable=False)[0])


def _nan_max(op: str, x: Tensor, dim: Any, keepdim: bool) -> Tensor:
    out = _reduce(op, x, dim, keepdim)
    if x.dtype.kind != "f" or x.ndim == 0:
        return out
    # NOTE: ONNX Runtime's ReduceMax/Min skip NaN (or not, depending on where it sits); PyTorch
    # propagates it. Multiplying by 1 or NaN keeps inf, and the NaN reaches the gradient as in
    # PyTorch's amax (grad / count * mask, all NaN in that slice).
    with state.no_grad():
        scale = where(_any_nan(x, dim, keepdim), float("nan"), 1.0)
    return mul(out, scale)


@op(og=True, method=True)
def amax(x: Tensor, dim: Any = None, keepdim: bool = False) -> Tensor:
    _check_nonempty("amax", x, dim if dim != () else None)
    return _nan_max("ReduceMax", x, dim, keepdim)


@op(og=True, method=True)
def amin(x: Tensor, dim: Any = None, keepdim: bool = False) -> Tensor:
    _check_nonempty("amin", x, dim if dim != () else None)
    return _nan_max("ReduceMin", x, dim, keepdim)


def _arg(op: str, x: Tensor, dim: int | None, keepdim: bool) -> Tensor:
    _check_nonempty(op.lower(), x, dim, IndexError)
    if dim is None:
        return _nan_arg(op, reshape(x, (-1,)), 0, False)
    (d,) = _norm_dims(x, dim)
    return _nan_arg(op, x, d, keepdim)


def _nan_arg(op: str, x: Tensor, axis: int, keepdim: bool) -> Tensor:
    """ArgMax/ArgMin where NaN wins (the first NaN), as PyTorch; ONNX Runtime skips NaN."""
    if x.ndim == 0:
        return _wrap(emit("Identity", [const(0, int64)], differentiable=False)[0])
    attrs = {"axis": axis, "keepdims": int(keepdim)}
    idx = _wrap(emit(op, [x._v], attrs, differentiable=False)[0])
    if x.dtype.kind != "f":
        return idx
    with state.no_grad():
        nan = _wrap(emit("IsNaN", [x._v], differentiable=False)[0])
        flags = _wrap(emit("Cast", [nan._v], {"to": int(ir.DataType.INT32)})[0])
        first_nan = _wrap(emit("ArgMax", [flags._v], attrs)[0])
        any_nan = _wrap(emit("Cast", [_reduce("ReduceMax", flags, [axis], keepdim)._v],
                             {"to": int(ir.DataType.BOOL)})[0])
        return where(any_nan, first_nan, idx)


@op(og=True, method=True)
def argmax(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    return _arg("ArgMax", x, dim, keepdim)


@op(og=True, method=True)
def argmin(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    return _arg("ArgMin", x, dim, keepdim)


def _select_reduce(arg_op: str, x: Tensor, dim: int, keepdim: bool) -> MaxResult:
    # NOTE: values come from GatherElements at the arg index, so the gradient goes to that one
    # element (as torch.max(dim)), not shared among ties as amax's is.
    name = "max" if arg_op == "ArgMax" else "min"
    _check_nonempty(name, x, dim)
    if x.ndim == 0:  # torch: max(dim) of a 0-d tensor is the tensor and index 0
        _norm_dims(x, dim)
        zero = _wrap(emit("Identity", [const(0, int64)], differentiable=False)[0])
        return MaxResult(_wrap(emit("Identity", [x._v])[0]), zero)
    (d,) = _norm_dims(x, dim)
    idx = _nan_arg(arg_op, x, d, True)
    values = _wrap(emit("GatherElements", [x._v, idx._v], {"axis": d})[0])
    if not keepdim:
        values, idx = squeeze(values, d), squeeze(idx, d)
    return MaxResult(values, idx)


@op(og=True, method=True)
def max(x: Tensor, dim: Any = None, keepdim: bool = False):  # noqa: A001
    if isinstance(dim, Tensor):
        return maximum(x, dim)
    if dim is None:
        return _full_max("max", x)
    return _select_reduce("ArgMax", x, dim, keepdim)


@op(og=True, method=True)
def min(x: Tensor, dim: Any = None, keepdim: bool = False):  # noqa: A001
    if isinstance(dim, Tensor):
        return minimum(x, dim)
    if dim is None:
        return _full_max("min", x)
    return _select_reduce("ArgMin", x, dim, keepdim)


def _full_max(name: str, x: Tensor) -> Tensor:
    """``x.max()`` / ``x.min()``: as amax, but a NaN result sends the gradient to the NaN
    elements (evenly), as PyTorch's evenly_distribute_backward, where amax's is NaN."""
    _check_nonempty(name, x, None)
    reduce = amax if name == "max" else amin
    if x.dtype.kind != "f" or x.ndim == 0:
        return reduce(x)
    with state.no_grad():
        nan = _wrap(emit("IsNaN", [x._v], differentiable=False)[0])
        count = sum(to(nan, x.dtype))
        found = gt(count, 0.0)
    fill = float("-inf") if name == "max" else float("inf")
    best = _reduce("ReduceMax" if name == "max" else "ReduceMin", where(nan, fill, x), None, False)
    nan_part = div(sum(where(nan, x, 0.0)), maximum(count, 1.0))
    return where(found, nan_part, best)


# --------------------------------------------------------------------------- shapes
def _shape_args(shape: tuple) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return tuple(int(s) for s in shape)


@op(og=True, method=("reshape", "view"))
def reshape(x: Tensor, *shape: Any) -> Tensor:
    shape = _shape_args(shape)
    size = x.numel()
    known = int(np.prod([s for s in shape if s != -1]))
    if shape.count(-1) > 1 or (-1 not in shape and known != size) or (
        -1 in shape and (known == 0 or size % known)
    ):
        raise ShapeError(f"shape {_fmt(shape)} is invalid for input of size {size} "
                         f"(shape {_fmt(x.shape)}){_where()}")
    if shape == x.shape:
        return x
    # NOTE: without allowzero, ONNX reads a 0 in the shape as "copy this dim of the input".
    attrs = {"allowzero": 1} if 0 in shape else None
    return _wrap(emit("Reshape", [x._v, const(shape, int64)], attrs)[0])


@op(og=True, method=True)
def flatten(x: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    if x.ndim == 0:
        return reshape(x, (1,))
    s, e = start_dim % x.ndim, end_dim % x.ndim
    shape = x.shape[:s] + (int(np.prod(x.shape[s:e + 1])),) + x.shape[e + 1:]
    return reshape(x, shape)


@op(og=True, method=True)
def squeeze(x: Tensor, dim: Any = None) -> Tensor:
    if dim is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    else:
        # A 0-d tensor has dims -1 and 0 to name, as in PyTorch, and nothing to squeeze.
        axes = [d for d in _norm_dims(x, dim) if x.ndim and x.shape[d] == 1]
    if not axes:
        return x
    return _wrap(emit("Squeeze", [x._v, const(axes, int64)])[0])


@op(og=True, method=True)
def unsqueeze(x: Tensor, dim: int) -> Tensor:
    if not -x.ndim - 1 <= dim <= x.ndim:
        raise IndexError(f"unsqueeze: dimension {dim} out of range for {x.ndim}-d tensor{_where()}")
    return _wrap(emit("Unsqueeze", [x._v, const([dim % (x.ndim + 1)], int64)])[0])


@op(og=True, method=True)
def permute(x: Tensor, *dims: Any) -> Tensor:
    perm = list(_shape_args(dims))
    if sorted(d % builtins.max(x.ndim, 1) for d in perm) != list(range(x.ndim)):
        raise ValueError(f"permute: {perm} is not a permutation of the {x.ndim} dims{_where()}")
    perm = [d % x.ndim for d in perm]
    if perm == list(range(x.ndim)):
        return x
    return _wrap(emit("Transpose", [x._v], {"perm": perm})[0])


@op(og=True, method=True)
def transpose(x: Tensor, dim0: int, dim1: int) -> Tensor:
    perm = list(range(x.ndim))
    d0, d1 = _norm_dims(x, dim0)[0], _norm_dims(x, dim1)[0]
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return permute(x, perm)


@op(method=True)
def expand(x: Tensor, *shape: Any) -> Tensor:
    shape = _shape_args(shape)
    lead = len(shape) - x.ndim
    full = tuple(x.shape[i - lead] if s == -1 else s for i, s in enumerate(shape))
    _check_broadcast("Expand", x.shape, full)
    if full == x.shape:
        return x
    return _wrap(emit("Expand", [x._v, const(full, int64)])[0])


@op(og=True)
def cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: expected a non-empty list of tensors")
    first = tensors[0]
    d = _norm_dims(first, dim)[0]
    for i, t in enumerate(tensors):
        if t.ndim != first.ndim or t.shape[:d] + t.shape[d + 1:] != first.shape[:d] + first.shape[d + 1:]:
            raise ShapeError(f"cat: sizes of tensors must match except in dimension {d}: "
                             f"tensor 0 is {_fmt(first.shape)}, tensor {i} is {_fmt(t.shape)}"
                             f"{_where()}")
    dtype = result_type(*tensors)
    if len(tensors) == 1:
        return tensors[0]
    return _wrap(emit("Concat", [_val(t, dtype) for t in tensors], {"axis": d})[0])


@op(og=True)
def stack(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: expected a non-empty list of tensors")
    for i, t in enumerate(tensors):
        if t.shape != tensors[0].shape:
            raise ShapeError(f"stack expects each tensor to be equal size, but got "
                             f"{_fmt(tensors[0].shape)} at entry 0 and {_fmt(t.shape)} at entry "
                             f"{i}{_where()}")
    d = dim % (tensors[0].ndim + 1)
    return cat([unsqueeze(t, d) for t in tensors], d)


@op(og=True, method=True)
def chunk(x: Tensor, chunks: int, dim: int = 0) -> list[Tensor]:
    if chunks <= 0:
        raise ValueError(f"chunk expects `chunks` to be greater than 0, got: {chunks}{_where()}")
    d = _norm_dims(x, dim)[0]
    size = -(-x.shape[d] // chunks)
    return split(x, size, d)


@op(og=True, method=True)
def split(x: Tensor, split_size: Any, dim: int = 0) -> list[Tensor]:
    d = _norm_dims(x, dim)[0]
    n = x.shape[d]
    sizes = ([split_size] * (n // split_size) + ([n % split_size] if n % split_size else [])
             if isinstance(split_size, int) else list(split_size))
    if sum_(sizes) != n:
        raise ShapeError(f"split: sizes {sizes} do not add up to {n} on dim {d}{_where()}")
    outs = emit("Split", [x._v, const(sizes, int64)], {"axis": d}, n_out=len(sizes))
    return [_wrap(v) for v in outs]


def sum_(values):
    total = 0
    for v in values:
        total += v
    return total


def _softmax(op: str, x: Tensor, dim: int) -> Tensor:
    axis = _norm_dims(x, dim)[0]
    if x.ndim == 0:
        # NOTE: ONNX Softmax needs rank >= 1; PyTorch treats a 0-d tensor as one element.
        return reshape(_softmax(op, reshape(x, (1,)), 0), ())
    return _wrap(emit(op, [_float_input(x)], {"axis": axis})[0])


@op(og=True, functional=True, method=True)
def softmax(x: Tensor, dim: int) -> Tensor:
    return _softmax("Softmax", x, dim)


@op(og=True, functional=True, method=True)
def log_softmax(x: Tensor, dim: int) -> Tensor:
    return _softmax("LogSoftmax", x, dim)


# --------------------------------------------------------------------------- indexing
# getitem, setitem and the indexing functions: tracer/index_ops.py.


# --------------------------------------------------------------------------- in-place
@op(method=True)
def copy_(self: Tensor, src: Any) -> Tensor:
    """``self.copy_(src)``: ``src`` broadcast to this shape and cast to this dtype, in place."""
    if self.requires_grad and self.is_leaf and state.grad_enabled():
        raise RuntimeError(f"a leaf Variable that requires grad is being used in an in-place "
                           f"operation (copy_){_where()}")
    src = src if isinstance(src, Tensor) else Tensor(Val(np.asarray(src)))
    _check_broadcast("copy_", self.shape, src.shape)
    value = to(expand(src, self.shape), self.dtype)
    self._write(value._v if value is not src else emit("Identity", [src._v])[0])
    return self


@op(method=True)
def fill_(self: Tensor, value: Any) -> Tensor:
    return copy_(self, Tensor(Val(np.asarray(value, dtype=self.dtype))))


@op(method=True)
def zero_(self: Tensor) -> Tensor:
    return fill_(self, 0)


# --------------------------------------------------------------------------- conversions
@op(method="float")
def to_float(x: Tensor) -> Tensor:
    return to(x, np.float32)


@op(method="double")
def to_double(x: Tensor) -> Tensor:
    return to(x, np.float64)


@op(method="long")
def to_long(x: Tensor) -> Tensor:
    return to(x, np.int64)


@op(method="int")
def to_int(x: Tensor) -> Tensor:
    return to(x, np.int32)


@op(method="bool")
def to_bool(x: Tensor) -> Tensor:
    return to(x, np.bool_)


@op(method=True)
def type_as(x: Tensor, other: Tensor) -> Tensor:
    return to(x, other.dtype)


@op(method=True)
def expand_as(x: Tensor, other: Tensor) -> Tensor:
    return expand(x, other.shape)


@op(method=("view_as", "reshape_as"))
def reshape_as(x: Tensor, other: Tensor) -> Tensor:
    return reshape(x, other.shape)


# --------------------------------------------------------------------------- layers
@op(functional=True)
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias``: one ``Gemm`` for 2-D input, MatMul (+ Add) otherwise."""
    if x.shape[-1:] != weight.shape[1:]:
        raise ShapeError(f"linear: input {_fmt(x.shape)} has {x.shape[-1] if x.ndim else 0} "
                         f"features but the weight {_fmt(weight.shape)} expects "
                         f"{weight.shape[1]}{_where()}")
    if x.dtype != weight.dtype:
        raise TypeError(f"linear: input dtype {x.dtype} does not match weight dtype "
                        f"{weight.dtype}{_where()}")
    if x.ndim == 2:
        inputs = [x._v, weight._v] + ([bias._v] if bias is not None else [])
        return _wrap(emit("Gemm", inputs, {"transB": 1})[0])
    out = matmul(x, permute(weight, [1, 0]))
    return out if bias is None else add(out, bias)


@op(functional=True)
def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Dropout in training mode: ``x`` times a mask of ``1/(1-p)`` (kept) and 0, drawn from
    onnxgrad's counter-based stream (``tracer/random_stream.py``): ``og.manual_seed`` fixes the
    masks, and a compiled or exported step draws the same masks in every runtime."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}{_where()}")
    if not training or p == 0:
        return x
    if p == 1:
        # PyTorch's p=1 is input * 0, which also keeps its NaNs and gives a zero gradient.
        return mul(x, 0.0)
    if x.dtype.kind != "f":
        raise TypeError(f"dropout expects a floating-point input, got {x.dtype}{_where()}")
    mask = random_stream.keep_mask(tuple(x.shape), float(p), x.dtype)
    return _wrap(emit("Mul", [x._v, mask])[0])


@op(og=True, method=True)
def gather(x: Tensor, dim: int, index: Tensor, *, sparse_grad: bool = False) -> Tensor:
    """``torch.gather``: ONNX ``GatherElements`` along ``dim`` (``sparse_grad`` is accepted; the
    gradient is dense)."""
    d = _norm_dims(x, dim)[0]
    if index.dtype.kind not in "iu" or index.ndim != x.ndim:
        raise IndexError(f"gather: index must be an integer tensor of rank {x.ndim}, got "
                         f"{index.dtype}{_fmt(index.shape)}{_where()}")
    if state.active_trace() is None and index.numel():  # traced: the values are not known
        values = index._v.data
        bad = values[(values < 0) | (values >= x.shape[d])]
        if bad.size:
            raise RuntimeError(f"index {int(bad.flat[0])} is out of bounds for dimension {d} "
                               f"with size {x.shape[d]}{_where()}")
    return _wrap(emit("GatherElements", [x._v, index._v], {"axis": d})[0])


# --------------------------------------------------------------------------- autograd
@op(method=True)
def backward(self: Tensor, gradient: Any = None, retain_graph: bool | None = None,
             create_graph: bool = False) -> None:
    """``tensor.backward()``: accumulate the gradients of this tensor into the leaves' ``.grad``.

    NOTE: declared with the ops, not in autograd.py, which knows tensors only as roots and leaves.
    """
    autograd.backward([self], None if gradient is None else [gradient],
                      retain_graph=retain_graph, create_graph=create_graph)
