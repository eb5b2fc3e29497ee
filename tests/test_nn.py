"""The ``og.nn`` Module API and layers against PyTorch's semantics.

Traversal order and deduplication, state dicts, modes, ``zero_grad``, ``repr``, BatchNorm's
running statistics, Dropout, default initialisation; then, where torch is importable, forward and
gradient parity of the layers and losses with identical weights.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest

import onnxgrad as og
from onnxgrad import nn
from onnxgrad.nn import functional as F


class Net(nn.Module):
    """Parameters, buffers (one non-persistent), a None slot, nesting and a shared child."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(og.ones(2))
        self.register_buffer("scale", og.ones(1))
        self.register_buffer("scratch", og.zeros(2), persistent=False)
        self.head = nn.Linear(2, 3)
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), self.head)
        self.again = self.head  # the same module under a second name
        self.register_parameter("unused", None)


# =========================================================================== traversal
def test_named_parameters_and_buffers_order_and_dedup() -> None:
    m = Net()
    # Own entries first, then children in registration order; a shared tensor once, under the
    # first name that reaches it (PyTorch's remove_duplicate=True).
    assert [n for n, _ in m.named_parameters()] == [
        "w", "head.weight", "head.bias", "body.0.weight", "body.0.bias", "body.1.weight",
        "body.1.bias"]
    assert [n for n, _ in m.named_buffers()] == [
        "scale", "scratch", "body.1.running_mean", "body.1.running_var",
        "body.1.num_batches_tracked"]
    assert [p for p in m.parameters()] == [p for _, p in m.named_parameters()]
    assert [b for b in m.buffers()] == [b for _, b in m.named_buffers()]
    assert [n for n, _ in m.named_parameters(recurse=False)] == ["w"]
    assert [n for n, _ in m.named_buffers(recurse=False)] == ["scale", "scratch"]
    assert [n for n, _ in m.head.named_parameters(prefix="x")] == ["x.weight", "x.bias"]
    # A parameter shared between two different modules is also listed once.
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.weight = a.weight
    assert [n for n, _ in nn.Sequential(a, b).named_parameters()] == ["0.weight", "0.bias",
                                                                      "1.bias"]


def test_children_and_modules_order_and_dedup() -> None:
    m = Net()
    assert [n for n, _ in m.named_children()] == ["head", "body"]
    assert list(m.children()) == [m.head, m.body]
    assert [n for n, _ in m.named_modules()] == ["", "head", "body", "body.0", "body.1"]
    assert list(m.modules()) == [mod for _, mod in m.named_modules()]
    assert [n for n, _ in m.body.named_modules(prefix="body")] == [
        "body", "body.0", "body.1", "body.2"]


def test_deep_nesting_does_not_recurse() -> None:
    m: nn.Module = nn.Linear(1, 1)
    for _ in range(3000):  # deeper than Python's default recursion limit
        m = nn.Sequential(m)
    assert len(list(m.named_parameters())) == 2
    assert len(list(m.modules())) == 3001
    assert len(m.state_dict()) == 2
    m.train(False)
    visited: list[nn.Module] = []
    m.apply(visited.append)
    assert len(visited) == 3001 and visited[-1] is m


def test_attribute_assignment_keeps_registrations() -> None:
    m = Net()
    with pytest.raises(TypeError, match="cannot assign 'Tensor' as parameter 'w'"):
        m.w = og.ones(2)
    with pytest.raises(TypeError, match="cannot assign 'int' as buffer 'scale'"):
        m.scale = 3
    with pytest.raises(TypeError, match="cannot assign 'int' as child module 'head'"):
        m.head = 5
    assert "w" in dict(m.named_parameters()) and "scale" in dict(m.named_buffers())
    m.scale = og.full((1,), 2.0)  # a tensor replaces a buffer
    assert m.state_dict()["scale"].item() == 2.0
    m.body = None  # None keeps the slot, as in PyTorch
    assert m.body is None and list(m._modules) == ["head", "body", "again"]
    assert "(body): None" in repr(m)
    m.w = None
    assert m.w is None and "w" not in m.state_dict()
    m.w = nn.Parameter(og.zeros(3))
    assert m.state_dict()["w"].shape == (3,)
    m.plain = 1.5  # ordinary attributes stay ordinary
    assert m.plain == 1.5 and "plain" not in m.state_dict()
    del m.head
    assert not hasattr(m, "head")


