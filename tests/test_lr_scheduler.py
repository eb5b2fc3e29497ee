"""``og.optim.lr_scheduler``: PyTorch's learning-rate schedules, value for value.

Each scheduler's learning rates over 50 steps (two parameter groups) equal PyTorch 2.13's (when
installed) exactly, momentum/betas too for OneCycleLR; a few are checked against hand-computed
values without PyTorch; state dicts resume a schedule; compiled steps read the scheduled values
as inputs and never retrace.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from onnxgrad.models import mlp

import onnxgrad as og
from onnxgrad import nn

# Most tests step schedules without training: PyTorch's order warning is expected there.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
F = og.nn.functional
STEPS = 50
METRICS = [1.0, 0.9, 0.95, 0.95, 0.96, 0.97, 0.8, 0.81, 0.82, 0.83, 0.84] * 5  # for plateaus


def _sequential(s: Any, opt: Any) -> Any:
    return s.SequentialLR(opt, [s.LinearLR(opt, start_factor=0.1, total_iters=5),
                                s.CosineAnnealingLR(opt, T_max=20, eta_min=1e-4),
                                s.ExponentialLR(opt, gamma=0.9)], milestones=[5, 30])


SCHEDULES: dict[str, tuple[str, Callable[[Any, Any], Any]]] = {
    "lambda": ("SGD", lambda s, o: s.LambdaLR(o, lambda e: 0.95 ** e)),
    "lambda/per-group": ("SGD", lambda s, o: s.LambdaLR(o, [lambda e: 1 / (1 + e),
                                                            lambda e: 0.5 ** (e // 7)])),
    "multiplicative": ("SGD", lambda s, o: s.MultiplicativeLR(o, lambda e: 0.97)),
    "step": ("SGD", lambda s, o: s.StepLR(o, step_size=7, gamma=0.5)),
    "multistep": ("SGD", lambda s, o: s.MultiStepLR(o, milestones=[5, 12, 12, 30], gamma=0.3)),
    "constant": ("SGD", lambda s, o: s.ConstantLR(o, factor=0.25, total_iters=8)),
    "exponential": ("SGD", lambda s, o: s.ExponentialLR(o, gamma=0.93)),
    "cosine": ("AdamW", lambda s, o: s.CosineAnnealingLR(o, T_max=20, eta_min=1e-3)),
    "cosine/past-T_max": ("SGD", lambda s, o: s.CosineAnnealingLR(o, T_max=15)),
    "linear": ("SGD", lambda s, o: s.LinearLR(o, start_factor=0.2, end_factor=0.9,
                                              total_iters=30)),
    "onecycle/sgd-momentum": ("SGD", lambda s, o: s.OneCycleLR(o, max_lr=[0.5, 0.2],
                                                               total_steps=STEPS)),
    "onecycle/adam-betas-linear": ("AdamW", lambda s, o: s.OneCycleLR(
        o, max_lr=0.01, epochs=5, steps_per_epoch=10, anneal_strategy="linear")),
    "onecycle/three-phase": ("RMSprop", lambda s, o: s.OneCycleLR(
        o, max_lr=0.1, total_steps=STEPS + 1, three_phase=True, pct_start=0.25)),
    "onecycle/no-momentum": ("Adagrad", lambda s, o: s.OneCycleLR(
        o, max_lr=0.1, total_steps=STEPS, cycle_momentum=False)),
    "sequential": ("SGD", _sequential),
    "plateau": ("SGD", lambda s, o: s.ReduceLROnPlateau(o, patience=2, factor=0.5,
                                                         min_lr=[1e-3, 0.02])),
    "plateau/max-abs-cooldown": ("Adam", lambda s, o: s.ReduceLROnPlateau(
        o, mode="max", threshold_mode="abs", threshold=0.01, patience=1, cooldown=3)),
}


def _optimizer(lib: Any, name: str, params: list) -> Any:
    extra = {"momentum": 0.9} if name in ("SGD", "RMSprop") else {}
    return getattr(lib.optim, name)([{"params": params[:1]}, {"params": params[1:], "lr": 0.05}],
                                    lr=0.1, **extra)


def _step_scheduler(sched: Any, k: int) -> None:
    if type(sched).__name__ == "ReduceLROnPlateau":
        sched.step(METRICS[k])
    else:
        sched.step()


def _history(opt: Any, sched: Any, steps: int = STEPS, start: int = 0) -> list[tuple]:
    rows = []
    for k in range(start, steps):
        groups = opt.param_groups
        rows.append((tuple(sched.get_last_lr()), tuple(g["lr"] for g in groups),
                     tuple(g.get("momentum") for g in groups),
                     tuple(g["betas"][0] if "betas" in g else None for g in groups)))
        _step_scheduler(sched, k)
    return rows


def _og(case: str) -> tuple[Any, Any]:
    name, make = SCHEDULES[case]
    params = [nn.Parameter(np.zeros(3, np.float32)), nn.Parameter(np.zeros(2, np.float32))]
    opt = _optimizer(og, name, params)
    return opt, make(og.optim.lr_scheduler, opt)


@pytest.mark.parametrize("case", list(SCHEDULES))
def test_lr_sequences_equal_pytorch_s(case: str) -> None:
    torch = pytest.importorskip("torch")
    name, make = SCHEDULES[case]
    opt, sched = _og(case)
    topt = _optimizer(torch, name, [torch.nn.Parameter(torch.zeros(3)),
                                    torch.nn.Parameter(torch.zeros(2))])
    with warnings.catch_warnings():
        # PyTorch warns that optimizer.step() was not called first; it is not needed here.
        warnings.simplefilter("ignore", UserWarning)
        tsched = make(torch.optim.lr_scheduler, topt)
        theirs = _history(topt, tsched)
    ours = _history(opt, sched)
    assert ours == theirs  # float64 Python arithmetic in PyTorch's order: equal, not close
    for key in ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"):
        assert [g.get(key) for g in opt.param_groups] == [g.get(key) for g in topt.param_groups]


def test_hand_computed_values() -> None:
    opt, _ = _og("step")
    sched = og.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
    lrs = [sched.get_last_lr()[0] for _ in range(7) if sched.step() is None]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001], rel=1e-12)

    opt, _ = _og("step")
    sched = og.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.5)
    lrs = [sched.get_last_lr()[1] for _ in range(5) if sched.step() is None]
    assert lrs == pytest.approx([0.05, 0.025, 0.025, 0.0125, 0.0125], rel=1e-12)

    opt, _ = _og("step")
    sched = og.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    lrs = [sched.get_last_lr()[0]] + [sched.get_last_lr()[0] for _ in range(4)
                                      if sched.step() is None]
    expected = [0.1 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)

    opt, _ = _og("step")
    sched = og.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)
    lrs = [sched.get_last_lr()[0]] + [sched.get_last_lr()[0] for _ in range(3)
                                      if sched.step() is None]
    assert lrs == pytest.approx([0.05, 0.075, 0.1, 0.1], rel=1e-12)

    opt, _ = _og("step")  # momentum 0.9 in both groups
    sched = og.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10, pct_start=0.2,
                                             anneal_strategy="linear")
    g = opt.param_groups[0]
    assert (g["initial_lr"], g["max_lr"], g["lr"], g["momentum"]) == (0.04, 1.0, 0.04, 0.95)
    sched.step()  # end of the warm-up phase (step 1 of 0..1)
    assert (g["lr"], g["momentum"]) == pytest.approx((1.0, 0.85))
    for _ in range(8):
        sched.step()
    assert g["lr"] == pytest.approx(0.04 / 1e4) and g["momentum"] == pytest.approx(0.95)
    with pytest.raises(ValueError, match="Tried to step 10 times. The specified number of total "
                                         "steps is 9"):
        og.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=9, last_epoch=8).step()


def test_plateau_reduces_after_patience_and_respects_min_lr() -> None:
    opt, _ = _og("step")
    sched = og.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.1, min_lr=0.004)
    for metric in (1.0, 1.0, 1.0):
        sched.step(og.tensor(np.float32(metric)))  # a 0-d tensor is read as a float
    assert sched.get_last_lr() == pytest.approx([0.01, 0.005])
    sched.step(1.0)
    sched.step(1.0)
    assert sched.get_last_lr() == pytest.approx([0.004, 0.004])  # clamped at min_lr
    opt.param_groups[0]["lr"] = 0.004 + 1e-9
    sched.step(1.0)
    sched.step(1.0)
    # A change smaller than eps (1e-8) is not made.
    assert sched.get_last_lr() == [0.004 + 1e-9, 0.004]


@pytest.mark.parametrize("case", ["cosine", "onecycle/sgd-momentum", "sequential", "plateau"])
def test_state_dict_resumes_the_schedule(case: str) -> None:
    opt, sched = _og(case)
    expected = _history(opt, sched)
    opt, sched = _og(case)
    _history(opt, sched, steps=20)
    saved_opt, saved = opt.state_dict(), sched.state_dict()
    assert "optimizer" not in saved
    opt2, sched2 = _og(case)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved)
    assert _history(opt2, sched2, start=20) == expected[20:]


def test_lambda_state_dict_keeps_callable_objects_state() -> None:
    class Decay:
        def __init__(self) -> None:
            self.rate = 0.5

        def __call__(self, epoch: int) -> float:
            return self.rate ** epoch

    opt, _ = _og("step")
    fn = Decay()
    fn.rate = 0.8
    sched = og.optim.lr_scheduler.LambdaLR(opt, [fn, lambda e: 1.0])
    saved = sched.state_dict()
    assert saved["lr_lambdas"] == [{"rate": 0.8}, None]
    fresh = Decay()
    opt2, _ = _og("step")
    og.optim.lr_scheduler.LambdaLR(opt2, [fresh, lambda e: 1.0]).load_state_dict(saved)
    assert fresh.rate == 0.8


@pytest.mark.parametrize("make", [
    lambda o: og.optim.lr_scheduler.StepLR(o, step_size=3),
    lambda o: og.optim.lr_scheduler.ReduceLROnPlateau(o),
    lambda o: og.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
    lambda o: og.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0),
])
def test_a_scheduler_on_a_non_optimizer_raises_pytorch_s_type_error(make: Callable) -> None:
    with pytest.raises(TypeError, match="^list is not an Optimizer$"):
        make([nn.Parameter(np.zeros(2, np.float32))])
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="^list is not an Optimizer$"):
        torch.optim.lr_scheduler.StepLR([torch.zeros(2)], step_size=3)


def test_bad_arguments_are_pytorch_s_errors() -> None:
    opt, _ = _og("step")
    s = og.optim.lr_scheduler
    with pytest.raises(ValueError, match="Expected 2 lr_lambdas, but got 1"):
        s.LambdaLR(opt, [lambda e: 1.0])
    with pytest.raises(ValueError, match="Factor should be < 1.0."):
        s.ReduceLROnPlateau(opt, factor=1.0)
    with pytest.raises(ValueError, match="You must define either total_steps OR"):
        s.OneCycleLR(opt, max_lr=0.1)
    with pytest.raises(ValueError, match="max_lr must have the same length as "
                                         "optimizer.param_groups"):
        s.OneCycleLR(opt, max_lr=[0.1], total_steps=5)
    adagrad = og.optim.Adagrad([nn.Parameter(np.zeros(2, np.float32))])
    with pytest.raises(ValueError, match="optimizer must support momentum or beta1"):
        s.OneCycleLR(adagrad, max_lr=0.1, total_steps=5)
    with pytest.raises(ValueError, match="does not support `ReduceLROnPlateau`"):
        s.SequentialLR(opt, [s.StepLR(opt, 2), s.ReduceLROnPlateau(opt)], milestones=[3])
    with pytest.raises(KeyError, match="param 'initial_lr' is not specified in param_groups"):
        s.StepLR(og.optim.SGD([nn.Parameter(np.zeros(2, np.float32))]), 3, last_epoch=4)


def _trainer(compiled: bool, name: str):
    og.manual_seed(0)
    model = mlp(12, [16], 5)
    params = list(model.parameters())
    extra = {"momentum": 0.9} if name == "SGD" else {}
    optim = getattr(og.optim, name)([{"params": params[:2]}, {"params": params[2:]}], lr=0.05,
                                    **extra)

    def step(x, y):
        optim.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
        return loss

    return model, optim, (og.compile(step) if compiled else step)


@pytest.mark.parametrize("name, make", [
    ("AdamW", lambda s, o: s.CosineAnnealingLR(o, T_max=10)),
    ("SGD", lambda s, o: s.OneCycleLR(o, max_lr=0.2, total_steps=10)),
    ("Adam", lambda s, o: s.OneCycleLR(o, max_lr=0.01, total_steps=10)),
])
def test_scheduled_compiled_steps_never_retrace_and_equal_eager(name: str, make: Callable) -> None:
    rng = np.random.default_rng(0)
    x = og.tensor(rng.standard_normal((8, 12), dtype=np.float32))
    y = og.tensor(rng.integers(0, 5, 8))
    runs = []
    for compiled in (False, True):
        model, optim, step = _trainer(compiled, name)
        sched = make(og.optim.lr_scheduler, optim)
        losses = []
        for _ in range(10):
            losses.append(float(step(x, y)))
            sched.step()
        runs.append((losses, {k: v.numpy().copy() for k, v in model.state_dict().items()}))
        if compiled:
            assert step.traces == 1
        else:
            assert len(optim._runners) == 1  # the eager update never rebuilt either
    (eager_losses, eager_params), (losses, params) = runs
    assert losses == eager_losses
    for key, value in eager_params.items():
        np.testing.assert_array_equal(params[key], value, err_msg=key)


@pytest.mark.filterwarnings("error")
def test_pytorch_s_warning_for_a_scheduler_stepped_before_the_optimizer() -> None:
    opt, _ = _og("step")
    sched = og.optim.lr_scheduler.StepLR(opt, step_size=3)
    with pytest.warns(UserWarning, match=r"Detected call of `lr_scheduler.step\(\)` before"):
        sched.step()
    # The right order, eager or compiled (the traced call runs optimizer.step() once): silent.
    for compiled in (False, True):
        _sgd_on_a_cosine_schedule(compiled)


def _sgd_on_a_cosine_schedule(compiled: bool) -> None:
    x = og.tensor(np.ones(3, np.float32))
    p = nn.Parameter(np.zeros(3, np.float32))
    opt = og.optim.SGD([p], lr=0.1)
    sched = og.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)

    def step(x):
        opt.zero_grad()
        loss = (p * x).sum()
        loss.backward()
        opt.step()
        return loss

    run = og.compile(step) if compiled else step
    for _ in range(3):
        run(x)
        sched.step()
    lrs = [0.1 * (1 + math.cos(math.pi * t / 5)) / 2 for t in range(3)]
    np.testing.assert_allclose(p.detach().numpy(), -sum(lrs), rtol=1e-6)
