"""``og.optim.SGD`` against ``torch.optim.SGD``'s algorithm, written out in NumPy.

Every variant (weight decay, momentum, dampening, nesterov, maximize) runs four steps on two
parameter groups with different learning rates, one parameter skipping steps (grad None).
Then: state dicts, ``zero_grad``, errors, the eager step's double-buffered runtime state and
eager edits between steps; and, where torch is importable, the same variants against
``torch.optim.SGD`` itself.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import onnxgrad as og
from onnxgrad import nn

STEPS = 4
LRS = (0.1, 0.03)  # group 0 keeps the default lr, group 1 overrides it
SHAPES = ((3, 2), (4,), (2, 3, 1, 1), (3,))  # params 0, 1 in group 0; 2, 3 in group 1
# (param 2 is shaped as a 1x1 convolution's weight: the update runs it without its trailing 1s)
SKIP = 3  # parameter 3 has no gradient at steps 0 and 2


# =========================================================================== the reference
def np_sgd_step(params: list[np.ndarray], grads: list[np.ndarray | None],
                bufs: list[np.ndarray | None], lr: float, momentum: float = 0,
                dampening: float = 0, weight_decay: float = 0, nesterov: bool = False,
                maximize: bool = False) -> None:
    """torch.optim.SGD's step (``_single_tensor_sgd``), in place on ``params`` and ``bufs``."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue  # no gradient: no update and no momentum buffer
        d_p = -g if maximize else g
        if weight_decay != 0:
            d_p = d_p + weight_decay * p
        if momentum != 0:
            if bufs[i] is None:
                bufs[i] = d_p.copy()  # the first step's buffer is d_p itself (no dampening)
            else:
                bufs[i] = momentum * bufs[i] + (1 - dampening) * d_p
            d_p = d_p + momentum * bufs[i] if nesterov else bufs[i]
        params[i] = p - lr * d_p


VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "weight_decay": {"weight_decay": 0.1},
    "momentum": {"momentum": 0.9},
    "dampening": {"momentum": 0.9, "dampening": 0.3},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "maximize": {"maximize": True},
    "momentum-wd-dampening-maximize": {"momentum": 0.8, "dampening": 0.2, "weight_decay": 0.05,
                                       "maximize": True},
    "nesterov-wd-maximize": {"momentum": 0.7, "nesterov": True, "weight_decay": 0.05,
                             "maximize": True},
}


def initial_params() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def gradients(step: int) -> list[np.ndarray | None]:
    rng = np.random.default_rng(100 + step)
    grads: list[np.ndarray | None] = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    if step % 2 == 0:
        grads[SKIP] = None
    return grads


def make_sgd(values: list[np.ndarray], **hyper: Any) -> tuple[list[nn.Parameter], og.optim.SGD]:
    params = [nn.Parameter(v) for v in values]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": LRS[1]}]
    return params, og.optim.SGD(groups, lr=LRS[0], **hyper)


def set_grads(params: list[Any], grads: list[np.ndarray | None], make: Any = og.tensor) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else make(g)


def buffers(optim: og.optim.SGD) -> dict[int, np.ndarray]:
    return {i: s["momentum_buffer"] for i, s in optim.state_dict()["state"].items()
            if "momentum_buffer" in s}


class Reference:
    """The NumPy model of the same two groups, in float64."""

    def __init__(self, values: list[np.ndarray], **hyper: Any) -> None:
        self.params = [v.astype(np.float64) for v in values]
        self.bufs: list[np.ndarray | None] = [None] * len(values)
        self.hyper = hyper

    def step(self, grads: list[np.ndarray | None]) -> None:
        for group, lr in ((slice(0, 2), LRS[0]), (slice(2, 4), LRS[1])):
            ps, bs = self.params[group], self.bufs[group]
            gs = [None if g is None else g.astype(np.float64) for g in grads[group]]
            np_sgd_step(ps, gs, bs, lr, **self.hyper)
            self.params[group], self.bufs[group] = ps, bs


