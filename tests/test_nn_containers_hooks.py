"""Containers, Module traversal and forward hooks, the new activations, ``BatchNorm1d`` and
channel dropout, against PyTorch: reprs, state dict keys, values and gradients, hooks' call
signatures and replacement semantics, eager and compiled."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest

import onnxgrad as og
from onnxgrad import nn

torch = pytest.importorskip("torch")


def _both(build):
    """``build(lib)`` with onnxgrad and PyTorch; PyTorch's parameters copied into ours."""
    og.manual_seed(0)
    torch.manual_seed(0)
    ours, theirs = build(og), build(torch)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    return ours, theirs


def _repr(module: Any) -> str:
    return repr(module).replace("torch.", "onnxgrad.")


# --------------------------------------------------------------------------- activations
ACTIVATIONS = [
    ("Softmax", {"dim": 1}), ("Softmax", {"dim": -1}), ("LogSoftmax", {"dim": 1}),
    ("LogSoftmax", {"dim": 0}), ("Tanh", {}), ("LeakyReLU", {}),
    ("LeakyReLU", {"negative_slope": 0.2, "inplace": True}), ("ELU", {}),
    ("ELU", {"alpha": 0.5}), ("Softplus", {}), ("Softplus", {"beta": 2.0, "threshold": 3.0}),
    ("Softsign", {}), ("Tanhshrink", {}), ("PReLU", {}), ("PReLU", {"num_parameters": 3}),
    ("PReLU", {"num_parameters": 3, "init": 0.1})]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "kw"), ACTIVATIONS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(ACTIVATIONS)])
def test_activations_match_pytorch(name: str, kw: dict, dtype) -> None:
    ours, theirs = _both(lambda lib: getattr(lib.nn, name)(**kw))
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.to(torch.float64 if dtype == np.float64 else torch.float32)
    ours.to(dtype)
    # Exact kinks included (0 for the ReLU family), and values past softplus' threshold.
    x = np.concatenate([np.random.default_rng(0).uniform(-4, 4, 21), [0.0, 1.6, 2.0]])
    x = x.reshape(2, 3, 4).astype(dtype)
    xo, xt = og.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    if kw.get("inplace"):  # a leaf cannot be updated in place: work on a copy
        yo, yt = ours(xo * 1.0), theirs(xt * 1.0)
    else:
        yo, yt = ours(xo), theirs(xt)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-12}
    np.testing.assert_allclose(yo.detach().numpy(), yt.detach().numpy(), **tol)
    u = np.random.default_rng(1).standard_normal(x.shape).astype(dtype)
    yo.backward(og.tensor(u))
    yt.backward(torch.from_numpy(u))
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), **tol)
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), **tol, err_msg=n)


def test_softmax_without_dim_uses_pytorchs_legacy_choice() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        ours = nn.Softmax()(og.tensor(x))
    with pytest.warns(UserWarning):
        theirs = torch.nn.Softmax()(torch.tensor(x))
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6)
    assert repr(nn.Softmax()) == repr(torch.nn.Softmax()) == "Softmax(dim=None)"


# --------------------------------------------------------------------------- containers
def test_module_list_operations_match_pytorch() -> None:
    def build(lib):
        ml = lib.nn.ModuleList([lib.nn.Linear(2, 2) for _ in range(3)])
        ml.append(lib.nn.ReLU())
        ml.extend([lib.nn.Linear(2, 3), lib.nn.Linear(2, 3)])
        ml.insert(1, lib.nn.Tanh())
        ml += [lib.nn.Sigmoid()]
        ml[0] = lib.nn.Linear(2, 2, bias=False)
        del ml[2]
        return ml

    ours, theirs = _both(build)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert len(ours) == len(theirs) == 7
    assert [type(m).__name__ for m in ours] == [type(m).__name__ for m in theirs]
    assert [type(m).__name__ for m in ours[1:5:2]] == [type(m).__name__ for m in theirs[1:5:2]]
    assert type(ours[-1]).__name__ == "Sigmoid" and isinstance(ours[2:], nn.ModuleList)
    assert repr(ours[2:]) == repr(theirs[2:])
    popped = ours.pop(1)
    assert isinstance(popped, nn.Tanh) and len(ours) == 6
    with pytest.raises(IndexError, match="index 9 is out of range"):
        ours[9]


