"""Item and slice assignment, boolean masks and integer arrays: eager, compiled, gradients, errors.

The op table (``tests/test_ops_index.py``) checks each index kind against NumPy and central
differences; here: PyTorch parity of values and gradients (``importorskip``), compiled == eager,
PyTorch's error messages, imported ONNX files using the indexing rules, and property tests that
draw random index expressions (``hypothesis``).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxgrad.runtime import OPSET
from onnxgrad.tracer.index_ops import IndexShapeError

import onnxgrad as og
from onnxgrad import nn
from onnxgrad.nn import functional as F

RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 3))


def _torch():
    return pytest.importorskip("torch")


def _to_torch(index: Any, torch: Any) -> Any:
    if isinstance(index, tuple):
        return tuple(_to_torch(i, torch) for i in index)
    if isinstance(index, np.ndarray):
        return torch.from_numpy(index)
    return index


def _to_og(index: Any) -> Any:
    if isinstance(index, tuple):
        return tuple(_to_og(i) for i in index)
    if isinstance(index, np.ndarray):
        return og.tensor(index)
    return index


# --------------------------------------------------------------------------- boolean masks
@pytest.mark.parametrize("kind", ["tensor", "list", "numpy"])
def test_boolean_masks_select_rows_not_indices(kind: str) -> None:
    """Issue 13: a list or NumPy array of bools gathered rows 1, 0, 1 instead of masking."""
    mask = [True, False, True]
    index = {"tensor": og.tensor(mask), "list": mask, "numpy": np.array(mask)}[kind]
    x = og.tensor(X[:3], requires_grad=True)
    y = x[index]
    np.testing.assert_array_equal(y.detach().numpy(), X[:3][np.array(mask)])
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.array([[1.0] * 3, [0.0] * 3, [1.0] * 3]))


def test_mask_of_the_wrong_shape_is_pytorchs_index_error() -> None:
    x = og.tensor(np.zeros(4))
    with pytest.raises(IndexError, match=r"^The shape of the mask \[3\] at index 0 does not match "
                                         r"the shape of the indexed tensor \[4\] at index 0"):
        x[og.tensor([True, False, True])]
    with pytest.raises(IndexError, match=r"The shape of the mask \[4, 2\] at index 1 does not "
                                         r"match the shape of the indexed tensor \[4, 3\] at "
                                         r"index 1"):
        og.tensor(X)[np.ones((4, 2), bool)]


def test_uint8_masks_are_masks_with_pytorchs_warning() -> None:
    x = og.tensor(X)
    with pytest.warns(UserWarning, match="indexing with dtype torch.uint8 is now deprecated"):
        y = x[og.tensor(np.array([1, 0, 0, 1], np.uint8))]
    np.testing.assert_array_equal(y.numpy(), X[[0, 3]])


@pytest.mark.parametrize("index", [
    np.array([True, False, True, True]),
    (slice(None), np.array([False, True, True])),
    np.array([[True, False, True], [False, False, False], [True, True, True], [False, True, False]]),
    (np.array([True, False, True, True]), np.array([2, 0, 1])),
    (Ellipsis, np.array([True, False, True]), None),
])
def test_mask_indexing_values_and_gradients_match_pytorch(index: Any) -> None:
    torch = _torch()
    u = RNG.standard_normal(X[index].shape)
    x = og.tensor(X, requires_grad=True)
    y = x[_to_og(index)]
    y.backward(og.tensor(u))
    tx = torch.tensor(X, requires_grad=True)
    ty = tx[_to_torch(index, torch)]
    ty.backward(torch.tensor(u))
    np.testing.assert_array_equal(y.detach().numpy(), ty.detach().numpy())
    np.testing.assert_array_equal(x.grad.numpy(), tx.grad.numpy())


# --------------------------------------------------------------------------- integer arrays
@pytest.mark.parametrize("shape,index", [
    ((4, 3), (np.array([1, 1, 2, 1]),)),                          # repeated: gradients add up
    ((4, 3), (np.array([1, 1, 2]), np.array([0, 2, 2]))),
    ((4, 3), (np.array([[3], [3]]), np.array([1, 1, -1]))),        # broadcast, repeated pairs
    ((2, 4, 3), (slice(None), np.array([1, 3]), np.array([0, 2]))),
    ((4, 2, 3), (np.array([1, 3, 3]), slice(None), np.array([0, 2, -3]))),
    ((4, 2, 3), (np.array([1, 3]), 0, np.array([0, 2]))),            # ints first: adjacent
    ((4, 2, 3), (np.array([1, 3]), None, np.array([0, 1]))),
    ((2, 3, 4), (None, np.array([[0], [1]]), Ellipsis, np.array([3, 0, 3]))),
    ((3, 4, 3), (slice(None, None, 2), np.array([[3, 0], [1, 1]]), slice(1, None))),
    ((4, 3), (np.int64(2), slice(1, None))),
])
def test_integer_array_indexing_matches_pytorch(shape: tuple, index: Any) -> None:
    """Issue 13: gradients of integer-array indexing have the input's shape, repeats add up."""
    torch = _torch()
    data = RNG.standard_normal(shape)
    tx = torch.tensor(data, requires_grad=True)
    ty = tx[_to_torch(index, torch)]
    u = RNG.standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(u))
    x = og.tensor(data, requires_grad=True)
    y = x[_to_og(index)]
    y.backward(og.tensor(u))
    assert y.shape == tuple(ty.shape)
    np.testing.assert_array_equal(y.detach().numpy(), ty.detach().numpy())
    assert x.grad.shape == shape
    np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_zero_d_integer_tensor_selects_like_an_int() -> None:
    """PyTorch: a 0-d integer tensor is a select, so the other array's dims stay in place."""
    x = og.tensor(RNG.standard_normal((4, 2, 3)))
    y = x[og.tensor(2), :, og.tensor([0, 2, 2])]
    assert y.shape == (2, 3)  # NumPy would give (3, 2)
    np.testing.assert_array_equal(y.numpy(), x.numpy()[2][:, [0, 2, 2]])


