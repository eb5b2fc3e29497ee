"""``grad_fn`` nodes (PyTorch's names, ``next_functions``, ``AccumulateGrad``), ``retain_grad``,
``register_hook``, ``detach_`` and ``inference_mode``, against PyTorch."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import onnxgrad as og
from onnxgrad import nn
from onnxgrad.nn import functional as F

torch = pytest.importorskip("torch")

A = [1.0, 2.0]
B = [[1.0, 2.0], [3.0, 4.0]]

# name -> f(a, b, lib): the same expression in both libraries.
CASES = {
    "add": lambda a, b, m: a + 1,
    "sub": lambda a, b, m: a - a,
    "rsub": lambda a, b, m: 2 - a,
    "mul": lambda a, b, m: a * 2,
    "div": lambda a, b, m: a / 2,
    "pow": lambda a, b, m: a ** 2,
    "pow_tensor": lambda a, b, m: a ** a,
    "sum": lambda a, b, m: a.sum(),
    "sum_dim": lambda a, b, m: b.sum(1),
    "mean": lambda a, b, m: a.mean(),
    "mean_dim": lambda a, b, m: b.mean(0),
    "mm": lambda a, b, m: b @ b,
    "mv": lambda a, b, m: b @ a,
    "dot": lambda a, b, m: a @ a,
    "relu": lambda a, b, m: a.relu(),
    "exp": lambda a, b, m: a.exp(),
    "log": lambda a, b, m: a.log(),
    "tanh": lambda a, b, m: a.tanh(),
    "sigmoid": lambda a, b, m: a.sigmoid(),
    "neg": lambda a, b, m: -a,
    "sqrt": lambda a, b, m: a.sqrt(),
    "abs": lambda a, b, m: a.abs(),
    "view": lambda a, b, m: b.view(4),
    "reshape": lambda a, b, m: b.reshape(4),
    "permute": lambda a, b, m: b.permute(1, 0),
    "unsqueeze": lambda a, b, m: a.unsqueeze(0),
    "clone": lambda a, b, m: a.clone(),
    "cat": lambda a, b, m: m.cat([a, a]),
    "clamp": lambda a, b, m: a.clamp(0, 1),
    "maximum": lambda a, b, m: m.maximum(a, a),
    "slice": lambda a, b, m: a[1:],
}


def _describe(node) -> list:
    """The node's name and its next functions' names, two levels deep."""
    if node is None:
        return [None]
    name = node.name()
    return [name] + [(_describe(n) if n is not None else None, i)
                     for n, i in node.next_functions]


@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_fn_names_and_next_functions_match_torch(name: str) -> None:
    f = CASES[name]
    y = f(og.tensor(A, requires_grad=True), og.tensor(B, requires_grad=True), og)
    yt = f(torch.tensor(A, requires_grad=True), torch.tensor(B, requires_grad=True), torch)
    assert _describe(y.grad_fn) == _describe(yt.grad_fn)


def test_composed_graph_structure_and_accumulate_grad() -> None:
    a = og.tensor(A, requires_grad=True)
    w = og.tensor(B, requires_grad=True)
    loss = (og.tanh(w @ a) * 3).sum()
    at = torch.tensor(A, requires_grad=True)
    wt = torch.tensor(B, requires_grad=True)
    losst = (torch.tanh(wt @ at) * 3).sum()
    assert _describe(loss.grad_fn) == _describe(losst.grad_fn)
    mv = loss.grad_fn.next_functions[0][0].next_functions[0][0].next_functions[0][0]
    (acc_w, _), (acc_a, _) = mv.next_functions
    assert acc_w.variable is w and acc_a.variable is a
    assert type(acc_w).__name__ == "AccumulateGrad" and acc_w.next_functions == ()
    assert loss.grad_fn is loss.grad_fn  # one node object per recorded op
    assert re.fullmatch(r"<SumBackward0 object at 0x[0-9a-f]+>", repr(loss.grad_fn))
    assert re.fullmatch(r"<AccumulateGrad object at 0x[0-9a-f]+>", repr(acc_w))
    assert repr(loss) == repr(losst) == "tensor(5.9997, grad_fn=<SumBackward0>)"


def test_leaves_and_untracked_tensors_have_no_grad_fn() -> None:
    a = og.tensor(A, requires_grad=True)
    assert a.grad_fn is None and og.tensor(A).grad_fn is None
    with og.no_grad():
        assert (a * 2).grad_fn is None
    assert (a * 2).detach().grad_fn is None


# --------------------------------------------------------------------------- retain_grad
def test_retain_grad_keeps_a_non_leaf_gradient_like_torch() -> None:
    def run(lib, t):
        x = t(A, requires_grad=True)
        y = x * x
        y.retain_grad()
        z = (lib.exp(y) * 2).sum()
        z.retain_grad()
        z.backward()
        return y.retains_grad, y.grad, z.grad, x.grad

    r, y_grad, z_grad, x_grad = run(og, og.tensor)
    rt, y_gradt, z_gradt, x_gradt = run(torch, torch.tensor)
    assert r is rt is True
    np.testing.assert_allclose(y_grad.numpy(), y_gradt.numpy(), rtol=1e-6)
    np.testing.assert_allclose(z_grad.numpy(), z_gradt.numpy())
    np.testing.assert_allclose(x_grad.numpy(), x_gradt.numpy(), rtol=1e-6)


def test_grad_of_a_non_leaf_without_retain_grad_warns_and_is_none() -> None:
    x = og.tensor(A, requires_grad=True)
    y = x * 2
    y.sum().backward()
    with pytest.warns(UserWarning, match="The .grad attribute of a Tensor that is not a leaf "
                                         "Tensor is being accessed"):
        assert y.grad is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert x.grad.tolist() == [2.0, 2.0]  # a leaf: no warning
    with pytest.raises(RuntimeError, match="can't retain_grad on Tensor that has "
                                           "requires_grad=False"):
        og.tensor(A).retain_grad()
    x.retain_grad()  # a leaf: nothing to do
    assert not x.retains_grad


# --------------------------------------------------------------------------- hooks
def test_hooks_on_leaves_and_non_leaves_match_torch() -> None:
    def run(lib, t):
        x = t(A, requires_grad=True)
        seen = []
        x.register_hook(lambda g: g * 10)
        y = x * x
        handle = y.register_hook(lambda g: seen.append(g.clone()) or g + 1)
        (lib.sin(y)).sum().backward()
        first = x.grad.clone()
        handle.remove()
        x.grad = None
        (lib.sin(x * x)).sum().backward()
        return seen[0], first, x.grad

    seen, first, second = run(og, og.tensor)
    seent, firstt, secondt = run(torch, torch.tensor)
    np.testing.assert_allclose(seen.numpy(), seent.numpy(), rtol=1e-6)
    np.testing.assert_allclose(first.numpy(), firstt.numpy(), rtol=1e-6)
    np.testing.assert_allclose(second.numpy(), secondt.numpy(), rtol=1e-6)


def test_hook_on_grad_inputs_and_bad_hooks() -> None:
    x = og.tensor(A, requires_grad=True)
    x.register_hook(lambda g: g * 0)
    (g,) = og.autograd.grad((x * 3).sum(), x)
    assert g.tolist() == [0.0, 0.0]
    with pytest.raises(RuntimeError, match="cannot register a hook on a tensor that doesn't "
                                           "require gradient"):
        og.tensor(A).register_hook(lambda g: g)
    y = og.tensor(A, requires_grad=True)
    y.register_hook(lambda g: og.ones(3))
    with pytest.raises(RuntimeError, match="has changed the size of value"):
        (y * 2).sum().backward()


def _hook_setup():
    og.manual_seed(2)
    model = nn.Linear(3, 2)
    return model, og.optim.SGD(model.parameters(), lr=0.1)


def _hook_step(model, opt, x):
    opt.zero_grad()
    h = model(x)
    h.register_hook(lambda g: g.clamp(-0.01, 0.01))  # clip the gradient at the activation
    loss = (F.relu(h) ** 2).sum()
    loss.backward()
    opt.step()
    return loss


def test_hooks_inside_compile_equal_eager() -> None:
    rng = np.random.default_rng(1)
    xs = [og.tensor(rng.standard_normal((4, 3)).astype(np.float32)) for _ in range(3)]
    model, opt = _hook_setup()
    eager = [_hook_step(model, opt, x).item() for x in xs]
    w = model.weight.detach().numpy().copy()
    cmodel, copt = _hook_setup()
    step = og.compile(lambda x: _hook_step(cmodel, copt, x))
    compiled = [step(x).item() for x in xs]
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cmodel.weight.detach().numpy(), w, rtol=1e-5, atol=1e-6)


def test_a_hook_that_only_looks_warns_inside_compile() -> None:
    model, opt = _hook_setup()
    seen = []

    def step(x):
        opt.zero_grad()
        h = model(x)
        h.register_hook(lambda g: seen.append(g))
        h.sum().backward()
        opt.step()
        return h.sum()

    compiled = og.compile(step)
    with pytest.warns(UserWarning, match="hooks run once, at trace time"):
        compiled(og.ones(2, 3))


# --------------------------------------------------------------------------- detach_, inference
def test_detach_in_place() -> None:
    x = og.tensor(A, requires_grad=True)
    y = x * 2
    assert y.detach_() is y
    assert not y.requires_grad and y.is_leaf and y.grad_fn is None and y.tolist() == [2.0, 4.0]
    x.detach_()
    assert not x.requires_grad and x.grad_fn is None
    xt = torch.tensor(A, requires_grad=True)
    yt = xt * 2
    yt.detach_()
    assert yt.requires_grad == y.requires_grad and yt.is_leaf == y.is_leaf


def test_inference_mode_as_context_manager_and_decorator() -> None:
    x = og.tensor(A, requires_grad=True)
    with og.inference_mode():
        assert og.is_inference_mode_enabled()
        y = x * 2
    assert not og.is_inference_mode_enabled()
    assert not y.requires_grad and y.grad_fn is None

    @og.inference_mode()
    def f(t):
        return t * 3

    @og.inference_mode
    def g(t):
        return t * 4

    assert not f(x).requires_grad and not g(x).requires_grad
    with og.inference_mode(False):
        assert (x * 2).requires_grad
    assert (x * 2).requires_grad
    assert og.autograd.inference_mode is og.inference_mode


def test_a_parameter_hook_added_or_removed_retraces_the_compiled_step() -> None:
    model, opt = _hook_setup()

    def step(x):
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        opt.step()
        return loss

    compiled = og.compile(step)
    x = og.ones(2, 3)
    compiled(x)
    w0 = model.weight.detach().numpy().copy()
    handle = model.weight.register_hook(lambda g: g * 0)  # freezes the weight
    compiled(x)
    np.testing.assert_array_equal(model.weight.detach().numpy(), w0)
    handle.remove()
    compiled(x)
    assert compiled.traces == 2 and not np.array_equal(model.weight.detach().numpy(), w0)