def test_register_buffer_persistence_follows_the_last_registration() -> None:
    m = nn.Module()
    m.register_buffer("b", og.zeros(1), persistent=False)
    assert list(m.state_dict()) == []
    m.register_buffer("b", og.zeros(1))
    assert list(m.state_dict()) == ["b"]
    with pytest.raises(TypeError):
        m.register_buffer("c", np.zeros(1))
    with pytest.raises(TypeError):
        m.register_parameter("p", og.zeros(1))


def test_apply_visits_subtrees_before_their_module() -> None:
    inner = nn.Sequential(nn.Linear(1, 1), nn.ReLU())
    m = nn.Sequential(inner, nn.Linear(1, 1))
    order: list[nn.Module] = []
    assert m.apply(order.append) is m
    # PyTorch's post-order: inner's children, inner, the next child, the root.
    assert order == [inner[0], inner[1], inner, m[1], m]


# =========================================================================== state dicts
def test_state_dict_keys_persistent_buffers_only_and_shared_modules_under_each_name() -> None:
    m = Net()
    sd = m.state_dict()
    # PyTorch's state_dict recursion lists a shared module under every path (not deduplicated
    # as parameters() is), and skips None entries and non-persistent buffers.
    assert list(sd) == [
        "w", "scale", "head.weight", "head.bias", "body.0.weight", "body.0.bias",
        "body.1.weight", "body.1.bias", "body.1.running_mean", "body.1.running_var",
        "body.1.num_batches_tracked", "body.2.weight", "body.2.bias", "again.weight",
        "again.bias"]
    assert isinstance(sd, OrderedDict)
    for t in sd.values():  # detached, sharing data
        assert not t.requires_grad
    assert np.shares_memory(sd["w"].numpy(), m.w.detach().numpy())
    assert sd["body.1.num_batches_tracked"].dtype == np.int64
    assert sd["body.1.num_batches_tracked"].shape == ()


def _arrays(m: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_load_state_dict_copies_values_in_place(kind: str) -> None:
    og.manual_seed(0)
    src, dst = Net(), Net()
    src.body[1].running_mean.data = og.full((2,), 0.25)
    src.body[1].num_batches_tracked.data = og.tensor(7)
    sd = src.state_dict() if kind == "tensor" else {k: v.numpy() for k, v in
                                                    src.state_dict().items()}
    params_before = list(dst.parameters())
    result = dst.load_state_dict(sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert list(dst.parameters()) == params_before  # same Parameter objects, new values
    want = _arrays(src)
    for k, v in _arrays(dst).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    assert dst.body[1].num_batches_tracked.item() == 7
    # Copies: editing the source afterwards does not reach the loaded model.
    src.w.data = og.full((2,), 9.0)
    assert dst.w.detach().numpy().tolist() == [1.0, 1.0]
    # Loaded parameters stay trainable leaves.
    assert all(p.requires_grad and p.is_leaf for p in dst.parameters())


def test_load_state_dict_casts_to_the_parameter_dtype() -> None:
    m = nn.Linear(2, 1)
    m.load_state_dict({"weight": np.array([[1, 2]], dtype=np.int64), "bias": [0.5]})
    assert m.weight.dtype == np.float32 and m.weight.detach().numpy().tolist() == [[1.0, 2.0]]
    assert m.bias.dtype == np.float32


def test_load_state_dict_strict_errors_list_missing_and_unexpected_keys() -> None:
    m = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm2d(3))
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    del sd["0.bias"], sd["1.num_batches_tracked"]
    sd["extra.weight"] = np.zeros(1)
    before = _arrays(m)
    with pytest.raises(RuntimeError, match=r"Sequential") as info:
        m.load_state_dict({k: v + 1 if k == "0.weight" else v for k, v in sd.items()})
    text = str(info.value)
    assert "missing keys: ['0.bias', '1.num_batches_tracked']" in text
    assert "unexpected keys: ['extra.weight']" in text
    # A strict failure changes nothing.
    for k, v in _arrays(m).items():
        np.testing.assert_array_equal(v, before[k])


def test_load_state_dict_non_strict_returns_the_keys_and_loads_the_rest() -> None:
    m = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm2d(3))
    result = m.load_state_dict({"0.weight": np.ones((3, 2)), "1.scale": np.ones(3)},
                               strict=False)
    assert result.missing_keys == ["0.bias", "1.weight", "1.bias", "1.running_mean",
                                   "1.running_var", "1.num_batches_tracked"]
    assert result.unexpected_keys == ["1.scale"]
    assert tuple(result) == (result.missing_keys, result.unexpected_keys)
    np.testing.assert_array_equal(m[0].weight.detach().numpy(), np.ones((3, 2)))


