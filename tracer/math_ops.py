"""Math ops: trigonometric and hyperbolic functions, rounding, remainders, the arithmetic
functions (``og.add``...), linear algebra on matrices and vectors, variance and products,
elementwise tests (``isnan``...) and comparisons of whole tensors (``allclose``, ``equal``).

Each op is one definition (``@op``) emitting standard ONNX nodes; where ONNX has no op
(``log1p``, ``atan2``, ``remainder``), it is a composition of ops that have gradient rules, so
only the new ONNX op types need a rule (``passes/rules/math.py``).
"""
from __future__ import annotations

import builtins
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from . import state
from .ops import (
    _TORCH_NAMES,
    ShapeError,
    _binary,
    _can_cast,
    _check_broadcast,
    _float_input,
    _fmt,
    _norm_dims,
    _unary,
    _val,
    _where,
    _wrap,
    abs,
    add,
    clamp,
    div,
    eq,
    expand,
    le,
    logical_not,
    lt,
    mean,
    mul,
    reshape,
    result_type,
    sqrt,
    sub,
    sum,
    to,
    unsqueeze,
    where,
)
from .registry import op
from .tensor import Tensor
from .values import Val, const, emit, get_default_dtype, int64

FLOAT = int(ir.DataType.FLOAT)
DOUBLE = int(ir.DataType.DOUBLE)


def _name(dtype: np.dtype) -> str:
    return _TORCH_NAMES.get(dtype.name, dtype.name)


def _tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(Val(np.asarray(x)))


# --------------------------------------------------------------------------- in-place variants
def _inplace(fn: Callable[..., Tensor], name: str) -> None:
    """Register ``Tensor.<name>(*args)``: ``fn(self, *args)`` written into ``self`` with PyTorch's
    checks (leaves guarded, result castable to self's dtype, result shape == self's shape).

    NOTE: the registry's ``inplace=`` names take one operand; these ops take several
    (``clamp_(min, max)``, ``round_(decimals=)``), so they register their own methods.
    """

    def method(self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.requires_grad and self.is_leaf and state.grad_enabled():
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place "
                               f"operation ({name}){_where()}")
        out = fn(self, *args, **kwargs)
        if not _can_cast(out.dtype, self.dtype):
            raise TypeError(f"result type {_name(out.dtype)} can't be cast to the desired output "
                            f"type {_name(self.dtype)} ({name}){_where()}")
        if out.shape != self.shape:
            raise ShapeError(f"output with shape {_fmt(self.shape)} doesn't match the broadcast "
                             f"shape {_fmt(out.shape)} ({name}){_where()}")
        value = to(out, self.dtype)
        self._write(value._v if value is not self else emit("Identity", [self._v])[0])
        return self

    method.__name__ = method.__qualname__ = name
    op(method=name, name=name)(method)


# --------------------------------------------------------------------------- unary
def _float32_between_casts(op_type: str, x: Tensor) -> Tensor:
    v = _float_input(x)
    if v.data.dtype != np.float64:
        return _wrap(emit(op_type, [v])[0])
    # NOTE: ONNX Runtime's CPU provider has no float64 kernel for Tan, Asin, Acos, Atan, Sinh,
    # Cosh, Asinh, Acosh or Atanh (checked on 1.32), so float64 computes in float32 between two
    # Casts, as erf does: values and gradients have float32 accuracy (~1e-7).
    f32 = emit("Cast", [v], {"to": FLOAT})[0]
    return _wrap(emit("Cast", [emit(op_type, [f32])[0]], {"to": DOUBLE})[0])


@op(og=True, method=True)
def tan(x: Tensor) -> Tensor:
    if _float_input(x).data.dtype == np.float64:
        # NOTE: no float64 Tan kernel in ONNX Runtime; sin/cos keeps float64 accuracy.
        from .ops import cos, sin
        return div(sin(x), cos(x))
    return _unary("Tan", x)


@op(og=("asin", "arcsin"), method=("asin", "arcsin"))
def asin(x: Tensor) -> Tensor:
    return _float32_between_casts("Asin", x)


