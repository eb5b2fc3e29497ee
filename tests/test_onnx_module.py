"""og.nn.OnnxModule: an ONNX file as a module whose forward replays its nodes through the tracer.

It must train like the model it was exported from: eagerly and compiled, with BatchNorm's
running statistics, several parameter groups, a replaced head and frozen layers. References are
PyTorch (for ``torch.onnx.export``ed resnets, when torch is installed) and onnxgrad's own
``og.nn`` modules (for files onnxgrad exported).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxgrad.passes import NoGradientRule
from onnxgrad.runtime import OPSET
from onnxgrad.runtime.metadata import STATE

import onnxgrad as og
from onnxgrad import nn
from onnxgrad.nn import functional as F
from onnxgrad.nn.onnx_module import TrainGraphError, _qualified_names

# The bar for parity with PyTorch over 3 steps: 1e-4 relative.
PARITY = {"rtol": 1e-4, "atol": 1e-5}
TIGHT = {"rtol": 1e-5, "atol": 1e-6}


def _batches(shape, classes: int, n: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape, dtype=np.float32), rng.integers(0, classes, shape[0]))
            for _ in range(n)]


def _og_train(model, optimizer, batches, compiled: bool) -> list[float]:
    """PyTorch's loop body in onnxgrad, eager or as one compiled step."""
    def step(x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    run = og.compile(step) if compiled else step
    model.train()
    return [run(og.tensor(x), og.tensor(y)).item() for x, y in batches]


def _state(module) -> dict[str, np.ndarray]:
    return {k: np.array(v.numpy()) for k, v in module.state_dict().items()}


def _quiet_module(*args, **kwargs) -> nn.OnnxModule:
    """An OnnxModule of a file of another opset, the conversion warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return nn.OnnxModule(*args, **kwargs)


# --------------------------------------------------------------------------- PyTorch's exports
def _torch_export(torch, model, path: Path, size: int = 64) -> Path:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # NOTE: the TorchScript exporter with PRESERVE keeps eval-mode BatchNorm a node (EVAL
        # and the dynamo exporter fold it into the Conv, leaving no statistics to train).
        torch.onnx.export(model, (torch.zeros(2, 3, size, size),), str(path), dynamo=False,
                          opset_version=18, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
                          training=torch.onnx.TrainingMode.PRESERVE)
    return path


def _torch_train(torch, model, batches, params=None, lr: float = 0.01) -> list[float]:
    model.train()
    opt = torch.optim.SGD(model.parameters() if params is None else params, lr=lr, momentum=0.9)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _torch_state(model, skip: str = "") -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked") and not (skip and k.startswith(skip))}


def _assert_state(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], **tol) -> None:
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, **tol, err_msg=name)


def _tiny_resnet(torch):
    """resnet18's structure (stem, a plain and a downsampling BasicBlock) at a width of 8-16."""
    from torch_reference import BasicBlock

    class TinyResNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.relu = torch.nn.ReLU()
            self.maxpool = torch.nn.MaxPool2d(3, stride=2, padding=1)
            self.layer1 = torch.nn.Sequential(BasicBlock(8, 8))
            down = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, stride=2, bias=False),
                                       torch.nn.BatchNorm2d(16))
            self.layer2 = torch.nn.Sequential(BasicBlock(8, 16, 2, down))
            self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer2(self.layer1(x))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(0)
    return TinyResNet()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_torch_resnet18_trains_like_pytorch(tmp_path: Path, compiled: bool) -> None:
    torch = pytest.importorskip("torch")
    from torch_reference import torch_resnet

    torch.manual_seed(0)
    model = torch_resnet("resnet18", num_classes=10)
    ours = _quiet_module(_torch_export(torch, model, tmp_path / "resnet18.onnx"))
    # PyTorch's names: initializer names are module paths, kept as the module tree.
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in model.named_parameters()}
    assert set(_state(ours)) == set(_torch_state(model))
    assert isinstance(ours.layer1, nn.Module)  # a scope of the tree: freeze it as a layer
    # NOTE: seed 1, not 0: seed 0's second step puts one input of layer4.0's residual ReLU
    # 7.6e-6 above 0 in PyTorch, within the float32 rounding (3e-5 there) between two correct
    # BatchNorm backward formulas, so which side it lands on, and layer4's gradients (2.5%), is
    # chance (measured with the statistics' part of dX in the BatchNormalization rule).
    batches = _batches((4, 3, 64, 64), 10, seed=1)
    opt = og.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    losses = _og_train(ours, opt, batches, compiled)
    np.testing.assert_allclose(losses, _torch_train(torch, model, batches), **PARITY)
    _assert_state(_state(ours), _torch_state(model), **PARITY)


