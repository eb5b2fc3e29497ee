"""Tensor behaviour as PyTorch's: factories, properties, repr, dtypes, .grad, retain_graph,
session reuse, no_grad, detach, og.grad, in-place updates and providers."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import pytest
from onnxgrad.runtime import add_model_check
from onnxgrad.tracer import autograd, registry
from onnxgrad.tracer.registry import OpMethod

import onnxgrad as og


@pytest.fixture
def sessions_made() -> Iterator[list[str]]:
    """Names of the graphs every ORT session created during the test was made from."""
    made: list[str] = []

    def record(model: onnx.ModelProto) -> None:
        made.append(model.graph.name)

    remove = add_model_check(record)
    yield made
    remove()


# --------------------------------------------------------------------------- factories
def test_tensor_dtypes_follow_torch() -> None:
    assert og.tensor([1.0, 2.0]).dtype == og.float32
    assert og.tensor([1, 2]).dtype == og.int64
    assert og.tensor([True]).dtype == og.bool
    assert og.tensor([[1, 2.5]]).dtype == og.float32  # mixed Python numbers: default float
    assert og.tensor(np.zeros(2, np.float64)).dtype == og.float64  # NumPy keeps its dtype
    assert og.tensor(np.zeros(2, np.int32)).dtype == og.int32
    assert og.tensor([1, 2], dtype=og.float64).dtype == og.float64


def test_tensor_copies_its_data() -> None:
    array = np.ones(3, np.float32)
    t = og.tensor(array)
    array[0] = 5
    assert t.tolist() == [1.0, 1.0, 1.0]


def test_factories() -> None:
    assert og.zeros(2, 3).shape == (2, 3) and og.zeros(2, 3).dtype == og.float32
    assert og.zeros((2, 3)).shape == (2, 3)
    assert og.ones(4, dtype=og.int64).tolist() == [1, 1, 1, 1]
    assert og.full((2,), 7).dtype == og.int64
    assert og.full((2,), 0.5).tolist() == [0.5, 0.5]
    assert og.full((1,), True).dtype == og.bool
    like = og.tensor([[1.0, 2.0]], dtype=og.float64)
    assert og.zeros_like(like).dtype == og.float64 and og.ones_like(like).shape == (1, 2)
    assert og.arange(4).tolist() == [0, 1, 2, 3] and og.arange(4).dtype == og.int64
    assert og.arange(0, 1, 0.25).tolist() == [0.0, 0.25, 0.5, 0.75]
    assert og.arange(0, 1, 0.25).dtype == og.float32
    r = og.rand(100)
    assert r.dtype == og.float32 and 0 <= r.numpy().min() and r.numpy().max() < 1
    assert og.randn(3, 4, dtype=og.float64).dtype == og.float64
    i = og.randint(2, 5, (50,))
    assert i.dtype == og.int64 and set(i.tolist()) <= {2, 3, 4}
    assert og.zeros(2, requires_grad=True).requires_grad


def test_manual_seed_reproduces() -> None:
    og.manual_seed(0)
    a = og.randn(5).tolist()
    og.manual_seed(0)
    assert og.randn(5).tolist() == a
    assert og.randn(5).tolist() != a


# --------------------------------------------------------------------------- properties
def test_properties() -> None:
    t = og.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert t.shape == (2, 3) and t.size() == (2, 3) and t.size(1) == 3
    assert t.ndim == 2 and t.dim() == 2 and t.numel() == 6 and len(t) == 2
    assert t.dtype == og.float32
    assert t.T.shape == (3, 2)
    assert t.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert isinstance(t.numpy(), np.ndarray) and t.numpy().dtype == np.float32
    assert t[1, 2].item() == 6.0 and isinstance(t[1, 2].item(), float)
    assert og.tensor(3).item() == 3 and isinstance(og.tensor(3).item(), int)
    assert float(og.tensor([2.5])) == 2.5 and int(og.tensor(4)) == 4
    assert [row.tolist() for row in t] == t.tolist()
    with pytest.raises(ValueError, match="cannot be converted to a Scalar"):
        t.item()
    with pytest.raises(RuntimeError, match="ambiguous"):
        bool(t > 0)


def test_leaf_and_grad_fn() -> None:
    a = og.tensor([1.0, 2.0], requires_grad=True)
    b = og.tensor([1.0, 2.0])
    y = a * 2
    assert a.is_leaf and a.requires_grad and a.grad_fn is None
    assert b.is_leaf and not b.requires_grad
    assert not y.is_leaf and y.requires_grad and y.grad_fn.name() == "MulBackward0"
    assert not (b * 2).requires_grad and (b * 2).is_leaf
    with pytest.raises(RuntimeError, match="Use tensor.detach"):
        a.numpy()
    with pytest.raises(RuntimeError, match="only floating point"):
        og.tensor([1, 2], requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf variables"):
        y.requires_grad_(False)
    assert b.requires_grad_() is b and b.requires_grad and b.is_leaf


def test_comparisons_do_not_require_grad() -> None:
    a = og.tensor([1.0, 2.0], requires_grad=True)
    for result in (a == 1, a != 1, a < 1, a <= 1, a > 1, a >= 1):
        assert result.dtype == og.bool and not result.requires_grad


# --------------------------------------------------------------------------- repr
@pytest.mark.parametrize("make, text", [
    (lambda: og.tensor([True, True]), "tensor([True, True])"),
    (lambda: og.tensor([True, False]), "tensor([ True, False])"),
    (lambda: og.tensor([2.0, 3.0], requires_grad=True), "tensor([2., 3.], requires_grad=True)"),
    (lambda: og.tensor([2.0, 3.0], requires_grad=True) * 2, "tensor([4., 6.], grad_fn=<MulBackward0>)"),
    (lambda: og.tensor([0.1234567, -2.5]), "tensor([ 0.1235, -2.5000])"),
    (lambda: og.tensor(2.5), "tensor(2.5000)"),
    (lambda: og.tensor([1, 2]), "tensor([1, 2])"),
    (lambda: og.tensor([1, 2], dtype=og.int32), "tensor([1, 2], dtype=onnxgrad.int32)"),
    (lambda: og.tensor([1.5, 2.0], dtype=og.float64),
     "tensor([1.5000, 2.0000], dtype=onnxgrad.float64)"),
    (lambda: og.tensor([1.5], dtype=og.float16), "tensor([1.5000], dtype=onnxgrad.float16)"),
    (lambda: og.tensor([1e-5, 1.0]), "tensor([1.0000e-05, 1.0000e+00])"),
    (lambda: og.tensor([float("nan"), 1.0, float("inf")]), "tensor([nan, 1., inf])"),
    (lambda: og.zeros(2, 2), "tensor([[0., 0.],\n        [0., 0.]])"),
    (lambda: og.tensor([]), "tensor([])"),
], ids=["bools", "bools-padded", "requires-grad", "grad-fn", "fractions", "0d", "int64",
        "int32", "float64", "float16", "scientific", "nonfinite", "2d", "empty"])
def test_repr_is_torch_like(make, text: str) -> None:
    assert repr(make()) == text
    assert str(make()) == text


# --------------------------------------------------------------------------- dtype promotion
T, S = "tensor", "0-d"  # a 1-d tensor operand, or a 0-dim tensor operand


def _operand(kind: str, dtype):
    if kind == T:
        return og.ones(2, dtype=dtype)
    return og.tensor(1, dtype=dtype)


# (left, right, result) as torch.result_type gives it (checked against torch 2.13).
PROMOTIONS = [
    ((T, og.float32), (T, og.float64), og.float64),
    ((T, og.float32), (S, og.float64), og.float32),   # 0-d of the same category doesn't widen
    ((T, og.int64), (S, og.float64), og.float64),     # ... but a higher category wins
    ((T, og.int64), (T, og.float32), og.float32),
    ((T, og.int32), (T, og.int64), og.int64),
    ((T, og.int32), (S, og.int64), og.int32),
    ((T, og.bool), (T, og.int64), og.int64),
    ((T, og.bool), (T, og.float32), og.float32),
    ((T, og.float16), (T, og.float32), og.float32),
    ((T, og.float16), (S, og.float32), og.float16),
    ((T, og.uint8), (T, og.int8), np.dtype("int16")),
    ((S, og.int64), (S, og.float32), og.float32),
    ((S, og.float64), (T, og.float16), og.float16),
]


@pytest.mark.parametrize("left, right, result", PROMOTIONS,
                         ids=[f"{a[1]}{a[0][0]}+{b[1]}{b[0][0]}" for a, b, _ in PROMOTIONS])
def test_promotion_of_tensors(left, right, result) -> None:
    assert (_operand(*left) + _operand(*right)).dtype == result
    assert (_operand(*right) + _operand(*left)).dtype == result


@pytest.mark.parametrize("dtype, scalar, result", [
    (og.int64, 2.5, og.float32),
    (og.int32, 2, og.int32),
    (og.bool, 2, og.int64),
    (og.bool, True, og.bool),
    (og.float64, 2.5, og.float64),
    (og.float16, 2, og.float16),
])
def test_promotion_with_python_scalars(dtype, scalar, result) -> None:
    t = og.ones(2, dtype=dtype)
    assert (t + scalar).dtype == result and (scalar + t).dtype == result


def test_true_division_and_float_functions_of_ints() -> None:
    assert (og.tensor([3]) / og.tensor([2])).tolist() == [1.5]
    assert (og.tensor([3]) / 2).dtype == og.float32
    assert og.tensor([0, 1]).exp().dtype == og.float32
    assert og.tensor([1, 2]).sum().dtype == og.int64
    assert og.tensor([True, True]).sum().tolist() == 2


def test_default_dtype() -> None:
    try:
        og.set_default_dtype(og.float64)
        assert og.tensor([1.0]).dtype == og.float64 and og.zeros(1).dtype == og.float64
        assert (og.tensor([1]) * 0.5).dtype == og.float64
    finally:
        og.set_default_dtype(og.float32)
    assert og.get_default_dtype() == og.float32
    with pytest.raises(TypeError):
        og.set_default_dtype(og.int64)


# --------------------------------------------------------------------------- .grad
def test_grad_accumulates_across_backward_calls() -> None:
    a = og.tensor([1.0, 2.0], requires_grad=True)
    (a * a).sum().backward()
    assert a.grad.tolist() == [2.0, 4.0]
    (a * 3).sum().backward()
    assert a.grad.tolist() == [5.0, 7.0]
    a.grad = None
    (a * 3).sum().backward()
    assert a.grad.tolist() == [3.0, 3.0]
    assert not a.grad.requires_grad and a.grad.dtype == og.float32


def test_grad_of_unreached_leaf_stays_none() -> None:
    a = og.tensor([1.0], requires_grad=True)
    b = og.tensor([1.0], requires_grad=True)
    (a * 2).sum().backward()
    assert a.grad is not None and b.grad is None


def test_backward_through_fan_out_and_shared_subgraph() -> None:
    a = og.tensor([1.0, -2.0], requires_grad=True)
    h = a * a
    y = (h + h * a + og.exp(h)).sum()
    y.backward()
    x = np.array([1.0, -2.0])
    expected = 2 * x + 3 * x ** 2 + 2 * x * np.exp(x ** 2)
    np.testing.assert_allclose(a.grad.numpy(), expected, rtol=1e-5)


def test_backward_of_several_roots() -> None:
    a = og.tensor([1.0, 2.0], requires_grad=True)
    og.tracer.backward([a * 2, (a * a).sum()], [og.tensor([1.0, 1.0]), None])
    assert a.grad.tolist() == [4.0, 6.0]


def test_retain_graph_semantics() -> None:
    a = og.tensor([1.0, 2.0], requires_grad=True)
    y = (a * a).sum()
    y.backward(retain_graph=True)
    y.backward()
    assert a.grad.tolist() == [4.0, 8.0]
    with pytest.raises(RuntimeError, match=r"^Trying to backward through the graph a second time"
                                           r".*retain_graph=True"):
        y.backward()


def test_graph_freed_only_along_the_backward_path() -> None:
    a = og.tensor([1.0], requires_grad=True)
    h = a * 3
    y1, y2 = (h * 2).sum(), (h * 5).sum()
    y1.backward()  # frees h's record too, as torch frees the whole graph it walked
    with pytest.raises(RuntimeError, match="second time"):
        y2.backward()
    b = og.tensor([1.0], requires_grad=True)
    (b * 2).sum().backward()
    (b * 2).sum().backward()  # a new forward records a new graph
    assert b.grad.tolist() == [4.0]


def test_second_identical_backward_creates_no_session(sessions_made: list[str]) -> None:
    def step(x: og.Tensor) -> None:
        ((x * 3 - 1).tanh() ** 2).mean().backward()

    a = og.tensor([[0.1, 0.2], [0.3, 0.4]], requires_grad=True)
    step(a)
    created = autograd.stats["sessions_created"]
    runs = autograd.stats["backward_runs"]
    made_before = len(sessions_made)
    step(a)  # same structure, new forward values
    assert autograd.stats["sessions_created"] == created
    assert autograd.stats["backward_runs"] == runs + 1
    assert len(sessions_made) == made_before, sessions_made[made_before:]
    x = np.array([[0.1, 0.2], [0.3, 0.4]])
    t = np.tanh(3 * x - 1)
    np.testing.assert_allclose(a.grad.numpy(), 2 * (2 * t * (1 - t ** 2) * 3 / 4), rtol=1e-5)


def test_new_shape_builds_a_new_backward_session() -> None:
    before = autograd.stats["sessions_created"]
    a = og.tensor([1.0] * 7, requires_grad=True)
    (a * a * a * a).sum().backward()
    assert autograd.stats["sessions_created"] == before + 1


# --------------------------------------------------------------------------- grad modes
def test_no_grad_records_nothing() -> None:
    a = og.tensor([1.0, 2.0], requires_grad=True)
    with og.no_grad():
        y = a * 2
        with og.enable_grad():
            z = a * 2
    assert not y.requires_grad and y.grad_fn is None and y._v.rec is None
    assert z.requires_grad

    @og.no_grad()
    def double(t: og.Tensor) -> og.Tensor:
        return t * 2

    assert not double(a).requires_grad
    og.set_grad_enabled(False)
    try:
        assert not (a * 2).requires_grad
    finally:
        og.set_grad_enabled(True)
    assert (a * 2).requires_grad


def test_detach_stops_gradients() -> None:
    a = og.tensor([1.0, 3.0], requires_grad=True)
    d = a.detach()
    assert not d.requires_grad and d.is_leaf and d.tolist() == a.tolist()
    (a.detach() * a).sum().backward()
    assert a.grad.tolist() == [1.0, 3.0]  # d(c * a)/da with c constant


def test_og_grad_leaves_dot_grad_alone() -> None:
    a = og.tensor([1.0, 2.0], requires_grad=True)
    b = og.tensor([3.0], requires_grad=True)
    a.grad = og.tensor([10.0, 10.0])
    (ga,) = og.grad((a * a).sum(), a)
    assert ga.tolist() == [2.0, 4.0]
    assert a.grad.tolist() == [10.0, 10.0] and b.grad is None
    ga, gb = og.grad((a * b).sum(), [a, b])
    assert ga.tolist() == [3.0, 3.0] and gb.tolist() == [3.0]
    with pytest.raises(RuntimeError, match="allow_unused=True"):
        og.grad((a * 2).sum(), [a, b])
    ga, gb = og.grad((a * 2).sum(), [a, b], allow_unused=True)
    assert ga.tolist() == [2.0, 2.0] and gb is None


# --------------------------------------------------------------------------- in-place updates
def test_sgd_step_under_no_grad_keeps_the_leaf() -> None:
    w = og.tensor([1.0, 2.0], requires_grad=True)
    (w * w).sum().backward()
    with og.no_grad():
        w -= 0.5 * w.grad
    assert w.is_leaf and w.requires_grad and w.tolist() == [0.0, 0.0]
    assert w.grad.tolist() == [2.0, 4.0]
    w.grad = None
    ((w + 1) * (w + 1)).sum().backward()
    assert w.grad.tolist() == [2.0, 2.0]


def test_in_place_on_non_leaf_is_differentiated() -> None:
    a = og.tensor([1.0, 2.0], requires_grad=True)
    y = a * 2
    y += a
    y *= a
    y.sum().backward()
    assert a.grad.tolist() == [6.0, 12.0]  # d(3a^2)/da


def test_in_place_keeps_dtype() -> None:
    t = og.tensor([1.0, 2.0])
    handle = t
    t += og.tensor([1.0, 1.0], dtype=og.float64)
    assert t is handle and t.dtype == og.float32 and t.tolist() == [2.0, 3.0]
    i = og.tensor([1, 2])
    i *= 3
    assert i.dtype == og.int64 and i.tolist() == [3, 6]


# --------------------------------------------------------------------------- providers
def test_set_providers() -> None:
    before = og.get_providers()
    assert before[-1] == "CPUExecutionProvider"
    try:
        og.set_providers(["CPUExecutionProvider"])
        assert og.get_providers() == ["CPUExecutionProvider"]
        assert (og.tensor([1.0]) + 1).tolist() == [2.0]  # kernels rebuilt on the new providers
        with pytest.raises(ValueError, match="not available"):
            og.set_providers(["NoSuchExecutionProvider"])
        with pytest.raises(ValueError):
            og.set_providers([])
        assert og.get_providers() == ["CPUExecutionProvider"]
    finally:
        og.set_providers(before)


def test_data_alias_and_in_place_fills_write_through() -> None:
    layer = og.nn.Linear(3, 2)
    w0 = layer.weight.detach().numpy().copy()
    layer.weight.data.mul_(2)
    np.testing.assert_array_equal(layer.weight.detach().numpy(), 2 * w0)
    assert layer.weight.is_leaf and layer.weight.requires_grad
    layer.bias.data.zero_()
    assert layer.bias.detach().tolist() == [0.0, 0.0]
    layer.bias.data.fill_(0.5)
    assert layer.bias.detach().tolist() == [0.5, 0.5]
    with og.no_grad():
        layer.weight.copy_(og.ones(3))  # broadcast, as torch's copy_
    assert layer.weight.detach().tolist() == [[1.0] * 3] * 2
    with pytest.raises(RuntimeError, match="in-place"):
        layer.weight.copy_(og.ones(2, 3))  # grad enabled: refused, as PyTorch
    t = og.zeros(2, dtype=og.int64)
    t.copy_(og.tensor([1.7, 2.2]))
    assert t.tolist() == [1, 2]


# --------------------------------------------------------------------------- entry points of the op definitions
# Every public op name as it was before the ops got one definition each (tracer/registry.py):
# none may disappear.
OG_OPS = ["abs", "amax", "amin", "arange", "argmax", "argmin", "cat", "chunk", "clamp", "clip",
          "exp", "flatten", "full", "log", "log_softmax", "matmul", "max", "maximum", "mean", "min",
          "minimum", "ones", "ones_like", "permute", "rand", "randint", "randn", "relu", "reshape",
          "sigmoid", "softmax", "split", "sqrt", "squeeze", "stack", "sum", "tanh", "transpose",
          "unsqueeze", "where", "zeros", "zeros_like"]
FUNCTIONAL = ["adaptive_avg_pool2d", "avg_pool2d", "batch_norm", "conv2d", "cross_entropy",
              "dropout", "flatten", "l1_loss", "linear", "log_softmax", "max_pool2d", "mse_loss",
              "nll_loss", "relu", "sigmoid", "softmax", "tanh"]
TENSOR_METHODS = [
    "abs", "add", "add_", "amax", "amin", "argmax", "argmin", "backward", "bool", "chunk", "clamp",
    "clip", "clone", "copy_", "div", "div_", "double", "eq", "exp", "expand", "expand_as",
    "fill_", "flatten", "float", "ge", "gt", "int", "le", "log", "log_softmax", "logical_not",
    "long", "lt", "matmul", "max", "maximum", "mean", "min", "minimum", "mul", "mul_", "ne", "neg",
    "permute", "pow", "relu", "reshape", "reshape_as", "sigmoid", "softmax", "split", "sqrt",
    "squeeze", "sub", "sub_", "sum", "tanh", "to", "transpose", "type_as", "unsqueeze", "view",
    "view_as", "zero_",
]


def test_public_op_names_are_kept() -> None:
    import onnxgrad.nn.functional as F

    for name in OG_OPS:
        assert callable(getattr(og, name)) and name in og.__all__, name
    for name in FUNCTIONAL:
        assert callable(getattr(F, name)) and name in F.__all__, name
    t = og.ones(2)
    for name in TENSOR_METHODS:
        assert callable(getattr(t, name)) and name in dir(t), name
    assert og.clip is og.clamp and F.relu is og.relu
    assert F.flatten(og.ones(2, 3, 4)).shape == (2, 12)  # functional's own: from dim 1
    assert og.flatten(og.ones(2, 3, 4)).shape == (24,)


def test_all_names_resolve() -> None:
    import onnxgrad.nn.functional as F

    for module in (og, F):
        assert len(module.__all__) == len(set(module.__all__)), module.__name__
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"


def test_operator_slots_are_exactly_the_declared_operators() -> None:
    # Python finds operators on the type: each dunder an op declares needs its slot in the
    # Tensor class body, and a slot that no op declares would be a dead operator.
    slots = {name for name, value in vars(og.Tensor).items() if isinstance(value, OpMethod)}
    declared = {name for name in registry.METHODS if name.startswith("__")}
    assert slots == declared


def test_operators_and_methods_dispatch_to_their_op() -> None:
    a, b = og.tensor([1.0, 4.0]), og.tensor([2.0, 2.0])
    np.testing.assert_array_equal((a + b).numpy(), [3.0, 6.0])
    np.testing.assert_array_equal((1 - a).numpy(), [0.0, -3.0])  # reflected
    np.testing.assert_array_equal((2 ** a).numpy(), [2.0, 16.0])
    np.testing.assert_array_equal(a.sub(b, alpha=2).numpy(), [-3.0, 0.0])
    c = a * 1
    c += b  # in place: the same handle
    assert c is not a and c.tolist() == [3.0, 6.0] and a.tolist() == [1.0, 4.0]
    with pytest.raises(AttributeError, match="'Tensor' object has no attribute 'no_such_op'"):
        _ = a.no_such_op
    with pytest.raises(AttributeError):
        _ = a.__no_such_dunder__


def test_a_name_is_registered_once() -> None:
    before = (dict(registry.OPS), dict(registry.METHODS), registry.namespace("og"))

    def exp(x):  # the name og.exp and Tensor.exp already have
        return x

    with pytest.raises(ValueError, match="og name 'exp' is already taken"):
        registry.op(og=True, method=True, name="test.exp")(exp)
    with pytest.raises(ValueError, match="op 'exp' is defined twice"):
        registry.op()(exp)
    # A refused op leaves nothing behind.
    assert (registry.OPS, registry.METHODS, registry.namespace("og")) == before