@op(og=("acos", "arccos"), method=("acos", "arccos"))
def acos(x: Tensor) -> Tensor:
    return _float32_between_casts("Acos", x)


@op(og=("atan", "arctan"), method=("atan", "arctan"))
def atan(x: Tensor) -> Tensor:
    return _float32_between_casts("Atan", x)


@op(og=True, method=True)
def sinh(x: Tensor) -> Tensor:
    return _float32_between_casts("Sinh", x)


@op(og=True, method=True)
def cosh(x: Tensor) -> Tensor:
    return _float32_between_casts("Cosh", x)


@op(og=("asinh", "arcsinh"), method=("asinh", "arcsinh"))
def asinh(x: Tensor) -> Tensor:
    return _float32_between_casts("Asinh", x)


@op(og=("acosh", "arccosh"), method=("acosh", "arccosh"))
def acosh(x: Tensor) -> Tensor:
    return _float32_between_casts("Acosh", x)


@op(og=("atanh", "arctanh"), method=("atanh", "arctanh"))
def atanh(x: Tensor) -> Tensor:
    return _float32_between_casts("Atanh", x)


def _as_float(x: Tensor) -> Tensor:
    return x if x.dtype.kind == "f" else to(x, get_default_dtype())


def _detached(fn: Callable[[], Tensor]) -> Tensor:
    with state.no_grad():
        return fn()


def _nan_to_zero(x: Tensor) -> Tensor:
    return where(isnan(x), 0.0, x)


@op(og=True, method=True)
def log1p(x: Tensor) -> Tensor:
    x = _as_float(x)
    u = add(x, 1.0)
    # NOTE: ONNX has no Log1p; log(1 + x) loses the low digits of x that 1 + x rounds away, so
    # they are added back: log1p(x) = log(u) + (x - (u - 1)) / u (u = 1 + x, first order in the
    # rounding error). The correction is a constant to autograd, so the gradient is exactly
    # PyTorch's grad / (1 + x); NaN corrections (x = -1, inf) are dropped.
    from .ops import log
    corr = _detached(lambda: _nan_to_zero(div(sub(x, sub(u, 1.0)), u)))
    return add(log(u), corr)


@op(og=True, method=True)
def expm1(x: Tensor) -> Tensor:
    x = _as_float(x)
    from .ops import exp, log
    u = exp(x)

    # NOTE: ONNX has no Expm1; exp(x) - 1 cancels for small x, so the result is corrected to
    # Kahan's (u - 1) * x / log(u) (x itself where u == 1). The correction is a constant to
    # autograd, so the gradient is PyTorch's grad * exp(x); NaN corrections (inf) are dropped.
    def correction() -> Tensor:
        um1 = sub(u, 1.0)
        exact = where(eq(u, 1.0), x, div(mul(um1, x), log(u)))
        return _nan_to_zero(sub(exact, um1))

    return add(sub(u, 1.0), _detached(correction))


@op(og=True, method=True)
def log2(x: Tensor) -> Tensor:
    from .ops import log
    return mul(log(x), 1.0 / math.log(2.0))


@op(og=True, method=True)
def log10(x: Tensor) -> Tensor:
    from .ops import log
    return mul(log(x), 1.0 / math.log(10.0))


@op(og=True, method=True)
def rsqrt(x: Tensor) -> Tensor:
    return reciprocal(sqrt(x))


@op(og=True, method=True)
def reciprocal(x: Tensor) -> Tensor:
    return _unary("Reciprocal", x)


@op(og=True, method=True)
def square(x: Tensor) -> Tensor:
    if x.dtype == np.bool_:
        x = to(x, int64)  # torch: bool squared is int64
    return mul(x, x)


@op(og=True, method=True)
def sign(x: Tensor) -> Tensor:
    if x.dtype == np.bool_:
        return _wrap(emit("Identity", [x._v], differentiable=False)[0])
    return _wrap(emit("Sign", [x._v])[0])


