"""Every way a compiled step could go stale: compiled == eager over several calls, or a clear error.

Each row builds a fresh little training setup twice (same seeds): one copy runs the function
eagerly, the other through ``og.compile``. Both are called four times; after the second call
the row changes something the function depends on (in both copies), and every call's outputs and
the parameters must agree.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import onnxgrad as og
from onnxgrad import nn

FLAG = False          # a module-level flag tested in an `if`
SCALE = 1.0           # a module-level number read by a helper
CONFIG = {"scale": 1.0, "mode": "a"}


class Config:
    scale = 1.0


OBJ = Config()


def helper(x: og.Tensor) -> og.Tensor:
    return x * SCALE


def other_helper(x: og.Tensor) -> og.Tensor:
    return x * 3.0


HELPERS = {"f": helper}


@pytest.fixture(autouse=True)
def _reset_globals():
    global FLAG, SCALE
    FLAG, SCALE = False, 1.0
    CONFIG.update(scale=1.0, mode="a")
    OBJ.scale = 1.0
    HELPERS["f"] = helper
    yield


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        og.manual_seed(0)
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6) if hasattr(nn, "BatchNorm1d") else nn.Identity()
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(6, 3)
        self.scale = 1.0

    def forward(self, x: og.Tensor) -> og.Tensor:
        return self.fc2(self.drop(og.relu(self.bn(self.fc1(x))))) * self.scale


def _data(i: int) -> tuple[og.Tensor, og.Tensor]:
    rng = np.random.default_rng(i)
    return (og.tensor(rng.standard_normal((8, 4), dtype=np.float32)),
            og.tensor(rng.integers(0, 3, 8)))


class Setup:
    """One copy: a model, an optimizer in a holder (so a row can replace it), a closure value."""

    def __init__(self) -> None:
        self.model = Net()
        self.opt = og.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.k = 1.0
        self.t = og.tensor([1.0, 2.0, 3.0])
        self.calls = 0

    def loss(self, x: og.Tensor, y: og.Tensor) -> og.Tensor:
        return og.nn.functional.cross_entropy(self.model(x), y)


def _train(s: Setup) -> Callable[..., Any]:
    def step(x, y):
        s.opt.zero_grad()
        loss = s.loss(x, y)
        loss.backward()
        s.opt.step()
        return loss
    return step


def _closure_float(s: Setup) -> Callable[..., Any]:
    k = [1.0]

    def step(x, y):
        return (s.model(x) * k[0]).sum()
    s.change = lambda: k.__setitem__(0, 2.5)
    return step


def _closure_number(s: Setup) -> Callable[..., Any]:
    k = 1.0

    def step(x, y):
        return (s.model(x) * k).sum()

    def change():
        nonlocal k
        k = 2.5
    s.change = change
    return step


def _closure_tensor(s: Setup, recompute: bool) -> Callable[..., Any]:
    t = og.tensor([1.0, 2.0, 3.0])

    def step(x, y):
        return (s.model(x) * t).sum()

    def change():
        nonlocal t
        t = t * 2 if recompute else og.tensor([5.0, 6.0, 7.0])
    s.change = change
    return step


def _flag(s: Setup) -> Callable[..., Any]:
    def step(x, y):
        out = s.model(x)
        if FLAG:
            out = out * 2
        return out.sum()

    def change():
        global FLAG
        FLAG = True
    s.change = change
    return step


def _returns(s: Setup) -> Callable[..., Any]:
    def step(x, y):
        out = s.model(x).sum()
        if CONFIG["mode"] == "b":
            return out, out * 2
        return out
    s.change = lambda: CONFIG.update(mode="b")
    return step


def _helper_global(s: Setup) -> Callable[..., Any]:
    def step(x, y):
        return helper(s.model(x)).sum()

    def change():
        global SCALE
        SCALE = 4.0
    s.change = change
    return step


def _helper_rebound(s: Setup) -> Callable[..., Any]:
    def step(x, y):
        return HELPERS["f"](s.model(x)).sum()
    s.change = lambda: HELPERS.__setitem__("f", other_helper)
    return step


def _dict_config(s: Setup) -> Callable[..., Any]:
    def step(x, y):
        return (s.model(x) * CONFIG["scale"]).sum()
    s.change = lambda: CONFIG.update(scale=0.5)
    return step


def _object_config(s: Setup) -> Callable[..., Any]:
    def step(x, y):
        return (s.model(x) * OBJ.scale).sum()
    s.change = lambda: setattr(OBJ, "scale", 7.0)
    return step


def _list_argument(s: Setup) -> Callable[..., Any]:
    def step(x, y):
        xs = [x, x * 0 + s.k]
        return (s.model(xs[0]) + s.model(xs[1])).sum()
    return step


def _nested(s: Setup) -> Callable[..., Any]:
    inner = og.compile(_train(s))  # eager copy: called from Python; compiled: one graph

    def step(x, y):
        return inner(x, y) * 2
    return step


def _set(attr: str, value: Any) -> Callable[[Setup], None]:
    return lambda s: setattr(s, attr, value)


def _module_attr(path: str, value: Any) -> Callable[[Setup], None]:
    def change(s: Setup) -> None:
        *owner, name = path.split(".")
        obj = s.model
        for part in owner:
            obj = getattr(obj, part)
        setattr(obj, name, value)
    return change


def _new_optimizer(**kwargs: Any) -> Callable[[Setup], None]:
    def change(s: Setup) -> None:
        settings = {"lr": 0.1, "momentum": 0.9, **kwargs}
        fc2_only = settings.pop("fc2_only", False)
        params = s.model.fc2.parameters() if fc2_only else s.model.parameters()
        s.opt = og.optim.SGD(params, **settings)
    return change


def _freeze(s: Setup) -> None:
    s.model.fc1.weight.requires_grad_(False)


def _unfreeze_after_freeze(s: Setup) -> None:
    s.model.fc1.weight.requires_grad_(True)


# (row id, step factory, change applied to each copy after the second call, setup before)
ROWS: list[tuple[str, Callable[[Setup], Any], Callable[[Setup], None] | None, Any]] = [
    ("freeze a parameter", _train, _freeze, None),
    ("unfreeze a parameter", _train, _unfreeze_after_freeze, _freeze),
    ("optimizer replaced, same settings", _train, _new_optimizer(), None),
    ("optimizer replaced, other lr and momentum", _train, _new_optimizer(lr=0.05, momentum=0.5),
     None),
    ("optimizer replaced, other parameters", _train, _new_optimizer(fc2_only=True), None),
    ("module attribute self.scale", _train, _module_attr("scale", 3.0), None),
    ("BatchNorm momentum", _train, _module_attr("bn.momentum", 0.5), None),
    ("Dropout p", _train, _module_attr("drop.p", 1.0), None),
    ("closure float in a list", _closure_float, None, None),
    ("closure number rebound", _closure_number, None, None),
    ("closure tensor rebound", lambda s: _closure_tensor(s, False), None, None),
    ("closure tensor recomputed", lambda s: _closure_tensor(s, True), None, None),
    ("module-level flag in an if", _flag, None, None),
    ("what the function returns", _returns, None, None),
    ("a global read in a helper function", _helper_global, None, None),
    ("a helper function replaced", _helper_rebound, None, None),
    ("a config dict entry", _dict_config, None, None),
    ("a config object attribute", _object_config, None, None),
    ("an attribute read through an object", _list_argument, _set("k", 5.0), None),
    ("a compiled function called inside another", _nested, None, None),
]


def _as_list(out: Any) -> list[np.ndarray]:
    if isinstance(out, og.Tensor):
        return [out.detach().numpy()]
    return [o.detach().numpy() for o in out]


@pytest.mark.parametrize(("factory", "change", "before"), [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])
def test_compiled_equals_eager_after_a_change(factory, change, before) -> None:
    eager, compiled = Setup(), Setup()
    fe, fc = factory(eager), og.compile(factory(compiled))
    for s in (eager, compiled):
        if before is not None:
            before(s)
    shared = [getattr(s, "change", None) for s in (eager, compiled)]
    for i in range(4):
        x, y = _data(i)
        want, got = fe(x, y), fc(x, y)
        a, b = _as_list(want), _as_list(got)
        assert len(a) == len(b), f"call {i}: {len(b)} outputs, eager returned {len(a)}"
        for u, v in zip(a, b):
            np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-6, err_msg=f"call {i}")
        for (n, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
            np.testing.assert_allclose(q.detach().numpy(), p.detach().numpy(), rtol=1e-5,
                                       atol=1e-6, err_msg=f"call {i}: {n}")
        if i == 1:
            if change is not None:
                change(eager)
                change(compiled)
            elif shared[0] is not None:  # a global: changed once for both copies
                shared[0]()
                if shared[1] is not shared[0]:
                    shared[1]()


def test_a_counter_the_function_increments_is_a_clear_error_not_silent() -> None:
    state = {"n": 0}

    def every_other(x):
        state["n"] += 1  # Python that a compiled call would not run
        return x * 2 if state["n"] % 2 else x

    f = og.compile(lambda x: every_other(x).sum())
    with pytest.raises(og.TraceError, match=r"changed the Python value\(s\) \['state"):
        f(og.ones(3))


def test_a_counter_changed_outside_is_retraced_then_a_clear_error() -> None:
    state = {"n": 0}
    f = og.compile(lambda x: (x * 2 if state["n"] % 2 else x).sum())
    results = []
    with pytest.raises(og.TraceError, match="Python value"):
        for _ in range(40):
            results.append(f(og.ones(3)).item())
            state["n"] += 1
    assert results == [3.0, 6.0] * (f.MAX_VALUE_TRACES // 2)  # right until the error


def test_trace_cache_is_bounded_least_recently_used_first() -> None:
    f = og.compile(lambda x: (x * 2).sum())
    for n in range(1, 41):
        assert f(og.ones(n)).item() == 2.0 * n
    assert len(f._programs) == f.MAX_PROGRAMS
    traces = f.traces
    f(og.ones(40))  # the most recent: kept
    assert f.traces == traces
    f(og.ones(1))  # evicted long ago: traced again, still right
    assert f.traces == traces + 1


def test_recompiles_are_logged_with_their_reason(caplog: pytest.LogCaptureFixture) -> None:
    k = [1.0]
    f = og.compile(lambda x: (x * k[0]).sum())
    with caplog.at_level(logging.INFO, logger="onnxgrad.recompiles"):
        f(og.ones(2))
        f(og.ones(3))
        k[0] = 2.0
        assert f(og.ones(3)).item() == 6.0
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "shapes or dtypes" in messages[0]
    assert "Python values k" in messages[1]


def test_tensors_inside_list_and_dict_arguments_are_inputs_not_constants() -> None:
    f = og.compile(lambda xs, d: (xs[0] * 2 + xs[1] - d["b"]).sum())
    assert f([og.ones(2), og.ones(2)], {"b": og.ones(2)}).item() == 4.0
    assert f([og.ones(2) * 3, og.ones(2)], {"b": og.zeros(2)}).item() == 14.0
    assert f.traces == 1
    names = [i.name for i in f.last.model.graph.input]
    assert names[:3] == ["xs.0", "xs.1", "d.b"]


GC_RUNS = {"n": 0}


def test_garbage_collector_callbacks_are_not_part_of_the_program() -> None:
    # The interpreter calls gc callbacks (hypothesis installs one) at any point of a trace;
    # what they read and change is not what the compiled function computes.
    import gc

    def callback(phase, info):
        GC_RUNS["n"] += 1

    def churn(x):
        for _ in range(50):
            gc.collect(0)
        return (x * 2).sum()

    gc.callbacks.append(callback)
    try:
        f = og.compile(churn)
        assert f(og.ones(3)).item() == 6.0
        assert f(og.ones(3)).item() == 6.0
    finally:
        gc.callbacks.remove(callback)
    assert f.traces == 1 and GC_RUNS["n"] > 0
