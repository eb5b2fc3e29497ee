"""``og.optim.Adam`` / ``AdamW``: added through the optimizer protocol (CONTRIBUTING.md's recipe).

Checked against a float64 NumPy transcription of PyTorch's single-tensor algorithm (always) and
against PyTorch 2.13 itself (when installed); compiled steps against eager steps bit for bit;
checkpoints round-trip with PyTorch's state keys; the exported AdamW step loops in the reference
evaluator as in ONNX Runtime.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxgrad.models import mlp
from onnxgrad.runtime.metadata import DATA_INPUTS, STATE

import onnxgrad as og
from onnxgrad import nn

F = og.nn.functional
SHAPES = [(3, 4), (4,), (2, 2, 3, 1, 1), (5,)]  # [2]: ends in 1s, as a 1x1 conv weight
STEPS = 10

CASES = {
    "adam": ("Adam", {}),
    "adam/l2": ("Adam", {"weight_decay": 0.1}),
    "adam/amsgrad+maximize": ("Adam", {"amsgrad": True, "maximize": True, "weight_decay": 0.05}),
    "adam/small-beta1": ("Adam", {"betas": (0.3, 0.9), "eps": 1e-3}),
    "adamw": ("AdamW", {}),
    "adamw/amsgrad": ("AdamW", {"amsgrad": True, "weight_decay": 0.2}),
}


def _initial() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _gradients() -> list[list[np.ndarray | None]]:
    rng = np.random.default_rng(1)
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(STEPS)]
    grads[2][3] = None  # a parameter without a gradient is skipped, its step count too
    return grads


def _groups(params: list, lr: float = 0.01) -> list[dict]:
    return [{"params": params[:2]}, {"params": params[2:], "lr": lr * 3}]


def _numpy_adam(params: list[np.ndarray], grads_per_step, groups_lr: list[float], *,
                betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                decoupled=False) -> tuple[list[np.ndarray], list[dict]]:
    """PyTorch's ``_single_tensor_adam`` in float64."""
    params = [p.astype(np.float64) for p in params]
    state = [{"step": 0, "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p),
              "max_exp_avg_sq": np.zeros_like(p)} for p in params]
    b1, b2 = betas
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            lr = groups_lr[0 if i < 2 else 1]
            g = -g.astype(np.float64) if maximize else g.astype(np.float64)
            s = state[i]
            s["step"] += 1
            if weight_decay:
                if decoupled:
                    params[i] = params[i] * (1 - lr * weight_decay)
                else:
                    g = g + weight_decay * params[i]
            s["exp_avg"] = s["exp_avg"] + (1 - b1) * (g - s["exp_avg"])
            s["exp_avg_sq"] = s["exp_avg_sq"] * b2 + (1 - b2) * g * g
            c1, c2 = 1 - b1 ** s["step"], 1 - b2 ** s["step"]
            second = s["exp_avg_sq"]
            if amsgrad:
                s["max_exp_avg_sq"] = second = np.maximum(s["max_exp_avg_sq"], second)
            denom = np.sqrt(second) / np.sqrt(c2) + eps
            params[i] = params[i] - lr / c1 * s["exp_avg"] / denom
    return params, state


def _og_run(name: str, hyper: dict, lr: float = 0.01):
    params = [nn.Parameter(a) for a in _initial()]
    optim = getattr(og.optim, name)(_groups(params, lr), lr=lr, **hyper)
    for grads in _gradients():
        for p, g in zip(params, grads):
            p.grad = None if g is None else og.tensor(g)
        optim.step()
    return params, optim


