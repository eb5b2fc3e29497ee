"""Eager composites in one run (``tracer/fusion.py``): a ``@fused`` builder gives the bits of its
nodes run one at a time, whatever it does at a call, and falls back when a call differs."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from onnxgrad.runtime import session
from onnxgrad.tracer import fusion, ops
from onnxgrad.tracer.fusion import fused

import onnxgrad as og
from onnxgrad.nn import functional as F

RNG = np.random.default_rng(0)


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The op types of the sessions run, fused ones as "fused"."""
    seen: list[str] = []
    run_node = session.run_node

    def counting(op_type: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(op_type)
        return run_node(op_type, *args, **kwargs)

    monkeypatch.setattr("onnxgrad.tracer.values.run_node", counting)
    make = fusion._Fused.__init__

    def session_counting(self: Any, *args: Any) -> None:
        make(self, *args)
        run = self.session.run

        class Counted:
            def run(self, *a: Any) -> Any:
                seen.append("fused")
                return run(*a)

        self.session = Counted()

    monkeypatch.setattr(fusion._Fused, "__init__", session_counting)
    return seen


def _bn_step(dtype: str, shape: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    """A training BatchNorm's forward and backward over three calls: every value it makes."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    running_mean = og.tensor(rng.standard_normal(channels).astype(dtype))
    running_var = og.tensor(rng.random(channels).astype(dtype) + 0.5)
    weight = og.tensor(rng.standard_normal(channels).astype(dtype), requires_grad=True)
    bias = og.tensor(rng.standard_normal(channels).astype(dtype), requires_grad=True)
    out: dict[str, np.ndarray] = {}
    for call in range(3):
        x = og.tensor(rng.standard_normal(shape).astype(dtype), requires_grad=True)
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                         momentum=0.1, eps=1e-5)
        (y * og.tensor(rng.standard_normal(shape).astype(dtype))).sum().backward()
        out.update({f"y{call}": y.detach().numpy(), f"dx{call}": x.grad.numpy(),
                    # NOTE: not .numpy(), which would share the buffers with NumPy (and so
                    # keep the next calls unfused).
                    f"mean{call}": np.array(running_mean.tolist(), dtype),
                    f"var{call}": np.array(running_var.tolist(), dtype)})
    out.update(dweight=weight.grad.numpy(), dbias=bias.grad.numpy())
    return out


def _unfused(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], Any]) -> Any:
    with monkeypatch.context() as m:
        m.setattr(fusion, "ENABLED", False)
        return fn()


@pytest.mark.parametrize("dtype,shape", [("float32", (8, 16, 12, 12)), ("float64", (4, 6, 5, 7)),
                                         ("float32", (32, 10))])
def test_batch_norm_fused_equals_one_node_at_a_time(runs: list[str],
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    dtype: str, shape: tuple[int, ...]) -> None:
    fused_values = _bn_step(dtype, shape, seed=1)
    # The first two calls capture (node by node); the third runs one fused session.
    assert runs.count("fused") == 1
    assert runs.count("BatchNormalization") == 2
    plain = _unfused(monkeypatch, lambda: _bn_step(dtype, shape, seed=1))
    assert fused_values.keys() == plain.keys()
    for name, value in plain.items():
        np.testing.assert_array_equal(fused_values[name], value, err_msg=name, strict=True)


def test_a_replay_that_differs_falls_back_and_stops_fusing(
        runs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    @fused
    def branchy(x: og.Tensor) -> og.Tensor:
        # Python reads a value the fused run computed, and emits other nodes on its sign.
        total = x.sum()
        return ops.exp(x) * 2.0 if float(total.item()) > 0 else ops.sin(x) * 3.0

    pos = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    expected = {sign: _unfused(monkeypatch, lambda s=sign: branchy(og.tensor(s * pos)).numpy())
                for sign in (1, -1)}
    runs.clear()
    for _ in range(3):
        np.testing.assert_array_equal(branchy(og.tensor(pos)).numpy(), expected[1])
    assert runs.count("fused") == 1  # the third call replays
    runs.clear()
    np.testing.assert_array_equal(branchy(og.tensor(-pos)).numpy(), expected[-1])
    assert runs.count("fused") == 1 and "Sin" in runs  # ran fused, diverged at Sin, went on
    runs.clear()
    np.testing.assert_array_equal(branchy(og.tensor(pos)).numpy(), expected[1])
    assert "fused" not in runs  # that signature is no longer fused


def test_constants_and_made_inputs_are_compared_at_each_replay() -> None:
    @fused
    def scaled(x: og.Tensor, factor: float) -> og.Tensor:
        return x * og.tensor(np.full(3, factor, np.float32)) + 1.0

    x = og.tensor(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    for factor in (2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 2.0):
        np.testing.assert_array_equal(scaled(x, factor).numpy(), x.numpy() * factor + 1.0)

    state = {"factor": 2.0}

    @fused
    def read_outside(x: og.Tensor) -> og.Tensor:  # an input the signature does not see
        return x * og.tensor(np.full(3, state["factor"], np.float32))

    for factor in (2.0, 2.0, 2.0, 5.0):
        state["factor"] = factor
        np.testing.assert_array_equal(read_outside(x).numpy(), x.numpy() * factor)


def test_errors_are_the_unfused_ones_at_every_call() -> None:
    one = og.tensor(np.ones((1, 3), np.float32))
    stats = og.zeros(3), og.ones(3)
    for _ in range(3):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            F.batch_norm(one, *stats, training=True)
    x = og.tensor(RNG.standard_normal((4, 3)).astype(np.float32))
    for _ in range(3):
        with pytest.raises(ops.ShapeError, match="does not match the 3 channels"):
            F.batch_norm(x, og.zeros(2), og.ones(2), training=False)


def test_numpy_shared_statistics_stay_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    mean_array, var_array = np.zeros(4, np.float32), np.ones(4, np.float32)
    mean, var = og.from_numpy(mean_array), og.from_numpy(var_array)
    for _ in range(3):
        x = og.tensor(RNG.standard_normal((6, 4)).astype(np.float32))
        F.batch_norm(x, mean, var, training=True)
    np.testing.assert_array_equal(mean_array, mean.numpy())  # updated in place, as PyTorch's
    assert mean_array.any()


def test_an_evicted_session_is_made_again_once(runs: list[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    x = og.tensor(RNG.standard_normal((5, 3)).astype(np.float32))
    stats = og.zeros(3), og.ones(3)
    expected = [F.batch_norm(x, *stats, training=True).numpy() for _ in range(3)]
    session._groups.clear()
    runs.clear()
    again = [F.batch_norm(x, *stats, training=True).numpy() for _ in range(3)]
    # Its signature was seen twice before: the first call captures and makes the session again.
    assert runs.count("fused") == 2
    for a, b in zip(expected, again):
        np.testing.assert_array_equal(a, b)
    session._groups.clear()  # evicted twice: the shapes change too often for a session to pay
    runs.clear()
    assert all(np.array_equal(F.batch_norm(x, *stats, training=True).numpy(), e)
               for e in expected)
    assert "fused" not in runs


def test_sessions_are_bounded_in_a_loop_of_changing_shapes(runs: list[str]) -> None:
    stats = og.zeros(3), og.ones(3)
    for rounds in range(3):
        for batch in range(2, 2 + session._groups.max_entries + 8):
            F.batch_norm(og.rand(batch, 3), *stats, training=True)
        assert len(session._groups) <= session._groups.max_entries
    assert runs.count("fused") < 2 * (session._groups.max_entries + 8)


def test_compiled_batch_norm_is_traced_node_by_node_and_matches_eager() -> None:
    og.manual_seed(0)
    model = og.nn.Sequential(og.nn.Conv2d(3, 4, 3), og.nn.BatchNorm2d(4), og.nn.ReLU())
    x = og.tensor(RNG.standard_normal((4, 3, 8, 8)).astype(np.float32))
    eager = [model(x).detach().numpy() for _ in range(3)]  # the third one fused
    og.manual_seed(0)
    twin = og.nn.Sequential(og.nn.Conv2d(3, 4, 3), og.nn.BatchNorm2d(4), og.nn.ReLU())
    step = og.compile(lambda inp: twin(inp))
    compiled = [step(x).numpy() for _ in range(3)]
    for a, b in zip(eager, compiled):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model[1].running_mean.numpy(), twin[1].running_mean.numpy())