def _rounding(op_type: str, x: Tensor) -> Tensor:
    if x.dtype.kind != "f":  # torch: integers are already whole, same dtype
        return _wrap(emit("Identity", [x._v], differentiable=False)[0])
    return _wrap(emit(op_type, [x._v])[0])


@op(og=True, method=True)
def floor(x: Tensor) -> Tensor:
    return _rounding("Floor", x)


@op(og=True, method=True)
def ceil(x: Tensor) -> Tensor:
    return _rounding("Ceil", x)


@op(og=True, method=True)
def round(x: Tensor, decimals: int = 0) -> Tensor:
    """Half to even, as PyTorch (and ONNX ``Round``); ``decimals`` scales by 10**decimals."""
    if decimals == 0 or x.dtype.kind != "f":
        return _rounding("Round", x)
    # NOTE: PyTorch's formula: round(x * 10**d) / 10**d (10**-d multiplies for negative d).
    scale = 10.0 ** builtins.abs(decimals)
    if decimals > 0:
        return div(_rounding("Round", mul(x, scale)), scale)
    return mul(_rounding("Round", div(x, scale)), scale)


@op(og=("trunc", "fix"), method=("trunc", "fix"))
def trunc(x: Tensor) -> Tensor:
    if x.dtype.kind != "f":
        return _rounding("Floor", x)
    # ONNX has no Trunc: toward zero is ceil below zero, floor above.
    return where(lt(x, 0.0), ceil(x), floor(x))


@op(og=True, method=True)
def frac(x: Tensor) -> Tensor:
    if x.dtype.kind != "f":
        raise TypeError(f"frac: not implemented for {_name(x.dtype)} tensors (integers have no "
                        f"fractional part){_where()}")
    return sub(x, trunc(x))


def _y_x_float(y: Any, x: Any) -> tuple[Tensor, Tensor]:
    dtype = result_type(y, x)
    if dtype.kind != "f":
        dtype = get_default_dtype()
    return _wrap(_val(y, dtype)), _wrap(_val(x, dtype))


@op(og=("atan2", "arctan2"), method=("atan2", "arctan2"))
def atan2(input: Any, other: Any) -> Tensor:
    """``atan2(y, x)``, the angle of the point (x, y), in (-pi, pi]."""
    y, x = _y_x_float(input, other)
    _check_broadcast("atan2", y.shape, x.shape)
    # NOTE: ONNX has no Atan2. The half-angle forms 2 atan(y / (r + x)) (x > 0) and
    # 2 atan((r - x) / y) (x <= 0), r = hypot(x, y), have no cancellation on their side, give
    # +-pi on the negative axis from y's signed zero, and are smooth wherever atan2 is, so the
    # gradient is PyTorch's x / r^2, -y / r^2 (also at x == 0). At (0, 0) the result is y (+-0)
    # and the 0/0 is kept out of the gradient. r overflows for |x|, |y| > ~1e19 in float32.
    r = sqrt(add(mul(x, x), mul(y, y)))
    positive = _detached(lambda: x > 0)
    origin = _detached(lambda: mul(eq(x, 0.0), eq(y, 0.0)))
    num = where(positive, y, sub(r, x))
    den = where(positive, add(r, x), y)
    den = where(origin, 1.0, den)
    return where(origin, y, mul(atan(div(num, den)), 2.0))


# --------------------------------------------------------------------------- remainders
def _check_int_divisor(op_name: str, b: Any, dtype: np.dtype) -> None:
    # NOTE: ONNX Runtime's integer Div/Mod by zero is undefined behaviour (a crash); PyTorch
    # raises. The eager value is checked (compiled steps trace with eager values too).
    if dtype.kind in "iub":
        data = b._v.data if isinstance(b, Tensor) else np.asarray(b)
        if np.any(data == 0):
            raise ZeroDivisionError(f"{op_name}: integer division by zero{_where()}")


