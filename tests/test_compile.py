"""``og.compile``: compiled == eager, the exported step in other runtimes, guards, runtime state.

Tolerances. The MLP runs the very kernels eager runs (DESIGN decision 4), node for node, so its
compiled and eager steps are compared bit for bit. ResNet-18 is compared with rtol 1e-4 / atol
1e-5: today it is bit-identical too, but its step is one large graph on which ONNX Runtime's
graph optimizer may fuse nodes (Conv + activation, BatchNorm folding in eval) differently from the
single-node eager kernels, changing float32 summation order (about 1e-7 relative per op), and five
SGD steps with momentum on a batch of 2 amplify that by a few orders of magnitude at most. The
exported step run by ``onnx.reference.ReferenceEvaluator`` (NumPy, its own summation order) is
compared with rtol 1e-4 / atol 1e-5 for the same reason; a fresh plain ``InferenceSession`` (other
session options: the default ENABLE_ALL level, no denormal flush) with rtol 1e-5 / atol 1e-6.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxgrad.models import mlp, resnet18
from onnxgrad.runtime.metadata import DATA_INPUTS as DATA_INPUTS_KEY
from onnxgrad.runtime.metadata import STATE as STATE_KEY
from onnxgrad.runtime.step import StepRunner, in_place_state, order_late_readers

import onnxgrad as og
from onnxgrad import nn

F = og.nn.functional
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers
def _mlp() -> nn.Module:
    og.manual_seed(0)
    return mlp(12, [16, 16], 5)


def _convnet() -> nn.Module:
    """Conv, BatchNorm (train-mode statistics, an int64 counter), MaxPool, Linear: small enough
    for the reference evaluator."""
    og.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))


def _data(shape: tuple[int, ...], classes: int = 5, seed: int = 0
          ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float32), rng.integers(0, classes, shape[0])


def _trainer(make: Callable[[], nn.Module], compiled: bool = True, **sgd):
    """(model, optimizer, step): the issue's training step, compiled or eager."""
    model = make()
    optim = og.optim.SGD(model.parameters(), **{"lr": 0.1, "momentum": 0.9, **sgd})

    def step(x, y):
        optim.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
        return loss

    return model, optim, (og.compile(step) if compiled else step)


