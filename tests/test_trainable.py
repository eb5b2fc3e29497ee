"""og.training_step and ``onnxgrad train-graph``: inference ONNX models made trainable.

The reference is onnxgrad's own compiled training (``og.compile`` of zero_grad / forward / loss /
backward / step) of the same model and weights: the training step of the imported graph must
give the same losses, parameters and BatchNorm statistics over 3 steps. Models come from
onnxgrad's own export of a forward pass, from hand-built graphs, and (when PyTorch is installed)
from ``torch.onnx.export``, whose training is then checked against PyTorch's SGD.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxgrad.passes import NoGradientRule
from onnxgrad.runtime import OPSET
from onnxgrad.runtime.metadata import DATA_INPUTS, STATE

import onnxgrad as og
from onnxgrad import nn
from onnxgrad.nn import functional as F
from onnxgrad.training import TrainGraphError

TIGHT = {"rtol": 1e-5, "atol": 1e-6}


def _quiet(fn, *args, **kwargs):
    """Call ``fn`` with the opset-conversion warning silenced (tests that don't check it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def _compiled_trainer(model: nn.Module | None, params: list, forward, loss_fn, **hyper):
    """onnxgrad's own compiled training step: the reference every imported step must match."""
    optimizer = og.optim.SGD(params, **hyper)

    @og.compile
    def train(x, y):
        optimizer.zero_grad()
        loss = loss_fn(forward(x), y)
        loss.backward()
        optimizer.step()
        return loss

    train.optimizer = optimizer
    return train


def _export_forward(model: nn.Module, x: np.ndarray, path: Path) -> Path:
    """An inference .onnx made by onnxgrad: og.compile of the eval-mode module, exported."""
    model.eval()
    forward = og.compile(model)
    forward(x)
    forward.export(path)
    return path


def _assert_same_training(step, train, batches, reference: Callable[[], dict]) -> None:
    """Same losses at every step, then the same values of ``reference()``'s tensors."""
    for x, y in batches:
        ours, ref = step(x, y), train(x, y)
        np.testing.assert_allclose(ours.numpy(), ref.numpy(), **TIGHT)
    state = step.state_dict()
    tensors = reference()
    assert set(tensors) <= set(state)
    for name, t in tensors.items():
        np.testing.assert_allclose(state[name], t.detach().numpy(), **TIGHT, err_msg=name)


def _batches(shape, classes: int, n: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape, dtype=np.float32), rng.integers(0, classes, shape[0]))
            for _ in range(n)]


# --------------------------------------------------------------------------- onnxgrad's own export
def _mlp() -> nn.Module:
    og.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_own_export_mlp_matches_compiled_training(tmp_path: Path) -> None:
    path = _export_forward(_mlp(), np.zeros((6, 8), np.float32), tmp_path / "mlp.onnx")
    step = og.training_step(path, loss="cross_entropy", lr=0.1, momentum=0.9)
    ref = _mlp().train()
    train = _compiled_trainer(ref, list(ref.parameters()), ref, F.cross_entropy, lr=0.1,
                              momentum=0.9)
    _assert_same_training(step, train, _batches((6, 8), 4), lambda: dict(ref.named_parameters()))
    # Same exported format as og.compile's: names, state mapping, defaults (data names aside).
    step.export(tmp_path / "ours.onnx")
    train.export(tmp_path / "ref.onnx")
    ours, theirs = onnx.load(tmp_path / "ours.onnx"), onnx.load(tmp_path / "ref.onnx")
    assert [i.name for i in ours.graph.input][2:] == [i.name for i in theirs.graph.input][2:]
    assert [o.name for o in ours.graph.output] == [o.name for o in theirs.graph.output]
    meta = {p.key: p.value for p in ours.metadata_props}
    ref_meta = {p.key: p.value for p in theirs.metadata_props}
    assert json.loads(meta[STATE]) == json.loads(ref_meta[STATE])
    assert json.loads(meta[DATA_INPUTS]) == ["xs", "labels"]
    assert [o.version for o in ours.opset_import] == [OPSET]
    # p.grad holds the last step's gradient, as after og.compile's step.
    for (name, p), q in zip(step.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), **TIGHT, err_msg=name)