def _mod(a: Any, b: Any, op_name: str) -> tuple[Tensor, np.dtype]:
    dtype = result_type(a, b)
    if dtype == np.bool_:
        raise TypeError(f"{op_name}: not implemented for Bool tensors{_where()}")
    _check_broadcast(op_name, np.shape(a._v.data if isinstance(a, Tensor) else a),
                     np.shape(b._v.data if isinstance(b, Tensor) else b))
    _check_int_divisor(op_name, b, dtype)
    # C's fmod: the sign of the dividend (ONNX Mod needs fmod=1 for floats).
    return _wrap(emit("Mod", [_val(a, dtype), _val(b, dtype)], {"fmod": 1})[0]), dtype


@op(og=True, method=True)
def fmod(input: Any, other: Any) -> Tensor:
    return _mod(input, other, "fmod")[0]


@op(og=True, method=("remainder", "__mod__"), reflected="__rmod__")
def remainder(input: Any, other: Any) -> Tensor:
    """Python's ``%``: the result has the divisor's sign."""
    r, dtype = _mod(input, other, "remainder")
    b = _wrap(_val(other, dtype)) if not isinstance(other, Tensor) else to(other, dtype)
    # PyTorch's CPU formula: fmod, then + b where the signs of r and b differ and r != 0.
    fix = _detached(lambda: mul(logical_not(eq(r, 0)), logical_not(eq(lt(r, 0), lt(b, 0)))))
    return where(fix, add(r, b), r)


@op(og=True, method=("floor_divide", "__floordiv__"), reflected="__rfloordiv__")
def floor_divide(input: Any, other: Any) -> Tensor:
    return div(input, other, rounding_mode="floor")


def rounded_div(a: Any, b: Any, rounding_mode: str | None) -> Tensor:
    if rounding_mode is None:
        return _binary("Div", a, b)
    if rounding_mode not in ("trunc", "floor"):
        raise ValueError(f"div expected rounding_mode to be one of None, 'trunc', or 'floor' but "
                         f"found '{rounding_mode}'{_where()}")
    dtype = result_type(a, b)
    if dtype == np.bool_:
        dtype = int64
    _check_int_divisor("div", b, dtype)
    if dtype.kind == "f":
        q = _binary("Div", _wrap(_val(a, dtype)), _wrap(_val(b, dtype)))
        return trunc(q) if rounding_mode == "trunc" else floor(q)
    va, vb = _wrap(_val(a, dtype)), _wrap(_val(b, dtype))
    q = _wrap(emit("Div", [va._v, vb._v])[0])  # ONNX integer Div truncates
    if rounding_mode == "trunc":
        return q
    # Floor: one less where the division was inexact and the signs differ.
    inexact = logical_not(eq(mul(q, vb), va))
    neg = logical_not(eq(lt(va, 0), lt(vb, 0)))
    return sub(q, to(mul(inexact, neg), dtype))


# --------------------------------------------------------------------------- linear algebra
class LinalgError(ShapeError, RuntimeError):
    """PyTorch raises RuntimeError for these; onnxgrad's shape errors are ValueErrors: both."""


def _same_dtype(a: Tensor, b: Tensor, what: str) -> None:
    if a.dtype != b.dtype:
        raise LinalgError(f"{what}: expected both operands to have the same dtype, but got "
                          f"{_name(a.dtype)} and {_name(b.dtype)}{_where()}")


def _check_tensors(name: str, *xs: Any) -> None:
    for x in xs:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}(): argument must be a Tensor, not {type(x).__name__}"
                            f"{_where()}")


@op(og=True, method=True)
def mm(input: Tensor, mat2: Tensor) -> Tensor:
    from .ops import matmul
    _check_tensors("mm", input, mat2)
    if input.ndim != 2:
        raise LinalgError(f"mm: self must be a matrix, got shape {_fmt(input.shape)}{_where()}")
    if mat2.ndim != 2:
        raise LinalgError(f"mm: mat2 must be a matrix, got shape {_fmt(mat2.shape)}{_where()}")
    if input.shape[1] != mat2.shape[0]:
        raise LinalgError(f"mm: mat1 and mat2 shapes cannot be multiplied ({input.shape[0]}x"
                          f"{input.shape[1]} and {mat2.shape[0]}x{mat2.shape[1]}){_where()}")
    _same_dtype(input, mat2, "mm")
    return matmul(input, mat2)