def _run(make, steps: int, x: np.ndarray, y: np.ndarray, compiled: bool, **sgd
         ) -> tuple[list[float], dict[str, np.ndarray]]:
    model, _, step = _trainer(make, compiled, **sgd)
    losses = [float(step(og.tensor(x), og.tensor(y))) for _ in range(steps)]
    return losses, {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- compiled == eager
SGD_CASES = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    # PyTorch's first step with dampening makes the buffer the gradient itself (no dampening),
    # a different graph from every later step: the compiled step retraces once.
    "dampening": dict(momentum=0.9, dampening=0.5),
    "nesterov+weight_decay": dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    "weight_decay": dict(momentum=0.0, weight_decay=1e-2),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_mlp_compiled_equals_eager(case: str) -> None:
    x, y = _data((8, 12))
    eager = _run(_mlp, 5, x, y, compiled=False, **SGD_CASES[case])
    compiled = _run(_mlp, 5, x, y, compiled=True, **SGD_CASES[case])
    assert compiled[0] == eager[0]  # bit for bit: the same kernels run
    for name, value in eager[1].items():
        np.testing.assert_array_equal(compiled[1][name], value, err_msg=name)


def test_dampening_retraces_once_after_the_first_step() -> None:
    x, y = _data((8, 12))
    model, optim, step = _trainer(_mlp, momentum=0.9, dampening=0.5)
    for _ in range(3):
        step(x, y)
    assert step.traces == 2  # the first step, then every later step
    assert all("momentum_buffer" in optim.state[p] for p in model.parameters())


def test_resnet18_compiled_close_to_eager() -> None:
    x, y = _data((2, 3, 32, 32), classes=10)

    def make() -> nn.Module:
        og.manual_seed(0)
        return resnet18(num_classes=10)

    eager = _run(make, 5, x, y, compiled=False, lr=1e-2)
    compiled = _run(make, 5, x, y, compiled=True, lr=1e-2)
    np.testing.assert_allclose(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    assert list(compiled[1]) == list(eager[1])
    for name, value in eager[1].items():
        np.testing.assert_allclose(compiled[1][name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    assert compiled[1]["bn1.num_batches_tracked"].shape == ()
    assert int(compiled[1]["bn1.num_batches_tracked"]) == 5


# --------------------------------------------------------------------------- the exported file
def _metadata(model: onnx.ModelProto) -> tuple[dict[str, str], list[str]]:
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props[STATE_KEY]), json.loads(props[DATA_INPUTS_KEY])


def _loop(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], model: onnx.ModelProto,
          batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Train with any runtime, knowing only the metadata: state outputs feed the next step, the
    hyperparameters keep their defaults."""
    feeds_for, data_inputs = _metadata(model)
    state = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
             if i.name in feeds_for.values()}
    results = []
    for batch in batches:
        assert set(batch) == set(data_inputs)
        out = run({**batch, **state})
        state = {feeds_for[name]: out[name] for name in feeds_for}
        results.append(out)
    return results


def test_exported_step_loops_in_reference_evaluator_and_plain_ort(tmp_path: Path) -> None:
    model, optim, step = _trainer(_convnet, lr=0.05, momentum=0.9)
    batches = [dict(zip(("x", "y"), _data((2, 3, 6, 6), seed=s))) for s in range(4)]
    step(batches[0]["x"], batches[0]["y"])
    path = tmp_path / "train_step.onnx"
    step.export(path)
    exported = onnx.load(path)
    feeds_for, data_inputs = _metadata(exported)
    assert data_inputs == ["x", "y"]
    assert feeds_for["0.weight.new"] == "0.weight"
    assert feeds_for["momentum.0.weight.new"] == "momentum.0.weight"
    assert feeds_for["1.num_batches_tracked.new"] == "1.num_batches_tracked"
    defaults = {i.name: numpy_helper.to_array(i) for i in exported.graph.initializer}
    # Every input but the data has a default: the hyperparameters' current values included.
    assert {i.name for i in exported.graph.input} - set(data_inputs) <= set(defaults)
    assert defaults["lr"] == np.float32(0.05) and defaults["momentum"] == np.float32(0.9)

    # The compiled step's own results for the next 3 batches.
    expected = []
    for batch in batches[1:]:
        loss = step(batch["x"], batch["y"])
        expected.append({"output": loss.numpy(), **{f"{k}.new": v.copy()
                                                    for k, v in _state(model).items()}})

    names = [o.name for o in exported.graph.output]
    reference = ReferenceEvaluator(exported)
    ref = _loop(lambda f: dict(zip(names, reference.run(None, f))), exported, batches[1:])
    options = ort.SessionOptions()
    options.log_severity_level = 3  # state inputs with initializers are meant: no warning
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    plain = _loop(lambda f: dict(zip(names, session.run(None, f))), exported, batches[1:])
    for k in range(3):
        for name, value in expected[k].items():
            np.testing.assert_allclose(ref[k][name], value, rtol=1e-4, atol=1e-5,
                                       err_msg=f"reference, step {k}: {name}")
            np.testing.assert_allclose(plain[k][name], value, rtol=1e-5, atol=1e-6,
                                       err_msg=f"onnxruntime, step {k}: {name}")
    assert int(plain[2]["1.num_batches_tracked.new"]) == 4


@pytest.mark.parametrize("make", [_mlp, _convnet], ids=["mlp", "convnet"])
def test_exported_model_is_standard_onnx(tmp_path: Path, make) -> None:
    _, _, step = _trainer(make)
    shape = (4, 12) if make is _mlp else (2, 3, 6, 6)
    step(*_data(shape))
    path = tmp_path / "step.onnx"
    step.export(path)
    exported = onnx.load(path)
    onnx.checker.check_model(exported, full_check=True)
    assert {o.domain for o in exported.opset_import} <= {"", "ai.onnx"}
    assert {n.domain for n in exported.graph.node} <= {"", "ai.onnx"}
    # The state inputs carry the current values as (overridable) defaults.
    initialized = {i.name for i in exported.graph.initializer}
    assert set(_metadata(exported)[0].values()) <= initialized
    assert {i.name for i in exported.graph.input} >= set(_metadata(exported)[0].values())


def test_graph_outputs_are_made_by_real_nodes() -> None:
    for make, shape in ((_mlp, (4, 12)), (_convnet, (2, 3, 6, 6))):
        _, _, step = _trainer(make)
        step(*_data(shape))
        graph = step.last.model.graph
        producer = {o: n.op_type for n in graph.node for o in n.output}
        copies = [o.name for o in graph.output if producer.get(o.name) == "Identity"]
        assert not copies, copies

    # The documented exception: a result that is a graph input is copied by an Identity.
    @og.compile
    def passthrough(x):
        return x, x * 2

    a, b = passthrough(np.ones(3, np.float32))
    np.testing.assert_array_equal(a.numpy(), np.ones(3))
    np.testing.assert_array_equal(b.numpy(), np.full(3, 2.0))


def test_crash_while_exporting_leaves_no_partial_file(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, step = _trainer(_mlp)
    step(*_data((4, 12)))
    target = tmp_path / "step.onnx"

    def crash(model, f, *args, **kwargs) -> None:
        Path(f).write_bytes(b"\x08\x0a half a model")
        raise OSError("disk full")

    real = onnx.save_model
    monkeypatch.setattr(onnx, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        step.export(target)
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(onnx, "save_model", real)
    step.export(target)
    before = target.read_bytes()
    step(*_data((4, 12)))
    monkeypatch.setattr(onnx, "save_model", crash)
    with pytest.raises(OSError):
        step.export(target)
    assert [p.name for p in tmp_path.iterdir()] == ["step.onnx"]
    assert target.read_bytes() == before  # the previous export is untouched


# --------------------------------------------------------------------------- guards
def test_new_input_shape_retraces_and_old_shape_reuses() -> None:
    _, _, step = _trainer(_mlp)
    step(*_data((4, 12)))
    step(*_data((4, 12), seed=1))
    assert step.traces == 1
    step(*_data((6, 12)))
    assert step.traces == 2
    step(*_data((4, 12), seed=2))
    assert step.traces == 2
    step(og.tensor(_data((4, 12))[0], dtype=og.float64).numpy().astype(np.float32),
         _data((4, 12))[1])
    assert step.traces == 2  # same dtype and shape, through a tensor or an array alike


def test_lr_change_takes_effect_without_retracing() -> None:
    model, optim, step = _trainer(_mlp, momentum=0.0)
    x, y = _data((4, 12))
    step(x, y)
    optim.param_groups[0]["lr"] = 0.0
    before = _state(model)
    step(x, y)
    after = _state(model)
    assert step.traces == 1
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    optim.param_groups[0]["lr"] = 0.5
    step(x, y)
    assert step.traces == 1
    assert not np.array_equal(_state(model)["0.weight"], before["0.weight"])


def test_eval_mode_retraces() -> None:
    og.manual_seed(0)
    model = _convnet()
    forward = og.compile(model)
    x, _ = _data((2, 3, 6, 6))
    train_out = forward(x).numpy()
    assert forward.traces == 1
    model.eval()
    eval_out = forward(x).numpy()
    assert forward.traces == 2
    assert not np.allclose(train_out, eval_out)  # batch statistics vs running statistics
    np.testing.assert_array_equal(eval_out, model(og.tensor(x)).detach().numpy())
    model.train()
    forward(x)
    assert forward.traces == 2  # back to the first program


def test_eager_edits_are_seen_by_the_next_call() -> None:
    x, y = _data((4, 12))
    model, optim, step = _trainer(_mlp, momentum=0.0)
    initial = _state(model)
    first = float(step(x, y))
    step(x, y)
    # load_state_dict puts the initial weights back: the next step is the first again.
    model.load_state_dict(initial)
    assert float(step(x, y)) == first
    # p.data = ...: zero weights give uniform logits, a loss of log(classes).
    for p in model.parameters():
        p.data = np.zeros(p.shape, p.dtype)
    assert float(step(x, y)) == pytest.approx(np.log(5), rel=1e-6)
    assert step.traces == 1


def test_optimizer_load_state_dict_reaches_the_compiled_step() -> None:
    x, y = _data((4, 12))
    model, optim, step = _trainer(_mlp, momentum=0.9)
    initial = _state(model)
    step(x, y)
    after_first = _state(model)
    saved = (_state(model), optim.state_dict())
    step(x, y)
    after_second = _state(model)
    step(x, y)
    # load_state_dict makes new momentum-buffer tensors: the compiled step must use them.
    model.load_state_dict(saved[0])
    optim.load_state_dict(saved[1])
    step(x, y)
    for name, value in after_second.items():
        np.testing.assert_array_equal(_state(model)[name], value, err_msg=name)
    # Cleared optimizer state: the next step is a first step again (PyTorch's zero buffer).
    model.load_state_dict(initial)
    optim.load_state_dict({"state": {}, "param_groups": optim.state_dict()["param_groups"]})
    step(x, y)
    for name, value in after_first.items():
        np.testing.assert_array_equal(_state(model)[name], value, err_msg=name)
    assert step.traces == 1


@pytest.mark.parametrize("what", ["item", "bool"])
def test_value_dependent_python_raises_naming_the_line(what: str) -> None:
    model = _mlp()

    def item(x):
        return model(x) * model(x).mean().item()  # the line the error names (item)

    def truth(x):
        out = model(x)
        if out.sum() > 0:  # the line the error names (bool)
            return out
        return -out

    fn = {"item": item, "bool": truth}[what]
    with pytest.raises(og.TraceError) as info:
        og.compile(fn)(_data((4, 12))[0])
    message = str(info.value)
    marker = {"item": "(item)", "bool": "(bool)"}[what]
    line = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1)
                if text.rstrip().endswith(marker))
    assert f"test_compile.py:{line}:" in message, message


# --------------------------------------------------------------------------- not only training
def test_forward_evaluation_and_module_compile() -> None:
    model = _mlp()
    x, _ = _data((4, 12))
    expected = model(og.tensor(x)).detach().numpy()

    forward = og.compile(model)
    np.testing.assert_array_equal(forward(x).numpy(), expected)

    @og.compile
    def evaluate(x):
        with og.no_grad():
            logits = model(x)
        return logits, logits.argmax(1)

    logits, predicted = evaluate(x)
    np.testing.assert_array_equal(logits.numpy(), expected)
    np.testing.assert_array_equal(predicted.numpy(), expected.argmax(1))
    assert all(p.grad is None for p in model.parameters())
    assert not any(n.endswith(".new") for n in (o.name for o in evaluate.last.model.graph.output))


def test_compiled_module_in_train_mode_updates_batchnorm_statistics() -> None:
    x, _ = _data((2, 3, 6, 6))
    eager, compiled = _convnet(), _convnet()
    eager(og.tensor(x))
    og.compile(compiled)(x)
    for name, value in _state(eager).items():
        np.testing.assert_array_equal(_state(compiled)[name], value, err_msg=name)


# --------------------------------------------------------------------------- runtime state
def test_state_lives_in_the_runner_buffers_written_over_in_place() -> None:
    model, optim, step = _trainer(_mlp)
    x, y = _data((4, 12))
    params = dict(model.named_parameters())
    addresses: dict[str, list[int]] = {}
    for _ in range(4):
        step(x, y)
        runner = step.last.runner
        for name in ("0.weight", "2.weight"):
            live = runner.current(name)
            assert np.shares_memory(params[name]._v.data, live)  # the tensor views the buffer
            buf = optim.state[params[name]]["momentum_buffer"]
            assert np.shares_memory(buf._v.data, runner.current(f"momentum.{name}"))
            addresses.setdefault(name, []).append(live.__array_interface__["data"][0])
            momentum = runner.current(f"momentum.{name}").__array_interface__["data"][0]
            addresses.setdefault(f"momentum.{name}", []).append(momentum)
    # Every parameter and momentum buffer has one buffer, written over by each run, 2.weight
    # too, which its layer's input gradient reads (order_late_readers makes that run first).
    runner = step.last.runner
    assert runner.in_place == set(runner.state)
    for name, seen in addresses.items():
        assert len(set(seen)) == 1, name
    # The gradients are single-buffered outputs; Python sees them without a copy.
    assert np.shares_memory(params["0.weight"].grad._v.data,
                            runner.carried_output("grad.0.weight"))


def test_state_alternates_between_two_buffers_where_a_run_may_be_undone() -> None:
    """Without in-place writes (a step whose checks read its results), a run at parity p reads
    buffer set p and writes set 1 - p: A B A B, never a new allocation, and the same values."""
    _, _, step = _trainer(_mlp)
    x, y = _data((4, 12))
    step(x, y)
    runner = step.last.runner
    twin = StepRunner(step.last.model.SerializeToString(), runner.state,
                      {name: runner.current(name).copy() for name in runner.state},
                      carried=runner.carried, in_place=False)
    feeds = dict(zip(step.last.data_names, (x, y)))
    feeds.update({n: np.asarray(g(), d) for n, (g, d) in step.last.scalars.items()})
    addresses = []
    for _ in range(4):
        twin.run(feeds)
        step(x, y)
        addresses.append(twin.current("2.weight").__array_interface__["data"][0])
        for name in runner.state:
            np.testing.assert_array_equal(twin.current(name), runner.current(name), err_msg=name)
    assert not twin.in_place
    assert addresses[0] == addresses[2] and addresses[1] == addresses[3]
    assert addresses[0] != addresses[1]


def test_late_readers_are_ordered_before_the_update() -> None:
    """A layer's input gradient reads its weight and need not run before the weight's update:
    order_late_readers makes it an ancestor through a scalar (four nodes on one element), so
    the weight can be written over; the graph stays a valid, sorted ONNX graph."""
    _, _, step = _trainer(_mlp)
    step(*_data((4, 12)))
    state = step.last.runner.state
    model = onnx.ModelProto.FromString(step.last.model.SerializeToString())
    assert "2.weight" not in in_place_state(model.graph, state)
    assert order_late_readers(model, state)
    assert in_place_state(model.graph, state) == set(state)
    onnx.checker.check_model(model, full_check=True)
    ties = [n for n in model.graph.node if n.name.startswith("order.")]
    assert ties and {n.op_type for n in ties} == {"Reshape", "Gather", "Cast", "Where"}
    # Each tie decides between a scalar and itself: the update reads the same learning rate.
    wheres = [n for n in ties if n.op_type == "Where"]
    assert all(n.input[1] == n.input[2] for n in wheres)
    # The exported step has none of them.
    assert not [n for n in step.last.model.graph.node if n.name.startswith("order.")]


def test_a_dynamic_batch_step_writes_every_state_in_place() -> None:
    """With a symbolic batch, the Linear's input gradient has no known size: its tie reads the
    nearest value made from it that has one. Every state has one buffer; the steps are eager's."""
    model, _, plain = _trainer(_convnet, compiled=False)
    step = og.compile(plain, dynamic=True)
    eager_model, _, eager = _trainer(_convnet, compiled=False)
    for b in (4, 3, 5):
        x, y = _data((b, 3, 6, 6), seed=b)
        np.testing.assert_allclose(float(step(x, y)), float(eager(og.tensor(x), og.tensor(y))),
                                   rtol=1e-5)
    runner = step.last.runner
    assert runner.in_place == set(runner.state)
    for (k, a), b in zip(model.state_dict().items(), eager_model.state_dict().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_in_place_state_is_decided_on_the_graph_onnxruntime_runs(monkeypatch) -> None:
    """ONNX Runtime folds a weight's Transpose into each MatMul reading it, so the input
    gradient's MatMul reads the weight itself. Where the model's graph missed such a reader,
    the state gets its second buffer when the session is made, and the step stays exact."""
    import onnxgrad.runtime.step as step_module

    def gru_step():
        og.manual_seed(0)
        rnn, head = nn.GRU(5, 7, num_layers=2), nn.Linear(7, 3)
        opt = og.optim.SGD([*rnn.parameters(), *head.parameters()], lr=0.1, momentum=0.9)

        def step(x, y):
            opt.zero_grad()
            out, _ = rnn(x)
            loss = F.cross_entropy(head(out[-1]), y)
            loss.backward()
            opt.step()
            return loss
        return rnn, step

    rng = np.random.default_rng(0)
    batches = [(og.tensor(rng.standard_normal((4, 6, 5)).astype(np.float32)),
                og.tensor(rng.integers(0, 3, 6))) for _ in range(3)]
    eager_rnn, eager = gru_step()
    expected = [float(eager(*b)) for b in batches]
    for blind in (False, True):
        if blind:  # the model-level rule no longer sees through the Transpose
            monkeypatch.setattr(step_module, "PASSED_THROUGH",
                                step_module.PASSED_THROUGH - {"Transpose"})
        rnn, step = gru_step()
        step = og.compile(step)
        assert [float(step(*b)) for b in batches] == pytest.approx(expected, rel=1e-6)
        runner = step.last.runner
        split = set(runner.state) - runner.in_place
        assert bool(split) == blind, split
        assert all(name.startswith("weight_ih_l1") for name in split)
        for (k, a), b in zip(rnn.state_dict().items(), eager_rnn.state_dict().values()):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)


def test_weight_gradients_are_written_before_their_reshape() -> None:
    """A convolution's weight gradient is a matrix product reshaped to the weight's shape: the
    session writes the product where the gradient is bound (the Reshape copied it there), and
    .grad views that buffer in the weight's shape, equal to the eager step's gradient."""
    def convnet():
        og.manual_seed(0)
        return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(32 * 6 * 6, 5))

    x, y = _data((2, 16, 6, 6))
    model, _, step = _trainer(convnet)
    eager_model, _, eager = _trainer(convnet, compiled=False)
    for _ in range(3):
        step(x, y)
        eager(og.tensor(x), og.tensor(y))
    runner = step.last.runner
    assert runner._viewed == {"grad.0.weight": [32, 16, 3, 3]}
    weight = model[0].weight
    assert weight.grad.shape == weight.shape
    assert np.shares_memory(weight.grad._v.data, runner.carried_output("grad.0.weight"))
    for p, q in zip(model.parameters(), eager_model.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_matrix_updates_are_written_before_their_reshape() -> None:
    """A 1x1 convolution's weight and momentum are updated as matrices (ONNX Runtime's
    broadcast walks trailing 1s one element at a time) and reshaped back: the session writes
    the matrices where the state is bound, in place, and the tensors keep their own shape and
    buffer, equal to the eager step's."""
    def pointwise():
        og.manual_seed(0)
        return nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4, 5))

    x, y = _data((2, 16, 2, 2))
    model, optim, step = _trainer(pointwise)
    eager_model, _, eager = _trainer(pointwise, compiled=False)
    weight = model[0].weight
    addresses = set()
    for _ in range(3):
        step(x, y)
        eager(og.tensor(x), og.tensor(y))
        runner = step.last.runner
        addresses.add(runner.current("0.weight").__array_interface__["data"][0])
        addresses.add(runner.current("momentum.0.weight").__array_interface__["data"][0])
    assert {runner.state[k] for k in ("0.weight", "momentum.0.weight")} <= set(runner._viewed)
    assert runner._viewed[runner.state["0.weight"]] == [32, 16, 1, 1]
    assert len(addresses) == 2  # one buffer each, written over by every run
    assert weight.shape == (32, 16, 1, 1)
    assert optim.state[weight]["momentum_buffer"].shape == (32, 16, 1, 1)
    assert np.shares_memory(weight._v.data, runner.current("0.weight"))
    for (k, a), b in zip(model.state_dict().items(), eager_model.state_dict().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_convs_lowered_for_the_cpu_train_as_eager(monkeypatch) -> None:
    """A layer4-sized Conv (2x2 outputs, a 4.7 MB weight) runs as one matrix product in the
    eager kernel and in the compiled step's session (runtime/lowering.py): both train alike."""
    from onnxgrad.runtime import lowering
    from onnxgrad.runtime import session as session_module
    from onnxgrad.runtime import step as step_module

    lowered = []

    def spy(model: onnx.ModelProto, shapes) -> int:
        lowered.append(lowering.lower_small_convs(model, shapes))
        return lowered[-1]

    monkeypatch.setattr(session_module, "lower_small_convs", spy)
    monkeypatch.setattr(step_module, "lower_small_convs", spy)

    def layer4():
        og.manual_seed(0)
        return nn.Sequential(nn.Conv2d(256, 512, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(512 * 4, 3))

    x, y = _data((2, 256, 4, 4), classes=3)
    eager_losses, eager_state = _run(layer4, 3, x, y, compiled=False)
    losses, state = _run(layer4, 3, x, y, compiled=True)
    assert lowered.count(1) >= 2, lowered  # the eager kernel and the compiled step's session
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-5)
    for k, v in state.items():
        np.testing.assert_allclose(v, eager_state[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_results_handed_out_are_never_overwritten() -> None:
    model, optim, step = _trainer(_mlp)
    batches = [_data((4, 12), seed=s) for s in range(5)]
    losses = [step(*b) for b in batches]
    kept = [float(loss) for loss in losses]
    again = _trainer(_mlp)[2]
    assert kept == [float(again(*b)) for b in batches]
    assert len({id(loss._v.data) for loss in losses}) == len(losses)


# --------------------------------------------------------------------------- the documented loop
def _documented_loop() -> str:
    """The plain-onnxruntime loop of the README's export-format section."""
    text = (ROOT / "README.md").read_text()
    loop = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S)
                if "import onnxruntime" in block)
    assert len(loop.strip().splitlines()) <= 15
    assert "onnxgrad" not in loop.replace('"onnxgrad.', "")  # only the metadata keys name it
    return loop


def test_documented_plain_onnxruntime_loop_trains_from_the_export(tmp_path: Path) -> None:
    model, optim, step = _trainer(_convnet, lr=0.05)
    batches = [_data((2, 3, 6, 6), seed=s) for s in range(4)]
    step(*batches[0])
    step.export(tmp_path / "train_step.onnx")
    np.savez(tmp_path / "batches.npz", *[a for batch in batches[1:] for a in batch])
    losses = [float(step(*batch)) for batch in batches[1:]]

    prelude = ("import numpy as np\n"
               "with np.load('batches.npz') as f:\n"
               "    arrays = [f[f'arr_{i}'] for i in range(len(f.files))]\n"
               "batches = list(zip(arrays[0::2], arrays[1::2]))\n")
    epilogue = ("import sys\n"
                "assert not [m for m in sys.modules if m.split('.')[0] == 'onnxgrad']\n"
                "np.savez('trained.npz', **state)\n")
    done = subprocess.run([sys.executable, "-c", prelude + _documented_loop() + epilogue],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [float(line) for line in done.stdout.split()]
    np.testing.assert_allclose(printed, losses, rtol=1e-5, atol=1e-6)
    with np.load(tmp_path / "trained.npz") as trained:
        assert set(trained.files) == set(_state(model)) | {f"momentum.{n}" for n, _ in
                                                            model.named_parameters()}
        for name, value in _state(model).items():
            np.testing.assert_allclose(trained[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_arguments_named_like_outputs_or_hyperparameters_get_a_prefix() -> None:
    layer = og.nn.Linear(3, 2)
    opt = og.optim.SGD(layer.parameters(), lr=0.1)

    @og.compile
    def step(output, lr):
        opt.zero_grad()
        loss = og.nn.functional.mse_loss(layer(output), lr)
        loss.backward()
        opt.step()
        return loss

    step(og.rand(4, 3), og.rand(4, 2))
    assert step.last.data_names == ["input.output", "input.lr"]
    names = [i.name for i in step.last.model.graph.input]
    assert len(names) == len(set(names)) and "lr" in names


def test_hand_written_sgd_update_is_part_of_the_compiled_step() -> None:
    og.manual_seed(0)
    holder = {"w": og.randn(3, 2, requires_grad=True)}
    x, y = og.rand(4, 3), og.rand(4, 2)

    def step(x, y):
        w = holder["w"]
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        with og.no_grad():
            w -= 0.1 * w.grad
        w.grad = None
        return loss

    w0 = holder["w"].detach().numpy().copy()
    eager = [step(x, y).item() for _ in range(3)]
    w_eager = holder["w"].detach().numpy().copy()
    holder["w"].data = w0
    compiled = og.compile(step)
    assert [compiled(x, y).item() for _ in range(3)] == eager
    np.testing.assert_array_equal(holder["w"].detach().numpy(), w_eager)
    assert compiled.traces == 1 and holder["w"].is_leaf and holder["w"].requires_grad


def test_values_handed_out_survive_later_steps() -> None:
    """The runner writes the buffers of step k's values again at step k + 2: values still in use
    (a graph recorded before the steps, gradients kept in a list) keep theirs."""
    model, optim, step = _trainer(_mlp)
    x, y = _data((4, 12))
    step(og.tensor(x), og.tensor(y))
    saved = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    pending = (model(og.tensor(x)) ** 2).sum()  # recorded at the current parameters
    grads = []
    for _ in range(3):
        step(og.tensor(x), og.tensor(y))
        grads.append(model[0].weight.grad)
    optim.zero_grad()
    pending.backward()
    fresh = _mlp()
    fresh.load_state_dict(saved)
    (fresh(og.tensor(x)) ** 2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy(), err_msg=name)
    # Gradients kept from every step are still each step's own.
    assert len({id(g._v.data) for g in grads}) == 3
    assert not np.array_equal(grads[0].numpy(), grads[2].numpy())


def test_a_program_not_running_holds_no_state_buffers() -> None:
    """A smaller last batch runs a second program: the first one's buffers are let go while it
    runs (the tensors hold the second's), and made again from the tensors when the first size
    comes back; the steps stay the eager ones, bit for bit, BatchNorm statistics included."""
    sizes = [8, 8, 5, 8, 5, 5, 8]
    batches = [_data((n, 3, 6, 6), seed=k) for k, n in enumerate(sizes)]
    results = []
    for compiled in (False, True):
        model, optim, step = _trainer(_convnet, compiled=compiled)
        losses = [step(og.tensor(x), og.tensor(y)).item() for x, y in batches[:3]]
        if compiled:
            eight, five = step._programs.values()  # in order of use
            assert eight.runner.released and not five.runner.released
            assert eight.runner._host == [{}, {}]  # nothing of the batch-8 step kept
            # Exporting it still writes the state as it is (the tensors' values).
            defaults = eight.defaults()
            for name, t in eight.updated.items():
                np.testing.assert_array_equal(defaults[name], t.detach().numpy())
        losses += [step(og.tensor(x), og.tensor(y)).item() for x, y in batches[3:]]
        grads = [p.grad.numpy().copy() for p in model.parameters()]
        results.append((losses, {k: v.numpy().copy() for k, v in model.state_dict().items()},
                        grads, np.array(optim.state_dict()["state"][0]["momentum_buffer"])))
    (eager_losses, eager_state, eager_grads, eager_m), (losses, state, grads, m) = results
    assert losses == eager_losses
    for k, v in eager_state.items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)
    for a, b in zip(grads, eager_grads):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m, eager_m)


def test_a_compiled_step_keeps_none_of_its_trace_alive() -> None:
    """An activation written in place (ReLU6(inplace=True)) is remembered while tracing; keeping
    it kept the trace's whole recorded forward (its values too) for the function's life."""
    import gc

    from onnxgrad.tracer.values import Record

    _, _, step = _trainer(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU6(inplace=True),
                                                nn.Linear(16, 5)))
    x, y = _data((4, 12))
    for _ in range(2):
        step(og.tensor(x), og.tensor(y))
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, Record)] == []