@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_shape_mismatch_names_key_expected_and_got(strict: bool) -> None:
    m = nn.Sequential(nn.Linear(2, 3))
    before = _arrays(m)
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.weight: expected shape "
                                           r"\[3, 2\], got \[2, 2\]"):
        m.load_state_dict({"0.weight": np.zeros((2, 2)), "0.bias": np.zeros(3)}, strict=strict)
    for k, v in _arrays(m).items():  # the valid bias was not loaded either
        np.testing.assert_array_equal(v, before[k])


def test_non_persistent_buffer_is_unexpected_in_a_loaded_state_dict() -> None:
    m = Net()
    sd = m.state_dict()
    sd["scratch"] = og.zeros(2)
    with pytest.raises(RuntimeError, match=r"unexpected keys: \['scratch'\]"):
        m.load_state_dict(sd)


def test_shared_module_state_dict_round_trips() -> None:
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, lin)
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    model.load_state_dict(model.state_dict())  # strict: no key missing or unexpected


# =========================================================================== modes and grads
def test_train_eval_propagate_to_every_module_and_return_self() -> None:
    m = Net()
    assert all(x.training for x in m.modules())
    assert m.eval() is m
    assert not any(x.training for x in m.modules())
    assert m.train() is m and all(x.training for x in m.modules())
    assert m.train(False) is m and not m.body[1].training
    m.body.train()
    assert m.body[1].training and not m.training


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none: bool) -> None:
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1, bias=False))
    m(og.randn(4, 3)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad(set_to_none=set_to_none)
    for p in m.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad.shape == p.shape and p.grad.dtype == p.dtype
            assert not p.grad.numpy().any() and not p.grad.requires_grad
    # Gradients accumulate again from zero.
    x = og.randn(4, 3)
    m(x).sum().backward()
    once = [p.grad.numpy().copy() for p in m.parameters()]
    m.zero_grad(set_to_none=set_to_none)
    m(x).sum().backward()
    for p, g in zip(m.parameters(), once):
        np.testing.assert_allclose(p.grad.numpy(), g, rtol=1e-6)


def test_zero_grad_default_sets_none_and_leaves_untouched_grads_none() -> None:
    m = nn.Linear(2, 2)
    m.zero_grad(set_to_none=False)
    assert m.weight.grad is None  # never computed: nothing to zero
    m(og.ones(1, 2)).sum().backward()
    m.zero_grad()
    assert m.weight.grad is None and m.bias.grad is None


# =========================================================================== repr
def _repr_model(mod: Any) -> Any:
    return mod.Sequential(
        mod.Linear(4, 3), mod.ReLU(),
        mod.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), mod.BatchNorm2d(8),
        mod.Conv2d(8, 4, (3, 1), dilation=2, groups=2),
        mod.BatchNorm2d(4, affine=False, track_running_stats=False),
        mod.MaxPool2d(2), mod.AdaptiveAvgPool2d((1, 1)), mod.Flatten(), mod.Dropout(0.2),
        mod.Identity(), mod.ReLU(inplace=True), mod.Linear(2, 2, bias=False), mod.Sequential(),
        mod.Conv2d(2, 2, 1, padding="valid"), mod.Conv2d(2, 2, 3, padding="same"),
        mod.Dropout(inplace=True))


# PyTorch's repr of _repr_model(torch.nn), by hand (torch 2.13: BatchNorm shows ``bias=``).
REPR = """\
Sequential(
  (0): Linear(in_features=4, out_features=3, bias=True)
  (1): ReLU()
  (2): Conv2d(3, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False)
  (3): BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
  (4): Conv2d(8, 4, kernel_size=(3, 1), stride=(1, 1), dilation=(2, 2), groups=2)
  (5): BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=False, bias=False, \
track_running_stats=False)
  (6): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
  (7): AdaptiveAvgPool2d(output_size=(1, 1))
  (8): Flatten(start_dim=1, end_dim=-1)
  (9): Dropout(p=0.2, inplace=False)
  (10): Identity()
  (11): ReLU(inplace=True)
  (12): Linear(in_features=2, out_features=2, bias=False)
  (13): Sequential()
  (14): Conv2d(2, 2, kernel_size=(1, 1), stride=(1, 1), padding=valid)
  (15): Conv2d(2, 2, kernel_size=(3, 3), stride=(1, 1), padding=same)
  (16): Dropout(p=0.5, inplace=True)
)"""