@pytest.mark.parametrize("case", list(CASES))
def test_matches_a_float64_transcription_of_pytorch(case: str) -> None:
    name, hyper = CASES[case]
    params, optim = _og_run(name, hyper)
    kwargs = {k: v for k, v in hyper.items()}
    if name == "AdamW":
        kwargs.setdefault("weight_decay", 1e-2)
    ref, ref_state = _numpy_adam(_initial(), _gradients(), [0.01, 0.03],
                                 decoupled=name == "AdamW", **kwargs)
    for i, (p, r) in enumerate(zip(params, ref)):
        np.testing.assert_allclose(p.detach().numpy(), r, rtol=2e-6, atol=1e-6, err_msg=str(i))
        state = optim.state[p]
        assert float(state["step"]) == ref_state[i]["step"] and state["step"].dtype == np.float32
        np.testing.assert_allclose(state["exp_avg"].numpy(), ref_state[i]["exp_avg"], rtol=1e-5,
                                   atol=1e-7)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_pytorch(case: str) -> None:
    torch = pytest.importorskip("torch")
    name, hyper = CASES[case]
    params, optim = _og_run(name, hyper)
    tparams = [torch.nn.Parameter(torch.tensor(a)) for a in _initial()]
    toptim = getattr(torch.optim, name)(_groups(tparams), lr=0.01, **hyper)
    for grads in _gradients():
        for p, g in zip(tparams, grads):
            p.grad = None if g is None else torch.tensor(g)
        toptim.step()
    ours, theirs = optim.state_dict(), toptim.state_dict()
    for i, (p, q) in enumerate(zip(params, tparams)):
        # NOTE: PyTorch's vectorized lerp fuses a multiply-add; ONNX has no fused op, so the
        # last bit may differ.
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-6, atol=1e-8)
        assert sorted(ours["state"][i]) == sorted(theirs["state"][i])
        for key, value in theirs["state"][i].items():
            value = value.numpy()
            # Tolerance relative to the tensor's scale: a one-bit difference of an operand
            # (the fused multiply-add above) shows large on an element that cancels to near 0.
            np.testing.assert_allclose(ours["state"][i][key], value, rtol=1e-6,
                                       atol=1e-6 * float(np.abs(value).max()), err_msg=key)
    for group in ours["param_groups"]:
        their = theirs["param_groups"][ours["param_groups"].index(group)]
        for key, value in group.items():
            assert their[key] == value, key


def _trainer(compiled: bool, name: str = "AdamW", **hyper):
    og.manual_seed(0)
    model = mlp(12, [16], 5)
    optim = getattr(og.optim, name)(model.parameters(), lr=1e-2, **hyper)

    def step(x, y):
        optim.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
        return loss

    return model, optim, (og.compile(step) if compiled else step)


def _data(seed: int = 0) -> tuple[og.Tensor, og.Tensor]:
    rng = np.random.default_rng(seed)
    return (og.tensor(rng.standard_normal((8, 12), dtype=np.float32)),
            og.tensor(rng.integers(0, 5, 8)))


@pytest.mark.parametrize("case", ["adam/l2", "adamw/amsgrad", "adam/amsgrad+maximize"])
def test_compiled_step_equals_eager_bit_for_bit(case: str) -> None:
    name, hyper = CASES[case]
    x, y = _data()
    runs = []
    for compiled in (False, True):
        model, optim, step = _trainer(compiled, name, **hyper)
        losses = [float(step(x, y)) for _ in range(4)]
        runs.append((losses, {k: v.numpy().copy() for k, v in model.state_dict().items()},
                     optim.state_dict()))
    (eager_losses, eager_params, eager_opt), (losses, params, opt) = runs
    assert losses == eager_losses
    for key, value in eager_params.items():
        np.testing.assert_array_equal(params[key], value, err_msg=key)
    for i, entry in eager_opt["state"].items():
        for key, value in entry.items():
            np.testing.assert_array_equal(opt["state"][i][key], value, err_msg=f"{i}.{key}")


def test_schedule_changes_never_retrace_and_checkpoints_resume_bit_identically() -> None:
    x, y = _data()
    model, optim, step = _trainer(True)
    for k in range(3):
        step(x, y)
        optim.param_groups[0]["lr"] *= 0.5
        optim.param_groups[0]["betas"] = (0.8, 0.99)
    saved = ({k: v.numpy().copy() for k, v in model.state_dict().items()}, optim.state_dict())
    expected = [float(step(x, y)) for _ in range(2)]
    assert step.traces == 1
    # A new model and optimizer loaded from the checkpoint continue exactly.
    model2, optim2, step2 = _trainer(True)
    model2.load_state_dict(saved[0])
    optim2.load_state_dict(saved[1])
    assert [float(step2(x, y)) for _ in range(2)] == expected
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(model2.state_dict()[key].numpy(), value.numpy())