def test_replacing_a_layer_retraces() -> None:
    model, optim, step = _trainer(_mlp)
    x, y = _data((4, 12))
    step(og.tensor(x), og.tensor(y))
    og.nn.Linear(3, 3)  # other modules being built elsewhere: no retrace
    step(og.tensor(x), og.tensor(y))
    assert step.traces == 1
    model.add_module("4", og.nn.Linear(16, 5))  # a new head, trained from here on
    optim.add_param_group({"params": list(model[4].parameters())})
    head = model[4].weight.detach().numpy().copy()
    step(og.tensor(x), og.tensor(y))
    assert step.traces == 2
    assert not np.array_equal(model[4].weight.detach().numpy(), head)


def test_compiled_graph_values_are_named_by_module_and_op() -> None:
    model, optim, step = _trainer(_mlp)
    step(*_data((4, 12)))
    text = str(og.inspect(step))
    # (the number counts the step's nodes before it: the loss's label checks come first)
    assert re.search(r"%0\.gemm_\d+: f32\[4,16\] = Gemm\(%x, %0\.weight, %0\.bias\)", text)
    assert "test_compile.py" in text  # the user's line, for traced nodes
    produced = {o for n in step.last.model.graph.node for o in n.output}
    assert any(name.startswith("grad") for name in produced)
    assert any(name.startswith("opt") for name in produced)


