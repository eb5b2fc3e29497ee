"""In-place writes inside a compiled step: an in-place activation (MobileNetV2's
``ReLU6(inplace=True)``) traces silently, computes what eager computes and is no output; state
overwritten without being read (``buffer.copy_(y)``) is updated as eager updates it."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import onnxgrad as og


def _step():
    og.manual_seed(0)
    model = og.nn.Sequential(og.nn.Conv2d(3, 4, 3), og.nn.ReLU6(inplace=True), og.nn.Flatten(),
                             og.nn.Linear(4 * 4 * 4, 3))
    opt = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(x, y):
        opt.zero_grad()
        loss = og.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def test_inplace_activation_in_a_compiled_step_warns_nothing() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32) * 4
    y = np.array([0, 2])
    losses = {}
    for compiled in (False, True):
        run = og.compile(_step()) if compiled else _step()
        with warnings.catch_warnings():
            # NOTE: tracing once read .grad of the tensor ReLU6 wrote in place (a non-leaf),
            # which warned "The .grad attribute of a Tensor that is not a leaf..." at the user.
            warnings.simplefilter("error")
            losses[compiled] = [float(run(og.tensor(x), og.tensor(y))) for _ in range(3)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_inplace_activation_is_no_output_of_the_step() -> None:
    """The tensor ReLU6 wrote in place was made by the call: no input held it before, so its
    new value is no output (one was computed, kept to the end of every run and discarded)."""
    step = og.compile(_step())
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    step(og.tensor(x), og.tensor(np.array([0, 2])))
    graph = step.__onnxgrad_model__().graph
    inputs = {i.name for i in graph.input}
    news = [o.name for o in graph.output if o.name.endswith(".new")]
    assert news and all(name.removesuffix(".new") in inputs for name in news), news


class _Overwrites(og.nn.Module):
    """A buffer overwritten in place from the batch without reading it first."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = og.nn.Linear(3, 2)
        self.register_buffer("last_mean", og.zeros(2))
        self.register_buffer("calls", og.zeros((), dtype=og.int64))

    def forward(self, x):
        y = self.lin(x)
        self.last_mean.copy_(y.detach().mean(0))
        self.calls.add_(1)
        return y


def test_state_overwritten_without_being_read_is_updated_like_eager() -> None:
    batches = [np.random.default_rng(i).standard_normal((4, 3)).astype(np.float32)
               for i in range(3)]
    states = {}
    for compiled in (False, True):
        og.manual_seed(0)
        model = _Overwrites()
        opt = og.optim.SGD(model.parameters(), lr=0.1)

        def step(x, model=model, opt=opt):
            opt.zero_grad()
            loss = model(x).sum()
            loss.backward()
            opt.step()
            return loss

        run = og.compile(step) if compiled else step
        states[compiled] = []
        for x in batches:
            run(og.tensor(x))
            states[compiled].append({k: v.numpy().copy() for k, v in model.state_dict().items()})
    for eager, compiled in zip(states[False], states[True]):
        assert eager.keys() == compiled.keys()
        for key in eager:
            np.testing.assert_array_equal(compiled[key], eager[key], err_msg=key)
    assert states[True][-1]["calls"] == 3 and states[True][-1]["last_mean"].any()


def test_writing_a_tensor_with_history_from_before_the_call_is_refused() -> None:
    """Eager code updates such a tensor in place; a compiled step cannot (its value before the
    call is no input), so tracing says so at the user's line instead of leaving it unchanged."""
    w = og.ones(3, requires_grad=True)
    h = w * 2

    @og.compile
    def f(x):
        with og.no_grad():
            h.add_(x)
        return h.sum()

    with pytest.raises(og.TraceError, match=r"test_compile_inplace.py:\d+: h.add_\(x\): writes "
                       r"in place to a tensor with autograd history from before the call "
                       r"\(made by Mul\)"):
        f(og.ones(3))
    np.testing.assert_array_equal(h.detach().numpy(), [2, 2, 2])

    @og.compile
    def g(x):
        d = h.detach()
        d.add_(x)  # detached first: state of the step, updated like eager
        return d.sum()

    assert float(g(og.ones(3))) == 9.0