@op(og=True, method=True)
def bmm(input: Tensor, mat2: Tensor) -> Tensor:
    from .ops import matmul
    _check_tensors("bmm", input, mat2)
    if input.ndim != 3:
        raise LinalgError(f"bmm: batch1 must be a 3D tensor, got shape {_fmt(input.shape)}"
                          f"{_where()}")
    if mat2.ndim != 3:
        raise LinalgError(f"bmm: batch2 must be a 3D tensor, got shape {_fmt(mat2.shape)}"
                          f"{_where()}")
    want = [input.shape[0], input.shape[2]]
    if list(mat2.shape[:2]) != want:
        raise LinalgError(f"bmm: Expected size for first two dimensions of batch2 tensor to be: "
                          f"{want} but got: {list(mat2.shape[:2])} (batch1 "
                          f"{_fmt(input.shape)}, batch2 {_fmt(mat2.shape)}){_where()}")
    _same_dtype(input, mat2, "bmm")
    return matmul(input, mat2)


@op(og=True, method=True)
def mv(input: Tensor, vec: Tensor) -> Tensor:
    from .ops import matmul
    _check_tensors("mv", input, vec)
    if input.ndim != 2 or vec.ndim != 1:
        raise LinalgError(f"mv: vector + matrix @ vector expected, got 1, {input.ndim}, "
                          f"{vec.ndim}{_where()}")
    if input.shape[1] != vec.shape[0]:
        raise LinalgError(f"mv: size mismatch, got input ({input.shape[0]}), mat "
                          f"({input.shape[0]}x{input.shape[1]}), vec ({vec.shape[0]}){_where()}")
    _same_dtype(input, vec, "mv")
    return matmul(input, vec)


@op(og=True, method=True)
def dot(input: Tensor, tensor: Tensor) -> Tensor:
    from .ops import matmul
    _check_tensors("dot", input, tensor)
    if input.ndim != 1 or tensor.ndim != 1:
        raise LinalgError(f"dot: 1D tensors expected, but got {input.ndim}D and {tensor.ndim}D "
                          f"tensors{_where()}")
    if input.shape != tensor.shape:
        raise LinalgError(f"dot: inconsistent tensor size, expected tensor [{input.shape[0]}] "
                          f"and src [{tensor.shape[0]}] to have the same number of elements, but "
                          f"got {input.shape[0]} and {tensor.shape[0]} elements respectively"
                          f"{_where()}")
    if input.dtype != tensor.dtype:
        raise LinalgError(f"dot: expected both vectors to have same dtype, but found "
                          f"{_name(input.dtype)} and {_name(tensor.dtype)}{_where()}")
    return matmul(input, tensor)


@op(og=("outer", "ger"), method=("outer", "ger"))
def outer(input: Tensor, vec2: Tensor) -> Tensor:
    _check_tensors("outer", input, vec2)
    for what, t in (("self", input), ("vec2", vec2)):
        if t.ndim != 1:
            raise LinalgError(f"outer: Expected 1-D argument {what}, but got {t.ndim}-D"
                              f"{_where()}")
    return mul(unsqueeze(input, 1), unsqueeze(vec2, 0))


# --------------------------------------------------------------------------- reductions
def _var_args(dim: Any, unbiased: Any, correction: Any) -> tuple[Any, float]:
    if isinstance(dim, bool):  # torch.var(x, unbiased): the old positional form
        dim, unbiased = None, dim
    if unbiased is not None and correction is not None:
        raise ValueError(f"var/std: cannot specify both unbiased and correction{_where()}")
    if correction is None:
        correction = 1 if unbiased is None or unbiased else 0
    return dim, float(correction)


