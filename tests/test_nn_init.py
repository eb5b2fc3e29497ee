"""``og.nn.init`` against PyTorch's formulas: fans, gains, errors, and the statistics of the
values each initialiser draws (not PyTorch's exact random numbers)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import onnxgrad as og
from onnxgrad import nn
from onnxgrad.nn import init

torch = pytest.importorskip("torch")

SHAPES = [(30, 20), (16, 8, 3, 3), (12, 6, 5), (7, 40)]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_fans_match_pytorch(shape) -> None:
    ours = init._calculate_fan_in_and_fan_out(og.zeros(*shape))
    theirs = torch.nn.init._calculate_fan_in_and_fan_out(torch.zeros(*shape))
    assert ours == theirs


@pytest.mark.parametrize(("name", "param"), [
    ("linear", None), ("conv2d", None), ("conv_transpose1d", None), ("sigmoid", None),
    ("tanh", None), ("relu", None), ("leaky_relu", None), ("leaky_relu", 0.2),
    ("leaky_relu", math.sqrt(5)), ("selu", None)])
def test_gains_match_pytorch(name: str, param) -> None:
    assert init.calculate_gain(name, param) == torch.nn.init.calculate_gain(name, param)


def test_errors_are_pytorchs() -> None:
    for fn in (init.calculate_gain,):
        with pytest.raises(ValueError, match="Unsupported nonlinearity foo"):
            fn("foo")
    with pytest.raises(ValueError, match="negative_slope True not a valid number"):
        init.calculate_gain("leaky_relu", True)
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        init.xavier_uniform_(og.zeros(5))
    with pytest.raises(ValueError, match="Mode fan_avg not supported"):
        init.kaiming_uniform_(og.zeros(3, 4), mode="fan_avg")
    with pytest.raises(ValueError, match="Only tensors with 2 or more dimensions"):
        init.orthogonal_(og.zeros(3))


def _stats(t: og.Tensor) -> tuple[float, float, float, float]:
    a = t.detach().numpy().astype(np.float64)
    return a.mean(), a.std(), a.min(), a.max()


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("nonlinearity", ["relu", "leaky_relu"])
def test_kaiming(mode: str, nonlinearity: str) -> None:
    og.manual_seed(0)
    w = nn.Parameter(og.zeros(64, 32, 3, 3))
    fan = 32 * 9 if mode == "fan_in" else 64 * 9
    gain = init.calculate_gain(nonlinearity, 0)
    out = init.kaiming_uniform_(w, mode=mode, nonlinearity=nonlinearity)
    assert out is w and w.is_leaf and w.requires_grad and w.dtype == np.float32
    bound = gain * math.sqrt(3.0 / fan)
    mean, std, lo, hi = _stats(w)
    assert -bound <= lo and hi <= bound and hi > 0.95 * bound
    assert abs(std - bound / math.sqrt(3)) < 0.03 * bound and abs(mean) < 0.02 * bound
    init.kaiming_normal_(w, mode=mode, nonlinearity=nonlinearity)
    mean, std, _, _ = _stats(w)
    assert abs(std - gain / math.sqrt(fan)) < 0.03 * std and abs(mean) < 0.02 * std


def test_xavier_and_plain_fills() -> None:
    og.manual_seed(1)
    w = og.zeros(200, 100, dtype=og.float64)
    init.xavier_uniform_(w, gain=2.0)
    a = 2.0 * math.sqrt(6.0 / 300)
    mean, std, lo, hi = _stats(w)
    assert w.dtype == np.float64 and -a <= lo and hi <= a and abs(std - a / math.sqrt(3)) < 0.02 * a
    init.xavier_normal_(w)
    assert abs(_stats(w)[1] - math.sqrt(2.0 / 300)) < 0.02 * math.sqrt(2.0 / 300)
    init.uniform_(w, -3, -1)
    mean, _, lo, hi = _stats(w)
    assert -3 <= lo and hi <= -1 and abs(mean + 2) < 0.02
    init.normal_(w, 5.0, 0.5)
    mean, std, _, _ = _stats(w)
    assert abs(mean - 5) < 0.01 and abs(std - 0.5) < 0.01
    init.constant_(w, 0.25)
    assert (w.numpy() == 0.25).all()
    init.zeros_(w)
    assert (w.numpy() == 0).all()
    init.ones_(w)
    assert (w.numpy() == 1).all()


def test_trunc_normal() -> None:
    og.manual_seed(2)
    w = og.zeros(300, 100)
    init.trunc_normal_(w, mean=0.5, std=1.0, a=-1.0, b=1.5)
    ref = torch.empty(300, 100)
    torch.manual_seed(0)
    torch.nn.init.trunc_normal_(ref, mean=0.5, std=1.0, a=-1.0, b=1.5)
    mean, std, lo, hi = _stats(w)
    assert -1.0 <= lo and hi <= 1.5
    r = ref.numpy().astype(np.float64)
    assert abs(mean - r.mean()) < 0.02 and abs(std - r.std()) < 0.02


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 2, 3)])
def test_orthogonal(shape) -> None:
    w = og.zeros(*shape, dtype=og.float64)
    init.orthogonal_(w, gain=2.0)
    flat = w.numpy().reshape(shape[0], -1)
    gram = flat @ flat.T if flat.shape[0] <= flat.shape[1] else flat.T @ flat
    np.testing.assert_allclose(gram, 4.0 * np.eye(gram.shape[0]), atol=1e-12)


def test_init_is_not_recorded_and_compiled_steps_see_it() -> None:
    model = nn.Linear(3, 2)
    with og.no_grad():
        init.zeros_(model.bias)
    init.ones_(model.weight)  # without no_grad too: never recorded
    assert model.weight.is_leaf and model.weight.grad_fn is None
    step = og.compile(lambda x: model(x).sum())
    x = og.ones(1, 3)
    assert step(x).item() == 6.0
    init.constant_(model.weight, 2.0)
    assert step(x).item() == 12.0
    assert step(x).item() == model(x).sum().item()


def test_layers_default_init_matches_kaiming_a_sqrt5_bounds() -> None:
    # PyTorch's default Linear init is kaiming_uniform_(a=sqrt(5)): bound 1 / sqrt(fan_in).
    gain = init.calculate_gain("leaky_relu", math.sqrt(5))
    assert math.isclose(gain * math.sqrt(3.0 / 16), 1 / math.sqrt(16))
    w = nn.Linear(16, 50).weight.detach().numpy()
    assert np.abs(w).max() <= 0.25 and np.abs(w).max() > 0.24


def test_init_inside_a_compiled_function_is_refused() -> None:
    w = og.zeros(3, 4)

    def step(x: og.Tensor) -> og.Tensor:
        init.normal_(w)
        return x @ w

    with pytest.raises(og.TraceError, match=r"og.nn.init inside a compiled function.*test_nn_init"):
        og.compile(step)(og.ones(2, 3))