def assert_matches(params: list[Any], optim: og.optim.SGD, ref: Reference, what: str) -> None:
    for i, (p, want) in enumerate(zip(params, ref.params)):
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{what}: param {i}")
    got = buffers(optim)
    # A parameter that never had a gradient has no buffer (with dampening 0, onnxgrad starts
    # a buffer at zero on a parameter's first step, which is numerically PyTorch's d_p: values
    # are compared, not how the first step was computed).
    assert sorted(got) == [i for i, b in enumerate(ref.bufs) if b is not None], what
    for i, b in got.items():
        np.testing.assert_allclose(b, ref.bufs[i], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{what}: momentum buffer {i}")


# =========================================================================== the algorithm
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sgd_matches_the_reference(variant: str) -> None:
    hyper = VARIANTS[variant]
    params, optim = make_sgd(initial_params(), **hyper)
    ref = Reference(initial_params(), **hyper)
    before = params[SKIP].detach().numpy().copy()
    for step in range(STEPS):
        grads = gradients(step)
        set_grads(params, grads)
        optim.step()
        ref.step(grads)
        assert_matches(params, optim, ref, f"{variant} step {step}")
        if step == 0:  # skipped: untouched, and no state
            np.testing.assert_array_equal(params[SKIP].detach().numpy(), before)
            assert SKIP not in optim.state_dict()["state"]
    for p in params:
        assert p.is_leaf and p.requires_grad and p.dtype == np.float32


def test_sgd_float64_parameters() -> None:
    values = [v.astype(np.float64) for v in initial_params()]
    params, optim = make_sgd(values, momentum=0.9, weight_decay=0.01)
    ref = Reference(values, momentum=0.9, weight_decay=0.01)
    for step in range(2):
        grads = [None if g is None else g.astype(np.float64) for g in gradients(step)]
        set_grads(params, grads)
        optim.step()
        ref.step(grads)
    for p, want in zip(params, ref.params):
        assert p.dtype == np.float64
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12, atol=1e-14)


def test_step_without_any_gradient_does_nothing_and_returns_the_closure_loss() -> None:
    params, optim = make_sgd(initial_params(), momentum=0.9)
    assert optim.step() is None
    assert optim.state_dict()["state"] == {}
    for p, v in zip(params, initial_params()):
        np.testing.assert_array_equal(p.detach().numpy(), v)
    set_grads(params, gradients(1))
    assert optim.step(lambda: 1.5) == 1.5


def test_frozen_parameters_are_accepted_and_left_alone() -> None:
    # Fine-tuning passes model.parameters() with some layers frozen, as in PyTorch.
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().numpy().copy()
    optim = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(og.randn(4, 3)).sum().backward()
    optim.step()
    np.testing.assert_array_equal(model[0].weight.detach().numpy(), frozen)
    assert model[0].weight.grad is None and model[1].weight.grad is not None
    assert sorted(optim.state_dict()["state"]) == [2, 3]


def test_lr_edit_in_param_groups_takes_effect() -> None:
    params, optim = make_sgd(initial_params(), momentum=0.9)
    ref = Reference(initial_params(), momentum=0.9)
    for step in range(STEPS):
        grads = gradients(step)
        set_grads(params, grads)
        optim.step()
        ref.step(grads)
        optim.param_groups[0]["lr"] *= 0.5  # a schedule; the graph does not change
        optim.param_groups[1]["momentum"] = 0.5
    # The reference with the same schedule.
    ref2 = Reference(initial_params(), momentum=0.9)
    lrs = list(LRS)
    for step in range(STEPS):
        for group, lr in ((slice(0, 2), lrs[0]), (slice(2, 4), LRS[1])):
            ps, bs = ref2.params[group], ref2.bufs[group]
            gs = [None if g is None else g.astype(np.float64) for g in gradients(step)[group]]
            np_sgd_step(ps, gs, bs, lr, momentum=0.9 if group.start == 0 or step == 0 else 0.5)
            ref2.params[group], ref2.bufs[group] = ps, bs
        lrs[0] *= 0.5
    assert_matches(params, optim, ref2, "lr schedule")
    assert len(optim._runners) == 1  # one structure: hyperparameters are graph inputs