def _detach_no_grad_data_step(compiled: bool) -> tuple[list[float], np.ndarray, np.ndarray]:
    og.manual_seed(0)
    layer = og.nn.Linear(3, 2)
    opt = og.optim.SGD(layer.parameters(), lr=0.01)

    def step(x):
        opt.zero_grad()
        with og.no_grad():
            scale = (layer.weight * layer.weight).sum()  # no gradient through this
        y = (layer(x) * layer.weight.detach().sum() / scale).sum()
        y.backward()
        opt.step()
        layer.bias.data.mul_(0.5)  # writes through to the parameter, as in PyTorch
        return y

    run = og.compile(step) if compiled else step
    x = og.tensor(np.linspace(0, 1, 12, dtype=np.float32).reshape(4, 3))
    losses = [run(x).item() for _ in range(3)]
    return losses, layer.weight.detach().numpy(), layer.bias.detach().numpy()


def test_no_grad_detach_and_data_writes_compile_like_eager() -> None:
    eager, compiled = _detach_no_grad_data_step(False), _detach_no_grad_data_step(True)
    assert eager[0] == compiled[0]
    np.testing.assert_array_equal(eager[1], compiled[1])
    np.testing.assert_array_equal(eager[2], compiled[2])


def test_gradients_accumulate_across_calls_without_zero_grad() -> None:
    def run(compiled: bool) -> tuple[np.ndarray, np.ndarray, int]:
        w = og.tensor([1.0, 2.0, 3.0], requires_grad=True)
        layer = og.nn.Linear(3, 1)

        def f(x):
            loss = (w * x).sum() + layer(x[None]).sum()
            loss.backward()
            return loss

        g = og.compile(f) if compiled else f
        x = og.tensor([1.0, 1.0, 2.0])
        for _ in range(3):
            g(x)
        return w.grad.numpy(), layer.weight.grad.numpy(), getattr(g, "traces", 0)

    eager, compiled = run(False), run(True)
    np.testing.assert_array_equal(eager[0], compiled[0])
    np.testing.assert_array_equal(eager[1], compiled[1])
    np.testing.assert_array_equal(compiled[0], [3.0, 3.0, 6.0])
    assert compiled[2] == 2  # first call: no gradient yet; then: it accumulates