def test_dampening_weight_decay_and_a_learning_rate_schedule(tmp_path: Path) -> None:
    """A dampened first step creates the buffers (a second graph); lr is an input, not rebuilt."""
    path = _export_forward(_mlp(), np.zeros((5, 8), np.float32), tmp_path / "mlp.onnx")
    hyper = {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 1e-2}
    step = og.training_step(path, loss="cross_entropy", **hyper)
    ref = _mlp().train()
    train = _compiled_trainer(ref, list(ref.parameters()), ref, F.cross_entropy, **hyper)
    batches = _batches((5, 8), 4, n=4, seed=1)
    _assert_same_training(step, train, batches[:2], lambda: dict(ref.named_parameters()))
    step.optimizer.param_groups[0]["lr"] = 0.01
    train.optimizer.param_groups[0]["lr"] = 0.01
    _assert_same_training(step, train, batches[2:], lambda: dict(ref.named_parameters()))
    assert len(step._programs) == 2  # dampened first step, then every later one


def test_any_optimizer_trains_an_imported_model_as_it_trains_og_nn(tmp_path: Path) -> None:
    """The optimizer protocol: AdamW (a class, or a function for its own options) on an
    imported model gives og.compile's own AdamW training, state file names and all."""
    path = _export_forward(_mlp(), np.zeros((6, 8), np.float32), tmp_path / "mlp.onnx")
    made = [og.training_step(path, loss="cross_entropy", optimizer=og.optim.AdamW, lr=0.01,
                             weight_decay=0.1),
            og.training_step(path, loss="cross_entropy",
                             optimizer=lambda ps: og.optim.AdamW(ps, lr=0.01, weight_decay=0.1))]
    for step in made:
        ref = _mlp().train()
        optimizer = og.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.1)

        @og.compile
        def train(x, y, ref=ref, optimizer=optimizer):
            optimizer.zero_grad()
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            optimizer.step()
            return loss

        _assert_same_training(step, train, _batches((6, 8), 4),
                              lambda ref=ref: dict(ref.named_parameters()))
        assert isinstance(step.optimizer, og.optim.AdamW)
    step.export(tmp_path / "adamw.onnx")
    names = {i.name for i in onnx.load(tmp_path / "adamw.onnx").graph.input}
    assert {"exp_avg.0.weight", "exp_avg_sq.0.weight", "step.0.weight", "beta1"} <= names
    with pytest.raises(TypeError, match=r"\['momentum'\] are SGD's; .* optimizer=lambda params"):
        og.training_step(path, optimizer=og.optim.AdamW, momentum=0.9)
    with pytest.raises(TypeError, match="optimizer must be an og.optim optimizer class"):
        og.training_step(path, optimizer="adam")


def test_own_export_cnn_without_bn(tmp_path: Path) -> None:
    """Conv, MaxPool, AveragePool, GlobalAveragePool, Flatten, Gemm; nesterov."""
    def net() -> nn.Module:
        og.manual_seed(1)
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(2),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    path = _export_forward(net(), np.zeros((3, 2, 8, 8), np.float32), tmp_path / "cnn.onnx")
    hyper = {"lr": 0.1, "momentum": 0.9, "nesterov": True}
    step = og.training_step(path, loss="cross_entropy", **hyper)
    ref = net().train()
    train = _compiled_trainer(ref, list(ref.parameters()), ref, F.cross_entropy, **hyper)
    _assert_same_training(step, train, _batches((3, 2, 8, 8), 3),
                          lambda: dict(ref.named_parameters()))


# --------------------------------------------------------------------------- hand-built graphs
def _bn_net() -> nn.Module:
    og.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5))
    rng = np.random.default_rng(3)
    # Statistics and affine parameters away from their defaults, so each is checked.
    model.load_state_dict({
        **{k: v for k, v in model.state_dict().items()},
        "1.weight": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "1.bias": rng.uniform(-0.5, 0.5, 4).astype(np.float32),
        "1.running_mean": rng.uniform(-0.2, 0.2, 4).astype(np.float32),
        "1.running_var": rng.uniform(0.5, 2.0, 4).astype(np.float32),
    })
    return model


