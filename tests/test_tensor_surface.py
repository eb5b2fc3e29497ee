"""PyTorch's tensor surface: og.Size, og.dtype, small Tensor methods, new factories, out=, and
og.from_numpy / .numpy() memory sharing (the rule is in og.from_numpy's docstring)."""
from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest

import onnxgrad as og


# --------------------------------------------------------------------------- og.Size
def test_size_prints_and_behaves_as_torch() -> None:
    torch = pytest.importorskip("torch")
    t, tt = og.zeros(3, 4), torch.zeros(3, 4)
    assert repr(t.shape) == repr(tt.shape).replace("torch", "onnxgrad") == "onnxgrad.Size([3, 4])"
    assert str(og.zeros(()).shape) == "onnxgrad.Size([])"
    assert t.size() == t.shape == (3, 4) and isinstance(t.size(), og.Size)
    assert t.size(1) == 4 and t.size(-2) == 3 and type(t.size(1)) is int
    assert t.shape.numel() == 12 == tt.shape.numel() and og.Size([]).numel() == 1
    for got, want in [(t.shape[1:], tt.shape[1:]), (t.shape + (5,), tt.shape + (5,)),
                      ((5,) + t.shape, (5,) + tt.shape)]:
        assert type(got) is og.Size and tuple(got) == tuple(want)
    assert t.shape[0] == 3 and t.shape != [3, 4]  # a tuple: not equal to a list, as PyTorch
    a, b = t.shape  # unpacks
    assert (a, b) == (3, 4)
    assert pickle.loads(pickle.dumps(t.shape)) == (3, 4)
    assert np.zeros(t.shape).shape == (3, 4)


# --------------------------------------------------------------------------- og.dtype
@pytest.mark.parametrize("name", ["float16", "float32", "float64", "int8", "int16", "int32",
                                  "int64", "uint8", "bool"])
def test_dtype_prints_and_answers_as_torch(name: str) -> None:
    torch = pytest.importorskip("torch")
    mine, theirs = getattr(og, name), getattr(torch, name)
    assert repr(mine) == repr(theirs).replace("torch", "onnxgrad") == f"onnxgrad.{name}"
    assert str(mine) == f"onnxgrad.{name}" and f"{mine}" == f"onnxgrad.{name}"
    assert mine.is_floating_point == theirs.is_floating_point
    assert mine.is_signed == theirs.is_signed
    assert mine.itemsize == theirs.itemsize
    t = og.zeros(2, dtype=mine)
    assert t.dtype is mine and t.element_size() == torch.zeros(2, dtype=theirs).element_size()


def test_dtype_is_still_numpy_compatible() -> None:
    assert og.float32 == np.float32 == np.dtype("float32")
    assert np.dtype("float32") == og.float32 and og.float32 != og.float64
    assert og.float32 != None  # NumPy would read None as float64
    assert hash(og.float32) == hash(np.dtype("float32"))
    assert {np.dtype("float32"): 1}[og.float32] == 1
    assert np.zeros(2, og.float64).dtype == np.float64
    assert np.arange(3).astype(og.int32).dtype == np.int32
    assert np.dtype(og.int64) == np.int64 and og.int64.kind == "i" and og.float32.name == "float32"
    assert og.ones(2).dtype in (og.float32, og.float64)
    assert og.float is og.float32 and og.double is og.float64 and og.long is og.int64
    assert og.half is og.float16 and og.int is og.int32 and og.bool is og.bool_
    assert og.get_default_dtype() is og.float32
    assert pickle.loads(pickle.dumps(og.float64)) is og.float64
    assert copy.deepcopy(og.int8) is og.int8
    assert isinstance(og.float32, og.dtype)
    assert og.tensor([1, 2], dtype=og.float16).dtype is og.float16


# --------------------------------------------------------------------------- small methods
def test_small_methods_match_torch() -> None:
    torch = pytest.importorskip("torch")
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    t, tt = og.tensor(data), torch.tensor(data)
    for name in ("dim", "ndimension", "numel", "nelement", "element_size", "is_contiguous",
                 "is_floating_point", "tolist"):
        assert getattr(t, name)() == getattr(tt, name)(), name
    assert og.tensor([2.5]).item() == torch.tensor([2.5]).item()
    assert t.contiguous() is t
    assert t.type() == tt.type().replace("torch", "onnxgrad") == "onnxgrad.FloatTensor"
    assert og.tensor([1, 2]).type() == "onnxgrad.LongTensor"
    assert og.tensor([True]).type() == "onnxgrad.BoolTensor"
    for target in ("torch.DoubleTensor", "onnxgrad.IntTensor", og.float16, "torch.BoolTensor"):
        cast = t.type(target)
        want = tt.type(target.replace("onnxgrad", "torch") if isinstance(target, str)
                       else torch.float16)
        assert cast.type().replace("onnxgrad", "torch") == want.type()
        np.testing.assert_array_equal(cast.numpy(), want.numpy())
    assert t.type("torch.FloatTensor") is t
    with pytest.raises(ValueError, match="invalid type: 'foo'"):
        t.type("foo")