def test_captured_tensors_are_inputs_fed_their_current_value() -> None:
    scale = og.tensor([1.0, 2.0, 3.0])

    @og.compile
    def f(x):
        inner = og.tensor([10.0, 10.0, 10.0])  # made inside the function: a constant
        return (x * scale + inner).sum()

    x = og.ones(3)
    assert f(x).item() == 36.0
    scale.data = og.tensor([0.0, 0.0, 1.0])  # an eager edit is seen
    assert f(x).item() == 31.0
    scale += 1  # so is an in-place update
    assert f(x).item() == 34.0
    assert f.traces == 1
    assert [i.name for i in f.last.model.graph.input][0] == "x"


def test_random_values_inside_a_compiled_function_are_fresh_each_call() -> None:
    @og.compile
    def f(x):
        return x + og.randn(3), x + og.randn(3), og.randint(0, 5, (200,))

    first, second, ints = f(og.zeros(3))
    again = f(og.zeros(3))[0]
    assert not np.array_equal(first.numpy(), second.numpy())  # two draws, not one merged
    assert not np.array_equal(first.numpy(), again.numpy())  # a new draw every call
    assert ints.dtype == np.int64 and set(np.unique(ints.numpy())) <= set(range(5))
    assert f.traces == 1


def test_gradients_made_outside_the_step_are_read_at_every_call() -> None:
    """A compiled update fed by an eager backward: each call reads the current .grad (never the
    one seen at trace time), a missing one retraces and is skipped as in eager, and a step that
    accumulates into .grad follows a .grad replaced between calls."""
    x, y = _data((8, 12))

    def run(compiled: bool) -> tuple[dict[str, np.ndarray], list[np.ndarray], int]:
        model = _mlp()
        optim = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        update = og.compile(optim.step) if compiled else optim.step
        grads = []
        for k in range(4):
            optim.zero_grad()
            F.cross_entropy(model(og.tensor(x * (k + 1))), og.tensor(y)).backward()
            if k == 2:
                model[0].bias.grad = None  # skipped by this step, as PyTorch skips it
            update()

        def accumulate(x, y):  # no zero_grad: adds to .grad made by an eager backward
            F.cross_entropy(model(x), y).backward()

        step = og.compile(accumulate) if compiled else accumulate
        for _ in range(2):
            optim.zero_grad()
            F.cross_entropy(model(og.tensor(x)), og.tensor(y)).backward()  # a new .grad tensor
            step(og.tensor(x[::-1].copy()), og.tensor(y))
            grads.append(model[0].weight.grad.numpy().copy())
        traces = update.traces + step.traces if compiled else 0
        return _state(model), grads, traces

    (eager, eager_grads, _), (compiled, compiled_grads, traces) = run(False), run(True)
    for name, value in eager.items():
        np.testing.assert_array_equal(compiled[name], value, err_msg=name)
    for a, b in zip(compiled_grads, eager_grads):
        np.testing.assert_array_equal(a, b)
    assert traces == 3  # the update with all gradients and with one missing; the accumulation