def _var_mean(name: str, x: Tensor, dim: Any, unbiased: Any, keepdim: bool,
              correction: Any) -> tuple[Tensor, Tensor]:
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: std and var only support floating point and complex dtypes, "
                        f"got {_name(x.dtype)}{_where()}")
    dim, correction = _var_args(dim, unbiased, correction)
    dims = _norm_dims(x, dim)
    n = int(np.prod([x.shape[d] for d in dims] if dims is not None and x.ndim else x.shape))
    mu = mean(x, dim, keepdim=True)
    centered = sub(x, mu)
    ss = sum(mul(centered, centered), dim, keepdim=keepdim)
    # NOTE: as PyTorch, n <= correction divides by max(0, n - correction): inf or nan.
    var = div(ss, builtins.max(n - correction, 0.0))
    if not keepdim and x.ndim:
        mu = reshape(mu, var.shape)
    elif not x.ndim:
        mu = reshape(mu, ())
    return var, mu


@op(og=True, method=True)
def var(input: Tensor, dim: Any = None, unbiased: Any = None, keepdim: bool = False, *,
        correction: Any = None) -> Tensor:
    return _var_mean("var", input, dim, unbiased, keepdim, correction)[0]


@op(og=True, method=True)
def std(input: Tensor, dim: Any = None, unbiased: Any = None, keepdim: bool = False, *,
        correction: Any = None) -> Tensor:
    return sqrt(_var_mean("std", input, dim, unbiased, keepdim, correction)[0])


@op(og=True)
def var_mean(input: Tensor, dim: Any = None, unbiased: Any = None, keepdim: bool = False, *,
             correction: Any = None) -> tuple[Tensor, Tensor]:
    return _var_mean("var_mean", input, dim, unbiased, keepdim, correction)


@op(og=True)
def std_mean(input: Tensor, dim: Any = None, unbiased: Any = None, keepdim: bool = False, *,
             correction: Any = None) -> tuple[Tensor, Tensor]:
    v, m = _var_mean("std_mean", input, dim, unbiased, keepdim, correction)
    return sqrt(v), m


@op(og=True, method=True)
def prod(input: Tensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None
         ) -> Tensor:
    x = input
    if dim is not None and not isinstance(dim, (int, np.integer)):
        raise TypeError(f"prod(): argument 'dim' must be int, not {type(dim).__name__}{_where()}")
    target = np.dtype(dtype) if dtype is not None else (x.dtype if x.dtype.kind == "f" else int64)
    v = _val(x, target)
    if x.ndim == 0:
        return _wrap(emit("Identity", [v])[0])
    inputs = [v] if dim is None else [v, const(_norm_dims(x, dim), int64)]
    return _wrap(emit("ReduceProd", inputs, {"keepdims": int(bool(keepdim))})[0])


def _count_true(x: Tensor, dim: Any, keepdim: bool, negate: bool) -> Tensor:
    truth = x if x.dtype == np.bool_ else logical_not(eq(x, 0))
    if negate:
        truth = logical_not(truth)
    counts = sum(to(truth, int64), dim, keepdim=keepdim)
    return counts


def _logical_reduce(x: Tensor, dim: Any, keepdim: bool, every: bool) -> Tensor:
    # NOTE: ONNX has no ReduceAll/Any: counts of (non)zero elements, so empty reductions give
    # PyTorch's all() == True and any() == False.
    counts = _count_true(x, dim, keepdim, negate=every)
    out = eq(counts, 0) if every else logical_not(eq(counts, 0))
    return to(out, np.uint8) if x.dtype == np.uint8 else out  # torch keeps uint8


@op(og=True, method=True)
def all(input: Tensor, dim: Any = None, keepdim: bool = False) -> Tensor:
    return _logical_reduce(input, dim, keepdim, every=True)


@op(og=True, method=True)
def any(input: Tensor, dim: Any = None, keepdim: bool = False) -> Tensor:
    return _logical_reduce(input, dim, keepdim, every=False)


