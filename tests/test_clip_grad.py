"""``og.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``: eager against PyTorch, and inside
compiled steps as graph nodes (the issue's AdamW + clipping + cosine schedule step: compiled ==
eager bit for bit, no retrace, like PyTorch's training)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from onnxgrad.models import mlp

import onnxgrad as og
import onnxgrad.nn.utils
from onnxgrad import nn

F = og.nn.functional
SHAPES = [(3, 4), (5,), (2, 3, 2)]


def _grads(scale: float = 3.0) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in SHAPES]


def _og_params(grads: list[np.ndarray]) -> list[nn.Parameter]:
    params = [nn.Parameter(np.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = og.tensor(g)
    return params


def _numpy_norm(flat: np.ndarray, p: float) -> float:
    if p == math.inf:
        return float(np.abs(flat).max())
    if p == -math.inf:
        return float(np.abs(flat).min())
    if p == 0:
        return float((flat != 0).sum())
    return float((np.abs(flat) ** p).sum() ** (1 / p))


def _numpy_total_norm(grads: list[np.ndarray], p: float) -> float:
    """The norm of the per-gradient norms (PyTorch's definition; for p = 0 it counts the
    gradients that have a nonzero element)."""
    return _numpy_norm(np.array([_numpy_norm(g.ravel().astype(np.float64), p) for g in grads]), p)


def test_og_nn_utils_is_importable_both_ways() -> None:
    assert onnxgrad.nn.utils.clip_grad_norm_ is og.nn.utils.clip_grad_norm_


@pytest.mark.parametrize("norm_type", [2.0, math.inf, "inf", 1.0, 3.0, 0.5, 0.0, -math.inf])
@pytest.mark.parametrize("max_norm", [1.0, 1e3])
def test_clip_grad_norm_matches_numpy_and_pytorch(norm_type: float, max_norm: float) -> None:
    grads = _grads()
    params = _og_params(grads)
    handles = [p.grad for p in params]
    total = og.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    assert isinstance(total, og.Tensor) and total.shape == () and total.dtype == np.float32
    expected = _numpy_total_norm(grads, float(norm_type))
    assert float(total) == pytest.approx(expected, rel=1e-5)
    coef = min(max_norm / (expected + 1e-6), 1.0)
    for p, h, g in zip(params, handles, grads):
        assert p.grad is h  # in place, as PyTorch
        np.testing.assert_allclose(p.grad.numpy(), g * coef, rtol=1e-5, atol=1e-7)
    torch = pytest.importorskip("torch")
    tparams = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, g in zip(tparams, grads):
        p.grad = torch.tensor(g)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, max_norm, norm_type)
    assert float(total) == pytest.approx(float(ttotal), rel=1e-6)
    for p, q in zip(params, tparams):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-6, atol=1e-8)


def test_parameters_without_grad_are_skipped_and_none_gives_zero() -> None:
    grads = _grads()
    params = _og_params(grads)
    params[1].grad = None
    total = og.nn.utils.clip_grad_norm_(iter(params), 0.5)
    assert float(total) == pytest.approx(_numpy_total_norm([grads[0], grads[2]], 2), rel=1e-6)
    assert params[1].grad is None
    empty = og.nn.utils.clip_grad_norm_([nn.Parameter(np.zeros(2, np.float32))], 1.0)
    assert float(empty) == 0.0 and empty.dtype == np.float32
    with pytest.warns(UserWarning, match="empty generator"):
        og.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    single = nn.Parameter(np.zeros(3, np.float32))
    single.grad = og.tensor(np.array([3.0, 4.0, 0.0], np.float32))
    assert float(og.nn.utils.clip_grad_norm_(single, 1.0)) == pytest.approx(5.0)
    np.testing.assert_allclose(single.grad.numpy(), [0.6, 0.8, 0.0], rtol=1e-5)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_error_if_nonfinite(bad: float, norm_type: float) -> None:
    grads = _grads()
    grads[1][2] = bad
    params = _og_params(grads)
    with pytest.raises(RuntimeError, match=f"The total norm of order {float(norm_type)} for "
                                           "gradients from `parameters` is non-finite"):
        og.nn.utils.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
    np.testing.assert_array_equal(params[0].grad.numpy(), grads[0])  # nothing was scaled
    total = og.nn.utils.clip_grad_norm_(params, 1.0, norm_type)  # scaled by it anyway
    assert not math.isfinite(float(total))
    assert not np.isfinite(params[0].grad.numpy()).any() or bad == np.inf


def test_clip_grad_value_matches_pytorch() -> None:
    grads = _grads()
    grads[1][2] = np.nan
    params = _og_params(grads)
    params.append(nn.Parameter(np.zeros(2, np.float32)))  # no grad: skipped
    assert og.nn.utils.clip_grad_value_(params, 1.5) is None
    for p, g in zip(params, grads):
        np.testing.assert_array_equal(p.grad.numpy(), np.clip(g, -1.5, 1.5))
    torch = pytest.importorskip("torch")
    tparams = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, g in zip(tparams, grads):
        p.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_value_(tparams, 1.5)
    for p, q in zip(params, tparams):
        np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy())


def _adamw_trainer(compiled: bool, clip: str = "norm", *, return_norm: bool = False):
    """The issue's example: zero_grad, loss, backward, clip, AdamW step, cosine schedule."""
    og.manual_seed(0)
    model = mlp(12, [16], 5)
    opt = og.optim.AdamW(model.parameters(), lr=3e-2, betas=(0.9, 0.999), weight_decay=0.01)
    sched = og.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)

    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if clip == "norm":
            norm = og.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        else:
            og.nn.utils.clip_grad_value_(model.parameters(), 0.05)
            norm = loss
        opt.step()
        return (loss, norm) if return_norm else loss

    return model, opt, sched, (og.compile(step) if compiled else step)