# --------------------------------------------------------------------------- Python values read
STEP_NOW = False  # a module-level flag a compiled function tests
CALLS = 0


def test_micro_batches_accumulate_in_one_graph_like_eager() -> None:
    x, y = _data((8, 12))

    def run(compiled: bool) -> tuple[list[float], dict[str, np.ndarray], int]:
        model = _mlp()
        optim = og.optim.AdamW(model.parameters(), lr=1e-2)

        def step(x, y):
            optim.zero_grad()
            total = 0.0
            for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])):  # two micro-batches
                loss = F.cross_entropy(model(xs), ys) / 2
                loss.backward()
                total = total + loss
            optim.step()
            return total

        fn = og.compile(step) if compiled else step
        losses = [float(fn(og.tensor(x), og.tensor(y))) for _ in range(3)]
        return losses, _state(model), fn.traces if compiled else 1

    (eager, eager_state, _), (compiled, state, traces) = run(False), run(True)
    assert compiled == eager and traces == 1
    for name, value in eager_state.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)


def test_python_values_the_function_reads_retrace_when_they_change() -> None:
    """A flag deciding when to step (gradient accumulation), a closure float, a rebound closure
    tensor: a trace bakes each in, so a change traces again and results stay eager's."""
    global STEP_NOW
    x, y = _data((4, 12))

    def run(compiled: bool) -> tuple[dict[str, np.ndarray], int]:
        global STEP_NOW
        model = _mlp()
        optim = og.optim.SGD(model.parameters(), lr=0.1)
        scale = 1.0
        shift = og.zeros(5)

        def step(x, y):
            loss = F.cross_entropy(model(x) * scale + shift, y) / 2
            loss.backward()
            if STEP_NOW:
                optim.step()
                optim.zero_grad()
            return loss

        fn = og.compile(step) if compiled else step
        for k in range(6):
            STEP_NOW = k % 2 == 1
            if k == 3:
                scale = 0.5
            if k == 4:
                shift = og.full((5,), 0.25)  # a new tensor under the same name
            fn(og.tensor(x), og.tensor(y))
        STEP_NOW = False
        return _state(model), fn.traces if compiled else 0

    (eager, _), (compiled, traces) = run(False), run(True)
    for name, value in eager.items():
        np.testing.assert_array_equal(compiled[name], value, err_msg=name)
    assert traces == 6  # flag off/on; then scale 0.5 (on, off); then the new shift (off, on)


