"""The op table of the math ops (tracer/math_ops.py): forward against NumPy, float64 VJP against
central differences, ONNX Runtime against the reference evaluator (tests/opcheck.py)."""
from __future__ import annotations

import numpy as np
import pytest
from opcheck import OpCase, arg, case, fixed, index, pos, table_tests

import onnxgrad as og


def f32(fn):
    """A reference whose NumPy result is float64 where torch (and onnxgrad) give float32."""
    return lambda *a: np.asarray(fn(*a), dtype=np.float32)


def np_prod_dim(x, axis, keepdims=False):
    return np.prod(x, axis=axis, keepdims=keepdims)


# NOTE: ops that compute float64 in float32 (ONNX Runtime lacks the kernels) get a wider
# central-difference step and tolerance, as erf's rows in test_ops.py.
F32_INSIDE = {"eps": 1e-3, "grad_rtol": 1e-4}
ZEROS = np.array([[0.0, 2.0, 3.0], [0.0, 0.0, 2.0], [1.5, -2.0, 0.5]], dtype=np.float32)

CASES: list[OpCase] = [
    # ------------------------------------------------------------------ trigonometric
    case("tan", og.tan, np.tan, arg(2, 3, low=-1.2, high=1.2)),
    case("tan/method", lambda a: a.tan(), np.tan, arg(4, low=-1, high=1)),
    case("asin", og.asin, np.arcsin, arg(2, 3, low=-0.9, high=0.9), **F32_INSIDE),
    case("acos", lambda a: a.acos(), np.arccos, arg(2, 3, low=-0.9, high=0.9), **F32_INSIDE),
    case("atan", og.atan, np.arctan, (2, 3), **F32_INSIDE),
    case("arctan/alias", og.arctan, np.arctan, (3,), **F32_INSIDE),
    case("sinh", og.sinh, np.sinh, (2, 3), **F32_INSIDE),
    case("cosh", lambda a: a.cosh(), np.cosh, (2, 3), **F32_INSIDE),
    case("asinh", og.asinh, np.arcsinh, (2, 3), **F32_INSIDE),
    case("acosh", og.acosh, np.arccosh, arg(2, 3, low=1.2, high=3), **F32_INSIDE),
    case("atanh", og.atanh, np.arctanh, arg(2, 3, low=-0.9, high=0.9), **F32_INSIDE),
    case("tan/int", og.tan, f32(np.tan), index([0, 1, -1]), grad=False),
    case("atan2", og.atan2, np.arctan2, (3, 4), (3, 4), avoid=(0.0,), **F32_INSIDE),
    case("atan2/broadcast", lambda y, x: y.atan2(x), np.arctan2, (2, 3), (3,), avoid=(0.0,),
         **F32_INSIDE),
    case("atan2/x-zero", og.atan2, np.arctan2, (3,), fixed([0.0, 0.0, 0.0]), avoid=(0.0,),
         **F32_INSIDE),
    case("atan2/axes", og.atan2, np.arctan2, fixed([0.0, -0.0, 0.0, -0.0, 1.0, -1.0]),
         fixed([0.0, 0.0, -1.0, -1.0, 0.0, 0.0]), grad=False),
    # ------------------------------------------------------------------ exp and log
    case("log1p", og.log1p, np.log1p, arg(2, 3, low=-0.5, high=2)),
    case("log1p/tiny", og.log1p, np.log1p, fixed([1e-10, -3e-9, 1e-20, 0.0]), rtol=1e-6,
         grad=False),
    case("expm1", og.expm1, np.expm1, (2, 3)),
    case("expm1/tiny", lambda a: a.expm1(), np.expm1, fixed([1e-10, -3e-9, 1e-20, 0.0]),
         rtol=1e-6, grad=False),
    case("log2", og.log2, np.log2, pos(2, 3)),
    case("log10", lambda a: a.log10(), np.log10, pos(2, 3)),
    case("rsqrt", og.rsqrt, lambda a: 1 / np.sqrt(a), pos(2, 3)),
    case("reciprocal", lambda a: a.reciprocal(), lambda a: 1 / a, pos(2, 3)),
    case("reciprocal/int", og.reciprocal, f32(lambda a: 1 / a), index([1, 2, -4]), grad=False),
    case("square", og.square, np.square, (2, 3)),
    case("square/int", lambda a: a.square(), np.square, index([3, -2]), grad=False),
    # ------------------------------------------------------------------ rounding
    case("sign", og.sign, np.sign, (2, 3), avoid=(0.0,)),
    case("sign/int", og.sign, np.sign, index([3, 0, -2]), grad=False),
    case("floor", og.floor, np.floor, arg(2, 3, low=-3, high=3)),
    case("ceil", lambda a: a.ceil(), np.ceil, arg(2, 3, low=-3, high=3)),
    case("round", og.round, np.round, arg(2, 3, low=-3, high=3)),
    case("round/half-even", og.round, np.round, fixed([0.5, 1.5, 2.5, -0.5, -1.5]), grad=False),
    case("round/decimals", lambda a: og.round(a, decimals=2), lambda a: np.round(a, 2),
         fixed([1.2345, -2.5551, 0.125]), grad=False),
    case("round/neg-decimals", lambda a: a.round(decimals=-1), lambda a: np.round(a, -1),
         fixed([14.0, 25.0, 35.0, -26.0]), grad=False),
    case("trunc", og.trunc, np.trunc, arg(2, 3, low=-3, high=3)),
    case("fix/alias", og.fix, np.trunc, fixed([-1.5, -0.5, 0.5, 2.7]), grad=False),
    case("frac", og.frac, lambda a: a - np.trunc(a), arg(2, 3, low=-3, high=3),
         avoid=(-2.0, -1.0, 0.0, 1.0, 2.0)),
    case("floor/int", og.floor, lambda a: a, index([3, -2]), grad=False),
    # ------------------------------------------------------------------ remainders and division
    case("fmod", og.fmod, np.fmod, arg(2, 3, low=-5, high=5), pos(3),
         avoid=(-4.0, -2.0, 0.0, 2.0, 4.0)),
    case("fmod/neg-divisor", lambda a: a.fmod(-1.5), lambda a: np.fmod(a, np.float32(-1.5)),
         arg(2, 3, low=-5, high=5), avoid=(-4.5, -3.0, -1.5, 0.0, 1.5, 3.0, 4.5)),
    case("fmod/int", og.fmod, np.fmod, index([5, -5, 7]), index([3, 3, -2]), grad=False),
    case("remainder", og.remainder, np.remainder, arg(2, 3, low=-5, high=5), arg(3, low=0.5,
         high=2), avoid=(-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0), margin=0.1),
    case("remainder/neg-divisor", lambda a, b: a % b, np.remainder,
         arg(2, 3, low=-4, high=4), arg(3, low=-2, high=-0.7), distinct=True, vjp=False),
    case("mod/operator", lambda a: a % 1.5, lambda a: np.remainder(a, np.float32(1.5)),
         arg(2, 3, low=-4, high=4), avoid=(-3.0, -1.5, 0.0, 1.5, 3.0)),
    case("rmod/operator", lambda b: 5.0 % b, lambda b: np.remainder(np.float32(5), b),
         fixed([3.0, -3.0, 1.5, -2.0]), grad=False),
    case("remainder/int", lambda a, b: a % b, np.remainder, index([5, -5, 7, -7]),
         index([3, 3, -2, -2]), grad=False),
    case("floor_divide", lambda a, b: a // b, np.floor_divide, arg(2, 3, low=-5, high=5),
         fixed([1.5, -2.0, 0.7]), grad=False),
    case("floor_divide/int", og.floor_divide, np.floor_divide, index([5, -5, 7, -7, 6]),
         index([3, 3, -2, -2, -3]), grad=False),
    case("div/floor-int", lambda a, b: og.div(a, b, rounding_mode="floor"), np.floor_divide,
         index([5, -5, 7, -7]), index([3, 3, -2, -2]), grad=False),
    case("div/trunc-int", lambda a, b: a.div(b, rounding_mode="trunc"),
         lambda a, b: np.trunc(a / b).astype(np.int64), index([5, -5, 7, -7]),
         index([3, 3, -2, -2]), grad=False),
    case("div/trunc", lambda a, b: og.div(a, b, rounding_mode="trunc"),
         lambda a, b: np.trunc(a / b), fixed([5.0, -5.0, 7.5]), fixed([2.0, 2.0, -2.0]),
         grad=False),
    # ------------------------------------------------------------------ arithmetic functions
    case("og.add/alpha", lambda a, b: og.add(a, b, alpha=2), lambda a, b: a + 2 * b,
         (2, 3), (3,)),
    case("og.sub", lambda a, b: og.sub(a, b), np.subtract, (2, 3), (2, 3)),
    case("og.subtract", lambda a, b: og.subtract(a, b, alpha=0.5), lambda a, b: a - 0.5 * b,
         (2, 3), (2, 3)),
    case("og.mul", og.mul, np.multiply, (2, 3), (2, 1)),
    case("og.multiply", og.multiply, np.multiply, (3,), ()),
    case("og.div", og.div, np.divide, (2, 3), pos(3)),
    case("og.true_divide", og.true_divide, np.divide, (2, 3), pos(2, 3)),
    case("og.pow", og.pow, np.power, pos(2, 3), (3,)),
    # ------------------------------------------------------------------ linear algebra
    case("mm", og.mm, np.matmul, (2, 3), (3, 4)),
    case("mm/method", lambda a, b: a.mm(b), np.matmul, (3, 3), (3, 1)),
    case("bmm", og.bmm, np.matmul, (2, 2, 3), (2, 3, 4)),
    case("mv", og.mv, np.matmul, (2, 3), (3,)),
    case("dot", og.dot, np.dot, (4,), (4,)),
    case("dot/int", og.dot, np.dot, index([1, 2, 3]), index([4, 5, 6]), grad=False),
    case("outer", og.outer, np.outer, (3,), (4,)),
    case("ger/method", lambda a, b: a.ger(b), np.outer, (2,), (3,)),
    case("mm/int", og.mm, np.matmul, index([[1, 2], [3, 4]]), index([[1], [-1]]), grad=False),
    # ------------------------------------------------------------------ reductions
    case("var", og.var, lambda a: np.var(a, ddof=1), (3, 4)),
    case("var/dim", lambda a: a.var(1), lambda a: np.var(a, 1, ddof=1), (3, 4)),
    case("var/unbiased-false", lambda a: og.var(a, 0, unbiased=False, keepdim=True),
         lambda a: np.var(a, 0, keepdims=True), (3, 4)),
    case("var/correction", lambda a: og.var(a, (0, 2), correction=2),
         lambda a: np.var(a, (0, 2), ddof=2), (2, 3, 4)),
    case("var/positional-unbiased", lambda a: a.var(False), np.var, (5,)),
    case("std", lambda a: a.std(), lambda a: np.std(a, ddof=1), (3, 4)),
    case("std/dim-keepdim", lambda a: og.std(a, -1, keepdim=True),
         lambda a: np.std(a, -1, ddof=1, keepdims=True), (3, 4)),
    case("var_mean", lambda a: og.var_mean(a, 1), lambda a: (np.var(a, 1, ddof=1), a.mean(1)),
         (3, 4)),
    case("std_mean", lambda a: og.std_mean(a, correction=0),
         lambda a: (np.std(a), a.mean()), (3, 4)),
    case("prod", og.prod, np.prod, (2, 3)),
    case("prod/dim", lambda a: a.prod(1), lambda a: np.prod(a, 1), (3, 4)),
    case("prod/dim-keepdim", lambda a: og.prod(a, 0, keepdim=True),
         lambda a: np.prod(a, 0, keepdims=True), (3, 2)),
    case("prod/zeros-dim", lambda a: a.prod(1), lambda a: np.prod(a, 1), fixed(ZEROS)),
    case("prod/zeros-dim0", lambda a: a.prod(0), lambda a: np.prod(a, 0), fixed(ZEROS)),
    case("prod/one-zero", og.prod, np.prod, fixed([[1.5, 0.0], [2.0, -3.0]])),
    case("prod/two-zeros", og.prod, np.prod, fixed(ZEROS)),
    case("prod/int", og.prod, np.prod, index([[2, 3], [4, -1]]), grad=False),
    case("prod/bool", og.prod, lambda a: np.prod(a).astype(np.int64), fixed([True, True]),
         grad=False),
    case("prod/dtype", lambda a: a.prod(dtype=og.float64), lambda a: np.prod(a, dtype=np.float64),
         (2, 3)),
    case("mean/dtype", lambda a: og.mean(a, dtype=og.float64),
         lambda a: np.mean(a, dtype=np.float64), index([1, 2, 4]), grad=False),
    case("sum/dtype", lambda a: a.sum(0, dtype=og.float64), lambda a: a.sum(0, dtype=np.float64),
         (2, 3)),
    case("all", og.all, np.all, fixed([[1.0, 0.0], [2.0, 3.0]]), grad=False),
    case("all/dim", lambda a: a.all(1), lambda a: np.all(a, 1), fixed([[1.0, 0.0], [2.0, 3.0]]),
         grad=False),
    case("all/empty", og.all, np.all, fixed(np.zeros((0, 2))), grad=False),
    case("all/uint8", og.all, lambda a: np.asarray(np.all(a), np.uint8),
         fixed(np.array([1, 2], np.uint8)), grad=False),
    case("any", lambda a: a.any(), np.any, fixed([[0, 0], [0, 3]]), grad=False),
    case("any/dim-keepdim", lambda a: og.any(a, 0, keepdim=True),
         lambda a: np.any(a, 0, keepdims=True), fixed([[False, False], [False, True]]),
         grad=False),
    case("any/empty", og.any, np.any, fixed(np.zeros((2, 0))), grad=False),
    # ------------------------------------------------------------------ tests and comparisons
    case("isnan", og.isnan, np.isnan, fixed([1.0, np.nan, np.inf, -np.inf]), grad=False),
    case("isinf", lambda a: a.isinf(), np.isinf, fixed([1.0, np.nan, np.inf, -np.inf]),
         grad=False),
    case("isfinite", og.isfinite, np.isfinite, fixed([1.0, np.nan, np.inf, -np.inf]),
         grad=False),
    case("isfinite/int", og.isfinite, np.isfinite, index([1, 2]), grad=False),
    case("isnan/int", og.isnan, np.isnan, index([[1, 2]]), grad=False),
    case("nan_to_num", og.nan_to_num, np.nan_to_num, fixed([1.0, np.nan, np.inf, -np.inf]),
         grad=False),
    case("nan_to_num/values", lambda a: a.nan_to_num(2.0, posinf=9.0, neginf=-9.0),
         lambda a: np.nan_to_num(a, nan=2.0, posinf=9.0, neginf=-9.0),
         fixed([1.0, np.nan, np.inf, -np.inf]), grad=False),
    case("nan_to_num/grad", og.nan_to_num, np.nan_to_num, (2, 3)),
    case("clamp_min", og.clamp_min, np.maximum, (2, 3), (3,), distinct=True),
    case("clamp_min/scalar", lambda a: a.clamp_min(0.5), lambda a: np.maximum(a, 0.5), (2, 3),
         avoid=(0.5,)),
    case("clamp_max", lambda a: a.clamp_max(-0.5), lambda a: np.minimum(a, -0.5), (2, 3),
         avoid=(-0.5,)),
    case("isclose", lambda a, b: og.isclose(a, b, rtol=0.1), lambda a, b: np.isclose(a, b, 0.1),
         fixed([1.0, 1.0, np.inf, np.nan, 2.0]), fixed([1.05, 1.5, np.inf, np.nan, 2.0]),
         grad=False),
    case("isclose/equal_nan", lambda a, b: a.isclose(b, equal_nan=True),
         lambda a, b: np.isclose(a, b, equal_nan=True), fixed([np.nan, 1.0, -np.inf]),
         fixed([np.nan, 1.0, np.inf]), grad=False),
    # ------------------------------------------------------------------ logical and bitwise
    case("logical_and", og.logical_and, np.logical_and, fixed([1.0, 0.0, 2.0]),
         fixed([[0.0], [3.0]]), grad=False),
    case("logical_or", lambda a, b: a.logical_or(b), np.logical_or, fixed([True, False]),
         fixed([False, False]), grad=False),
    case("logical_xor", og.logical_xor, np.logical_xor, index([0, 1, 2]), index([1, 1, 0]),
         grad=False),
    case("logical_not", og.logical_not, np.logical_not, fixed([0.0, 1.5]), grad=False),
    case("bitwise_and/bool", lambda a, b: a & b, np.bitwise_and, fixed([True, False, True]),
         fixed([True, True, False]), grad=False),
    case("bitwise_and/int", og.bitwise_and, np.bitwise_and, index([6, 3, -1]), index([3]),
         grad=False),
    case("bitwise_or", lambda a, b: a | b, np.bitwise_or, index([6, 3, -8]), index([1, 4, 2]),
         grad=False),
    case("bitwise_xor/reflected", lambda a: 5 ^ a, lambda a: np.bitwise_xor(5, a),
         index([6, 3, 0]), grad=False),
    case("bitwise_not/int", lambda a: ~a, np.invert, index([5, 0, -3]), grad=False),
    case("bitwise_not/bool", og.bitwise_not, np.logical_not, fixed([True, False]), grad=False),
    # ------------------------------------------------------------------ in-place (non-leaf)
    case("floor_", lambda a: (a * 1).floor_(), np.floor, arg(2, 3, low=-3, high=3)),
    case("clamp_min_", lambda a: (a + 0).clamp_min_(0.0), lambda a: np.maximum(a, 0), (2, 3),
         avoid=(0.0,)),
    case("clamp_", lambda a: (a + 0).clamp_(-0.5, 0.5), lambda a: np.clip(a, -0.5, 0.5), (2, 3),
         avoid=(-0.5, 0.5)),
    case("imod", lambda a: _imod(a * 1, 1.5), lambda a: np.remainder(a, np.float32(1.5)),
         arg(2, 3, low=-4, high=4), avoid=(-3.0, -1.5, 0.0, 1.5, 3.0)),
    case("nan_to_num_", lambda a: (a * 1).nan_to_num_(), np.nan_to_num,
         fixed([1.0, np.nan, np.inf]), grad=False),
    case("pow_", lambda a: (a * 1).pow_(2), np.square, (2, 3)),
]