class WithExtra(nn.Module):
    """A module with both an extra_repr and children (PyTorch puts the extra on its own line)."""

    def __init__(self, mod: Any = nn) -> None:
        super().__init__()
        self.inner = mod.Sequential(mod.Linear(1, 1))

    def extra_repr(self) -> str:
        return "scale=2"


REPR_EXTRA = """\
WithExtra(
  scale=2
  (inner): Sequential(
    (0): Linear(in_features=1, out_features=1, bias=True)
  )
)"""


def test_repr_matches_pytorch_by_hand() -> None:
    assert repr(_repr_model(nn)) == REPR
    assert repr(WithExtra()) == REPR_EXTRA
    assert str(nn.Linear(2, 3)) == "Linear(in_features=2, out_features=3, bias=True)"


def test_repr_matches_installed_pytorch() -> None:
    torch = pytest.importorskip("torch")
    assert repr(_repr_model(nn)) == repr(_repr_model(torch.nn))

    class TorchWithExtra(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Sequential(torch.nn.Linear(1, 1))

        def extra_repr(self) -> str:
            return "scale=2"

    assert repr(WithExtra()) == repr(TorchWithExtra()).replace("TorchWithExtra", "WithExtra")


def test_parameter_repr() -> None:
    p = nn.Parameter(og.tensor([1.0, 2.0]))
    assert repr(p) == "Parameter containing:\ntensor([1., 2.], requires_grad=True)"
    assert repr(nn.Parameter(og.tensor([1.5, -2.25]))) == (
        "Parameter containing:\ntensor([ 1.5000, -2.2500], requires_grad=True)")
    frozen = nn.Parameter(og.tensor([1.0]), requires_grad=False)
    assert repr(frozen) == "Parameter containing:\ntensor([1.])" and not frozen.requires_grad


def test_parameter_copies_its_data_and_is_a_leaf() -> None:
    t = og.tensor([1.0, 2.0])
    p = nn.Parameter(t)
    p.data = og.tensor([3.0, 4.0])
    assert t.tolist() == [1.0, 2.0]
    assert p.is_leaf and p.requires_grad and isinstance(p, og.Tensor)


def test_sequential_indexing() -> None:
    layers = [nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 3)]
    seq = nn.Sequential(*layers)
    assert len(seq) == 3 and list(seq) == layers and seq[-1] is layers[2]
    head = seq[:2]
    assert isinstance(head, nn.Sequential) and list(head) == layers[:2]
    assert list(seq[1:]._modules) == ["1", "2"]  # a slice keeps the names, as in PyTorch
    named = nn.Sequential(OrderedDict([("fc", layers[0]), ("act", layers[1])]))
    assert [n for n, _ in named.named_children()] == ["fc", "act"]