def test_module_dict_matches_pytorch() -> None:
    def build(lib):
        md = lib.nn.ModuleDict({"conv": lib.nn.Conv2d(1, 2, 3), "act": lib.nn.ReLU()})
        md["fc"] = lib.nn.Linear(4, 2)
        md.update([("out", lib.nn.Linear(2, 1))])
        del md["act"]
        return md

    ours, theirs = _both(build)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert list(ours.keys()) == list(theirs.keys()) == ["conv", "fc", "out"]
    assert list(ours) == list(theirs) and "fc" in ours and "act" not in ours
    assert isinstance(ours.pop("out"), nn.Linear) and len(ours) == 2
    ours.clear()
    assert len(ours) == 0 and list(ours.parameters()) == []


def test_parameter_list_and_dict_match_pytorch() -> None:
    def build(lib):
        m = lib.nn.Module()
        m.plist = lib.nn.ParameterList([lib.nn.Parameter(lib.ones(2, 3)), lib.zeros(4)])
        m.plist.append(lib.nn.Parameter(lib.ones(1)))
        m.pdict = lib.nn.ParameterDict({"a": lib.nn.Parameter(lib.ones(3))})
        m.pdict["b"] = lib.zeros(2, 2)
        m.pdict.update({"c": lib.nn.Parameter(lib.ones(5))})
        return m

    ours, theirs = _both(build)
    assert _repr(theirs) == repr(ours)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in ours.plist)
    assert len(ours.plist) == 3 and ours.plist[-1].shape == (1,)
    assert isinstance(ours.pdict["b"], nn.Parameter) and list(ours.pdict) == ["a", "b", "c"]
    del ours.pdict["a"]
    assert list(ours.pdict.keys()) == ["b", "c"] and len(list(ours.parameters())) == 5
    with pytest.raises(RuntimeError, match="ParameterList should not be called"):
        ours.plist()


def test_sequential_and_children_traversal_match_pytorch() -> None:
    def build(lib):
        shared = lib.nn.Linear(2, 2)
        inner = lib.nn.Sequential(OrderedDict([("lin", shared), ("act", lib.nn.Tanh())]))
        return lib.nn.Sequential(inner, shared, lib.nn.ModuleList([lib.nn.ReLU(), inner]))

    ours, theirs = _both(build)
    assert repr(ours) == repr(theirs)
    for kwargs in ({}, {"prefix": "net"}, {"remove_duplicate": False}):
        assert [n for n, _ in ours.named_modules(**kwargs)] == \
            [n for n, _ in theirs.named_modules(**kwargs)], kwargs
    assert [n for n, _ in ours.named_children()] == [n for n, _ in theirs.named_children()]
    assert [type(m).__name__ for m in ours.children()] == \
        [type(m).__name__ for m in theirs.children()]
    assert [type(m).__name__ for m in ours.modules()] == \
        [type(m).__name__ for m in theirs.modules()]
    assert [n for n, _ in ours.named_parameters(remove_duplicate=False)] == \
        [n for n, _ in theirs.named_parameters(remove_duplicate=False)]
    assert len(list(ours.parameters(recurse=False))) == 0
    assert ours.get_submodule("2.1.lin") is ours[0][0]
    with pytest.raises(AttributeError, match="Sequential has no attribute `nope`"):
        ours.get_submodule("0.nope")
    with pytest.raises(AttributeError, match="`weight` is not an nn.Module"):
        ours.get_submodule("0.lin.weight")
    assert ours.get_parameter("0.lin.bias") is ours[0][0].bias
    seen = []
    ours.apply(lambda m: seen.append(type(m).__name__))
    theirs_seen = []
    theirs.apply(lambda m: theirs_seen.append(type(m).__name__))
    assert seen == theirs_seen


def test_sequential_editing_matches_pytorch() -> None:
    def build(lib):
        seq = lib.nn.Sequential(lib.nn.Linear(2, 3), lib.nn.ReLU())
        seq.append(lib.nn.Linear(3, 3))
        seq.extend([lib.nn.Tanh(), lib.nn.Linear(3, 1)])
        seq.insert(1, lib.nn.Sigmoid())
        seq.insert(-1, lib.nn.ELU())
        seq[0] = lib.nn.Linear(2, 3, bias=False)
        del seq[2]
        return seq

    ours, theirs = _both(build)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours[1:3]) == repr(theirs[1:3])
    assert type(ours.pop(-1)).__name__ == type(theirs.pop(-1)).__name__ == "Linear"
    assert repr(ours) == repr(theirs)