def _bn_graph(model: nn.Module, opset: int = 17, batch: str | int = "N") -> onnx.ModelProto:
    """What torch.onnx.export writes for _bn_net: inference BatchNormalization, 1-output MaxPool,
    dynamic batch dimension, weights as initializers."""
    sd = {k: v.numpy() for k, v in model.state_dict().items() if k != "1.num_batches_tracked"}
    nodes = [
        helper.make_node("Conv", ["x", "0.weight", "0.bias"], ["c"], pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c", "1.weight", "1.bias", "1.running_mean",
                                                "1.running_var"], ["b"], epsilon=1e-5,
                         momentum=0.9, name="bn"),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["m"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "6.weight", "6.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])],
        [numpy_helper.from_array(v, k) for k, v in sd.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_batchnorm_trains_like_compiled_training_and_opset_is_converted() -> None:
    proto = _bn_graph(_bn_net())
    with pytest.warns(UserWarning, match=f"opset 17 to onnxgrad's opset {OPSET}"):
        step = og.training_step(proto, loss="cross_entropy", lr=0.1, momentum=0.9)
    assert [n for n, _ in step.named_buffers()] == ["1.running_mean", "1.running_var"]
    ref = _bn_net().train()
    train = _compiled_trainer(ref, list(ref.parameters()), ref, F.cross_entropy, lr=0.1,
                              momentum=0.9)
    _assert_same_training(step, train, _batches((4, 3, 8, 8), 5), lambda: {
        k: v for k, v in ref.state_dict().items() if k != "1.num_batches_tracked"})
    # The node stays an inference-form BatchNormalization, fed the batch's statistics.
    nodes = step.model.graph.node
    (bn,) = [n for n in nodes if n.op_type == "BatchNormalization"]
    made_by = {out: n.op_type for n in nodes for out in n.output}
    assert (made_by[bn.input[3]], made_by[bn.input[4]]) == ("Reshape", "ReduceMean")
    assert all(len(n.output) == 2 for n in step.model.graph.node if n.op_type == "MaxPool")
    state = json.loads({p.key: p.value for p in step.model.metadata_props}[STATE])
    assert state["1.running_mean.new"] == "1.running_mean"


def test_freeze_bn_keeps_inference_batchnorm() -> None:
    proto = _bn_graph(_bn_net())
    step = _quiet(og.training_step, proto, loss="cross_entropy", lr=0.1, freeze_bn=True)
    assert list(step.named_buffers()) == []
    ref = _bn_net().eval()  # BatchNorm on running statistics, which stay as they are
    train = _compiled_trainer(ref, list(ref.parameters()), ref, F.cross_entropy, lr=0.1)
    _assert_same_training(step, train, _batches((4, 3, 8, 8), 5),
                          lambda: dict(ref.named_parameters()))
    assert all(i.name not in ("1.running_mean", "1.running_var")
               for i in step.model.graph.input)


def test_exported_step_runs_in_the_reference_evaluator(tmp_path: Path) -> None:
    proto = _bn_graph(_bn_net(), opset=OPSET, batch=2)
    step = og.training_step(proto, loss="cross_entropy", lr=0.1, momentum=0.9)
    x, y = _batches((2, 3, 8, 8), 5, n=1)[0]
    step(x, y)
    step.export(tmp_path / "train.onnx")
    model = onnx.load(tmp_path / "train.onnx")
    onnx.checker.check_model(model, full_check=True)
    defaults = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    feeds = {i.name: defaults[i.name] for i in model.graph.input if i.name in defaults}
    assert {"lr", "momentum", "1.running_mean", "momentum.0.weight"} <= set(feeds)
    feeds.update(x=x, labels=y)
    ours = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    reference = ReferenceEvaluator(model).run(None, feeds)
    for out, a, b in zip(model.graph.output, ours, reference):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=out.name)
    # The exported file is the step: running it gives the step's next result.
    expected = step(x, y)
    np.testing.assert_allclose(ours[0], expected.numpy(), **TIGHT)


def test_dropout_trains_with_a_mask() -> None:
    """An inference Dropout becomes a training one: the gradient is masked and scaled."""
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"]),
             helper.make_node("Dropout", ["h", "ratio"], ["y"])]
    graph = helper.make_graph(
        nodes, "drop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
        [numpy_helper.from_array(np.ones((1, 256), np.float32), "w"),
         numpy_helper.from_array(np.asarray(0.5, np.float32), "ratio")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    step = og.training_step(proto, loss="sum", lr=1.0, trainable=["w"])
    step(np.ones((1, 256), np.float32))
    grad = next(step.parameters()).grad.numpy()
    assert set(np.unique(grad)) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - 0.5)


def test_maxpool_gets_indices_only_where_a_gradient_flows() -> None:
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("MaxPool", ["c"], ["q"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["q"], ["y"])]
    graph = helper.make_graph(
        nodes, "pools", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    step = og.training_step(proto, loss="sum", lr=0.1)
    step(np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32))
    pools = [len(n.output) for n in step.model.graph.node if n.op_type == "MaxPool"]
    assert sorted(pools) == [1, 2]  # the pool of the raw input needs no Indices


def _op_mix_graph(opset: int) -> onnx.ModelProto:
    """Identity, Concat, MatMul, Add, Mul, Transpose, Softmax, Reshape with a Constant shape."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(
            np.asarray([-1, 8], np.int64))),
        helper.make_node("MatMul", ["x", "w"], ["mm"]),                     # [N, 4]
        helper.make_node("Identity", ["mm"], ["same"]),
        helper.make_node("Concat", ["mm", "same"], ["cat"], axis=1),        # [N, 8]
        helper.make_node("Add", ["cat", "b"], ["add"]),
        helper.make_node("Mul", ["add", "s"], ["mul"]),
        helper.make_node("Transpose", ["mul"], ["t"], perm=[1, 0]),         # [8, N]
        helper.make_node("Softmax", ["t"], ["sm"], axis=0),
        helper.make_node("Reshape", ["sm", "shape"], ["out"]),              # [N, 8]
    ]
    weights = {"w": rng.standard_normal((3, 4), dtype=np.float32),
               "b": rng.standard_normal((8,), dtype=np.float32),
               "s": rng.standard_normal((1, 8), dtype=np.float32)}
    graph = helper.make_graph(
        nodes, "mix", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_op_coverage_mse_and_an_older_opset(tmp_path: Path) -> None:
    proto = _op_mix_graph(13)
    path = tmp_path / "mix.onnx"
    onnx.save_model(proto, path, save_as_external_data=True, location="mix.data",
                    size_threshold=0)  # weights in external data, read from beside the file
    with pytest.warns(UserWarning, match="opset 13"):
        step = og.training_step(path, loss="mse", lr=0.5, momentum=0.5)
    inits = {t.name: numpy_helper.to_array(t) for t in _op_mix_graph(13).graph.initializer}
    params = {k: nn.Parameter(v) for k, v in inits.items()}

    def forward(x):
        mm = og.matmul(x, params["w"])
        h = (og.cat([mm, mm], 1) + params["b"]) * params["s"]
        return og.reshape(og.softmax(og.transpose(h, 0, 1), 0), (-1, 8))

    train = _compiled_trainer(None, list(params.values()), forward, F.mse_loss, lr=0.5,
                              momentum=0.5)
    rng = np.random.default_rng(5)
    batches = [(rng.standard_normal((4, 3), dtype=np.float32),
                rng.uniform(0, 0.3, (4, 8)).astype(np.float32)) for _ in range(3)]
    _assert_same_training(step, train, batches, lambda: params)


def test_batch_size_is_bound_per_call_and_state_carries_over() -> None:
    proto = _op_mix_graph(OPSET)
    step = og.training_step(proto, loss="l1", lr=0.1)
    rng = np.random.default_rng(6)
    step(rng.standard_normal((4, 3), dtype=np.float32), rng.uniform(0, 1, (4, 8)))
    after_first = step.state_dict()
    # A new batch size: a new graph, from the state the first one left.
    step(rng.standard_normal((6, 3), dtype=np.float32), rng.uniform(0, 1, (6, 8)))
    assert len(step._programs) == 2
    assert not np.allclose(step.state_dict()["w"], after_first["w"])
    with pytest.raises(TrainGraphError, match=r"input 'x' has shape \['N', 3\], the data has "
                                              r"shape \[4, 5\]"):
        step(rng.standard_normal((4, 5), dtype=np.float32), np.zeros((4, 8), np.float32))


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    with pytest.raises(TrainGraphError, match="is not an ONNX model"):
        og.training_step(text)
    with pytest.raises(FileNotFoundError):
        og.training_step(tmp_path / "missing.onnx")

    ints = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "ints",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])],
        [numpy_helper.from_array(np.asarray([3, 2], np.int64), "shape")])
    proto = helper.make_model(ints, opset_imports=[helper.make_opsetid("", OPSET)])
    with pytest.raises(TrainGraphError, match="no float initializers"):
        og.training_step(proto, loss="sum")

    mix = _op_mix_graph(OPSET)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        og.training_step(mix, loss="hinge")
    with pytest.raises(TrainGraphError, match=r"\['nope'\] are not float initializers"):
        og.training_step(mix, loss="sum", trainable=["nope"])
    step = og.training_step(mix, loss="mse")
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"labels of shape \[4, 4\] do not match output 'out' "
                                         r"of shape \[4, 8\]"):
        step(x, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="needs labels"):
        step(x)

    mlp = _bn_graph(_bn_net(), opset=OPSET)
    step = og.training_step(mlp, loss="cross_entropy")
    with pytest.raises(ValueError, match=r"class indices \(integers\) of shape \[4\]"):
        step(np.zeros((4, 3, 8, 8), np.float32), np.zeros((4, 5), np.float32))


def test_an_op_without_a_rule_is_named_at_once() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Elu", ["h"], ["y"], name="act/Elu")]
    graph = helper.make_graph(
        nodes, "elu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ones((3, 3), np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    with pytest.raises(NoGradientRule,
                       match=r"no gradient rule for ONNX op 'Elu' \(node act/Elu\)"):
        og.training_step(proto, loss="sum")


# --------------------------------------------------------------------------- the command
def test_train_graph_command(tmp_path: Path) -> None:
    src = _export_forward(_mlp(), np.zeros((6, 8), np.float32), tmp_path / "mlp.onnx")
    out = tmp_path / "mlp_train.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxgrad", "train-graph", str(src), str(out), "--loss",
         "cross_entropy", "--lr", "0.01", "--momentum", "0.9", "--freeze", "0.*"],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    model = onnx.load(out)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[STATE]) == {"2.weight.new": "2.weight", "2.bias.new": "2.bias",
                                       "momentum.2.weight.new": "momentum.2.weight",
                                       "momentum.2.bias.new": "momentum.2.bias"}
    defaults = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert float(defaults["lr"]) == pytest.approx(0.01)
    assert "+ lr, momentum" in proc.stdout

    # Any optimizer: AdamW with its default weight decay, its state and hyperparameters named.
    adamw = tmp_path / "mlp_adamw.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxgrad", "train-graph", str(src), str(adamw), "--optimizer",
         "adamw", "--lr", "0.002", "--betas", "0.8", "0.99"],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "+ lr, beta1, beta2, eps, weight_decay" in proc.stdout
    model = onnx.load(adamw)
    defaults = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert float(defaults["beta1"]) == 0.8 and float(defaults["weight_decay"]) == 1e-2
    assert json.loads({p.key: p.value for p in model.metadata_props}[STATE])[
        "exp_avg.2.weight.new"] == "exp_avg.2.weight"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxgrad", "train-graph", str(src), str(adamw), "--betas", "0.8",
         "0.99"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "--betas and --eps are Adam's" in proc.stderr

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    proc = subprocess.run([sys.executable, "-m", "onnxgrad", "train-graph", str(bad),
                           str(tmp_path / "x.onnx")], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not an ONNX model" in proc.stderr


# --------------------------------------------------------------------------- PyTorch's exports
def _torch_export(torch, model, x, path: Path, opset: int) -> Path:
    # The TorchScript exporter: these tests pin its files (tests/test_onnx_import.py covers the
    # dynamo exporter's, which fold eval-mode BatchNorm unless told otherwise).
    kwargs = {"opset_version": opset, "input_names": ["x"], "output_names": ["logits"],
              "dynamic_axes": {"x": {0: "N"}, "logits": {0: "N"}}, "dynamo": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # NOTE: PRESERVE keeps eval-mode BatchNorm a node; EVAL would fold it into the Conv.
        torch.onnx.export(model, (x,), str(path), training=torch.onnx.TrainingMode.PRESERVE,
                          **kwargs)
    return path


def _torch_parity(torch, model, step, batches, opt=None, skip: tuple[str, ...] = ()) -> None:
    model.train()
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        ours = step(x, y)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        np.testing.assert_allclose(ours.numpy(), loss.item(), rtol=1e-5, atol=1e-6)
    state = step.state_dict()
    for name, value in model.state_dict().items():
        if name in state and name not in skip:
            np.testing.assert_allclose(state[name], value.numpy(), rtol=1e-4, atol=1e-5,
                                       err_msg=name)


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_torch_cnn_trains_like_pytorch(tmp_path: Path, optimizer: str) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class CNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            # Fresh BatchNorms: the exporter ties their equal weights, biases and statistics
            # into one initializer each (Identity nodes); training must untie them.
            self.bn = torch.nn.BatchNorm2d(4)
            self.pool = torch.nn.MaxPool2d(2)
            self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn2 = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4, 5)

        def forward(self, x):
            x = self.pool(torch.relu(self.bn(self.conv(x))))
            x = torch.relu(self.bn2(self.conv2(x)))
            return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    model = CNN().eval()
    path = _torch_export(torch, model, torch.zeros(2, 3, 8, 8), tmp_path / "cnn.onnx", 17)
    if optimizer == "SGD":
        step = _quiet(og.training_step, path, loss="cross_entropy", lr=0.1, momentum=0.9)
        opt = None
    else:  # an imported model trained with AdamW, as PyTorch trains the module
        step = _quiet(og.training_step, path, loss="cross_entropy",
                      optimizer=lambda ps: og.optim.AdamW(ps, lr=1e-2, weight_decay=0.1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert sorted(n for n, _ in step.named_buffers()) == [
        "bn.running_mean", "bn.running_var", "bn2.running_mean", "bn2.running_var"]
    assert {n for n, _ in step.named_parameters()} == {
        n for n, _ in model.named_parameters()}
    # NOTE: conv.bias feeds a training-mode BatchNorm, so its gradient is 0 in exact arithmetic
    # and float32 noise in both frameworks; AdamW turns any noise into steps of +-lr, so neither
    # framework's float32 run agrees with its float64 run on it, nor on bn.running_mean, which
    # averages the conv's output, bias included. Every other tensor is compared.
    skip = ("conv.bias", "bn.running_mean") if optimizer == "AdamW" else ()
    _torch_parity(torch, model, step, _batches((4, 3, 8, 8), 5), opt, skip)
    if optimizer == "AdamW":  # and its state, by PyTorch's keys
        theirs = opt.state_dict()["state"]
        ours = {name: step.optimizer.state[p] for name, p in step.named_parameters()}
        for i, (name, _) in enumerate(model.named_parameters()):
            if name in skip:
                continue
            for key, value in theirs[i].items():
                np.testing.assert_allclose(ours[name][key].numpy(), value.numpy(), rtol=1e-4,
                                           atol=1e-6, err_msg=f"{key} of {name}")


def test_torch_mlp_trains_like_pytorch_across_batch_sizes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3)).eval()
    path = _torch_export(torch, model, torch.zeros(2, 3, 4), tmp_path / "mlp.onnx", 18)
    step = _quiet(og.training_step, path, loss="cross_entropy", lr=0.1, momentum=0.9)
    batches = _batches((5, 3, 4), 3, n=2) + _batches((3, 3, 4), 3, n=1, seed=9)
    _torch_parity(torch, model, step, batches)


# --------------------------------------------------------------------------- review regressions
def test_optimizer_state_loaded_into_a_step_that_ran_is_used() -> None:
    """optimizer.load_state_dict replaces the buffer tensors: a built program must follow them."""
    proto = _op_mix_graph(OPSET)
    rng = np.random.default_rng(7)
    batches = [(rng.standard_normal((4, 3), dtype=np.float32),
                rng.uniform(0, 0.3, (4, 8)).astype(np.float32)) for _ in range(4)]
    ref = og.training_step(proto, loss="mse", lr=0.5, momentum=0.9)
    for x, y in batches[:2]:
        ref(x, y)
    params, opt_state = ref.state_dict(), ref.optimizer.state_dict()
    for x, y in batches[2:]:
        ref(x, y)
    step = og.training_step(proto, loss="mse", lr=0.5, momentum=0.9)
    step(*batches[3])  # the program exists, with its own buffers
    step.load_state_dict(params)
    step.optimizer.load_state_dict(opt_state)
    for x, y in batches[2:]:
        step(x, y)
    for name, value in ref.state_dict().items():
        np.testing.assert_allclose(step.state_dict()[name], value, **TIGHT, err_msg=name)


def test_dampened_export_before_any_call_is_the_step_that_loops(tmp_path: Path) -> None:
    """train-graph (and export before a call) with dampening: the file carries the momentum
    buffers as state; the graph of a dampened first step does not, and would never accumulate."""
    src = _export_forward(_mlp(), np.zeros((6, 8), np.float32), tmp_path / "mlp.onnx")
    out = tmp_path / "mlp_train.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxgrad", "train-graph", str(src), str(out), "--lr", "0.01",
         "--momentum", "0.9", "--dampening", "0.1"],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "dampening" in proc.stderr  # the first step differs from PyTorch's: said so
    model = onnx.load(out)
    state = json.loads({p.key: p.value for p in model.metadata_props}[STATE])
    assert state["momentum.0.weight.new"] == "momentum.0.weight"
    # The step in memory is untouched: its first call is still PyTorch's dampened first step.
    step = _quiet(og.training_step, src, lr=0.1, momentum=0.9, dampening=0.3)
    with pytest.warns(UserWarning, match="dampening"):
        step.export(tmp_path / "early.onnx")
    ref = _mlp().train()
    train = _compiled_trainer(ref, list(ref.parameters()), ref, F.cross_entropy, lr=0.1,
                              momentum=0.9, dampening=0.3)
    _assert_same_training(step, train, _batches((6, 8), 4), lambda: dict(ref.named_parameters()))


def test_a_training_mode_torch_export_trains() -> None:
    """torch.onnx.export(training=TRAINING) writes BatchNormalization(training_mode=1) with
    unused statistics outputs: it trains like an inference export (and freeze_bn freezes it)."""
    proto = _bn_graph(_bn_net(), opset=OPSET)
    bn = next(n for n in proto.graph.node if n.op_type == "BatchNormalization")
    bn.output.extend(["unused_mean", "unused_var"])
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    step = og.training_step(proto, loss="cross_entropy", lr=0.1, momentum=0.9)
    ref = _bn_net().train()
    train = _compiled_trainer(ref, list(ref.parameters()), ref, F.cross_entropy, lr=0.1,
                              momentum=0.9)
    _assert_same_training(step, train, _batches((4, 3, 8, 8), 5), lambda: {
        k: v for k, v in ref.state_dict().items() if k != "1.num_batches_tracked"})
    frozen = og.training_step(proto, loss="cross_entropy", lr=0.1, freeze_bn=True)
    ref = _bn_net().eval()
    train = _compiled_trainer(ref, list(ref.parameters()), ref, F.cross_entropy, lr=0.1)
    _assert_same_training(frozen, train, _batches((4, 3, 8, 8), 5),
                          lambda: dict(ref.named_parameters()))