@pytest.mark.parametrize("method, dtype", [("float", "float32"), ("double", "float64"),
                                           ("half", "float16"), ("long", "int64"),
                                           ("int", "int32"), ("bool", "bool")])
def test_conversion_methods(method: str, dtype: str) -> None:
    t = og.tensor([0.0, 1.5, -2.0])
    assert getattr(t, method)().dtype is getattr(og, dtype)


def test_new_factories_take_dtype_from_self() -> None:
    torch = pytest.importorskip("torch")
    t, tt = og.ones(2, dtype=og.float64), torch.ones(2, dtype=torch.float64)
    cases = [("new_zeros", ((2, 3),), {}), ("new_zeros", (2, 3), {}), ("new_ones", ((4,),), {}),
             ("new_full", ((2,), 7), {}), ("new_tensor", ([1, 2],), {}),
             ("new_empty", ((2,),), {}), ("new_zeros", ((2,),), {"dtype": "int64"})]
    for name, args, kwargs in cases:
        mine = getattr(t, name)(*args, **{k: getattr(og, v) for k, v in kwargs.items()})
        theirs = getattr(tt, name)(*args, **{k: getattr(torch, v) for k, v in kwargs.items()})
        assert str(mine.dtype).split(".")[1] == str(theirs.dtype).split(".")[1], name
        assert mine.shape == tuple(theirs.shape), name
        if name != "new_empty":
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    assert t.new_zeros(2, requires_grad=True).requires_grad


def test_clone_is_recorded_and_requires_grad_() -> None:
    x = og.tensor([1.0, 2.0])
    assert x.requires_grad_() is x and x.requires_grad
    y = x.clone()
    assert y.grad_fn is not None and not y.is_leaf
    (y * y).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0])
    with pytest.raises(RuntimeError, match="only floating point tensors can require gradients"):
        og.tensor([1, 2]).requires_grad_()


# --------------------------------------------------------------------------- factories
def test_linspace_logspace_eye_values_match_torch() -> None:
    torch = pytest.importorskip("torch")
    cases = [
        (og.linspace(-1, 1, 7), torch.linspace(-1, 1, 7)),
        (og.linspace(0, 10, 5, dtype=og.int64), torch.linspace(0, 10, 5, dtype=torch.int64)),
        (og.linspace(3, -2.5, 10, dtype=og.float64),
         torch.linspace(3, -2.5, 10, dtype=torch.float64)),
        (og.linspace(0.1, 0.7, 1), torch.linspace(0.1, 0.7, 1)),
        (og.linspace(0, 1, 0), torch.linspace(0, 1, 0)),
        (og.logspace(-2, 2, 5), torch.logspace(-2, 2, 5)),
        (og.logspace(0, 3, 4, base=2.0), torch.logspace(0, 3, 4, base=2.0)),
        (og.eye(3), torch.eye(3)),
        (og.eye(2, 4, dtype=og.int64), torch.eye(2, 4, dtype=torch.int64)),
        (og.empty(2, 3), torch.zeros(2, 3)),
        (og.full_like(og.ones(2, 2), 7), torch.full_like(torch.ones(2, 2), 7)),
        (og.empty_like(og.ones(3, dtype=og.int32)), torch.zeros(3, dtype=torch.int32)),
    ]
    for mine, theirs in cases:
        assert mine.shape == tuple(theirs.shape)
        assert str(mine.dtype).split(".")[1] == str(theirs.dtype).split(".")[1]
        # linspace follows PyTorch's kernel to the last bit; logspace's pow may differ in the
        # last place (PyTorch's vectorized pow), hence rtol.
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-6, atol=0)
    for args, dt in [((-1, 1, 7), "float32"), ((0, 1, 100), "float32"),
                     ((3, -2.5, 10), "float64"), ((1e-3, 7.3, 57), "float64")]:
        mine = og.linspace(*args, dtype=getattr(og, dt)).numpy()
        np.testing.assert_array_equal(mine, torch.linspace(*args, dtype=getattr(torch, dt)))
    # linspace's kernel counts down from the end in its second half: -2.98e-08, not 0.
    assert og.linspace(-1, 1, 7).numpy()[3] == torch.linspace(-1, 1, 7).numpy()[3]