def test_torch_export_with_a_new_head_and_two_parameter_groups(tmp_path: Path) -> None:
    """Cut at the pooled features, an og.nn.Linear head, backbone and head at their own lr."""
    torch = pytest.importorskip("torch")
    model = _tiny_resnet(torch)
    path = _torch_export(torch, model, tmp_path / "tiny.onnx")
    gemm = next(n for n in onnx.load(path).graph.node if n.op_type == "Gemm")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = _quiet_module(path, outputs=[gemm.input[0]])
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.backbone(x))

    og.manual_seed(0)
    ours = Net()
    assert not any(n.startswith("fc.") for n, _ in ours.backbone.named_parameters())
    model.fc = torch.nn.Linear(16, 3)
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(ours.fc.weight.detach().numpy()))
        model.fc.bias.copy_(torch.from_numpy(ours.fc.bias.detach().numpy()))
    opt = og.optim.SGD([{"params": list(ours.backbone.parameters()), "lr": 0.01},
                        {"params": list(ours.fc.parameters())}], lr=0.05, momentum=0.9)
    head = list(model.fc.parameters())
    backbone = [p for p in model.parameters() if all(p is not q for q in head)]
    groups = [{"params": backbone, "lr": 0.01}, {"params": head}]
    batches = _batches((4, 3, 64, 64), 3)
    losses = _og_train(ours, opt, batches, compiled=True)
    np.testing.assert_allclose(losses, _torch_train(torch, model, batches, groups, lr=0.05),
                               **PARITY)
    theirs = _torch_state(model)
    _assert_state({k.replace("backbone.", "", 1): v for k, v in _state(ours).items()}, theirs,
                  **PARITY)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_torch_export_with_frozen_layers(tmp_path: Path, compiled: bool) -> None:
    torch = pytest.importorskip("torch")
    model = _tiny_resnet(torch)
    ours = _quiet_module(_torch_export(torch, model, tmp_path / "tiny.onnx"))
    for m in (ours.conv1, ours.bn1, ours.layer1):
        m.requires_grad_(False)
    for m in (model.conv1, model.bn1, model.layer1):
        m.requires_grad_(False)
    frozen = {n: np.array(p.numpy()) for n, p in ours.named_parameters() if not p.requires_grad}
    assert len(frozen) == 9  # conv1, bn1 (2), and layer1.0: two convs, two BatchNorms (4)
    opt = og.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    batches = _batches((4, 3, 64, 64), 10, seed=1)
    losses = _og_train(ours, opt, batches, compiled)
    np.testing.assert_allclose(
        losses, _torch_train(torch, model, batches, [p for p in model.parameters()
                                                      if p.requires_grad]), **PARITY)
    state = _state(ours)
    for name, value in frozen.items():
        assert np.array_equal(state[name], value), name  # bit-identical
    # Frozen layers' BatchNorms still update their statistics in train(), as in PyTorch.
    _assert_state(state, _torch_state(model), **PARITY)


def test_eval_replays_the_file_as_onnx_runtime_runs_it(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = _torch_export(torch, _tiny_resnet(torch), tmp_path / "tiny.onnx", size=32)
    ours = _quiet_module(path).eval()
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32), dtype=np.float32)
    (expected,) = ort.InferenceSession(str(path)).run(None, {"x": x})
    before = _state(ours)
    with og.no_grad():
        np.testing.assert_allclose(ours(x).numpy(), expected, **TIGHT)
    ours.train()
    with og.no_grad():
        trained = ours(x).numpy()
    assert not np.allclose(trained, expected, rtol=1e-3)  # batch statistics now
    after = _state(ours)
    assert not np.array_equal(after["bn1.running_mean"], before["bn1.running_mean"])


# --------------------------------------------------------------------------- onnxgrad's exports
def _export_forward(model: nn.Module, x: np.ndarray, path: Path) -> Path:
    model.eval()
    forward = og.compile(model)
    forward(x)
    forward.export(path)
    return path