# --------------------------------------------------------------------------- tests
def _test(op_type: str, x: Tensor, fill: bool) -> Tensor:
    if x.dtype.kind != "f":  # integers are never nan or infinite
        data = np.full(x.shape, fill)
        return expand(_wrap(const(fill, np.bool_)), *x.shape) if x.ndim else \
            Tensor(Val(data))
    return _wrap(emit(op_type, [x._v], differentiable=False)[0])


@op(og=True, method=True)
def isnan(input: Tensor) -> Tensor:
    return _test("IsNaN", input, False)


@op(og=True, method=True)
def isinf(input: Tensor) -> Tensor:
    return _test("IsInf", input, False)


@op(og=True, method=True)
def isfinite(input: Tensor) -> Tensor:
    if input.dtype.kind != "f":
        return _test("", input, True)
    return logical_not(add(isnan(input), isinf(input)))


@op(og=True, method=True)
def isposinf(input: Tensor) -> Tensor:
    if input.dtype.kind != "f":
        return _test("", input, False)
    return _wrap(emit("IsInf", [input._v], {"detect_negative": 0}, differentiable=False)[0])


@op(og=True, method=True)
def isneginf(input: Tensor) -> Tensor:
    if input.dtype.kind != "f":
        return _test("", input, False)
    return _wrap(emit("IsInf", [input._v], {"detect_positive": 0}, differentiable=False)[0])


@op(og=True, method=True)
def nan_to_num(input: Tensor, nan: float = 0.0, posinf: float | None = None,
               neginf: float | None = None) -> Tensor:
    x = input
    if x.dtype.kind != "f":
        return _wrap(emit("Identity", [x._v], differentiable=False)[0])
    info = np.finfo(x.dtype)
    big = float(info.max) if posinf is None else posinf
    small = float(info.min) if neginf is None else neginf
    out = where(isnan(x), float(nan), x)
    out = where(isposinf(x), big, out)
    return where(isneginf(x), small, out)


@op(og=True, method=True)
def clamp_min(input: Tensor, min: Any) -> Tensor:
    return clamp(input, min=min)


@op(og=True, method=True)
def clamp_max(input: Tensor, max: Any) -> Tensor:
    return clamp(input, max=max)


def _same_dtype_close(a: Tensor, b: Tensor, name: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{name}: {_name(a.dtype)} did not match {_name(b.dtype)}: both tensors "
                        f"must have the same dtype{_where()}")


@op(og=True, method=True)
def isclose(input: Tensor, other: Tensor, rtol: float = 1e-05, atol: float = 1e-08,
            equal_nan: bool = False) -> Tensor:
    a, b = input, _tensor(other)
    _same_dtype_close(a, b, "isclose")
    if rtol < 0 or atol < 0:
        raise ValueError(f"isclose: rtol and atol must be non-negative, got rtol={rtol}, "
                         f"atol={atol}{_where()}")
    with state.no_grad():
        same = eq(a, b)  # equal infinities
        if a.dtype.kind != "f":
            a, b = to(a, get_default_dtype()), to(b, get_default_dtype())
        close = le(abs(sub(a, b)), add(mul(abs(b), float(rtol)), float(atol)))
        out = add(same, mul(close, isfinite(a)))
        if equal_nan:
            out = add(out, mul(isnan(a), isnan(b)))
    return out


@op(og=True, method=True)
def allclose(input: Tensor, other: Tensor, rtol: float = 1e-05, atol: float = 1e-08,
             equal_nan: bool = False) -> bool:
    _check_broadcast("allclose", input.shape, _tensor(other).shape)
    return bool(all(isclose(input, other, rtol, atol, equal_nan)).item())


@op(og=True, method=True)
def equal(input: Tensor, other: Tensor) -> bool:
    """True when both have the same shape and elements (dtypes promoted, as PyTorch)."""
    other = _tensor(other)
    if input.shape != other.shape:
        return False
    with state.no_grad():
        return bool(all(eq(input, other)).item())