def _imod(a: og.Tensor, b: float) -> og.Tensor:
    a %= b
    return a


test_forward, test_vjp, test_runtimes, test_ids_are_unique = table_tests(CASES)


# --------------------------------------------------------------------------- whole-tensor tests
def test_allclose_and_equal_are_python_bools():
    a = og.tensor([1.0, 2.0, np.nan])
    assert og.allclose(a[:2], og.tensor([1.0, 2.0 + 1e-7])) is True
    assert og.allclose(a, a) is False
    assert a.allclose(a, equal_nan=True) is True
    assert og.equal(a[:2], og.tensor([1.0, 2.0])) is True
    assert og.equal(a[:2], og.tensor([1.0, 2.0, 3.0])) is False
    assert og.equal(og.tensor([1, 2]), og.tensor([1.0, 2.0])) is True


@pytest.mark.parametrize("call, error, fragment", [
    (lambda: og.mm(og.ones(3), og.ones(3, 2)), RuntimeError, "self must be a matrix"),
    (lambda: og.mm(og.ones(2, 3), og.ones(3)), RuntimeError, "mat2 must be a matrix"),
    (lambda: og.mm(og.ones(2, 3), og.ones(4, 2)), RuntimeError,
     "mat1 and mat2 shapes cannot be multiplied (2x3 and 4x2)"),
    (lambda: og.mm(og.ones(2, 3), og.ones(3, 2, dtype=og.float64)), RuntimeError, "same dtype"),
    (lambda: og.bmm(og.ones(2, 3), og.ones(2, 3, 4)), RuntimeError, "batch1 must be a 3D tensor"),
    (lambda: og.bmm(og.ones(2, 2, 3), og.ones(2, 4, 4)), RuntimeError,
     "Expected size for first two dimensions of batch2 tensor to be: [2, 3] but got: [2, 4]"),
    (lambda: og.mv(og.ones(2, 3), og.ones(4)), RuntimeError,
     "size mismatch, got input (2), mat (2x3), vec (4)"),
    (lambda: og.mv(og.ones(3), og.ones(3)), RuntimeError,
     "vector + matrix @ vector expected, got 1, 1, 1"),
    (lambda: og.dot(og.ones(2, 3), og.ones(3)), RuntimeError,
     "1D tensors expected, but got 2D and 1D tensors"),
    (lambda: og.dot(og.ones(3), og.ones(4)), RuntimeError, "inconsistent tensor size"),
    (lambda: og.dot(og.ones(3), og.ones(3, dtype=og.float64)), RuntimeError,
     "expected both vectors to have same dtype, but found Float and Double"),
    (lambda: og.outer(og.ones(3), og.ones(3, 1)), RuntimeError,
     "Expected 1-D argument vec2, but got 2-D"),
    (lambda: og.var(og.tensor([1, 2])), TypeError, "only support floating point"),
    (lambda: og.prod(og.ones(2, 2), (0, 1)), TypeError, "'dim' must be int"),
    (lambda: og.floor_divide(og.tensor([3]), og.tensor([0])), ZeroDivisionError, "by zero"),
    (lambda: og.tensor([3]) % 0, ZeroDivisionError, "by zero"),
    (lambda: og.div(og.ones(2), 2, rounding_mode="round"), ValueError, "rounding_mode"),
    (lambda: og.frac(og.tensor([1, 2])), TypeError, "frac"),
    (lambda: og.isclose(og.ones(2), og.ones(2, dtype=og.float64)), TypeError,
     "Float did not match Double"),
    (lambda: og.ones(2).requires_grad_().floor_(), RuntimeError, "leaf Variable"),
    (lambda: og.tensor([1, 2]).reciprocal_(), TypeError,
     "can't be cast"),
])
def test_bad_input(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)
    assert "ONNXRuntimeError" not in str(info.value)