def _og_net() -> nn.Module:
    og.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.0),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    rng = np.random.default_rng(4)
    # Statistics away from their defaults, so that each is checked.
    model.load_state_dict({**model.state_dict(),
                           "1.running_mean": rng.uniform(-0.2, 0.2, 8).astype(np.float32),
                           "1.running_var": rng.uniform(0.5, 2.0, 8).astype(np.float32)})
    return model


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_own_export_trains_like_the_module_it_came_from(tmp_path: Path, compiled: bool) -> None:
    """Without torch: a new head on the cut features, two groups, a frozen first conv."""
    path = _export_forward(_og_net(), np.zeros((4, 3, 8, 8), np.float32), tmp_path / "cnn.onnx")
    with warnings.catch_warnings():  # an onnxgrad export is at onnxgrad's opset: no conversion
        warnings.simplefilter("error")
        backbone = nn.OnnxModule(path)
    ref = _og_net()
    assert [n for n, _ in backbone.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in backbone.named_buffers()] == [
        n for n, _ in ref.named_buffers() if not n.endswith("num_batches_tracked")]

    # The features: what the last layer (a Gemm here) reads.
    last = next(n for n in reversed(onnx.load(path).graph.node) if "10.weight" in n.input)
    og.manual_seed(5)
    ours = nn.Sequential(nn.OnnxModule(path, outputs=[last.input[0]]), nn.Linear(8, 3))
    ref = nn.Sequential(_og_net()[:10], nn.Linear(8, 3))
    ref[1].load_state_dict(ours[1].state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for model in (ours, ref):
        next(iter(model[0].parameters())).requires_grad_(False)  # 0.weight: frozen
    frozen = np.array(next(iter(ours[0].parameters())).numpy())

    def optimizer(model):
        body = [p for p in model[0].parameters() if p.requires_grad]
        return og.optim.SGD([{"params": body, "lr": 0.02}, {"params": model[1].parameters()}],
                            lr=0.1, momentum=0.9, nesterov=True)

    batches = _batches((4, 3, 8, 8), 3, seed=6)
    losses = _og_train(ours, optimizer(ours), batches, compiled)
    np.testing.assert_allclose(losses, _og_train(ref, optimizer(ref), batches, compiled), **TIGHT)
    ref_state = {k: v for k, v in _state(ref).items() if not k.endswith("num_batches_tracked")}
    _assert_state(_state(ours), ref_state, **TIGHT)
    assert np.array_equal(next(iter(ours[0].parameters())).numpy(), frozen)


def test_two_imported_models_stacked_train_compiled(tmp_path: Path) -> None:
    def first() -> nn.Module:
        og.manual_seed(7)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU())

    def second() -> nn.Module:
        og.manual_seed(8)
        return nn.Sequential(nn.Linear(16, 4))

    a = _export_forward(first(), np.zeros((5, 6), np.float32), tmp_path / "a.onnx")
    b = _export_forward(second(), np.zeros((5, 16), np.float32), tmp_path / "b.onnx")
    ours = nn.Sequential(nn.OnnxModule(a), nn.OnnxModule(b))
    ref = nn.Sequential(first(), second())
    batches = _batches((5, 6), 4, seed=9)
    losses = _og_train(ours, og.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), batches,
                       compiled=True)
    expected = _og_train(ref, og.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), batches,
                         compiled=True)
    np.testing.assert_allclose(losses, expected, **TIGHT)
    _assert_state(_state(ours), _state(ref), **TIGHT)


# --------------------------------------------------------------------------- graphs by hand
def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_names_that_are_not_module_paths_are_sanitized_and_kept_for_export(
        tmp_path: Path) -> None:
    assert _qualified_names(["layer1.0.conv1.weight", "onnx::Conv_12", "a..b", "enc",
                             "enc.w"]) == {
        "layer1.0.conv1.weight": "layer1.0.conv1.weight", "onnx::Conv_12": "onnx::Conv_12",
        "enc.w": "enc.w", "a..b": "a__b", "enc": "enc_1"}
    rng = np.random.default_rng(10)
    weights = {"enc.w": rng.standard_normal((3, 4), dtype=np.float32),
               "enc": rng.standard_normal((4,), dtype=np.float32),
               "onnx::Mul_3": rng.standard_normal((4,), dtype=np.float32),
               "x..y": rng.standard_normal((4,), dtype=np.float32)}
    proto = _model([helper.make_node("MatMul", ["x", "enc.w"], ["h"]),
                    helper.make_node("Add", ["h", "enc"], ["h2"]),
                    helper.make_node("Mul", ["h2", "onnx::Mul_3"], ["h3"]),
                    helper.make_node("Add", ["h3", "x..y"], ["out"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                   [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])], weights)
    module = nn.OnnxModule(proto.SerializeToString())
    assert [n for n, _ in module.named_parameters()] == ["enc_1", "onnx::Mul_3", "x__y", "enc.w"]
    assert module.initializer_names["x__y"] == "x..y"
    opt = og.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)

    @og.compile
    def step(x, y):
        opt.zero_grad()
        loss = F.mse_loss(module(x), y)
        loss.backward()
        opt.step()
        return loss

    x, y = rng.standard_normal((2, 3), dtype=np.float32), np.zeros((2, 4), np.float32)
    step(x, y)
    step.export(tmp_path / "step.onnx")
    state = json.loads({p.key: p.value for p in onnx.load(tmp_path / "step.onnx")
                        .metadata_props}[STATE])
    assert {"x..y.new": "x..y", "momentum.x..y.new": "momentum.x..y",
            "enc.new": "enc"}.items() <= state.items()
    for name, p in module.named_parameters():
        assert not np.allclose(p.detach().numpy(), weights[module.initializer_names[name]]), name