def test_a_counter_read_by_the_function_is_a_clear_error_not_a_trace_per_call() -> None:
    global CALLS
    x, y = _data((4, 12))
    model, optim, _ = _trainer(_mlp)

    @og.compile
    def step(x, y):
        F.cross_entropy(model(x), y).backward()
        if CALLS % 100 == 99:
            optim.step()
        return x

    with pytest.raises(og.TraceError, match=r"traced 8 times for the same inputs because the "
                                            r"Python value\(s\) \['CALLS'\] it reads changed"):
        for CALLS in range(20):  # noqa: B007  (the global the function reads)
            step(x, y)
    assert step.traces == 9  # the first call, with no gradient yet, then 8 for the counter


def test_freezing_and_module_attributes_retrace_like_eager() -> None:
    """requires_grad_(False) after a call, and plain attributes a forward reads (a scale, a
    BatchNorm's momentum), change what the step does: the next call retraces and matches eager."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _convnet()
            self.scale = 1.0

        def forward(self, x):
            return self.body(x) * self.scale

    x, y = _data((4, 3, 6, 6))

    def run(compiled: bool) -> tuple[dict[str, np.ndarray], int]:
        model = Scaled()
        optim = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step(x, y):
            optim.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optim.step()
            return loss

        fn = og.compile(step) if compiled else step
        fn(og.tensor(x), og.tensor(y))
        model.body[0].weight.requires_grad_(False)  # freeze the first conv
        fn(og.tensor(x), og.tensor(y))
        model.scale = 0.5
        model.body[1].momentum = 0.5
        fn(og.tensor(x), og.tensor(y))
        return _state(model), fn.traces if compiled else 0

    (eager, _), (compiled, traces) = run(False), run(True)
    for name, value in eager.items():
        np.testing.assert_allclose(compiled[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    assert traces == 3


def test_cleanup_keeps_the_type_of_an_output_it_deduplicates() -> None:
    """A graph output that repeats an earlier value (a gradient rule's nodes need not have
    shapes) keeps its shape and type through common-subexpression elimination."""
    import onnx_ir as ir
    from onnxgrad.passes.cleanup import cleanup

    x = ir.Value(name="x", shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    first = ir.node("Neg", [x])
    second = ir.node("Neg", [x])
    out = second.outputs[0]
    out.name, out.shape, out.type = "out", ir.Shape([2, 3]), ir.TensorType(ir.DataType.FLOAT)
    total = ir.node("Add", [first.outputs[0], out])
    total.outputs[0].name = "total"
    graph = ir.Graph([x], [out, total.outputs[0]], nodes=[first, second, total],
                     opset_imports={"": 21})
    cleanup(ir.Model(graph, ir_version=10))
    assert len(graph) == 2  # one Neg left
    assert graph.outputs[0].shape == ir.Shape([2, 3])
    assert graph.outputs[0].dtype == ir.DataType.FLOAT


def test_tracing_frees_the_values_no_tensor_holds() -> None:
    """While tracing, a value whose last tensor is gone is freed (the records keep its shape);
    one the user still holds is not. The compiled call computes what eager computes."""
    import weakref

    og.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    refs: list[weakref.ref] = []
    kept: list[og.Tensor] = []

    def f(x):
        h = model[0](x)
        refs.append(weakref.ref(h._v.data))
        kept.append(model[1](h))
        del h
        return model[2](kept[-1]).sum()

    x = og.randn(4, 8)
    want = float(f(x))
    refs.clear()
    kept.clear()
    got = float(og.compile(f)(x))
    assert refs[0]() is None  # the dead tensor's value: freed while tracing
    assert kept[0]._v.data.shape == (4, 16) and kept[0]._v.data.any()  # the kept one: as it was
    assert got == want