def test_reset_parameters_redraws_within_pytorchs_bounds() -> None:
    lin, conv, bn = nn.Linear(20, 30), nn.Conv2d(3, 4, 3), nn.BatchNorm1d(3)
    before = lin.weight.detach().numpy().copy()
    lin.reset_parameters()
    conv.reset_parameters()
    after = lin.weight.detach().numpy()
    assert not np.array_equal(before, after) and np.abs(after).max() <= 1 / np.sqrt(20)
    assert np.abs(lin.bias.detach().numpy()).max() <= 1 / np.sqrt(20)
    assert np.abs(conv.bias.detach().numpy()).max() <= 1 / np.sqrt(27)
    bn(og.randn(4, 3) * 3 + 2)
    bn.reset_parameters()
    assert (bn.running_mean.numpy() == 0).all() and (bn.running_var.numpy() == 1).all()
    assert bn.num_batches_tracked.item() == 0 and bn.num_batches_tracked.dtype == np.int64


def test_zero_grad_and_requires_grad_() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model(og.ones(1, 2)).sum().backward()
    model.zero_grad(set_to_none=False)
    assert all((p.grad.numpy() == 0).all() for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert model.requires_grad_(False) is model
    assert not any(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- hooks
def _hooked(lib, calls: list):
    net = lib.nn.Sequential(lib.nn.Linear(3, 4), lib.nn.ReLU(), lib.nn.Linear(4, 2))

    def pre(module, args):
        calls.append(("pre", type(module).__name__, len(args), tuple(args[0].shape)))
        return (args[0] * 2,)  # replaces the input

    def post(module, args, output):
        calls.append(("post", type(module).__name__, tuple(output.shape)))
        return output + 1  # replaces the output

    def watch(module, args, output):
        calls.append(("watch", type(module).__name__))  # returns None: output kept

    handles = [net[0].register_forward_pre_hook(pre), net[2].register_forward_hook(post),
               net.register_forward_hook(watch)]
    return net, handles


def test_forward_hooks_match_pytorch_eager() -> None:
    calls_o: list = []
    calls_t: list = []
    ours, handles_o = _hooked(og, calls_o)
    theirs, handles_t = _hooked(torch, calls_t)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    xo, xt = og.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    yo, yt = ours(xo), theirs(xt)
    assert calls_o == calls_t
    np.testing.assert_allclose(yo.detach().numpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    yo.sum().backward()
    yt.sum().backward()
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    for h in handles_o[:2]:
        h.remove()
    for h in handles_t[:2]:
        h.remove()
    handles_o[0].remove()  # twice: no error, as PyTorch
    calls_o.clear()
    calls_t.clear()
    np.testing.assert_allclose(ours(og.tensor(x)).detach().numpy(),
                               theirs(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert calls_o == calls_t == [("watch", "Sequential")]


def test_hook_kwargs_prepend_and_context_manager() -> None:
    order: list = []
    lin = nn.Linear(2, 2)
    lin.register_forward_hook(lambda m, a, o: order.append("second"))
    with lin.register_forward_hook(lambda m, a, o: order.append("first"), prepend=True):
        lin(og.ones(1, 2))
    lin(og.ones(1, 2))
    assert order == ["first", "second", "second"]

    def pre(m, args, kwargs):
        return (args[0] * 0,), kwargs

    h = lin.register_forward_pre_hook(pre, with_kwargs=True)
    out = lin(og.ones(1, 2))
    np.testing.assert_allclose(out.detach().numpy(), lin.bias.detach().numpy()[None], rtol=1e-6)
    h.remove()
    seen = []
    lin.register_forward_hook(lambda m, a, kw, o: seen.append(kw), with_kwargs=True)
    lin(og.ones(1, 2))
    assert seen == [{}]


def test_hooks_in_compiled_steps_match_eager_and_retrace() -> None:
    def run(compiled: bool) -> list[float]:
        og.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        opt = og.optim.SGD(net.parameters(), lr=0.1)
        def step(x):
            opt.zero_grad()
            loss = net(x).sum()
            loss.backward()
            opt.step()
            return loss

        fn = og.compile(step) if compiled else step
        x = og.tensor(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
        losses = [fn(x).item()]
        handle = net[1].register_forward_hook(lambda m, a, o: o * 0.5)
        net[0].register_forward_pre_hook(lambda m, a: (a[0] * 2.0,))
        losses += [fn(x).item(), fn(x).item()]
        handle.remove()
        losses.append(fn(x).item())
        if compiled:
            assert fn.traces == 3  # once per hook set: registering and removing retraces
        return losses

    np.testing.assert_allclose(run(True), run(False), rtol=1e-5)


def test_a_hook_with_python_side_effects_is_refused_in_a_compiled_step() -> None:
    # Compiled calls run no Python: a hook that counts calls would count traces, not calls.
    net = nn.Sequential(nn.Linear(3, 1))
    seen: list = []
    net[0].register_forward_pre_hook(lambda m, a: seen.append(1))
    step = og.compile(lambda x: net(x).sum())
    with pytest.raises(og.TraceError, match=r"changed the Python value\(s\) \['seen"):
        step(og.ones(2, 3))


# --------------------------------------------------------------------------- BatchNorm1d, dropout
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm1d_matches_pytorch(shape, affine: bool) -> None:
    ours, theirs = _both(lambda lib: lib.nn.BatchNorm1d(3, momentum=0.2, affine=affine))
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    rng = np.random.default_rng(0)
    for step in range(3):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        xo, xt = og.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
        yo, yt = ours(xo), theirs(xt)
        np.testing.assert_allclose(yo.detach().numpy(), yt.detach().numpy(), rtol=1e-4,
                                   atol=1e-5)
        u = rng.standard_normal(shape).astype(np.float32)
        yo.backward(og.tensor(u))
        yt.backward(torch.from_numpy(u))
        np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    for k, v in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[k].numpy(), v.numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=k)
    ours.eval()
    theirs.eval()
    x = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(ours(og.tensor(x)).detach().numpy(),
                               theirs(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(og.ShapeError, match=r"expected 2D or 3D input \(got 4D input\)"):
        ours(og.zeros(2, 3, 2, 2))


def test_batchnorm1d_compiled_matches_eager() -> None:
    def run(compiled: bool):
        og.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 1))
        opt = og.optim.SGD(net.parameters(), lr=0.1)

        def step(x):
            opt.zero_grad()
            loss = net(x).sum()
            loss.backward()
            opt.step()
            return loss

        fn = og.compile(step) if compiled else step
        x = og.tensor(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
        losses = [fn(x).item() for _ in range(3)]
        return losses, {k: v.numpy().copy() for k, v in net.state_dict().items()}

    (lc, sc), (le, se) = run(True), run(False)
    np.testing.assert_allclose(lc, le, rtol=1e-5)
    for k in se:
        np.testing.assert_allclose(sc[k], se[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(("cls", "shape"), [("Dropout2d", (40, 50, 3, 3)),
                                            ("Dropout1d", (40, 50, 4)),
                                            ("Dropout1d", (1000, 6))])
def test_channel_dropout_statistics_and_eval_identity(cls: str, shape) -> None:
    p = 0.3
    layer = getattr(nn, cls)(p)
    assert repr(layer) == repr(getattr(torch.nn, cls)(p)) == f"{cls}(p=0.3, inplace=False)"
    og.manual_seed(0)
    x = og.ones(*shape)
    y = layer(x).numpy()
    lead = 2 if len(shape) > 2 else 1  # (N, C) or unbatched (C)
    per_channel = y.reshape(int(np.prod(shape[:lead])), -1)
    # Whole channels: each is all zeros or all 1 / (1 - p).
    assert np.all((per_channel == 0).all(1) | np.isclose(per_channel, 1 / (1 - p)).all(1))
    dropped = (per_channel == 0).all(1).mean()
    assert abs(dropped - p) < 0.06
    assert abs(y.mean() - 1.0) < 0.1  # unbiased in expectation
    layer.eval()
    xr = og.tensor(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    assert layer(xr) is xr or np.array_equal(layer(xr).numpy(), xr.numpy())


def test_dropout2d_in_compiled_step_draws_fresh_channel_masks() -> None:
    layer = nn.Dropout2d(0.5)
    fn = og.compile(lambda x: layer(x))
    x = og.ones(8, 16, 2, 2)
    masks = [fn(x).numpy().reshape(128, 4) for _ in range(3)]
    for m in masks:
        assert np.all((m == 0).all(1) | (m == 2).all(1))
    assert not np.array_equal(masks[0], masks[1])
    layer.eval()
    np.testing.assert_array_equal(fn(x).numpy(), x.numpy())  # eval retraces: identity


def test_dropout2d_gradient_uses_the_same_mask() -> None:
    x = og.ones(4, 6, 2, 2, requires_grad=True)
    y = nn.functional.dropout2d(x, 0.5)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), y.detach().numpy())