# --------------------------------------------------------------------------- PyTorch parity
def _grads(fn, *arrays):
    ts = [og.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(og.ones_like(out) if hasattr(og, "ones_like") else og.ones(*out.shape))
    return out.detach().numpy(), [None if t.grad is None else t.grad.numpy() for t in ts]


def _torch_grads(torch, fn, *arrays):
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(torch.ones_like(out))
    return out.detach().numpy(), [None if t.grad is None else t.grad.numpy() for t in ts]


@pytest.mark.parametrize("name", [
    "floor", "ceil", "round", "trunc", "sign", "frac", "prod-zeros", "prod-all-zero",
    "atan2-axes", "log1p", "expm1", "std", "nan_to_num", "remainder", "fmod",
])
def test_matches_torch(name):
    torch = pytest.importorskip("torch")
    x = np.array([[-1.5, 0.0, 2.5], [0.3, -0.7, 0.0]], dtype=np.float32)
    y = np.array([[1.0, -1.0, 0.0], [-0.0, 2.0, -3.0]], dtype=np.float32)
    cases = {
        "floor": (lambda t, a: t.floor(a), (x,)),
        "ceil": (lambda t, a: t.ceil(a), (x,)),
        "round": (lambda t, a: t.round(a), (x,)),
        "trunc": (lambda t, a: t.trunc(a), (x,)),
        "sign": (lambda t, a: t.sign(a), (x,)),
        "frac": (lambda t, a: t.frac(a), (x,)),
        "prod-zeros": (lambda t, a: t.prod(a, 1), (x,)),
        "prod-all-zero": (lambda t, a: t.prod(a), (x,)),
        "atan2-axes": (lambda t, a, b: t.atan2(a, b), (y, x)),
        "log1p": (lambda t, a: t.log1p(a), (np.abs(x),)),
        "expm1": (lambda t, a: t.expm1(a), (x * 1e-4,)),
        "std": (lambda t, a: t.std(a, 1), (x,)),
        "nan_to_num": (lambda t, a: t.nan_to_num(a),
                       (np.array([np.nan, np.inf, -np.inf, 1.0], np.float32),)),
        "remainder": (lambda t, a, b: t.remainder(a, b), (x, np.float32(1.5) + 0 * x - 3 * y)),
        "fmod": (lambda t, a, b: t.fmod(a, b), (x, np.float32(1.5) + 0 * x - 3 * y)),
    }
    fn, arrays = cases[name]
    got, got_g = _grads(lambda *a: fn(og, *a), *arrays)
    want, want_g = _torch_grads(torch, lambda *a: fn(torch, *a), *arrays)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, equal_nan=True)