@pytest.mark.parametrize(("kw", "pattern"), [
    ({"padding": "bogus"}, "Invalid padding string 'bogus'"),
    ({"padding": "same", "stride": 2}, "not supported for strided convolutions"),
    ({"groups": 3}, "divisible by groups"),
])
def test_conv2d_bad_configuration_fails_when_made(kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        nn.Conv2d(4, 4, 3, **kw)


# =========================================================================== BatchNorm2d
def np_bn_step(x: np.ndarray, mean: np.ndarray, var: np.ndarray, momentum: float = 0.1,
               eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One PyTorch training step: output (batch statistics, biased variance) and the running
    statistics updated with the unbiased variance."""
    axes = (0, 2, 3)
    m = x.mean(axis=axes, dtype=np.float64)
    v = x.astype(np.float64).var(axis=axes)
    n = x.size // x.shape[1]
    y = (x - m[None, :, None, None]) / np.sqrt(v[None, :, None, None] + eps)
    return (y, (1 - momentum) * mean + momentum * m,
            (1 - momentum) * var + momentum * v * n / (n - 1))


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_batchnorm2d_running_statistics_after_training_steps(momentum: float) -> None:
    bn = nn.BatchNorm2d(3, momentum=momentum)
    mean, var = np.zeros(3), np.ones(3)
    rng = np.random.default_rng(0)
    for step in range(4):
        x = (rng.standard_normal((2, 3, 3, 2)) * [1, 2, 3][step % 3] + step).astype(np.float32)
        y = bn(og.tensor(x))
        want, mean, var = np_bn_step(x, mean, var, momentum)
        np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.numpy(), var, rtol=1e-5, atol=1e-6)
        assert bn.num_batches_tracked.item() == step + 1
    assert bn.running_mean.dtype == np.float32 and bn.num_batches_tracked.dtype == np.int64
    # Eval mode normalises with the running statistics and leaves them alone.
    bn.eval()
    bn.weight.data = og.tensor([1.0, 2.0, -1.0])
    bn.bias.data = og.tensor([0.0, 0.5, 1.0])
    x = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    y = bn(og.tensor(x)).detach().numpy()
    want = ((x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
            * np.array([1, 2, -1])[None, :, None, None] + np.array([0, 0.5, 1])[None, :, None, None])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.item() == 4


def test_batchnorm2d_without_running_statistics_always_uses_the_batch() -> None:
    bn = nn.BatchNorm2d(2, affine=False, track_running_stats=False).eval()
    assert list(bn.state_dict()) == [] and list(bn.parameters()) == []
    x = np.random.default_rng(1).standard_normal((3, 2, 2, 2)).astype(np.float32)
    want, _, _ = np_bn_step(x, np.zeros(2), np.ones(2))
    np.testing.assert_allclose(bn(og.tensor(x)).numpy(), want, rtol=1e-4, atol=1e-5)


def test_batchnorm2d_without_bias_has_no_bias_parameter() -> None:
    bn = nn.BatchNorm2d(2, bias=False)
    assert [n for n, _ in bn.named_parameters()] == ["weight"]
    assert bn(og.randn(2, 2, 2, 2)).shape == (2, 2, 2, 2)


def test_batchnorm2d_gradient_flows_to_parameters_not_statistics() -> None:
    bn = nn.BatchNorm2d(2)
    x = og.randn(3, 2, 2, 2, requires_grad=True)
    (bn(x) * og.randn(3, 2, 2, 2)).sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None and x.grad is not None
    assert bn.running_mean.grad is None and not bn.running_mean.requires_grad


# =========================================================================== Dropout
def test_dropout_module_eval_is_identity_and_train_masks() -> None:
    d = nn.Dropout(0.5)
    x = og.tensor(np.linspace(1, 2, 64, dtype=np.float32))
    y = d(x).numpy()
    assert set(np.unique(y == 0)) == {True, False}
    kept = y != 0
    np.testing.assert_allclose(y[kept], 2 * x.numpy()[kept], rtol=1e-6)
    d.eval()
    np.testing.assert_array_equal(d(x).numpy(), x.numpy())
    assert repr(d) == "Dropout(p=0.5, inplace=False)"
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.Dropout(1.5)


# =========================================================================== initialisation
def _assert_uniform(a: np.ndarray, bound: float) -> None:
    """Inside [-bound, bound] and spread over it, as U(-bound, bound) is."""
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.9 * bound
    assert abs(a.std() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)


def test_default_init_is_kaiming_uniform_bounds() -> None:
    og.manual_seed(0)
    lin = nn.Linear(64, 500)
    _assert_uniform(lin.weight.detach().numpy(), 1 / math.sqrt(64))
    _assert_uniform(lin.bias.detach().numpy(), 1 / math.sqrt(64))
    conv = nn.Conv2d(8, 300, 3, groups=2)  # fan_in = 8 / 2 * 3 * 3
    assert conv.weight.shape == (300, 4, 3, 3)
    _assert_uniform(conv.weight.detach().numpy(), 1 / math.sqrt(36))
    _assert_uniform(conv.bias.detach().numpy(), 1 / math.sqrt(36))
    bn = nn.BatchNorm2d(4)
    assert bn.weight.detach().numpy().tolist() == [1] * 4
    assert bn.bias.detach().numpy().tolist() == [0] * 4
    assert bn.running_var.numpy().tolist() == [1] * 4
    assert lin.weight.dtype == np.float32
    og.manual_seed(0)
    np.testing.assert_array_equal(nn.Linear(64, 500).weight.detach().numpy(),
                                  lin.weight.detach().numpy())


# =========================================================================== PyTorch parity
def _copy_weights(ours: nn.Module, theirs: Any) -> None:
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})


def _grads_match(ours: nn.Module, theirs: Any, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    t_params = dict(theirs.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert names == list(t_params)
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), t_params[name].grad.numpy(), rtol=rtol,
                                   atol=atol, err_msg=name)


def _run_pair(ours: nn.Module, theirs: Any, x: np.ndarray, torch: Any,
              rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Forward and backward (a random upstream gradient) with identical weights and input."""
    xo = og.tensor(x, requires_grad=True)
    xt = torch.tensor(x, requires_grad=True)
    yo, yt = ours(xo), theirs(xt)
    np.testing.assert_allclose(yo.detach().numpy(), yt.detach().numpy(), rtol=rtol, atol=atol)
    u = np.random.default_rng(1).standard_normal(yt.shape).astype(np.float32)
    yo.backward(og.tensor(u))
    yt.backward(torch.tensor(u))
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), rtol=rtol, atol=atol)
    _grads_match(ours, theirs, rtol, atol)


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 5), (5,)], ids=["2d", "3d", "1d"])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_parity_linear(shape: tuple[int, ...], bias: bool) -> None:
    torch = pytest.importorskip("torch")
    theirs = torch.nn.Linear(5, 3, bias=bias)
    ours = nn.Linear(5, 3, bias=bias)
    _copy_weights(ours, theirs)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    _run_pair(ours, theirs, x, torch)