def test_shapes_computed_in_the_graph_are_folded_into_constants() -> None:
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape: a constant shape, per input shape."""
    w = np.random.default_rng(11).standard_normal((3, 4), dtype=np.float32)
    proto = _model([
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["h", "target"], ["r"]),
        helper.make_node("ReduceSum", ["r", "last"], ["out"], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])],
        {"w": w, "zero": np.asarray(0, np.int64), "axes": np.asarray([0], np.int64),
         "tail": np.asarray([2, 2], np.int64), "last": np.asarray([2], np.int64)})
    module = nn.OnnxModule(proto)
    assert [n for n, _ in module.named_parameters()] == ["w"]
    forward = og.compile(module)
    for n in (5, 2):
        x = np.random.default_rng(n).standard_normal((n, 3), dtype=np.float32)
        np.testing.assert_allclose(forward(x).numpy(), (x @ w).reshape(n, 2, 2).sum(2), **TIGHT)
        ops = {node.op_type for node in forward.last.model.graph.node}
        assert not ops & {"Shape", "Gather", "Unsqueeze", "Concat"}, ops
    assert len(forward._programs) == 2  # the symbolic N is bound per input shape


def test_dropout_follows_train_and_eval() -> None:
    proto = _model([helper.make_node("Mul", ["x", "w"], ["h"]),
                    helper.make_node("Dropout", ["h", "ratio"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
                   {"w": np.ones((1, 256), np.float32), "ratio": np.asarray(0.5, np.float32)})
    module = nn.OnnxModule(proto)
    assert [n for n, _ in module.named_parameters()] == ["w"]  # a ratio is no parameter
    x = np.ones((1, 256), np.float32)
    module(x).sum().backward()
    assert set(np.unique(module.w.grad.numpy())) == {0.0, 2.0}
    module.eval()
    with og.no_grad():
        np.testing.assert_array_equal(module(x).numpy(), x)


def test_errors_name_the_node() -> None:
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                    helper.make_node("Celu", ["h"], ["y"], name="act/Celu")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                   {"w": np.ones((3, 3), np.float32)})
    module = nn.OnnxModule(proto)
    x = np.ones((2, 3), np.float32)
    with pytest.raises(NoGradientRule, match=r"no gradient rule for ONNX op 'Celu' "
                                              r"\(node act/Celu\)"):
        module(x)
    with og.no_grad():  # inference needs no rule
        assert module(x).shape == (2, 3)
    module.requires_grad_(False)  # nor does a frozen model
    assert module(x).shape == (2, 3)
    with pytest.raises(TrainGraphError, match=r"input 'x' has shape \[2, 3\], the data has "
                                              r"shape \[2, 4\]"):
        module(np.ones((2, 4), np.float32))
    # A node that ONNX Runtime rejects (no declared shape caught it first) is named too.
    loose = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   {"w": np.ones((3, 3), np.float32)})
    with pytest.raises(RuntimeError, match=r"node 'mm' \(MatMul\)"):
        nn.OnnxModule(loose)(np.ones((2, 4), np.float32))
    with pytest.raises(TrainGraphError, match=r"has no value \['nope'\]"):
        nn.OnnxModule(proto, outputs=["nope"])
    with pytest.raises(TypeError, match="expected a path, an onnx.ModelProto or bytes"):
        nn.OnnxModule(42)
