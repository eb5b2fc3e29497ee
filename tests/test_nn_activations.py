"""The mobile nets' layers against PyTorch: same state dict keys and shapes, PyTorch's weights
loaded with load_state_dict, then the same outputs and gradients (input and parameters), in
float32 and float64; and the default initialisation's distribution."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnxgrad as og
from onnxgrad import nn


def _pair(ours: nn.Module, theirs, x: np.ndarray, dtype=np.float32, grad_rtol: float = 1e-11):
    """Load theirs into ours, run both forward and backward with a random upstream gradient."""
    theirs = theirs.to(torch.float64 if dtype == np.float64 else torch.float32)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    ours.to(dtype)
    x = x.astype(dtype)
    xo, xt = og.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    yo, yt = ours(xo), theirs(xt)
    u = np.random.default_rng(1).standard_normal(yt.shape).astype(dtype)
    yo.backward(og.tensor(u))
    yt.backward(torch.from_numpy(u))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-12}
    np.testing.assert_allclose(yo.detach().numpy(), yt.detach().numpy(), **tol, err_msg="output")
    if dtype == np.float64:
        tol["rtol"] = grad_rtol
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), **tol, err_msg="input grad")
    tp = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), tp[name].grad.numpy(), **tol, err_msg=name)


ACTIVATIONS = [("SiLU", -6, 6), ("Mish", -6, 6), ("Hardswish", -5, 5), ("Hardsigmoid", -5, 5),
               ("ReLU6", -2, 8), ("Sigmoid", -6, 6)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "low", "high"), ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_activation_layers(name: str, low: float, high: float, dtype) -> None:
    x = np.random.default_rng(0).uniform(low, high, (4, 3, 5, 5))
    # NOTE: PyTorch's float64 hardsigmoid gradient multiplies by float(1.0f / 6.0f), 3e-8 off
    # 1/6 (hardsigmoid_backward's one_sixth constant); onnxgrad's is the float64 1/6.
    _pair(getattr(nn, name)(), getattr(torch.nn, name)(), x, dtype,
          grad_rtol=1e-7 if name == "Hardsigmoid" else 1e-11)
    assert repr(getattr(nn, name)(inplace=True) if name != "Sigmoid" else nn.Sigmoid()) == \
        repr(getattr(torch.nn, name)(inplace=True) if name != "Sigmoid" else torch.nn.Sigmoid())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("groups", "channels", "shape", "affine"), [
    (2, 4, (3, 4, 5, 6), True), (3, 6, (2, 6, 7), True), (1, 4, (2, 4, 3, 3), False),
    (4, 4, (2, 4, 9), True), (2, 4, (5, 4), True), (2, 4, (2, 4, 3), "no-bias")])
def test_group_norm(groups, channels, shape, affine, dtype) -> None:
    kw = {"affine": bool(affine), "bias": affine is True}
    theirs = torch.nn.GroupNorm(groups, channels, **kw)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
    ours = nn.GroupNorm(groups, channels, **kw)
    assert repr(ours) == repr(theirs)
    x = np.random.default_rng(2).standard_normal(shape) * 3 + 1
    _pair(ours, theirs, x, dtype)


def test_group_norm_checks_like_pytorch() -> None:
    with pytest.raises(ValueError, match="num_channels must be divisible by num_groups"):
        nn.GroupNorm(4, 6)


def _kw(**kw):
    return kw


CONV1D = [
    _kw(in_channels=3, out_channels=4, kernel_size=3, padding=1),
    _kw(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2, bias=False),
    _kw(in_channels=6, out_channels=6, kernel_size=5, padding=2, groups=6),  # depthwise
    _kw(in_channels=3, out_channels=6, kernel_size=3, dilation=2, padding="same", groups=3),
    _kw(in_channels=4, out_channels=2, kernel_size=1),
]


@pytest.mark.parametrize("kw", CONV1D, ids=[str(i) for i in range(len(CONV1D))])
def test_conv1d(kw) -> None:
    torch.manual_seed(0)
    theirs = torch.nn.Conv1d(**kw)
    ours = nn.Conv1d(**kw)
    assert repr(ours) == repr(theirs)
    assert ours.weight.shape == tuple(theirs.weight.shape)
    x = np.random.default_rng(3).standard_normal((2, kw["in_channels"], 13))
    _pair(ours, theirs, x)
    # Unbatched [C, L] input, as PyTorch.
    with og.no_grad():
        single = ours(og.tensor(x[0].astype(np.float32))).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(single, theirs(torch.from_numpy(x[0].astype(np.float32))),
                                   rtol=1e-5, atol=1e-6)


CONV2D = [
    _kw(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1, groups=2, bias=False),
    _kw(in_channels=8, out_channels=8, kernel_size=3, stride=1, padding=1, groups=8, bias=False),
    _kw(in_channels=8, out_channels=8, kernel_size=5, stride=2, padding=2, groups=8, bias=False),
    _kw(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1, groups=4),
]


@pytest.mark.parametrize("kw", CONV2D, ids=["grouped", "depthwise", "depthwise-5x5-s2",
                                            "depthwise-multiplier2"])
def test_grouped_and_depthwise_conv2d(kw) -> None:
    """The mobile nets' depthwise convolutions, gradients through the Conv rule."""
    torch.manual_seed(1)
    theirs = torch.nn.Conv2d(**kw)
    ours = nn.Conv2d(**kw)
    assert repr(ours) == repr(theirs)
    _pair(ours, theirs, np.random.default_rng(4).standard_normal((2, kw["in_channels"], 9, 10)))


def test_default_init_is_pytorchs() -> None:
    """kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = C/groups * k."""
    og.manual_seed(0)
    conv = nn.Conv1d(8, 16, 5, groups=2)
    bound = 1 / np.sqrt(4 * 5)
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert np.abs(b).max() <= bound
    norm = nn.GroupNorm(2, 4)
    np.testing.assert_array_equal(norm.weight.detach().numpy(), np.ones(4, np.float32))
    np.testing.assert_array_equal(norm.bias.detach().numpy(), np.zeros(4, np.float32))