def test_exported_adamw_step_loops_in_the_reference_evaluator(tmp_path: Path) -> None:
    x, y = _data()
    model, _, step = _trainer(True, weight_decay=0.1)
    step(x, y)
    path = tmp_path / "adamw_step.onnx"
    step.export(path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    feeds_of, data = meta[STATE], meta[DATA_INPUTS]  # output -> the input it feeds; data inputs
    names = [v.name for v in proto.graph.input]
    assert {"exp_avg.0.weight", "exp_avg_sq.0.weight", "step.0.weight", "lr", "beta1",
            "beta2", "eps", "weight_decay"} <= set(names)
    # The loop the README documents: inputs default to their initializers, state is fed back.
    defaults = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer
                if t.name in names}
    results = []
    for run in (ReferenceEvaluator(proto), ort.InferenceSession(str(path))):
        state = dict(defaults)
        for _ in range(3):
            feeds = {**state, **dict(zip(data, (x.numpy(), y.numpy())))}
            outs = dict(zip([o.name for o in proto.graph.output], run.run(None, feeds)))
            state.update({feeds_of[o]: outs[o] for o in feeds_of})
        results.append(state)
    for key, value in results[1].items():
        np.testing.assert_allclose(results[0][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    # And onnxgrad's own next three steps agree with the file's.
    for _ in range(3):
        step(x, y)
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(results[1][key], value.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "Invalid learning rate"),
    ({"eps": -1e-8}, "Invalid epsilon value"),
    ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
    ({"weight_decay": -0.1}, "Invalid weight_decay value"),
])
def test_bad_hyperparameters_are_pytorch_s_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        og.optim.Adam([nn.Parameter(np.zeros(2, np.float32))], **kwargs)


def test_load_state_dict_checks_each_state_s_shape() -> None:
    p = nn.Parameter(np.zeros((2, 3), np.float32))
    optim = og.optim.Adam([p])
    sd = optim.state_dict()
    sd["state"] = {0: {"step": np.float32(3), "exp_avg": np.zeros((2, 3)),
                       "exp_avg_sq": np.zeros((3, 2))}}
    with pytest.raises(ValueError, match=r"exp_avg_sq of parameter 0: expected shape \[2, 3\]"):
        optim.load_state_dict(sd)


def test_another_optimizer_s_state_dict_is_refused_naming_the_keys() -> None:
    params = [nn.Parameter(np.ones(3, np.float32))]
    sgd = og.optim.SGD(params, lr=0.1, momentum=0.9)
    params[0].grad = og.ones(3)
    sgd.step()
    adam = og.optim.Adam([nn.Parameter(np.ones(3, np.float32))])
    with pytest.raises(ValueError, match=r"not Adam's: its parameter group 0 has no \['amsgrad', "
                                         r"'betas', .*\(found \['dampening', 'lr', "):
        adam.load_state_dict(sgd.state_dict())
    adam_state = adam.state_dict()
    adam_state["state"] = sgd.state_dict()["state"]
    with pytest.raises(ValueError, match=r"the state of parameter 0 has \['momentum_buffer'\], "
                                         r"Adam with these options keeps \['exp_avg', "
                                         r"'exp_avg_sq', 'step'\]"):
        adam.load_state_dict(adam_state)
    # Nothing was changed by the refused loads.
    assert adam.state == {} and adam.param_groups[0]["betas"] == (0.9, 0.999)
    # An older PyTorch's state dict (no maximize, no decoupled_weight_decay) loads: defaults.
    old = adam.state_dict()
    for key in ("maximize", "decoupled_weight_decay"):
        del old["param_groups"][0][key]
    adam.param_groups[0]["maximize"] = True
    adam.load_state_dict(old)
    assert adam.param_groups[0]["maximize"] is False
