"""Property-based tests against PyTorch: random shapes, dims and index expressions.

Each property draws a case with ``hypothesis`` (shapes, broadcasting, dims, keepdim, view
chains, index expressions), computes it with onnxgrad and with PyTorch from the same data, and
compares the forward result and the gradients of a random weighting of the output, in float32
and float64. Examples per property are kept to CI time (``ONNXGRAD_HYPOTHESIS_EXAMPLES``).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
torch = pytest.importorskip("torch")
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxgrad as og

EXAMPLES = int(os.environ.get("ONNXGRAD_HYPOTHESIS_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
DTYPES = [np.float32, np.float64]
TOL = {np.float32: {"rtol": 2e-5, "atol": 2e-5}, np.float64: {"rtol": 1e-10, "atol": 1e-12}}

dims = st.integers(1, 4)
shapes = st.lists(dims, min_size=0, max_size=4).map(tuple)


def _compare(fn_og: Callable[..., Any], fn_torch: Callable[..., Any], arrays: list[np.ndarray],
             dtype: Any, seed: int = 0) -> None:
    """Forward values and the gradients of ``sum(out * w)`` for a random ``w``, both libraries."""
    xs = [og.tensor(a, requires_grad=True) for a in arrays]
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    out, ref = fn_og(*xs), fn_torch(*ts)
    assert tuple(out.shape) == tuple(ref.shape)
    tol = TOL[dtype]
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), **tol)
    if not ref.requires_grad or ref.numel() == 0:
        return
    w = np.random.default_rng(seed).standard_normal(tuple(ref.shape)).astype(dtype)
    (out * og.tensor(w)).sum().backward()
    (ref * torch.tensor(w)).sum().backward()
    for x, t in zip(xs, ts):
        want = np.zeros_like(t.detach().numpy()) if t.grad is None else t.grad.numpy()
        got = np.zeros_like(want) if x.grad is None else x.grad.numpy()
        np.testing.assert_allclose(got, want, **tol)


def _data(shape: tuple[int, ...], dtype: Any, seed: int, positive: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(dtype)
    return np.abs(a) + 0.5 if positive else a


@st.composite
def broadcast_pair(draw: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out = draw(st.lists(dims, min_size=0, max_size=4))
    def side() -> tuple[int, ...]:
        keep = draw(st.integers(0, len(out)))
        tail = out[len(out) - keep:]
        return tuple(1 if draw(st.booleans()) else d for d in tail)
    return side(), side()


BINARY = {
    "add": (lambda a, b: a + b, lambda a, b: a + b),
    "sub": (lambda a, b: a - b, lambda a, b: a - b),
    "mul": (lambda a, b: a * b, lambda a, b: a * b),
    "div": (lambda a, b: a / b, lambda a, b: a / b),
    "pow": (lambda a, b: a ** b, lambda a, b: a ** b),
    "maximum": (og.maximum, torch.maximum),
    "minimum": (og.minimum, torch.minimum),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("op", sorted(BINARY))
@SETTINGS
@given(shapes=broadcast_pair(), seed=st.integers(0, 2**16))
def test_broadcasting_binary_ops(op: str, dtype: Any, shapes: Any, seed: int) -> None:
    positive = op in ("div", "pow")
    a = _data(shapes[0], dtype, seed, positive)
    b = _data(shapes[1], dtype, seed + 1, positive)
    _compare(*BINARY[op], [a, b], dtype, seed)


REDUCTIONS = {
    "sum": (lambda x, d, k: x.sum(dim=d, keepdim=k), lambda x, d, k: x.sum(dim=d, keepdim=k)),
    "mean": (lambda x, d, k: x.mean(dim=d, keepdim=k), lambda x, d, k: x.mean(dim=d, keepdim=k)),
    "amax": (lambda x, d, k: x.amax(dim=d, keepdim=k), lambda x, d, k: x.amax(dim=d, keepdim=k)),
    "amin": (lambda x, d, k: x.amin(dim=d, keepdim=k), lambda x, d, k: x.amin(dim=d, keepdim=k)),
    "logsumexp": (lambda x, d, k: og.logsumexp(x, dim=d, keepdim=k),
                  lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k)),
}


@st.composite
def reduction_case(draw: Any) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    shape = tuple(draw(st.lists(dims, min_size=1, max_size=4)))
    axes = draw(st.lists(st.integers(-len(shape), len(shape) - 1), min_size=1, max_size=len(shape),
                         unique_by=lambda a: a % len(shape)))
    return shape, tuple(axes), draw(st.booleans())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("op", sorted(REDUCTIONS))
@SETTINGS
@given(case=reduction_case(), seed=st.integers(0, 2**16))
def test_reductions_over_random_dims(op: str, dtype: Any, case: Any, seed: int) -> None:
    shape, axes, keepdim = case
    fo, ft = REDUCTIONS[op]
    if op == "logsumexp" and len(axes) > 1:
        axes = axes[:1]
    _compare(lambda x: fo(x, axes, keepdim), lambda x: ft(x, axes, keepdim),
             [_data(shape, dtype, seed)], dtype, seed)


@st.composite
def view_chain(draw: Any) -> tuple[tuple[int, ...], list[tuple[str, Any]]]:
    shape = list(draw(st.lists(dims, min_size=1, max_size=4)))
    start = tuple(shape)
    steps: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["reshape", "permute", "transpose", "unsqueeze", "squeeze",
                                     "flatten"]))
        n = len(shape)
        if kind == "reshape":
            total = int(np.prod(shape))
            divisors = [d for d in range(1, total + 1) if total % d == 0]
            first = draw(st.sampled_from(divisors))
            new = [first, -1]
            shape = [first, total // first]
            steps.append((kind, tuple(new)))
        elif kind == "permute":
            perm = draw(st.permutations(range(n)))
            shape = [shape[p] for p in perm]
            steps.append((kind, tuple(perm)))
        elif kind == "transpose" and n >= 2:
            a, b = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
            shape[a], shape[b] = shape[b], shape[a]
            steps.append((kind, (a, b)))
        elif kind == "unsqueeze" and n < 5:
            d = draw(st.integers(-n - 1, n))
            shape.insert(d if d >= 0 else n + 1 + d, 1)
            steps.append((kind, d))
        elif kind == "squeeze":
            d = draw(st.integers(-n, n - 1))
            if shape[d] == 1 and n > 1:
                shape.pop(d)
            steps.append((kind, d))
        elif kind == "flatten" and n >= 2:
            a = draw(st.integers(0, n - 2))
            b = draw(st.integers(a, n - 1))
            shape = shape[:a] + [int(np.prod(shape[a:b + 1]))] + shape[b + 1:]
            steps.append((kind, (a, b)))
    return start, steps


def _apply(x: Any, steps: list[tuple[str, Any]]) -> Any:
    for kind, arg in steps:
        if kind in ("reshape", "permute") or kind in ("transpose", "flatten"):
            x = getattr(x, kind)(*arg)
        else:
            x = getattr(x, kind)(arg)
    return x * 1.5


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@SETTINGS
@given(case=view_chain(), seed=st.integers(0, 2**16))
def test_view_chains(dtype: Any, case: Any, seed: int) -> None:
    shape, steps = case
    _compare(lambda x: _apply(x, steps), lambda x: _apply(x, steps),
             [_data(shape, dtype, seed)], dtype, seed)


@st.composite
def basic_index(draw: Any) -> tuple[tuple[int, ...], tuple[Any, ...]]:
    shape = tuple(draw(st.lists(dims, min_size=1, max_size=4)))
    index: list[Any] = []
    used_ellipsis = False
    for d in shape:
        kind = draw(st.sampled_from(["int", "slice", "full", "none", "ellipsis"]))
        if kind == "int":
            index.append(draw(st.integers(-d, d - 1)))
        elif kind == "slice":
            start = draw(st.none() | st.integers(-d - 1, d + 1))
            stop = draw(st.none() | st.integers(-d - 1, d + 1))
            step = draw(st.none() | st.integers(1, 3))
            index.append(slice(start, stop, step))
        elif kind == "none":
            index += [None, slice(None)]
        elif kind == "ellipsis" and not used_ellipsis:
            used_ellipsis = True
            index.append(Ellipsis)
            break
        else:
            index.append(slice(None))
    return shape, tuple(index)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@SETTINGS
@given(case=basic_index(), seed=st.integers(0, 2**16))
def test_basic_indexing(dtype: Any, case: Any, seed: int) -> None:
    shape, index = case
    _compare(lambda x: x[index] * 2.0, lambda x: x[index] * 2.0,
             [_data(shape, dtype, seed)], dtype, seed)


@st.composite
def integer_array_index(draw: Any) -> tuple[tuple[int, ...], int, np.ndarray]:
    shape = tuple(draw(st.lists(dims, min_size=1, max_size=3)))
    axis = draw(st.integers(0, len(shape) - 1))
    n = draw(st.integers(1, 5))
    idx = np.array(draw(st.lists(st.integers(-shape[axis], shape[axis] - 1), min_size=n,
                                 max_size=n)))
    return shape, axis, idx


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@SETTINGS
@given(case=integer_array_index(), seed=st.integers(0, 2**16))
def test_integer_array_indexing_repeats_accumulate(dtype: Any, case: Any, seed: int) -> None:
    shape, axis, idx = case
    index = (slice(None),) * axis + (idx,)
    _compare(lambda x: x[index], lambda x: x[(slice(None),) * axis + (torch.tensor(idx),)],
             [_data(shape, dtype, seed)], dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=4).map(tuple), data=st.data(),
       seed=st.integers(0, 2**16))
def test_softmax_and_log_softmax(dtype: Any, log: bool, shape: Any, data: Any, seed: int) -> None:
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    name = "log_softmax" if log else "softmax"
    _compare(lambda x: getattr(og.nn.functional, name)(x, dim=dim),
             lambda x: getattr(torch.nn.functional, name)(x, dim=dim),
             [_data(shape, dtype, seed) * 3], dtype, seed)


@st.composite
def matmul_shapes(draw: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    m, k, n = draw(dims), draw(dims), draw(dims)
    batch = draw(st.lists(dims, min_size=0, max_size=2))
    a_batch = [1 if draw(st.booleans()) else d for d in batch]
    b_batch = [1 if draw(st.booleans()) else d for d in batch]
    a = (k,) if draw(st.integers(0, 4)) == 0 else (*a_batch, m, k)
    b = (k,) if draw(st.integers(0, 4)) == 0 else (*b_batch[len(b_batch) - draw(
        st.integers(0, len(b_batch))):], k, n)
    return a, b


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@SETTINGS
@given(shapes=matmul_shapes(), seed=st.integers(0, 2**16))
def test_matmul_shapes(dtype: Any, shapes: Any, seed: int) -> None:
    a, b = shapes
    _compare(lambda x, y: x @ y, lambda x, y: x @ y,
             [_data(a, dtype, seed), _data(b, dtype, seed + 1)], dtype, seed)


def test_squeeze_of_a_0d_tensor_is_a_no_op_as_in_pytorch() -> None:
    # found by test_view_chains: x.squeeze(0) of a 0-d tensor raised IndexError
    x = og.ones(1).squeeze(0)
    assert tuple(x.squeeze(0).shape) == tuple(x.squeeze(-1).shape) == ()
    with pytest.raises(IndexError, match="out of range"):
        x.squeeze(1)


@SETTINGS
@given(shape=st.lists(st.integers(0, 14), min_size=0, max_size=3).map(tuple),
       scale=st.integers(-6, 9), kind=st.sampled_from(["float", "integral", "int", "bool",
                                                       "special", "float64"]),
       seed=st.integers(0, 2**16))
def test_printing_matches_pytorch(shape: Any, scale: int, kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape) * 10.0**scale
    if kind == "integral":
        a = np.round(a)
    elif kind == "int":
        a = np.round(a).clip(-1e12, 1e12).astype(np.int64)
    elif kind == "bool":
        a = a > 0
    elif kind == "special" and a.size:
        a.ravel()[rng.integers(0, a.size, 2)] = [np.nan, np.inf]
    a = a.astype(np.float64 if kind == "float64" else a.dtype if a.dtype.kind in "bi"
                 else np.float32)
    assert _unwrapped(repr(og.tensor(a))) == _unwrapped(repr(torch.tensor(a)))


def _unwrapped(text: str) -> str:
    """The repr with the library's name normalised, and suffixes joined to their line:
    ``onnxgrad.float64`` is 3 characters longer than ``torch.float64``, so the same rule may
    put the suffix on the next line in one library and not in the other."""
    return re.sub(r",\n *(dtype=|size=|grad_fn=|requires_grad=)", r", \1",
                  text.replace("onnxgrad.", "torch."))


def test_printing_summarizes_large_tensors_as_pytorch() -> None:
    rng = np.random.default_rng(0)
    for a in (np.arange(2000, dtype=np.float32) * 1e-3, rng.standard_normal((40, 50)),
              rng.integers(0, 100, (3, 400, 2))):
        assert _unwrapped(repr(og.tensor(a))) == _unwrapped(repr(torch.tensor(a)))