@pytest.mark.parametrize("kw", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": (3, 2), "stride": 2, "padding": (1, 0), "dilation": (1, 2), "groups": 2,
     "bias": False},
    {"kernel_size": 1, "stride": 1},
], ids=["3x3-pad1", "strided-dilated-grouped", "1x1"])
def test_torch_parity_conv2d(kw: dict) -> None:
    torch = pytest.importorskip("torch")
    theirs = torch.nn.Conv2d(4, 6, **kw)
    ours = nn.Conv2d(4, 6, **kw)
    _copy_weights(ours, theirs)
    x = np.random.default_rng(0).standard_normal((2, 4, 7, 6)).astype(np.float32)
    _run_pair(ours, theirs, x, torch)


def test_torch_parity_batchnorm2d_train_then_eval() -> None:
    torch = pytest.importorskip("torch")
    theirs = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor([1.0, 0.5, -2.0]))
        theirs.bias.copy_(torch.tensor([0.1, 0.0, 0.3]))
    ours = nn.BatchNorm2d(3)
    _copy_weights(ours, theirs)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = (rng.standard_normal((4, 3, 3, 3)) * 2 + 1).astype(np.float32)
        for m in (ours, theirs):
            for p in m.parameters():
                p.grad = None
        _run_pair(ours, theirs, x, torch)
        for name, buf in theirs.named_buffers():
            np.testing.assert_allclose(getattr(ours, name).numpy(), buf.numpy(), rtol=1e-5,
                                       atol=1e-6, err_msg=name)
    ours.eval()
    theirs.eval()
    for m in (ours, theirs):
        for p in m.parameters():
            p.grad = None
    _run_pair(ours, theirs, rng.standard_normal((2, 3, 2, 2)).astype(np.float32), torch)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3


def test_torch_parity_dropout_p0_and_eval() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    for ours, theirs in ((nn.Dropout(0.0), torch.nn.Dropout(0.0)),
                         (nn.Dropout(0.7).eval(), torch.nn.Dropout(0.7).eval())):
        _run_pair(ours, theirs, x, torch, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss", "mse_loss", "l1_loss"])
def test_torch_parity_losses(loss: str, reduction: str) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    if loss in ("cross_entropy", "nll_loss"):
        target = np.array([2, 0, 3, 2, 1])
    else:
        target = rng.standard_normal((5, 4)).astype(np.float32)
    xo, xt = og.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    yo = getattr(F, loss)(xo, og.tensor(target), reduction=reduction)
    yt = getattr(torch.nn.functional, loss)(xt, torch.tensor(target), reduction=reduction)
    np.testing.assert_allclose(yo.detach().numpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    u = rng.standard_normal(yt.shape).astype(np.float32)
    yo.backward(og.tensor(u))
    yt.backward(torch.tensor(u))
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_batchnorm_cumulative_average_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="momentum=None"):
        og.nn.BatchNorm2d(3, momentum=None)


def test_deepcopy_of_a_module_trains_its_own_parameters() -> None:
    import copy

    og.manual_seed(0)
    layer = nn.Linear(3, 2)
    twin = copy.deepcopy(layer)
    assert type(twin.weight) is nn.Parameter and twin.weight.requires_grad
    np.testing.assert_array_equal(twin.weight.detach().numpy(), layer.weight.detach().numpy())
    twin(og.ones(4, 3)).sum().backward()
    assert layer.weight.grad is None and twin.weight.grad is not None
    twin.weight.data.mul_(0)
    assert float(layer.weight.detach().abs().sum()) > 0
