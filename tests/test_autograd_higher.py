"""Higher-order gradients: ``og.autograd.grad(..., create_graph=True)`` records the gradient nodes
(the rules' ONNX nodes) as ops, so gradients can be differentiated again, eager and compiled."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxgrad.passes import NoGradientRule
from onnxgrad.passes.rules import RULES
from onnxgrad.runtime.metadata import DATA_INPUTS

import onnxgrad as og
from onnxgrad import nn
from onnxgrad.nn import functional as F

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(7)

# f(x) -> scalar, written once for both libraries (the same method names).
SCALAR_FUNCTIONS = {
    "tanh_cube": lambda x, m: (m.tanh(x) ** 3).sum(),
    "sigmoid_mul": lambda x, m: (m.sigmoid(x) * x).sum(),
    "exp_log": lambda x, m: (m.exp(x * 0.5) + m.log(x * x + 1.0)).sum(),
    "div_pow": lambda x, m: (x / (x * x + 2.0)).pow(2).mean(),
    "softmax": lambda x, m: (m.softmax(x.reshape(2, 3), 1) * x.reshape(2, 3)).sum(),
    "relu_square": lambda x, m: (m.relu(x) * x * x).sum(),
}


class _T:
    tanh, sigmoid, exp, log, relu = (staticmethod(torch.tanh), staticmethod(torch.sigmoid),
                                     staticmethod(torch.exp), staticmethod(torch.log),
                                     staticmethod(torch.relu))
    softmax = staticmethod(torch.softmax)


class _O:
    tanh, sigmoid, exp, log, relu = (staticmethod(og.tanh), staticmethod(og.sigmoid),
                                     staticmethod(og.exp), staticmethod(og.log),
                                     staticmethod(F.relu))
    softmax = staticmethod(F.softmax)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(SCALAR_FUNCTIONS))
def test_grad_of_grad_matches_torch(name: str, dtype: str) -> None:
    f = SCALAR_FUNCTIONS[name]
    data = RNG.standard_normal(6).astype(dtype)
    x = og.tensor(data, requires_grad=True)
    (g,) = og.autograd.grad(f(x, _O), x, create_graph=True)
    assert g.requires_grad and g.grad_fn is not None
    (h,) = og.autograd.grad((g * g).sum(), x)
    xt = torch.tensor(data, requires_grad=True)
    (gt,) = torch.autograd.grad(f(xt, _T), xt, create_graph=True)
    (ht,) = torch.autograd.grad((gt * gt).sum(), xt)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == "float64" else {"rtol": 2e-4, "atol": 1e-5}
    np.testing.assert_allclose(g.detach().numpy(), gt.detach().numpy(), **tol)
    np.testing.assert_allclose(h.numpy(), ht.numpy(), **tol)
    assert h.dtype == np.dtype(dtype)


def test_third_order_and_central_differences() -> None:
    x = og.tensor([0.3, -1.2, 0.8], dtype=og.float64, requires_grad=True)
    (g,) = og.grad(og.sin(x).sum(), x, create_graph=True)
    (g2,) = og.grad(g.sum(), x, create_graph=True)
    (g3,) = og.grad(g2.sum(), x)
    np.testing.assert_allclose(g2.detach().numpy(), -np.sin(x.detach().numpy()), rtol=1e-12)
    np.testing.assert_allclose(g3.numpy(), -np.cos(x.detach().numpy()), rtol=1e-12)

    # d/dx of the gradient of tanh(x)^2, against central differences of the first gradient.
    def first(a: np.ndarray) -> np.ndarray:
        t = og.tensor(a, requires_grad=True)
        return og.grad((og.tanh(t) ** 2).sum(), t)[0].numpy()

    a = np.array([0.4, -0.9], dtype=np.float64)
    t = og.tensor(a, requires_grad=True)
    (g,) = og.grad((og.tanh(t) ** 2).sum(), t, create_graph=True)
    u = np.array([0.7, -0.2])
    (hu,) = og.grad(g, t, grad_outputs=og.tensor(u))
    eps = 1e-6
    numeric = sum(u[i] * (first(a + eps * np.eye(2)[i]) - first(a - eps * np.eye(2)[i])) / (2 * eps)
                  for i in range(2))
    np.testing.assert_allclose(hu.numpy(), numeric, rtol=1e-6, atol=1e-9)


def _mlp_params(dtype: str) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.standard_normal(s).astype(dtype) * 0.5 for s in [(5, 4), (5,), (3, 5), (3,)]]


def _mlp_loss(params, x, y, m):
    w1, b1, w2, b2 = params
    h = m.tanh(m.linear(x, w1, b1))
    h = m.relu(h + 0.1) * h
    return m.cross_entropy(m.linear(h, w2, b2), y)


class _TF:
    tanh, relu, linear = (staticmethod(torch.tanh), staticmethod(torch.relu),
                          staticmethod(torch.nn.functional.linear))
    cross_entropy = staticmethod(torch.nn.functional.cross_entropy)


class _OF:
    tanh, relu, linear, cross_entropy = (staticmethod(og.tanh), staticmethod(F.relu),
                                         staticmethod(F.linear), staticmethod(F.cross_entropy))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mlp_hessian_vector_product_matches_torch(dtype: str) -> None:
    values = _mlp_params(dtype)
    rng = np.random.default_rng(4)
    xs = rng.standard_normal((6, 4)).astype(dtype)
    ys = rng.integers(0, 3, 6)
    vs = [rng.standard_normal(p.shape).astype(dtype) for p in values]

    params = [og.tensor(p, requires_grad=True) for p in values]
    loss = _mlp_loss(params, og.tensor(xs), og.tensor(ys), _OF)
    grads = og.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * og.tensor(v)).sum() for g, v in zip(grads, vs))
    hv = og.autograd.grad(dot, params)

    tparams = [torch.tensor(p, requires_grad=True) for p in values]
    tloss = _mlp_loss(tparams, torch.tensor(xs), torch.tensor(ys), _TF)
    tgrads = torch.autograd.grad(tloss, tparams, create_graph=True)
    tdot = sum((g * torch.tensor(v)).sum() for g, v in zip(tgrads, vs))
    thv = torch.autograd.grad(tdot, tparams)
    tol = {"rtol": 1e-9, "atol": 1e-11} if dtype == "float64" else {"rtol": 1e-3, "atol": 1e-5}
    for a, b in zip(grads, tgrads):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), **tol)
    for a, b in zip(hv, thv):
        np.testing.assert_allclose(a.numpy(), b.numpy(), **tol)

    # og.autograd.functional.hvp agrees (as a function of the first layer's weight).
    def f(w1):
        return _mlp_loss([w1] + [og.tensor(p) for p in values[1:]], og.tensor(xs),
                         og.tensor(ys), _OF)

    def ft(w1):
        return _mlp_loss([w1] + [torch.tensor(p) for p in values[1:]], torch.tensor(xs),
                         torch.tensor(ys), _TF)

    value, h = og.autograd.functional.hvp(f, og.tensor(values[0]), og.tensor(vs[0]))
    tvalue, th = torch.autograd.functional.hvp(ft, torch.tensor(values[0]), torch.tensor(vs[0]))
    np.testing.assert_allclose(h.numpy(), th.numpy(), **tol)
    np.testing.assert_allclose(value.numpy(), tvalue.numpy(), **tol)


def test_functional_vjp_and_jvp_match_torch() -> None:
    a = RNG.standard_normal(4)
    v = RNG.standard_normal(4)
    _, vjp = og.autograd.functional.vjp(lambda x: og.tanh(x) * x, og.tensor(a), og.tensor(v))
    _, tvjp = torch.autograd.functional.vjp(lambda x: torch.tanh(x) * x, torch.tensor(a),
                                               torch.tensor(v))
    np.testing.assert_allclose(vjp.numpy(), tvjp.numpy(), rtol=1e-12)
    _, jvp = og.autograd.functional.jvp(lambda x: og.exp(x) * x, og.tensor(a), og.tensor(v))
    _, tjvp = torch.autograd.functional.jvp(lambda x: torch.exp(x) * x, torch.tensor(a),
                                            torch.tensor(v))
    np.testing.assert_allclose(jvp.numpy(), tjvp.numpy(), rtol=1e-12)


def test_backward_with_create_graph_leaves_a_differentiable_grad() -> None:
    x = og.tensor([0.5, -1.5], dtype=og.float64, requires_grad=True)
    (x ** 3).sum().backward(create_graph=True)
    gx = x.grad
    assert gx.requires_grad and gx.grad_fn is not None
    np.testing.assert_allclose(gx.detach().numpy(), [0.75, 6.75])
    x.grad = None
    gx.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [3.0, -9.0])  # 6x


def test_grad_with_respect_to_a_non_leaf() -> None:
    x = og.tensor([1.0, 2.0], requires_grad=True)
    y = x * x
    z = (og.exp(y) * 2).sum()
    gy, gx = og.autograd.grad(z, [y, x])
    np.testing.assert_allclose(gy.numpy(), 2 * np.exp([1.0, 4.0]), rtol=1e-6)
    np.testing.assert_allclose(gx.numpy(), 4 * np.array([1.0, 2.0]) * np.exp([1.0, 4.0]),
                               rtol=1e-6)
    assert x.grad is None and not gy.requires_grad


def test_create_graph_retains_the_graph_and_grad_leaves_dot_grad_alone() -> None:
    x = og.tensor([1.0, 2.0], requires_grad=True)
    y = (x ** 2).sum()
    og.autograd.grad(y, x, create_graph=True)
    og.autograd.grad(y, x)  # retained by create_graph
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        og.autograd.grad(y, x)
    assert x.grad is None


def test_bad_inputs_name_the_problem() -> None:
    x = og.tensor([1.0, 2.0], requires_grad=True)
    c = og.tensor([1.0, 2.0])
    with pytest.raises(RuntimeError, match="does not require grad and does not have a grad_fn"):
        og.autograd.grad((c * 2).sum(), x)
    with pytest.raises(RuntimeError, match="One of the differentiated Tensors does not require"):
        og.autograd.grad((x * 2).sum(), c)
    with pytest.raises(RuntimeError, match="appears to not have been used in the graph"):
        og.autograd.grad((x * 2).sum(), [x, og.tensor([1.0], requires_grad=True)],
                         create_graph=True)
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar"):
        og.autograd.grad(x * 2, x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"Mismatch in shape: grad_output\[0\]"):
        og.autograd.grad(x * 2, x, grad_outputs=og.ones(3), create_graph=True)
    (g,) = og.autograd.grad((x * 2).sum(), [x], materialize_grads=True)
    assert g.tolist() == [2.0, 2.0]


def test_create_graph_through_an_op_without_second_order_rule_names_it(monkeypatch) -> None:
    # The Tanh rule builds Mul(g, Sub(1, Mul(y, y))): without a Sub rule, the gradient of tanh
    # cannot be differentiated again, and the error says which op and which node type.
    monkeypatch.delitem(RULES, "Sub")
    x = og.tensor([0.2, 0.4], requires_grad=True)
    (g,) = og.autograd.grad(og.tanh(x).sum(), x, create_graph=True)
    with pytest.raises(NoGradientRule, match="create_graph through Tanh is not supported: no "
                                             "gradient rule for Sub"):
        og.autograd.grad(g.sum(), x)


def test_gather_is_twice_differentiable_as_in_pytorch() -> None:
    # GatherElements' gradient is a ScatterElements, which has a rule of its own.
    torch = pytest.importorskip("torch")
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    index = np.array([[1, 0], [0, 0]])
    x = og.tensor(a, requires_grad=True)
    y = x.gather(1, og.tensor(index))
    (g,) = og.autograd.grad((y * y * y).sum(), x, create_graph=True)
    (h,) = og.autograd.grad(g.sum(), x)
    xt = torch.tensor(a, requires_grad=True)
    yt = xt.gather(1, torch.tensor(index))
    (gt,) = torch.autograd.grad((yt * yt * yt).sum(), xt, create_graph=True)
    (ht,) = torch.autograd.grad(gt.sum(), xt)
    np.testing.assert_allclose(g.detach().numpy(), gt.detach().numpy())
    np.testing.assert_allclose(h.numpy(), ht.numpy())


# --------------------------------------------------------------------------- compiled
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(og.tanh(self.fc1(x)))


def _penalty_setup():
    og.manual_seed(0)
    model = _Net()
    opt = og.optim.SGD(model.parameters(), lr=0.1)
    return model, opt


def _penalty_step(model, opt, x, t):
    opt.zero_grad()
    x = x.detach().requires_grad_(True)
    out = model(x)
    loss = ((out - t) ** 2).mean()
    (g,) = og.autograd.grad(out.sum(), x, create_graph=True)
    total = loss + ((g * g).sum(1) - 1.0).pow(2).mean()
    total.backward()
    opt.step()
    return total


def test_gradient_penalty_step_compiled_equals_eager(tmp_path) -> None:
    rng = np.random.default_rng(0)
    batches = [(og.tensor(rng.standard_normal((5, 3)).astype(np.float32)),
                og.tensor(rng.standard_normal((5, 2)).astype(np.float32))) for _ in range(3)]
    model, opt = _penalty_setup()
    eager = [_penalty_step(model, opt, x, t).item() for x, t in batches]
    eager_state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    model, opt = _penalty_setup()
    step = og.compile(lambda x, t: _penalty_step(model, opt, x, t))
    compiled = [step(x, t).item() for x, t in batches]
    assert step.traces == 1
    assert any(n.op_type == "Tanh" for n in step.last.model.graph.node)
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v.detach().numpy(), eager_state[k], rtol=1e-5, atol=1e-6)
    # The torch twin of one step: the same penalty gradient.
    twin, twin_opt = _penalty_setup()
    tmodel = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        for p, q in zip(twin.parameters(), tmodel.parameters()):
            q.copy_(torch.tensor(p.detach().numpy()))
    x, t = batches[0]
    xt = torch.tensor(x.numpy(), requires_grad=True)
    out = tmodel(xt)
    (g,) = torch.autograd.grad(out.sum(), xt, create_graph=True)
    total = ((out - torch.tensor(t.numpy())) ** 2).mean() + ((g * g).sum(1) - 1.0).pow(2).mean()
    total.backward()
    _penalty_step(twin, twin_opt, x, t)
    for p, q in zip(twin.parameters(), tmodel.parameters()):
        before = q.detach().numpy() - 0.1 * q.grad.numpy()
        np.testing.assert_allclose(p.detach().numpy(), before, rtol=1e-5, atol=1e-6)

    # The exported step (penalty gradient included) runs in plain onnxruntime.
    path = tmp_path / "penalty.onnx"
    step.export(path)
    exported = onnx.load(path)
    data = json.loads({p.key: p.value for p in exported.metadata_props}[DATA_INPUTS])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x, t = batches[0]
    result = session.run(["output"], dict(zip(data, [x.numpy(), t.numpy()])))[0]
    expected = step(x, t).item()
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