def _data() -> tuple[og.Tensor, og.Tensor]:
    rng = np.random.default_rng(0)
    return (og.tensor(rng.standard_normal((8, 12), dtype=np.float32) * 4),
            og.tensor(rng.integers(0, 5, 8)))


@pytest.mark.parametrize("clip", ["norm", "value"])
def test_clipping_in_a_compiled_adamw_step_equals_eager_and_never_retraces(clip: str) -> None:
    x, y = _data()
    runs = []
    for compiled in (False, True):
        model, _, sched, step = _adamw_trainer(compiled, clip, return_norm=True)
        outs = []
        for _ in range(10):
            loss, norm = step(x, y)
            outs.append((float(loss), float(norm)))
            sched.step()
        grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
        runs.append((outs, {k: v.numpy().copy() for k, v in model.state_dict().items()}, grads))
        if compiled:
            assert step.traces == 1
            proto = step.__onnxgrad_model__()
            assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
            nodes = {n.op_type for n in proto.graph.node}
            assert ({"ReduceL2", "Min"} if clip == "norm" else {"Max", "Min"}) <= nodes
    (eager, eager_params, eager_grads), (outs, params, grads) = runs
    assert outs == eager
    if clip == "norm":
        assert outs[0][1] > 0.5  # the clipping is active
    for key, value in eager_params.items():
        np.testing.assert_array_equal(params[key], value, err_msg=key)
    for key, value in eager_grads.items():  # .grad holds the clipped gradients, as eagerly
        np.testing.assert_array_equal(grads[key], value, err_msg=key)


def test_compiled_clipping_trains_like_pytorch() -> None:
    torch = pytest.importorskip("torch")
    x, y = _data()
    model, _, sched, step = _adamw_trainer(True, return_norm=True)
    tmodel = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(),
                                 torch.nn.Linear(16, 5))
    tmodel.load_state_dict({k: torch.tensor(v.numpy()) for k, v in model.state_dict().items()})
    topt = torch.optim.AdamW(tmodel.parameters(), lr=3e-2, weight_decay=0.01, foreach=False)
    tsched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=8)
    tx, ty = torch.tensor(x.numpy()), torch.tensor(y.numpy())
    for _ in range(10):
        loss, norm = step(x, y)
        sched.step()
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(tmodel(tx), ty)
        tloss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_(tmodel.parameters(), max_norm=0.5)
        topt.step()
        tsched.step()
        assert float(loss) == pytest.approx(tloss.item(), rel=1e-5)
        assert float(norm) == pytest.approx(float(tnorm), rel=1e-5)
    assert step.traces == 1
    for key, value in tmodel.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[key].numpy(), value.numpy(), rtol=1e-4,
                                   atol=1e-5, err_msg=key)


def test_error_if_nonfinite_in_a_compiled_step_is_a_clear_trace_error() -> None:
    og.manual_seed(0)
    model = mlp(12, [16], 5)
    opt = og.optim.SGD(model.parameters(), lr=0.1)

    @og.compile
    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        og.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
        opt.step()
        return loss

    with pytest.raises(og.TraceError, match=r"error_if_nonfinite=True\) needs the total norm's "
                                            r"value.*test_clip_grad.py.*error_if_nonfinite=False"):
        step(*_data())
    # The failed trace left nothing behind: the model still trains eagerly.
    before = model.state_dict()["0.weight"].numpy().copy()
    x, y = _data()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    og.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    opt.step()
    assert not np.array_equal(model.state_dict()["0.weight"].numpy(), before)


def test_clipping_gradients_left_from_before_a_compiled_step() -> None:
    # Gradients computed outside, clipped and applied inside: each call clips the current .grad.
    og.manual_seed(0)
    model = mlp(12, [16], 5)
    opt = og.optim.SGD(model.parameters(), lr=0.1)

    def apply():
        norm = og.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        return norm

    compiled = og.compile(apply)
    x, y = _data()
    eager_model = mlp(12, [16], 5)
    eager_model.load_state_dict(model.state_dict())
    eager_opt = og.optim.SGD(eager_model.parameters(), lr=0.1)
    for k in range(3):
        for m, o in ((model, opt), (eager_model, eager_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
        norm = compiled()
        eager_norm = og.nn.utils.clip_grad_norm_(eager_model.parameters(), 0.1)
        eager_opt.step()
        assert float(norm) == float(eager_norm)
        for (key, p), q in zip(model.named_parameters(), eager_model.parameters()):
            np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy(), err_msg=key)
            np.testing.assert_array_equal(p.detach().numpy(), q.detach().numpy(), err_msg=key)