# --------------------------------------------------------------------------- setitem
SETITEM = [
    ((slice(None), 1), ()),
    ((slice(None), 1), None),                    # a Python scalar
    ((slice(None), 1), (1, 4)),                  # leading ones are dropped, as PyTorch
    (0, (3,)),
    ((slice(1, None, 2),), (2, 1)),
    ((None, Ellipsis, 0), (4,)),
    ((np.array([0, 2]),), (2, 3)),
    ((np.array([0, 2]), np.array([1, 1])), (2,)),
    ((Ellipsis, np.array([0, 2])), (4, 1)),
    ((np.array([True, False, True, True]),), None),
    ((np.array([True, False, True, True]),), (3,)),
    ((np.array([True, False, True, True]),), (3, 3)),
    ((np.array([True, False, True, True]),), (3, 1)),
    ((slice(None), np.array([True, False, True])), (1,)),
    ((X > 0,), ()),
    ((X > 0,), (int((X > 0).sum()),)),
]


@pytest.mark.parametrize("index,value_shape", SETITEM)
def test_setitem_values_and_gradients_match_pytorch(index: Any, value_shape: Any) -> None:
    torch = _torch()
    v = RNG.standard_normal(value_shape) if value_shape is not None else None
    weights = RNG.standard_normal(X.shape)

    def run(lib: Any, tensor: Any, idx: Any) -> tuple[np.ndarray, ...]:
        x = tensor(X, requires_grad=True)
        value = tensor(v, requires_grad=True) if v is not None else 0.25
        b = x * 1.0
        b[idx] = value
        (b * tensor(weights)).sum().backward()
        grads = (x.grad.numpy(),) + ((value.grad.numpy(),) if v is not None else ())
        return (b.detach().numpy(),) + grads

    got = run(og, og.tensor, _to_og(index))
    want = run(torch, torch.tensor, _to_torch(index, torch))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_setitem_with_repeated_indices_gives_each_value_the_gradient_as_pytorch() -> None:
    torch = _torch()
    i = np.array([1, 1, 3])
    v = np.array([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])
    t = torch.zeros(4, 3, dtype=torch.float64)
    tv = torch.tensor(v, requires_grad=True)
    t[torch.from_numpy(i)] = tv
    (t * torch.arange(12.0).reshape(4, 3)).sum().backward()
    x = og.zeros(4, 3, dtype=og.float64)
    ov = og.tensor(v, requires_grad=True)
    x[og.tensor(i)] = ov
    (x * og.tensor(np.arange(12.0).reshape(4, 3))).sum().backward()
    np.testing.assert_array_equal(ov.grad.numpy(), tv.grad.numpy())


def test_setitem_casts_scalars_and_basic_values_to_the_tensor_dtype() -> None:
    x = og.zeros(4, dtype=og.int64)
    x[0] = 2.7              # truncated, as PyTorch
    x[1:3] = og.tensor([5.9, -1.2])
    np.testing.assert_array_equal(x.numpy(), [2, 5, -1, 0])
    assert x.dtype == og.int64