def test_factories_take_requires_grad_and_dtype() -> None:
    for make in (lambda **k: og.linspace(0, 1, 3, **k), lambda **k: og.logspace(0, 1, 3, **k),
                 lambda **k: og.eye(2, **k), lambda **k: og.empty(2, **k),
                 lambda **k: og.empty_like(og.ones(2), **k),
                 lambda **k: og.full_like(og.ones(2), 1.5, **k),
                 lambda **k: og.rand_like(og.ones(2), **k),
                 lambda **k: og.randn_like(og.ones(2), **k),
                 lambda **k: og.zeros(2, **k), lambda **k: og.rand(2, **k)):
        t = make(dtype=og.float64, requires_grad=True, device="cpu")
        assert t.dtype is og.float64 and t.requires_grad and t.is_leaf


def test_random_like_and_randperm() -> None:
    og.manual_seed(0)
    x = og.ones(200, dtype=og.float64)
    r = og.rand_like(x)
    assert r.dtype is og.float64 and r.shape == (200,) and 0 <= r.numpy().min() < 0.1
    assert r.numpy().max() < 1
    n = og.randn_like(x)
    assert abs(float(n.numpy().mean())) < 0.3 and 0.7 < float(n.numpy().std()) < 1.3
    i = og.randint_like(og.ones(100, dtype=og.int32), 3, 7)
    assert i.dtype is og.int32 and set(i.tolist()) == {3, 4, 5, 6}
    f = og.randint_like(x, 5)
    assert f.dtype is og.float64 and set(f.tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    p = og.randperm(10)
    assert p.dtype is og.int64 and sorted(p.tolist()) == list(range(10))
    assert og.randperm(4, dtype=og.float32).dtype is og.float32
    og.manual_seed(1)
    first = og.randperm(8).tolist()
    og.manual_seed(1)
    assert og.randperm(8).tolist() == first
    g = np.random.default_rng(5)
    assert og.rand(3, generator=g).shape == (3,)


def test_factory_bad_input_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    for mine, theirs in [(lambda: og.linspace(0, 1, -1), lambda: torch.linspace(0, 1, -1)),
                         (lambda: og.rand_like(og.ones(2, dtype=og.int64)),
                          lambda: torch.rand_like(torch.ones(2, dtype=torch.int64))),
                         (lambda: og.eye(-1), lambda: torch.eye(-1))]:
        with pytest.raises(RuntimeError) as want:
            theirs()
        with pytest.raises(RuntimeError) as got:
            mine()
        assert str(got.value) == str(want.value)
    with pytest.raises(TypeError, match="'steps' must be int"):
        og.linspace(0, 1, 2.5)


def test_random_like_is_traced_fresh_in_compiled_functions() -> None:
    x = og.ones(4)
    step = og.compile(lambda t: og.rand_like(t) + t)
    a, b = step(x), step(x)
    assert not np.array_equal(a.numpy(), b.numpy())


# --------------------------------------------------------------------------- out=
def test_out_writes_into_and_returns_out() -> None:
    torch = pytest.importorskip("torch")
    a = np.arange(6, dtype=np.float32).reshape(2, 3) / 3
    b = np.ones((3, 2), np.float32)
    cases = [(og.exp, torch.exp, (a,)), (og.matmul, torch.matmul, (a, b)),
             (og.maximum, torch.maximum, (a, a[::-1].copy())), (og.sin, torch.sin, (a,))]
    for mine, theirs, args in cases:
        want = theirs(*map(torch.tensor, args))
        out = og.zeros(want.shape)
        result = mine(*map(og.tensor, args), out=out)
        assert result is out
        np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-6)