# --------------------------------------------------------------------------- logical, bitwise
def _logical(op_type: str, a: Any, b: Any) -> Tensor:
    a, b = _tensor(a), _tensor(b)
    _check_broadcast(op_type.lower(), a.shape, b.shape)
    return _wrap(emit(op_type, [_val(a, np.dtype(np.bool_)), _val(b, np.dtype(np.bool_))], differentiable=False)[0])


@op(og=True, method=True)
def logical_and(input: Tensor, other: Any) -> Tensor:
    return _logical("And", input, other)


@op(og=True, method=True)
def logical_or(input: Tensor, other: Any) -> Tensor:
    return _logical("Or", input, other)


@op(og=True, method=True)
def logical_xor(input: Tensor, other: Any) -> Tensor:
    return _logical("Xor", input, other)


def _bitwise(name: str, op_type: str, a: Any, b: Any) -> Tensor:
    dtype = result_type(a, b)
    if dtype.kind not in "biu":
        kind = _name(dtype).capitalize()
        raise NotImplementedError(f'"{name}_cpu" not implemented for \'{kind}\'; bitwise '
                                  f"ops take bool or integer tensors{_where()}")
    a, b = _tensor(a), _tensor(b)
    _check_broadcast(name, a.shape, b.shape)
    onnx_op = op_type if dtype.kind == "b" else "Bitwise" + op_type  # BitwiseAnd: opset 18
    return _wrap(emit(onnx_op, [_val(a, dtype), _val(b, dtype)], differentiable=False)[0])


@op(og=True, method=("bitwise_and", "__and__"), reflected="__rand__")
def bitwise_and(input: Tensor, other: Any) -> Tensor:
    return _bitwise("bitwise_and", "And", input, other)


@op(og=True, method=("bitwise_or", "__or__"), reflected="__ror__")
def bitwise_or(input: Tensor, other: Any) -> Tensor:
    return _bitwise("bitwise_or", "Or", input, other)


@op(og=True, method=("bitwise_xor", "__xor__"), reflected="__rxor__")
def bitwise_xor(input: Tensor, other: Any) -> Tensor:
    return _bitwise("bitwise_xor", "Xor", input, other)


@op(og=True, method=("bitwise_not", "__invert__"))
def bitwise_not(input: Tensor) -> Tensor:
    """``~x``: logical not of bools, two's-complement not of integers (as PyTorch)."""
    if input.dtype.kind not in "biu":
        kind = _name(input.dtype).capitalize()
        raise NotImplementedError(f'"bitwise_not_cpu" not implemented for \'{kind}\'{_where()}')
    onnx_op = "Not" if input.dtype.kind == "b" else "BitwiseNot"
    return _wrap(emit(onnx_op, [input._v], differentiable=False)[0])


# --------------------------------------------------------------------------- in-place variants
for _fn, _names in (
    (floor, ("floor_",)), (ceil, ("ceil_",)), (round, ("round_",)), (trunc, ("trunc_", "fix_")),
    (frac, ("frac_",)), (sign, ("sign_",)), (reciprocal, ("reciprocal_",)),
    (square, ("square_",)), (rsqrt, ("rsqrt_",)), (tan, ("tan_",)), (atan, ("atan_",)),
    (log1p, ("log1p_",)), (expm1, ("expm1_",)), (fmod, ("fmod_",)),
    (remainder, ("remainder_", "__imod__")), (floor_divide, ("floor_divide_", "__ifloordiv__")),
    (clamp, ("clamp_", "clip_")), (clamp_min, ("clamp_min_",)), (clamp_max, ("clamp_max_",)),
    (nan_to_num, ("nan_to_num_",)), (bitwise_and, ("bitwise_and_", "__iand__")),
    (bitwise_or, ("bitwise_or_", "__ior__")), (bitwise_xor, ("bitwise_xor_", "__ixor__")),
    (logical_not, ("logical_not_",)), (bitwise_not, ("bitwise_not_",)),
):
    for _n in _names:
        _inplace(_fn, _n)