def test_setitem_on_a_leaf_that_requires_grad_is_refused_outside_no_grad() -> None:
    w = og.tensor(np.zeros((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"^a view of a leaf Variable that requires grad is "
                                           r"being used in an in-place operation\."):
        w[0] = 1.0
    with pytest.raises(RuntimeError, match=r"^a leaf Variable that requires grad is being used "
                                           r"in an in-place operation\."):
        w[[0]] = 1.0
    with og.no_grad():
        w[0, 1] = 5.0       # an initialization: the leaf stays a leaf
    assert w.is_leaf and w.requires_grad
    np.testing.assert_array_equal(w.detach().numpy(), [[0, 5, 0], [0, 0, 0]])


def test_setitem_makes_a_plain_tensor_part_of_the_graph() -> None:
    x = og.zeros(3)
    v = og.tensor(2.0, requires_grad=True)
    x[1] = v
    assert not x.is_leaf and x.requires_grad
    (x * og.tensor([1.0, 3.0, 5.0])).sum().backward()
    assert v.grad.item() == 3.0


def test_setitem_through_data_changes_the_tensor() -> None:
    w = og.tensor(np.zeros(3), requires_grad=True)
    w.data[1] = 4.0
    np.testing.assert_array_equal(w.detach().numpy(), [0, 4, 0])


# --------------------------------------------------------------------------- compiled == eager
def test_setitem_and_masks_in_a_compiled_step_match_eager() -> None:
    def make():
        w = og.tensor(np.arange(12, dtype=np.float32).reshape(4, 3) / 7, requires_grad=True)
        return w, og.optim.SGD([w], lr=0.1)

    def step(w, opt, x, i, m, v):
        opt.zero_grad()
        h = w * x
        h[:, 1] = 0.0                   # basic index, scalar
        h[i] = h[i] * 2 + v             # integer array read and written
        h[m] = -1.0                     # mask, scalar: a Where
        h[..., 2] = h[..., 0].flip(0)   # ellipsis, tensor value
        loss = (h ** 2).sum() + h.masked_fill(m, 3.0).cumsum(0).sum()
        loss.backward()
        opt.step()
        return loss, h

    w_e, opt_e = make()
    w_c, opt_c = make()
    compiled = og.compile(lambda x, i, m, v: step(w_c, opt_c, x, i, m, v))
    x = og.tensor(RNG.standard_normal((4, 3)).astype(np.float32))
    v = og.tensor(RNG.standard_normal(3).astype(np.float32))
    for k in range(3):
        i = og.tensor([k % 4, 2])
        m = og.tensor(np.arange(12).reshape(4, 3) % (k + 2) == 0)
        want = step(w_e, opt_e, x, i, m, v)
        got = compiled(x, i, m, v)
        for g, e in zip(got, want):
            np.testing.assert_array_equal(g.detach().numpy(), e.detach().numpy())
    np.testing.assert_array_equal(w_c.detach().numpy(), w_e.detach().numpy())
    assert compiled.traces == 1


def test_advanced_indexing_in_a_compiled_step_reads_new_indices() -> None:
    w = og.tensor(RNG.standard_normal((5, 3)).astype(np.float32), requires_grad=True)
    f = og.compile(lambda i, j: w[i, j].sum() + w[:, j].index_select(0, i).sum())
    for i, j in (([0, 4, 4], [1, 2, 0]), ([3, 3, 3], [0, 0, 2])):
        got = f(og.tensor(i), og.tensor(j)).item()
        want = (w[og.tensor(i), og.tensor(j)].sum() + w[:, og.tensor(j)][og.tensor(i)].sum())
        assert got == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("fn,what", [
    (lambda x, m: x[m].sum(), "Boolean-mask indexing"),
    (lambda x, m: og.masked_select(x, m).sum(), "Boolean-mask indexing"),
    (lambda x, m: og.nonzero(m).sum(), "nonzero()"),
    (lambda x, m: F.one_hot(m.long()).sum(), "one_hot() without num_classes"),
])
def test_data_dependent_shapes_in_a_compiled_function_name_the_line(fn: Any, what: str) -> None:
    f = og.compile(fn)
    with pytest.raises(og.TraceError, match=re.escape(what) + r".*test_indexing\.py:\d+"):
        f(og.tensor(X), og.tensor(X > 0))


def test_mask_assignment_of_a_broadcast_value_compiles() -> None:
    def f(x, m, v):
        y = x * 1.0
        y[m] = v
        return y

    compiled = og.compile(f)
    x, v = og.tensor(X), og.tensor(np.array([1.0, 2.0, 3.0]))
    for m in (X > 0, X < 0.5):
        np.testing.assert_array_equal(compiled(x, og.tensor(m[:, 0]), v).numpy(),
                                      f(x, og.tensor(m[:, 0]), v).numpy())


# --------------------------------------------------------------------------- repeated indices
# Sizes at which ONNX Runtime's CPU ScatterND(reduction="add") of slices, on 2 threads, lost or
# reordered additions (20 runs of the embedding case: 20 different results, up to 5.4 off).
def _added_at(base: tuple | np.ndarray, where: Any, values: np.ndarray) -> np.ndarray:
    """``values`` added one at a time into ``base`` (or zeros of that shape) at ``where``."""
    out = np.zeros(base, values.dtype) if isinstance(base, tuple) else base.copy()
    np.add.at(out, where, values)
    return out


def test_an_embeddings_gradient_adds_repeated_tokens_in_order() -> None:
    rng = np.random.default_rng(0)
    weight = og.tensor(rng.standard_normal((512, 256)).astype(np.float32), requires_grad=True)
    tokens = rng.integers(0, 64, (8, 128))  # 1,024 lookups of 64 rows
    seed = rng.standard_normal((8, 128, 256)).astype(np.float32)
    want = _added_at((512, 256), tokens.reshape(-1), seed.reshape(-1, 256))
    for _ in range(3):
        weight.grad = None
        (F.embedding(og.tensor(tokens), weight) * og.tensor(seed)).sum().backward()
        assert np.array_equal(weight.grad.numpy(), want)


def test_a_gathered_pairs_gradient_adds_repeated_pairs_in_order() -> None:
    rng = np.random.default_rng(1)
    x = og.tensor(rng.standard_normal((64, 32, 256)).astype(np.float32), requires_grad=True)
    rows, cols = rng.integers(-64, 64, 4096), rng.integers(0, 32, 4096)
    seed = rng.standard_normal((4096, 256)).astype(np.float32)
    want = _added_at((64, 32, 256), (rows, cols), seed)
    for _ in range(3):
        x.grad = None
        (x[og.tensor(rows), og.tensor(cols)] * og.tensor(seed)).sum().backward()
        assert np.array_equal(x.grad.numpy(), want)


@pytest.mark.parametrize("dim", [0, 1])
def test_index_add_adds_repeated_indices_in_order(dim: int) -> None:
    rng = np.random.default_rng(2)
    index = rng.integers(-64, 64, 2048)
    source = rng.standard_normal((2048, 512)).astype(np.float32)
    base = rng.standard_normal((64, 512)).astype(np.float32)
    want = _added_at(base, index, source)
    if dim == 1:
        source, base, want = (np.ascontiguousarray(a.T) for a in (source, base, want))
    for _ in range(3):
        got = og.tensor(base).index_add(dim, og.tensor(index), og.tensor(source))
        assert np.array_equal(got.numpy(), want)


# --------------------------------------------------------------------------- errors
def _set(x: og.Tensor, index: Any, value: Any) -> None:
    x[index] = value


ERRORS = [
    (lambda: _set(og.zeros(4, 3), (slice(None), 1), og.ones(2)), RuntimeError,
     (r"The expanded size of the tensor \(4\) must match the existing size \(2\) at non-singleton "
     r"dimension 0.  Target sizes: \[4\].  Tensor sizes: \[2\]")),
    (lambda: _set(og.zeros(4, 3), [0, 1], og.ones(3, 3)), RuntimeError,
     (r"shape mismatch: value tensor of shape \[3, 3\] cannot be broadcast to indexing result of "
     r"shape \[2, 3\]")),
    (lambda: _set(og.zeros(4, 3), og.tensor([True, False, True, True]), og.ones(2)), ValueError,
     (r"shape mismatch: value tensor of shape \[2\] cannot be broadcast to indexing result of "
     r"shape \[3, 3\]")),
    (lambda: _set(og.zeros(4, 3), [0, 1], og.ones(2, 3, dtype=og.float64)), RuntimeError,
     (r"Index put requires the source and destination dtypes match, got Float for the "
     r"destination and Double for the source")),
    (lambda: og.zeros(4, 3)[[0, 1], [0, 1, 2]], IndexError,
     r"shape mismatch: indexing tensors could not be broadcast together with shapes \[2\], \[3\]"),
    (lambda: og.zeros(4, 3)[0, 0, 0], IndexError, r"too many indices for tensor of dimension 2"),
    (lambda: og.zeros(4, 3)[[5]], IndexError, (r"index 5 is out of bounds for dimension 0 with "
                                              r"size 4")),
    (lambda: og.zeros(4, 3)[:, og.tensor([0, -4])], IndexError,
     r"index -4 is out of bounds for dimension 1 with size 3"),
    (lambda: og.zeros(4, 3)[og.tensor([0.5])], IndexError,
     r"tensors used as indices must be long, int, byte or bool tensors"),
    (lambda: og.zeros(4, 3)[0.5], IndexError, (r"only integers, slices \(`:`\), ellipsis "
                                               r"\(`\.\.\.`\), None and long or byte Variables")),
    (lambda: og.zeros(4, 3)[..., 0, ...], IndexError, r"an index can only have a single ellipsis"),
    (lambda: og.zeros(4, 3).masked_fill(og.ones(4, 3), 1.0), RuntimeError,
     r"masked_fill_ only supports boolean masks, but got mask with dtype float"),
    (lambda: og.zeros(4, 3).masked_fill(og.ones(4, 3).bool(), og.ones(2)), RuntimeError,
     (r"masked_fill_ only supports a 0-dimensional value tensor, but got tensor with 1 "
     r"dimension\(s\)")),
    (lambda: og.zeros(4, 3).masked_fill(og.ones(5).bool(), 1.0), RuntimeError,
     (r"The size of tensor a \(3\) must match the size of tensor b \(5\) at non-singleton "
     r"dimension 1")),
    (lambda: og.zeros(4, 3).masked_fill_(og.ones(2, 4, 3).bool(), 1.0), RuntimeError,
     r"output with shape \[4, 3\] doesn't match the broadcast shape \[2, 4, 3\]"),
    (lambda: og.masked_select(og.zeros(4, 3), og.ones(3)), RuntimeError,
     r"masked_select: expected BoolTensor for mask"),
    (lambda: F.one_hot(og.tensor([0, -1])), RuntimeError, r"Class values must be non-negative\."),
    (lambda: F.one_hot(og.tensor([0, 3]), 3), RuntimeError,
     r"Class values must be smaller than num_classes\."),
    (lambda: F.one_hot(og.tensor([0.0, 1.0]), 3), RuntimeError,
     r"one_hot is only applicable to index tensor of type LongTensor\."),
    (lambda: F.one_hot(og.tensor(np.zeros(0, np.int64))), RuntimeError,
     r"Can not infer total number of classes from empty tensor\."),
    (lambda: og.zeros(4, 3).topk(5, 0), RuntimeError, r"selected index k out of range"),
    (lambda: og.zeros(4, 3).index_select(0, og.tensor([[0]])), IndexError,
     r"index_select\(\): Index is supposed to be a vector"),
    (lambda: og.zeros(4, 3).index_select(0, og.tensor([7])), IndexError,
     r"index out of range in self"),
    (lambda: og.zeros(4, 3).index_select(0, og.tensor([0.0])), RuntimeError,
     r"index_select\(\): Expected dtype int32 or int64 for index"),
    (lambda: og.zeros(4, 3).scatter(0, og.tensor([[5]]), 1.0), RuntimeError,
     r"index 5 is out of bounds for dimension 0 with size 4"),
    (lambda: og.zeros(4, 3).scatter(0, og.tensor([[0]]), og.ones(1, 1, dtype=og.float64)),
     RuntimeError, r"scatter\(\): Expected self.dtype to be equal to src.dtype"),
    (lambda: og.zeros(4, 3).scatter(0, og.tensor([[0, 1, 2, 3]]), og.ones(1, 2)), RuntimeError,
     (r"Expected index \[1, 4\] to be no larger than self \[4, 3\] apart from dimension 0 and to "
     r"be no larger size than src \[1, 2\]")),
    (lambda: og.zeros(4, 3).scatter(0, og.tensor([[0]]), 1.0, reduce="sum"), RuntimeError,
     r"reduce argument must be either add or multiply\."),
    (lambda: og.zeros(4, 3).index_add(0, og.tensor([0, 0]), og.ones(2, 2)), RuntimeError,
     (r"source tensor shape must match self tensor shape, excluding the specified dimension. Got "
     r"self.shape = \[4, 3\] source.shape = \[2, 2\]")),
    (lambda: og.zeros(4, 3).flip(0, 0), RuntimeError,
     r"dim 0 appears multiple times in the list of dims"),
    (lambda: og.zeros(4, 3).roll((1, 2), (0,)), RuntimeError,
     r"shifts and dimensions must align. shifts: 2, dims:1"),
    (lambda: og.take_along_dim(og.zeros(4, 3), og.tensor([0]), 1), RuntimeError,
     r"input and indices should have the same number of dimensions"),
]


@pytest.mark.parametrize("fn,exc,message", ERRORS, ids=range(len(ERRORS)))
def test_errors_are_pytorchs(fn: Any, exc: type, message: str) -> None:
    with pytest.raises(exc, match=message) as info:
        fn()
    assert "test_indexing.py" in str(info.value)  # the user's line


def test_shape_errors_are_value_and_runtime_errors() -> None:
    with pytest.raises(IndexShapeError) as info:
        _set(og.zeros(4, 3), (slice(None), 1), og.ones(2))
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("index", [0, slice(None), [0, 1], np.array([True, False, True])])
def test_error_messages_equal_pytorchs_text(index: Any) -> None:
    """Shape mismatches in assignment: the same text as PyTorch, then onnxgrad's line."""
    torch = _torch()
    with pytest.raises(RuntimeError) as want:
        t = torch.zeros(3, 2)
        t[_to_torch(index, torch)] = torch.ones(5)
    with pytest.raises(RuntimeError) as got:
        _set(og.zeros(3, 2), _to_og(index), og.ones(5))
    assert str(got.value).startswith(str(want.value).split("\n")[0])


# --------------------------------------------------------------------------- functions vs PyTorch
def test_topk_and_sort_return_named_values_and_indices() -> None:
    x = og.tensor([[3.0, 1.0, 2.0]])
    top = x.topk(2)
    assert type(top).__name__ == "topk" and top._fields == ("values", "indices")
    np.testing.assert_array_equal(top.values.numpy(), [[3.0, 2.0]])
    np.testing.assert_array_equal(top.indices.numpy(), [[0, 2]])
    _, indices = og.sort(x, descending=True)
    np.testing.assert_array_equal(indices.numpy(), [[0, 2, 1]])


def test_stable_sort_keeps_ties_in_order_as_pytorch() -> None:
    torch = _torch()
    data = np.array([2.0, 1.0, 2.0, np.nan, 1.0, 2.0, 0.0])
    for descending in (False, True):
        got = og.sort(og.tensor(data), descending=descending, stable=True)
        want = torch.sort(torch.tensor(data), descending=descending, stable=True)
        np.testing.assert_array_equal(got.indices.numpy(), want.indices.numpy())
        np.testing.assert_array_equal(got.values.numpy(), want.values.numpy())


@pytest.mark.parametrize("name", ["gather", "scatter", "scatter_add", "index_select", "index_add",
                                  "take_along_dim", "tile", "flip", "roll", "topk", "sort",
                                  "cumsum", "cumprod", "masked_fill", "masked_select"])
def test_functions_and_gradients_match_pytorch(name: str) -> None:
    torch = _torch()
    idx = np.array([[0, 3, 1], [2, 2, 0]])
    calls = {
        "gather": lambda m, x: m.gather(x, 0, T(m, idx)),
        "scatter": lambda m, x: m.scatter(x, 0, T(m, idx[:1]), x[1:2] * 2),
        "scatter_add": lambda m, x: m.scatter_add(x, 0, T(m, idx), x[:2] * 3),
        "index_select": lambda m, x: m.index_select(x, 1, T(m, np.array([2, 0, 2]))),
        "index_add": lambda m, x: m.index_add(x, 0, T(m, np.array([3, 3])), x[:2], alpha=2),
        "take_along_dim": lambda m, x: m.take_along_dim(x, T(m, idx[:, :1]), 0),
        "tile": lambda m, x: m.tile(x, (2, 1, 2)),
        "flip": lambda m, x: m.flip(x, (0, 1)),
        "roll": lambda m, x: m.roll(x, (3, -1), (0, 1)),
        "topk": lambda m, x: m.topk(x, 2, dim=0).values,
        "sort": lambda m, x: m.sort(x, dim=1, descending=True).values,
        "cumsum": lambda m, x: m.cumsum(x, 0),
        "cumprod": lambda m, x: m.cumprod(x, 1),
        "masked_fill": lambda m, x: m.masked_fill(x, T(m, X > 0.3), 1.5),
        "masked_select": lambda m, x: m.masked_select(x, T(m, X > 0.3)),
    }
    results = []
    for m in (og, torch):
        x = m.tensor(X, requires_grad=True)
        y = calls[name](m, x)
        y.backward(m.tensor(np.cos(np.arange(y.numel())).reshape(tuple(y.shape))))
        results.append((y.detach().numpy(), x.grad.numpy()))
    (y, g), (ty, tg) = results
    np.testing.assert_allclose(y, ty, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g, tg, rtol=1e-12, atol=1e-12)


def T(module: Any, array: np.ndarray) -> Any:
    return module.tensor(array)


def test_one_hot_is_int64_as_pytorch() -> None:
    out = F.one_hot(og.tensor([2, 0]), 3)
    assert out.dtype == og.int64
    np.testing.assert_array_equal(out.numpy(), [[0, 0, 1], [1, 0, 0]])


def test_in_place_variants_update_the_tensor_and_guard_leaves() -> None:
    x = og.zeros(2, 3)
    x.masked_fill_(og.tensor([[True, False, False], [False, False, True]]), 2.0)
    x.scatter_(1, og.tensor([[1], [0]]), 5.0)
    x.scatter_add_(0, og.tensor([[1, 1, 1]]), og.ones(1, 3))
    x.index_add_(1, og.tensor([2]), og.ones(2, 1), alpha=3)
    np.testing.assert_array_equal(x.numpy(), [[2, 5, 3], [6, 1, 6]])
    w = og.zeros(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        w.masked_fill_(og.ones(2, 3).bool(), 1.0)


# --------------------------------------------------------------------------- imported ONNX
def test_imported_model_with_scatternd_and_gathernd_trains_like_pytorch() -> None:
    """The rules serve files too: ScatterND, GatherND, ScatterElements, TopK and CumSum."""
    torch = _torch()
    w0 = RNG.standard_normal((4, 3)).astype(np.float32)
    i1 = np.array([[1, 2], [0, 0]], np.int64)
    i2 = np.array([[0, 0], [1, 2], [3, 1], [0, 0], [2, 2]], np.int64)
    i3 = np.array([[2, 0, 1]], np.int64)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w0, "w"), (i1, "i1"), (i2, "i2"), (i3, "i3"), (np.array([2], np.int64), "k"),
              (np.array(0, np.int64), "axis"))]
    nodes = [helper.make_node("ScatterND", ["w", "i1", "u"], ["s"]),
             helper.make_node("ScatterElements", ["s", "i3", "u3"], ["e"], axis=0,
                              reduction="add"),
             helper.make_node("GatherND", ["e", "i2"], ["g"]),
             helper.make_node("TopK", ["e", "k"], ["top", "top_i"], axis=1),
             helper.make_node("CumSum", ["top", "axis"], ["c"]),
             helper.make_node("Mul", ["g", "g"], ["g2"]),
             helper.make_node("ReduceSum", ["g2"], ["a"], keepdims=0),
             helper.make_node("ReduceSum", ["c"], ["b"], keepdims=0),
             helper.make_node("Add", ["a", "b"], ["loss"])]
    graph = helper.make_graph(
        nodes, "idx",
        [helper.make_tensor_value_info("u", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("u3", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(proto)
    module = nn.OnnxModule(proto)
    assert [n for n, _ in module.named_parameters()] == ["w"]
    opt = og.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)

    tw = torch.tensor(w0, requires_grad=True)
    topt = torch.optim.SGD([tw], lr=0.05, momentum=0.9)

    def torch_loss(u: Any, u3: Any) -> Any:
        s = tw.clone()
        s[1, 2], s[0, 0] = u[0], u[1]
        e = s.scatter_add(0, torch.from_numpy(i3), u3)
        g = e[torch.from_numpy(i2[:, 0]), torch.from_numpy(i2[:, 1])]
        return (g * g).sum() + e.topk(2, dim=1).values.cumsum(0).sum()

    for step in range(3):
        u = RNG.standard_normal(2).astype(np.float32)
        u3 = RNG.standard_normal((1, 3)).astype(np.float32)
        opt.zero_grad()
        loss = module(u, u3)
        loss.backward()
        opt.step()
        topt.zero_grad()
        tloss = torch_loss(torch.from_numpy(u), torch.from_numpy(u3))
        tloss.backward()
        topt.step()
        assert loss.item() == pytest.approx(tloss.item(), rel=1e-5), step
        np.testing.assert_allclose(module.w.detach().numpy(), tw.detach().numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_gathernd_with_batch_dims_has_a_gradient() -> None:
    data = RNG.standard_normal((2, 3, 4))
    idx = np.array([[[0, 1], [2, 2]], [[1, 3], [1, 3]]], np.int64)  # batch 2, 2 lookups each
    graph = helper.make_graph(
        [helper.make_node("GatherND", ["x", "i"], ["y"], batch_dims=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 2])],
        [numpy_helper.from_array(idx, "i")])
    module = nn.OnnxModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))
    x = og.tensor(data, requires_grad=True)
    module(x).backward(og.tensor([[1.0, 2.0], [3.0, 4.0]]))
    want = np.zeros_like(data)
    want[0, 0, 1], want[0, 2, 2] = 1.0, 2.0
    want[1, 1, 3] = 3.0 + 4.0   # a repeated lookup: both gradients
    np.testing.assert_array_equal(x.grad.numpy(), want)


# --------------------------------------------------------------------------- property tests
def _numpy_torch_index(index: tuple) -> tuple[tuple, tuple]:
    """PyTorch's semantics in NumPy: ints, slices and None first (a view), then the arrays and
    masks on what is left, where NumPy's advanced-index rules then agree with PyTorch's.

    Returns the two index tuples (the second empty without arrays or masks)."""
    basic, advanced = [], []
    for item in index:
        if isinstance(item, np.ndarray):
            basic.append(slice(None))
            advanced.append(item)
            if item.dtype == np.bool_:
                basic.extend([slice(None)] * (item.ndim - 1))
        elif isinstance(item, (int, np.integer)):
            basic.append(item)
        elif item is Ellipsis:
            basic.append(item)
            advanced.append(item)
        else:  # slice, None
            basic.append(item)
            advanced.append(slice(None))
    if not any(isinstance(i, np.ndarray) for i in advanced):
        return tuple(basic), ()
    return tuple(basic), tuple(advanced)


def _index_strategy():
    st = pytest.importorskip("hypothesis.strategies")

    @st.composite
    def draw_index(draw):
        ndim = draw(st.integers(1, 3))
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
        array_shape = draw(st.sampled_from([(), (1,), (2,), (3,), (2, 1), (1, 2)]))
        items: list[Any] = []
        dim, masked, arrays, nones = 0, False, 0, 0
        while dim < ndim:
            size = shape[dim]
            kind = draw(st.sampled_from(["int", "slice", "slice", "none", "array", "mask",
                                         "stop"]))
            if kind == "stop":
                break
            if kind == "none":
                if nones < 2:
                    items.append(None)
                    nones += 1
                continue
            if kind == "int":
                items.append(draw(st.integers(-size, size - 1)))
            elif kind == "slice":
                bound = st.none() | st.integers(-size - 1, size + 1)
                items.append(slice(draw(bound), draw(bound), draw(st.none() | st.integers(1, 3))))
            elif kind == "array" and not masked:
                n = int(np.prod(array_shape))
                values = draw(st.lists(st.integers(-size, size - 1), min_size=n, max_size=n))
                items.append(np.array(values, np.int64).reshape(array_shape))
                arrays += 1
            elif kind == "mask" and not arrays and not masked:
                k = draw(st.integers(1, min(2, ndim - dim)))
                mask = draw(st.lists(st.booleans(), min_size=int(np.prod(shape[dim:dim + k])),
                                     max_size=int(np.prod(shape[dim:dim + k]))))
                items.append(np.array(mask, bool).reshape(shape[dim:dim + k]))
                masked = True
                dim += k
                continue
            else:
                continue
            dim += 1
        if draw(st.booleans()):
            items.insert(draw(st.integers(0, len(items))), Ellipsis)
        return shape, tuple(items)

    return draw_index()


def _property(test):
    hypothesis = pytest.importorskip("hypothesis")
    return hypothesis.settings(max_examples=40, deadline=None, derandomize=True,
                               suppress_health_check=list(hypothesis.HealthCheck))(
        hypothesis.given(_index_strategy())(test))


def _expected(data: np.ndarray, index: tuple) -> np.ndarray:
    basic, advanced = _numpy_torch_index(index)
    return data[basic][advanced] if advanced else data[basic]


@pytest.fixture(scope="module")
def hypothesis_available():
    pytest.importorskip("hypothesis")


def test_getitem_of_random_indices_matches_numpy_and_pytorch(hypothesis_available) -> None:
    torch = _torch_or_none()

    @_property
    def check(case):
        shape, index = case
        data = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) / 3
        x = og.tensor(data, requires_grad=True)
        y = x[_to_og(index)]
        want = _expected(data, index)
        assert y.shape == want.shape, (shape, index)
        np.testing.assert_array_equal(y.detach().numpy(), want)
        if torch is None or y.numel() == 0:
            return
        u = np.cos(np.arange(y.numel())).reshape(y.shape)
        y.backward(og.tensor(u))
        tx = torch.tensor(data, requires_grad=True)
        ty = tx[_to_torch(index, torch)]
        assert tuple(ty.shape) == y.shape
        ty.backward(torch.tensor(u))
        np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-12, atol=1e-12)

    check()