def test_out_casts_resizes_and_refuses_as_torch() -> None:
    torch = pytest.importorskip("torch")
    out = og.zeros(3, dtype=og.float64)
    og.exp(og.zeros(3), out=out)
    assert out.dtype is og.float64 and out.tolist() == [1.0, 1.0, 1.0]
    empty = og.zeros(0)
    og.matmul(og.ones(2, 3), og.ones(3, 2), out=empty)
    assert empty.shape == (2, 2)
    small = og.zeros(2)
    with pytest.warns(UserWarning, match="was resized since it had shape \\[2\\]"):
        og.exp(og.zeros(3), out=small)
    assert small.shape == (3,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        og.exp(og.zeros(3), out=og.zeros(0))  # empty outs resize silently
    for mine, theirs in [
        (lambda: og.exp(og.ones(2, requires_grad=True), out=og.zeros(2)),
         lambda: torch.exp(torch.ones(2, requires_grad=True), out=torch.zeros(2))),
        (lambda: og.exp(og.ones(2), out=og.zeros(2, requires_grad=True)),
         lambda: torch.exp(torch.ones(2), out=torch.zeros(2, requires_grad=True))),
        (lambda: og.exp(og.ones(2), out=og.zeros(2, dtype=og.int64)),
         lambda: torch.exp(torch.ones(2), out=torch.zeros(2, dtype=torch.int64))),
    ]:
        with pytest.raises(RuntimeError) as want:
            theirs()
        with pytest.raises(RuntimeError) as got:
            mine()
        assert str(got.value) == str(want.value)
    with og.no_grad():  # allowed without grad mode, as PyTorch
        leaf = og.zeros(2, requires_grad=True)
        og.exp(og.zeros(2), out=leaf)
    assert leaf.tolist() == [1.0, 1.0] and leaf.requires_grad and leaf.is_leaf
    values, indices = og.zeros(2), og.zeros(2, dtype=og.int64)
    result = og.max(og.tensor([[1.0, 3.0], [4.0, 2.0]]), 1, out=(values, indices))
    assert result.values is values and values.tolist() == [3.0, 4.0]
    assert indices.tolist() == [1, 0]
    z = og.zeros(2)
    assert og.ones(2, out=z) is z and z.tolist() == [1.0, 1.0]
    with pytest.raises(TypeError, match="argument 'out' must be Tensor"):
        og.exp(og.ones(2), out=np.zeros(2))


# --------------------------------------------------------------------------- memory sharing
def test_from_numpy_shares_memory_both_ways() -> None:
    a = np.arange(4, dtype=np.float32)
    t = og.from_numpy(a)
    assert t.dtype is og.float32 and t.numpy() is a
    a[0] = 10  # a write to the array is seen by the tensor
    assert t.tolist() == [10.0, 1.0, 2.0, 3.0]
    assert (t * 2).tolist() == [20.0, 2.0, 4.0, 6.0]
    t.add_(1)  # an in-place op on the tensor is seen by the array
    np.testing.assert_array_equal(a, [11, 2, 3, 4])
    t.mul_(og.tensor([1.0, 0.0, 1.0, 0.0]))
    t.zero_()
    np.testing.assert_array_equal(a, [0, 0, 0, 0])
    t.copy_(og.tensor([1.0, 2.0, 3.0, 4.0]))
    t.fill_(5)
    np.testing.assert_array_equal(a, [5, 5, 5, 5])
    og.exp(og.zeros(4), out=t)  # out= writes through too
    np.testing.assert_array_equal(a, [1, 1, 1, 1])
    d = t.detach()  # a detached tensor shares the buffer, as PyTorch's
    d.add_(1)
    np.testing.assert_array_equal(a, [2, 2, 2, 2])
    e = t.detach().requires_grad_()  # its flag only: t stays as it was
    assert e.requires_grad and not t.requires_grad and e.numpy(force=True) is not a
    (e * 3).sum().backward()
    assert e.grad.tolist() == [3.0] * 4 and t.grad is None
    i = og.from_numpy(np.array([1, 2], dtype=np.int64))
    assert i.dtype is og.int64


def test_as_tensor_shares_numpy_memory_as_torch() -> None:
    torch = pytest.importorskip("torch")
    for dtype in (np.float32, np.float64, np.int64):
        a, b = np.zeros(3, dtype), np.zeros(3, dtype)
        t, tt = og.as_tensor(a), torch.as_tensor(b)
        a[0] = b[0] = 1
        assert t.tolist() == tt.tolist() == [1, 0, 0]
    c = np.zeros(2, np.float32)
    assert og.as_tensor(c, dtype=og.float64).dtype is og.float64  # a cast: a copy
    og.as_tensor(c, dtype=og.float64).add_(1)
    assert c.tolist() == [0.0, 0.0]


def test_numpy_shares_memory_both_ways() -> None:
    torch = pytest.importorskip("torch")
    t, tt = og.ones(3), torch.ones(3)
    n, nn = t.numpy(), tt.numpy()
    t.add_(1)
    tt.add_(1)
    np.testing.assert_array_equal(n, nn)  # both [2, 2, 2]
    n[1] = 7
    nn[1] = 7
    assert t.tolist() == tt.tolist() == [2.0, 7.0, 2.0]
    assert t.numpy() is n


def test_memory_is_not_shared_where_a_graph_saved_the_value() -> None:
    # The rule: an in-place op on a tensor whose value a recorded graph saved gives the tensor
    # new memory; the gradient then uses the saved values (PyTorch raises at backward instead).
    a = np.array([1.0, 2.0], dtype=np.float32)
    x = og.from_numpy(a)
    w = og.tensor([3.0, 4.0], requires_grad=True)
    y = (w * x).sum()
    x.add_(100)
    np.testing.assert_array_equal(a, [1.0, 2.0])  # the array keeps the saved values
    assert x.tolist() == [101.0, 102.0]
    y.backward()
    np.testing.assert_array_equal(w.grad.numpy(), [1.0, 2.0])
    # Also when the graph saved a detached handle on the same buffer.
    b = np.array([1.0, 2.0], dtype=np.float32)
    x = og.from_numpy(b)
    w.grad = None
    y = (w * x.detach()).sum()
    x.add_(100)
    y.backward()
    np.testing.assert_array_equal(w.grad.numpy(), [1.0, 2.0])


def test_numpy_refuses_tensors_that_require_grad_as_torch() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(RuntimeError) as want:
        torch.ones(2, requires_grad=True).numpy()
    with pytest.raises(RuntimeError) as got:
        og.ones(2, requires_grad=True).numpy()
    assert str(got.value) == str(want.value)
    with pytest.raises(RuntimeError, match="Use tensor.detach"):
        (og.ones(2, requires_grad=True) * 2).numpy()
    forced = og.ones(2, requires_grad=True).numpy(force=True)
    assert forced.tolist() == [1.0, 1.0]


def test_from_numpy_bad_input() -> None:
    torch = pytest.importorskip("torch")
    bad = np.zeros(2, dtype=np.complex64)
    with pytest.raises(TypeError, match="can't convert np.ndarray of type numpy.complex64"):
        og.from_numpy(bad)
    with pytest.raises(TypeError, match="expected np.ndarray"):
        og.from_numpy([1, 2])
    with pytest.raises(TypeError, match="expected np.ndarray"):
        torch.from_numpy([1, 2])
    with pytest.raises(ValueError, match="C-contiguous"):
        og.from_numpy(np.zeros((3, 3), np.float32).T)


def test_parameters_after_an_optimizer_step_give_snapshots() -> None:
    # The rule for state a step updates (parameters, optimizer state): it lives in the runner's
    # double-buffered memory, which the step after next rewrites, so .numpy() of it (through
    # detach or .data) is a snapshot, never a view that would change under the caller.
    model = og.nn.Linear(2, 1)
    opt = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = og.ones(3, 2)
    snaps = []
    for _ in range(4):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        snaps.append((model.weight.detach().numpy(), model.weight.detach().numpy().copy()))
    for view, copied in snaps:
        np.testing.assert_array_equal(view, copied)  # nothing changed under the caller
    assert not np.array_equal(snaps[0][1], snaps[-1][1])
    w = model.weight.detach()
    before = w.numpy().copy()
    w.numpy()[0, 0] = 123.0  # a snapshot: the parameter is untouched
    np.testing.assert_array_equal(model.weight.detach().numpy(), before)


def test_numpy_of_an_unrecorded_result_and_in_place_after_step() -> None:
    # A computed tensor that is not recorded (no grad) is a leaf: it shares like any other.
    y = og.ones(2) * 3
    n = y.numpy()
    y.sub_(1)
    np.testing.assert_array_equal(n, [2.0, 2.0])
    # In-place updates under no_grad of a parameter keep it a leaf and do not share: the
    # parameter's own .numpy() is refused (it requires grad).
    p = og.nn.Parameter(og.ones(2))
    with og.no_grad():
        p.add_(1)
    assert p.is_leaf and p.detach().tolist() == [2.0, 2.0]


def test_batchnorm_running_stats_update_a_shared_buffer() -> None:
    torch = pytest.importorskip("torch")
    bn, tbn = og.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)
    mean, tmean = bn.running_mean.numpy(), tbn.running_mean.numpy()
    x = np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32)
    bn(og.tensor(x))
    tbn(torch.tensor(x))
    assert mean.any()  # the array followed the update
    np.testing.assert_allclose(mean, tmean, rtol=1e-5)


def test_compiled_functions_read_a_shared_buffer_current_values() -> None:
    a = np.array([1.0, 2.0], dtype=np.float32)
    t = og.from_numpy(a)
    step = og.compile(lambda x: x * t)
    x = og.ones(2)
    assert step(x).tolist() == [1.0, 2.0]
    t.add_(1)  # an in-place op, written into a
    assert step(x).tolist() == [2.0, 3.0]
    a[:] = [5.0, 6.0]  # a write through the array
    assert step(x).tolist() == [5.0, 6.0]