# =========================================================================== state dicts
def test_state_dict_layout_is_pytorch_s() -> None:
    params, optim = make_sgd(initial_params(), momentum=0.9, nesterov=True)
    set_grads(params, gradients(0))
    optim.step()
    sd = optim.state_dict()
    assert sd["param_groups"] == [
        {"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0, "nesterov": True,
         "maximize": False, "params": [0, 1]},
        {"lr": 0.03, "momentum": 0.9, "dampening": 0, "weight_decay": 0, "nesterov": True,
         "maximize": False, "params": [2, 3]},
    ]
    assert sorted(sd["state"]) == [0, 1, 2] and list(sd["state"][0]) == ["momentum_buffer"]
    assert all(isinstance(s["momentum_buffer"], np.ndarray) for s in sd["state"].values())


@pytest.mark.parametrize("variant", ["momentum-wd-dampening-maximize", "nesterov-wd-maximize"])
def test_state_dict_round_trip_gives_identical_next_steps(variant: str) -> None:
    hyper = VARIANTS[variant]
    params, optim = make_sgd(initial_params(), **hyper)
    for step in range(2):
        set_grads(params, gradients(step))
        optim.step()
    sd = optim.state_dict()
    snapshot = {i: b.copy() for i, b in buffers(optim).items()}
    # A fresh optimizer (default hyperparameters: the state dict brings them) on a copy.
    copies = [nn.Parameter(p.detach().numpy()) for p in params]
    fresh = og.optim.SGD([{"params": copies[:2]}, {"params": copies[2:]}], lr=1.0)
    fresh.load_state_dict(sd)
    assert fresh.state_dict()["param_groups"] == sd["param_groups"]
    for step in range(2, STEPS):
        grads = gradients(step)
        set_grads(params, grads)
        set_grads(copies, grads)
        optim.step()
        fresh.step()
        for p, q in zip(params, copies):
            np.testing.assert_array_equal(q.detach().numpy(), p.detach().numpy())
        for i, b in buffers(optim).items():
            np.testing.assert_array_equal(buffers(fresh)[i], b)
    # The state dict is a snapshot, not a view of the live buffers.
    for i, b in snapshot.items():
        np.testing.assert_array_equal(sd["state"][i]["momentum_buffer"], b)


def test_load_state_dict_accepts_tensors_and_checks_shapes_and_groups() -> None:
    params, optim = make_sgd(initial_params(), momentum=0.9)
    set_grads(params, gradients(1))
    optim.step()
    sd = optim.state_dict()
    as_tensors = {"state": {i: {k: og.tensor(v) for k, v in s.items()}
                            for i, s in sd["state"].items()},
                  "param_groups": sd["param_groups"]}
    optim.load_state_dict(as_tensors)
    for i, b in buffers(optim).items():
        np.testing.assert_array_equal(b, sd["state"][i]["momentum_buffer"])
    bad = {"state": {0: {"momentum_buffer": np.zeros((2, 3))}},
           "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match=r"momentum_buffer of parameter 0: expected shape "
                                         r"\[3, 2\], got \[2, 3\]"):
        optim.load_state_dict(bad)
    # Older PyTorch versions save a None buffer for parameters without momentum.
    optim.load_state_dict({"state": {0: {"momentum_buffer": None}},
                           "param_groups": sd["param_groups"]})
    assert buffers(optim) == {}
    with pytest.raises(ValueError, match="number of parameter groups"):
        optim.load_state_dict({"state": {}, "param_groups": sd["param_groups"][:1]})