def test_setitem_of_random_indices_matches_numpy_and_pytorch(hypothesis_available) -> None:
    from hypothesis import assume

    torch = _torch_or_none()

    @_property
    def check(case):
        shape, index = case
        data = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) / 3
        positions = _expected(np.arange(data.size).reshape(shape), index)
        assume(np.unique(positions).size == positions.size)  # repeated writes: any may win
        value = np.asarray(-1 - np.sin(np.arange(positions.size)).reshape(positions.shape))
        want = data.copy()
        basic, advanced = _numpy_torch_index(index)
        if advanced:
            want[basic][advanced] = value  # want[basic] is a view: it has a slice per array
        else:
            want[basic] = value
        x = og.tensor(data, requires_grad=True)
        v = og.tensor(value, requires_grad=True)
        b = x * 1.0
        b[_to_og(index)] = v
        np.testing.assert_array_equal(b.detach().numpy(), want)
        if torch is None:
            return
        weights = np.cos(np.arange(data.size)).reshape(shape)
        (b * og.tensor(weights)).sum().backward()
        tx = torch.tensor(data, requires_grad=True)
        tv = torch.tensor(value, requires_grad=True)
        tb = tx * 1.0
        tb[_to_torch(index, torch)] = tv
        (tb * torch.tensor(weights)).sum().backward()
        np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(v.grad.numpy(), tv.grad.numpy(), rtol=1e-12, atol=1e-12)

    check()


def _torch_or_none() -> Any:
    """PyTorch when installed: the property tests check values against NumPy without it."""
    try:
        import torch
    except ImportError:
        return None
    return torch