# --------------------------------------------------------------------------- compiled
def test_compiled_step_matches_eager():
    """The math ops trace into one graph (their no-gradient corrections too) whose values and
    gradients equal eager ones on new data, NaN-free or not."""
    rng = np.random.default_rng(0)
    w_data = rng.uniform(0.5, 2, 6).astype(np.float32)

    def make_step():
        w = og.tensor(w_data, requires_grad=True)

        def step(x):
            w.grad = None
            y = og.log1p(og.abs(x)) + og.expm1(x * 0.1) * og.atan2(x, w) - og.remainder(x, 1.5)
            z = og.mm(og.reshape(y, (2, 3)), og.reshape(w, (3, 2))).sum() + og.var(y) + og.prod(w)
            loss = z + og.amax(x * w) + (x * w).max() + og.clamp_min(x * w, 0.0).round().sum()
            loss.backward()
            return loss.detach(), w.grad

        return step

    eager, compiled = make_step(), og.compile(make_step())
    for k in range(3):
        x = rng.uniform(-3, 3, 6).astype(np.float32)
        if k == 2:
            x[1] = np.nan
        for e, g in zip(eager(og.tensor(x)), compiled(og.tensor(x))):
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-6,
                                       equal_nan=True)


# --------------------------------------------------------------------------- small arithmetic
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
def test_small_arithmetic_in_numpy_has_the_kernels_bits(monkeypatch, op: str, dtype) -> None:
    """Small float Add/Sub/Mul/Div run in NumPy (runtime/session.py): the same bits as ONNX
    Runtime's kernel, subnormals, infinities, NaN, signed zeros, division by zero and
    broadcasting included."""
    from onnxgrad.runtime import session

    info = np.finfo(dtype)
    special = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, info.tiny, info.tiny / 8,
                        -info.tiny / 3, info.max, -info.max, info.eps, 3.0, 1 / 3, 1e-30],
                       dtype=dtype)
    rng = np.random.default_rng(0)
    pairs = [(special[:, None], special[None, :]),  # every pair of special values
             (rng.standard_normal((4, 5)).astype(dtype), rng.standard_normal((5,)).astype(dtype)),
             (np.asarray(0.1, dtype), rng.standard_normal((3, 1, 2)).astype(dtype)),
             (rng.standard_normal((2, 3)).astype(dtype) * info.tiny, np.asarray(0.7, dtype))]
    for a, b in pairs:
        fast = session.run_node(op, {}, (), [a, b])[0]
        with monkeypatch.context() as m:
            m.setattr(session, "NUMPY_ARITHMETIC_MAX", 0)
            kernel = session.run_node(op, {}, (), [a, b])[0]
        assert fast.dtype == kernel.dtype and fast.shape == kernel.shape
        assert fast.flags.c_contiguous
        np.testing.assert_array_equal(fast.view(f"u{fast.itemsize}"),
                                      kernel.view(f"u{kernel.itemsize}"))