# =========================================================================== zero_grad
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none: bool) -> None:
    params, optim = make_sgd(initial_params())
    set_grads(params, gradients(0))
    optim.zero_grad(set_to_none=set_to_none)
    for p, g in zip(params, gradients(0)):
        if set_to_none or g is None:
            assert p.grad is None
        else:
            assert p.grad.shape == p.shape and p.grad.dtype == p.dtype
            assert not p.grad.numpy().any()
    optim.step()  # zero gradients (or none) leave the parameters as they were
    for p, v in zip(params, initial_params()):
        np.testing.assert_array_equal(p.detach().numpy(), v)
    set_grads(params, gradients(0))
    optim.zero_grad()  # the default sets None, as in PyTorch 2
    assert all(p.grad is None for p in params)


# =========================================================================== errors
def _p() -> nn.Parameter:
    return nn.Parameter(og.ones(2))


@pytest.mark.parametrize(("make", "error", "pattern"), [
    (lambda: og.optim.SGD([_p()], lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
    (lambda: og.optim.SGD([_p()], lr=0.1, momentum=-0.5), ValueError, "Invalid momentum value"),
    (lambda: og.optim.SGD([_p()], lr=0.1, weight_decay=-1), ValueError, "Invalid weight_decay"),
    (lambda: og.optim.SGD([_p()], lr=0.1, nesterov=True), ValueError, "Nesterov momentum"),
    (lambda: og.optim.SGD([_p()], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
     ValueError, "zero dampening"),
    (lambda: og.optim.SGD([{"params": [_p()]}, {"params": [_p()], "lr": -1}]),
     ValueError, "Invalid learning rate: -1"),
    (lambda: og.optim.SGD([], lr=0.1), ValueError, "empty parameter list"),
    (lambda: og.optim.SGD([{"params": []}], lr=0.1), ValueError, "empty parameter list"),
    (lambda: og.optim.SGD(_p(), lr=0.1), TypeError, "iterable of Tensors or dicts"),
    (lambda: og.optim.SGD([np.ones(2)], lr=0.1), TypeError, "only optimize Tensors"),
    (lambda: og.optim.SGD([og.ones(2, requires_grad=True) * 2], lr=0.1), ValueError,
     "non-leaf"),
    (lambda: og.optim.SGD([og.tensor(1.0)], lr=og.tensor(0.1)), TypeError, "Python number"),
], ids=["negative-lr", "negative-momentum", "negative-weight-decay", "nesterov-no-momentum",
        "nesterov-dampening", "group-negative-lr", "empty", "empty-group", "a-tensor",
        "not-a-tensor", "non-leaf", "tensor-lr"])
def test_errors(make: Any, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        make()


def test_duplicate_parameters_are_refused() -> None:
    shared = _p()
    with pytest.raises(ValueError, match="more than one parameter group"):
        og.optim.SGD([{"params": [shared]}, {"params": [_p(), shared]}], lr=0.1)
    with pytest.raises(ValueError, match="more than once in a parameter group"):
        og.optim.SGD([shared, _p(), shared], lr=0.1)
    optim = og.optim.SGD([shared], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        optim.add_param_group({"params": [shared]})


def test_hyperparameters_are_checked_again_at_step() -> None:
    p = _p()
    optim = og.optim.SGD([p], lr=0.1)
    p.grad = og.ones(2)
    optim.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate"):
        optim.step()


def test_repr_is_pytorch_s() -> None:
    optim = og.optim.SGD([_p()], lr=0.1, momentum=0.9)
    assert repr(optim) == ("SGD (\nParameter Group 0\n    dampening: 0\n    lr: 0.1\n"
                           "    maximize: False\n    momentum: 0.9\n    nesterov: False\n"
                           "    weight_decay: 0\n)")


# =========================================================================== the eager runtime
def _step(optim: og.optim.SGD, params: list[Any], step: int) -> None:
    set_grads(params, [g if g is not None else np.ones(SHAPES[SKIP], np.float32)
                       for g in gradients(step)])
    optim.step()


def test_eager_step_updates_the_runtime_buffers_in_place() -> None:
    params, optim = make_sgd(initial_params(), momentum=0.9)
    seen: list[list[np.ndarray]] = []
    for step in range(6):
        _step(optim, params, step)
        seen.append([p._v.data for p in params] + [optim.state[p]["momentum_buffer"]._v.data
                                                   for p in params])
    (runner,) = optim._runners.values()
    assert runner.runs == 6
    # The update is the only reader of the parameters and buffers it updates, so it writes
    # over them, as PyTorch's in-place kernels do: one buffer each, nothing new allocated.
    assert runner.in_place == set(runner.state)
    for k in range(1, 6):
        for a, b in zip(seen[k], seen[k - 1]):
            assert a is b
    # The tensors view the runner's live buffers (on the CPU, shared with ONNX Runtime).
    name = next(iter(runner.state))
    assert runner.current(name) is params[0]._v.data


def test_eager_edits_between_steps_are_seen_by_the_next_step() -> None:
    hyper = {"momentum": 0.9, "weight_decay": 0.01}
    params, optim = make_sgd(initial_params(), **hyper)
    ref = Reference(initial_params(), **hyper)
    model = nn.Module()
    for i, p in enumerate(params):
        model.register_parameter(f"p{i}", p)

    def both(step: int) -> None:
        grads = [g if g is not None else np.ones(SHAPES[SKIP], np.float32)
                 for g in gradients(step)]
        set_grads(params, grads)
        optim.step()
        ref.step(grads)
        assert_matches(params, optim, ref, f"step {step}")

    both(0)
    both(1)
    # p.data = ...
    params[0].data = og.full(SHAPES[0], 0.5)
    ref.params[0] = np.full(SHAPES[0], 0.5)
    both(2)
    # model.load_state_dict(...)
    new = {f"p{i}": np.full(s, i + 1.0, np.float32) for i, s in enumerate(SHAPES)}
    model.load_state_dict(new)
    ref.params = [new[f"p{i}"].astype(np.float64) for i in range(len(SHAPES))]
    both(3)
    # optim.load_state_dict(...) with other momentum buffers
    sd = optim.state_dict()
    for i, s in sd["state"].items():
        s["momentum_buffer"] = np.full(SHAPES[i], -0.25, np.float32)
        ref.bufs[i] = np.full(SHAPES[i], -0.25)
    optim.load_state_dict(sd)
    both(4)
    # Several edits at once, and a grad of zeros: the step still reads the edited values.
    params[1].data = og.tensor(np.arange(4, dtype=np.float32))
    ref.params[1] = np.arange(4.0)
    optim.param_groups[1]["lr"] = 0.5
    grads = gradients(5)
    grads[SKIP] = np.zeros(SHAPES[SKIP], np.float32)
    set_grads(params, grads)
    optim.step()
    for group, lr in ((slice(0, 2), LRS[0]), (slice(2, 4), 0.5)):
        ps, bs = ref.params[group], ref.bufs[group]
        np_sgd_step(ps, [g.astype(np.float64) for g in grads[group]], bs, lr, **hyper)
        ref.params[group], ref.bufs[group] = ps, bs
    assert_matches(params, optim, ref, "step 5")
    assert len(optim._runners) == 1  # edits never rebuilt the step


@pytest.mark.parametrize("edit", ["steps", "data-edit"])
def test_recorded_values_survive_later_steps_and_edits(edit: str) -> None:
    # A Val is immutable: a graph recorded before the steps differentiates at the values it
    # saw, although the runner reuses its buffers (step k + 2 writes where step k did, an eager
    # edit writes the buffer the next step reads). PyTorch would raise at backward instead.
    p = nn.Parameter(og.tensor([1.0, 2.0]))
    q = nn.Parameter(og.tensor([3.0, -1.0]))
    optim = og.optim.SGD([p, q], lr=0.5, momentum=0.5)
    p.grad, q.grad = og.ones(2), og.ones(2)
    optim.step()  # p, q now live in the runner's buffers
    at_forward = p.detach().numpy().copy(), q.detach().numpy().copy()
    y = (p * p * q).sum()  # saves p and q for the backward
    kept = p * 1  # and a plain result: its record keeps p's value too
    if edit == "steps":
        for _ in range(3):
            p.grad, q.grad = og.ones(2), og.ones(2)
            optim.step()
    else:
        p.data = og.tensor([7.0, 8.0])  # copied into the buffer that p's saved value wraps
        p.grad, q.grad = og.ones(2), og.ones(2)
        optim.step()
    p.grad = q.grad = None
    y.backward()
    pv, qv = at_forward
    np.testing.assert_allclose(p.grad.numpy(), 2 * pv * qv, rtol=1e-6)
    np.testing.assert_allclose(q.grad.numpy(), pv * pv, rtol=1e-6)
    np.testing.assert_array_equal(kept.detach().numpy(), pv)


def test_no_copy_when_nothing_else_reads_the_buffers() -> None:
    # The usual loop (forward, backward, step): backward frees the graph, so nothing is copied
    # and the parameters stay in the one buffer the update writes over.
    model = nn.Linear(3, 2)
    optim = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []
    for _ in range(5):
        optim.zero_grad()
        model(og.randn(4, 3)).sum().backward()
        optim.step()
        seen.append(model.weight._v.data)
    assert all(s is seen[0] for s in seen)


def test_values_read_from_a_step_are_not_changed_by_the_next() -> None:
    # A state dict of the optimizer is a copy, so later steps (which write the other buffer
    # set, then this one) never change it.
    params, optim = make_sgd(initial_params(), momentum=0.9)
    _step(optim, params, 0)
    sd = optim.state_dict()
    kept = {i: s["momentum_buffer"].copy() for i, s in sd["state"].items()}
    for step in range(1, 4):
        _step(optim, params, step)
    for i, b in kept.items():
        np.testing.assert_array_equal(sd["state"][i]["momentum_buffer"], b)


# =========================================================================== PyTorch parity
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_parity(variant: str) -> None:
    torch = pytest.importorskip("torch")
    hyper = VARIANTS[variant]
    params, optim = make_sgd(initial_params(), **hyper)
    tparams = [torch.nn.Parameter(torch.tensor(v)) for v in initial_params()]
    toptim = torch.optim.SGD([{"params": tparams[:2]}, {"params": tparams[2:], "lr": LRS[1]}],
                             lr=LRS[0], **hyper)
    for step in range(STEPS):
        grads = gradients(step)
        set_grads(params, grads)
        set_grads(tparams, grads, torch.tensor)
        optim.step()
        toptim.step()
        for i, (p, t) in enumerate(zip(params, tparams)):
            np.testing.assert_allclose(p.detach().numpy(), t.detach().numpy(), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{variant} step {step} param {i}")
        theirs = {i: s["momentum_buffer"] for i, s in toptim.state_dict()["state"].items()
                  if s.get("momentum_buffer") is not None}
        ours = buffers(optim)
        assert sorted(ours) == sorted(theirs)
        for i, b in ours.items():
            np.testing.assert_allclose(b, theirs[i].numpy(), rtol=1e-5, atol=1e-6)
    # Our state dict loads into torch's optimizer (PyTorch's layout).
    sd = optim.state_dict()
    toptim.load_state_dict({"state": {i: {k: torch.tensor(v) for k, v in s.items()}
                                      for i, s in sd["state"].items()},
                            "param_groups": sd["param_groups"]})
    assert toptim.param_groups[1]["lr"] == LRS[1]
