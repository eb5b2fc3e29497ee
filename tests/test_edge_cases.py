"""Edge cases that must match PyTorch (issue #13): NaN propagation through max/min-like ops and
their gradients, reductions over every dim, empty inputs, 0-d softmax, bool/integer matmul."""
from __future__ import annotations

import numpy as np
import pytest

import onnxgrad as og

torch = pytest.importorskip("torch")
NAN = float("nan")

X = np.array([[1.0, NAN, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
X3 = np.array([[[1.0, NAN], [2.0, -1.0]], [[0.5, 3.0], [NAN, NAN]], [[7.0, 1.0], [2.0, 2.5]]],
              dtype=np.float32)
POOL = np.arange(32, dtype=np.float32).reshape(1, 2, 4, 4) % 7
POOL[0, 0, 0, 0] = POOL[0, 0, 3, 3] = POOL[0, 1, 1, 2] = NAN


def _run(lib, fn, arrays, grad):
    ts = [lib.tensor(a, requires_grad=grad and a.dtype.kind == "f") for a in arrays]
    out = fn(lib, *ts)
    outs = list(out) if isinstance(out, tuple) else [out]
    if grad:
        seed = outs[0].detach().numpy() * 0 + np.arange(outs[0].numel()).reshape(
            outs[0].shape).astype(outs[0].detach().numpy().dtype) + 1
        outs[0].backward(lib.tensor(seed))
    grads = [t.grad.numpy() if grad and t.grad is not None else None for t in ts]
    return [o.detach().numpy() for o in outs], grads


def _same(fn, *arrays, grad=True):
    got, got_g = _run(og, fn, arrays, grad)
    want, want_g = _run(torch, fn, arrays, grad)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g, w)
        np.testing.assert_allclose(g, w, equal_nan=True)
    for g, w in zip(got_g, want_g):
        assert (g is None) == (w is None), (g, w)
        if w is not None:
            np.testing.assert_allclose(g, w, equal_nan=True)


NAN_CASES = {
    "amax": lambda t, x: t.amax(x),
    "amax/dim1": lambda t, x: t.amax(x, 1),
    "amax/dim0-keepdim": lambda t, x: t.amax(x, 0, keepdim=True),
    "amin": lambda t, x: t.amin(x),
    "amin/dim1": lambda t, x: t.amin(x, 1),
    "max": lambda t, x: t.max(x),
    "min": lambda t, x: t.min(x),
    "max/dim0": lambda t, x: t.max(x, 0),
    "max/dim1": lambda t, x: t.max(x, 1),
    "max/dim-1-keepdim": lambda t, x: t.max(x, -1, keepdim=True),
    "min/dim0": lambda t, x: t.min(x, 0),
    "min/dim1": lambda t, x: t.min(x, 1),
    "maximum": lambda t, x: t.maximum(x, x.flip(0) if hasattr(x, "flip") else x[[1, 0]]),
    "minimum": lambda t, x: t.minimum(x, t.tensor([[2.0, 2.0, NAN]]).expand(2, 3)),
    "maximum/scalar-tensor": lambda t, x: t.maximum(x, t.tensor(2.0)),
}


@pytest.mark.parametrize("name", list(NAN_CASES))
def test_nan_propagates_as_in_torch(name):
    _same(NAN_CASES[name], X)


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("fn", ["max", "min", "argmax", "argmin", "amax", "amin"])
def test_reductions_over_every_dim_with_nan(fn, dim, keepdim):
    grad = not fn.startswith("arg")
    _same(lambda t, x: getattr(t, fn)(x, dim, keepdim=keepdim), X3, grad=grad)
    finite = np.nan_to_num(X3, nan=0.25)
    _same(lambda t, x: getattr(t, fn)(x, dim, keepdim=keepdim), finite, grad=grad)


@pytest.mark.parametrize("fn", ["argmax", "argmin"])
def test_argmax_whole_tensor_nan(fn):
    _same(lambda t, x: getattr(t, fn)(x), X, grad=False)
    _same(lambda t, x: getattr(t, fn)(x), X3, grad=False)


@pytest.mark.parametrize("kernel, stride, padding", [(2, 2, 0), (3, 1, 1), (2, 1, 0)])
def test_max_pool2d_nan_forward(kernel, stride, padding):
    for grad in (False, True):
        got, _ = _run(og, lambda t, x: t.nn.functional.max_pool2d(x, kernel, stride, padding),
                      [POOL], grad)
        want, _ = _run(torch, lambda t, x: t.nn.functional.max_pool2d(x, kernel, stride,
                                                                         padding), [POOL], grad)
        np.testing.assert_allclose(got[0], want[0], equal_nan=True)


@pytest.mark.parametrize("kernel, stride, padding", [(2, 2, 0), (3, 1, 1), (2, 1, 0)])
def test_max_pool2d_nan_gradient_goes_to_the_nan(kernel, stride, padding):
    x = POOL + np.linspace(0, 0.1, POOL.size, dtype=np.float32).reshape(POOL.shape)  # no ties
    _same(lambda t, a: t.nn.functional.max_pool2d(a, kernel, stride, padding), x)
    _same(lambda t, a: t.nn.functional.max_pool2d(a, kernel, stride, padding,
                                                  return_indices=True), x)


def test_max_pool2d_gradient_without_nan_windows_matches_torch():
    x = np.nan_to_num(POOL, nan=-3.0) + np.linspace(0, 0.1, POOL.size).reshape(POOL.shape)
    x = x.astype(np.float32)
    _same(lambda t, a: t.nn.functional.max_pool2d(a, 2), x)


def test_max_pool2d_module_nan():
    got = og.nn.MaxPool2d(2)(og.tensor(POOL)).numpy()
    want = torch.nn.MaxPool2d(2)(torch.tensor(POOL)).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


# --------------------------------------------------------------------------- empty tensors
def test_mean_of_empty_is_nan():
    e = np.zeros((0, 3), np.float32)
    _same(lambda t, x: t.mean(x), e, grad=False)
    _same(lambda t, x: x.mean(0), e, grad=False)
    _same(lambda t, x: x.mean(1), e, grad=False)
    _same(lambda t, x: t.sum(x), e, grad=False)


@pytest.mark.parametrize("call", [
    lambda t, x: t.amax(x), lambda t, x: t.amin(x), lambda t, x: t.max(x), lambda t, x: t.min(x),
    lambda t, x: t.argmax(x), lambda t, x: t.argmin(x), lambda t, x: t.amax(x, 0),
    lambda t, x: t.max(x, 0), lambda t, x: x.min(0), lambda t, x: t.argmax(x, 0),
])
def test_max_of_empty_raises_torch_error(call):
    e = np.zeros((0, 3), np.float32)
    with pytest.raises(Exception) as want:
        call(torch, torch.tensor(e))
    with pytest.raises(type(want.value)) as got:
        call(og, og.tensor(e))
    # PyTorch's message, with the shape appended; never ONNX Runtime's text.
    assert str(want.value).split(".")[0] in str(got.value)
    assert "ONNXRuntime" not in str(got.value)


def test_max_over_a_nonempty_dim_of_an_empty_tensor():
    e = np.zeros((0, 3), np.float32)
    _same(lambda t, x: t.amax(x, 1), e, grad=False)
    _same(lambda t, x: t.max(x, 1), e, grad=False)
    _same(lambda t, x: t.argmax(x, 1), e, grad=False)


# --------------------------------------------------------------------------- 0-d tensors
@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [0, -1])
def test_softmax_of_0d(fn, dim):
    _same(lambda t, x: getattr(t, fn)(x, dim) * 3, np.array(2.5, np.float32))
    _same(lambda t, x: getattr(t.nn.functional, fn)(x, dim=dim), np.array(-1.0, np.float32))


def test_softmax_0d_bad_dim():
    with pytest.raises(IndexError):
        og.softmax(og.tensor(1.0), 1)


def test_max_dim_of_0d():
    _same(lambda t, x: t.max(x, 0), np.array(2.5, np.float32))
    _same(lambda t, x: t.argmax(x), np.array(2.5, np.float32), grad=False)


# --------------------------------------------------------------------------- matmul dtypes
@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_integer_matmul(dtype):
    a = np.arange(6, dtype=dtype).reshape(2, 3) - 2
    b = np.arange(12, dtype=dtype).reshape(3, 4) % 5
    _same(lambda t, x, y: x @ y, a, b, grad=False)
    _same(lambda t, x, y: t.matmul(x, y[:, 0]), a, b, grad=False)


def test_bool_matmul_raises_onnxgrads_error():
    a = og.tensor([[True, False], [True, True]])
    with pytest.raises(NotImplementedError) as info:
        a @ a
    text = str(info.value)
    assert "matmul" in text and "bool" in text and "[2, 2]" in text
    assert "ONNXRuntime" not in text and "INVALID_GRAPH" not in text
    with pytest.raises(NotImplementedError):
        torch.tensor([[True]]) @ torch.tensor([[True]])


def test_mixed_dtype_matmul_raises():
    with pytest.raises(TypeError, match="same dtype"):
        og.ones(2, 2) @ og.ones(2, 2, dtype=og.int64)


def test_a_batch_of_zero_gives_a_nan_loss_and_zero_gradients_as_pytorch() -> None:
    # Eagerly and in a compiled step (whose in-graph label check sees no labels at all).
    model = og.nn.Sequential(og.nn.Linear(4, 3))
    x, y = og.zeros(0, 4), og.tensor(np.zeros(0, np.int64))
    loss = og.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert np.isnan(loss.item())
    assert model[0].weight.grad.abs().sum().item() == 0.0
    assert model[0].bias.grad.tolist() == [0.0, 0.0, 0.0]
    opt = og.optim.SGD(model.parameters(), lr=0.1)
    before = model[0].weight.detach().numpy().copy()

    @og.compile
    def step(x, y):
        opt.zero_grad()
        loss = og.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    assert np.isnan(step(x, y).item()) and np.isnan(step(x, y).item())
    np.testing.assert_array_equal(model[0].weight.detach().numpy(), before)
