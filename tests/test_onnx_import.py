"""Importing ONNX files: recurrent nodes, sequence ops, CastLike, what trains by default, the
folded-BatchNorm warning and errors on missing shapes."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxgrad.runtime import OPSET

import onnxgrad as og
from onnxgrad import nn

TOL = {"rtol": 1e-4, "atol": 1e-5}


def _model(nodes: list, inputs: list, outputs: list, inits: list | None = None,
           producer: str = "") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.producer_name = producer
    return model


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _f(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# --------------------------------------------------------------------------- recurrent nodes
RECURRENT_CASES = [
    pytest.param("LSTM", "forward", 0, {}, id="lstm-forward"),
    pytest.param("LSTM", "reverse", 0, {}, id="lstm-reverse"),
    pytest.param("LSTM", "bidirectional", 1, {}, id="lstm-bidirectional-layout1"),
    pytest.param("GRU", "forward", 0, {"linear_before_reset": 1}, id="gru-reset-after"),
    pytest.param("GRU", "bidirectional", 0, {}, id="gru-reset-before-bidirectional"),
    pytest.param("RNN", "forward", 0, {}, id="rnn-tanh"),
    pytest.param("RNN", "bidirectional", 0, {"activations": ["Relu", "Relu"]}, id="rnn-relu"),
]


def _recurrent_model(op: str, direction: str, layout: int, attrs: dict, with_state: bool
                     ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    dirs, hidden, length, batch, width = 2 if direction == "bidirectional" else 1, 4, 5, 3, 2
    rng = np.random.default_rng(0)
    w = rng.uniform(-0.7, 0.7, (dirs, gates * hidden, width)).astype(np.float32)
    r = rng.uniform(-0.7, 0.7, (dirs, gates * hidden, hidden)).astype(np.float32)
    b = rng.uniform(-0.7, 0.7, (dirs, 2 * gates * hidden)).astype(np.float32)
    x_shape = [batch, length, width] if layout else [length, batch, width]
    s_shape = [batch, dirs, hidden] if layout else [dirs, batch, hidden]
    names = ["X", "W", "R", "B", "", "initial_h" if with_state else ""]
    feeds = {"X": rng.standard_normal(x_shape).astype(np.float32)}
    inputs = [_f("X", x_shape)]
    if with_state:
        feeds["initial_h"] = rng.standard_normal(s_shape).astype(np.float32)
        inputs.append(_f("initial_h", s_shape))
        if op == "LSTM":
            names.append("initial_c")
            feeds["initial_c"] = rng.standard_normal(s_shape).astype(np.float32)
            inputs.append(_f("initial_c", s_shape))
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, names, outs, direction=direction, hidden_size=hidden,
                            layout=layout, **attrs)
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"))]
    return _model([node], inputs, [_f(o, None) for o in outs], inits), feeds


@pytest.mark.parametrize("op, direction, layout, attrs", RECURRENT_CASES)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_recurrent_nodes_replay_as_onnx_runtime_runs_them(op: str, direction: str, layout: int,
                                                           attrs: dict, with_state: bool) -> None:
    model, feeds = _recurrent_model(op, direction, layout, attrs, with_state)
    if layout:  # NOTE: ONNX Runtime's CPU kernels refuse layout=1; ONNX's reference runs it
        from onnx.reference import ReferenceEvaluator

        expected = ReferenceEvaluator(model).run(None, feeds)
    else:
        expected = _ort(model, feeds)
    module = nn.OnnxModule(model)
    got = module(*[og.tensor(a) for a in feeds.values()])
    for ours, theirs, name in zip(got, expected, ["Y", "Y_h", "Y_c"]):
        assert tuple(ours.shape) == theirs.shape, name
        np.testing.assert_allclose(ours.detach().numpy(), theirs, **TOL, err_msg=name)
    # Gradients flow to W, R and B through the unrolled cells.
    sum(o.sum() for o in got).backward()
    assert all(p.grad is not None and np.abs(p.grad.numpy()).sum() > 0
               for p in module.parameters())


def test_sequence_lens_shorter_than_the_sequence_is_a_clear_error() -> None:
    model, feeds = _recurrent_model("LSTM", "forward", 0, {}, False)
    node = model.graph.node[0]
    node.input[4] = "lens"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([5, 3, 5], np.int32),
                                                                "lens"))
    with pytest.raises(ValueError, match=r"sequence_lens \[5, 3, 5\].*length 5"):
        nn.OnnxModule(model)(og.tensor(feeds["X"]))
    model.graph.initializer[-1].CopyFrom(onnx.numpy_helper.from_array(np.full(3, 5, np.int32),
                                                                      "lens"))
    np.testing.assert_allclose(nn.OnnxModule(model)(og.tensor(feeds["X"]))[0].detach().numpy(),
                               _ort(model, feeds)[0], **TOL)


# --------------------------------------------------------------------------- PyTorch's exports
def _torch_classifier(torch: Any, kind: str) -> Any:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = getattr(torch.nn, kind)(5, 7, num_layers=2, bidirectional=True,
                                               batch_first=True)
            self.fc = torch.nn.Linear(14, 3)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.fc(out[:, -1])

    torch.manual_seed(0)
    return Net()


def _onnx_layout(torch_params: dict[str, np.ndarray], kind: str, layer: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's layer ``layer`` as ONNX's W, R, B (gates reordered: LSTM ifgo -> iofc, GRU
    rzn -> zrh; directions stacked; input and hidden biases concatenated)."""
    order = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2]}[kind]

    def reorder(a: np.ndarray) -> np.ndarray:
        return np.concatenate([np.split(a, len(order))[k] for k in order])

    ws, rs, bs = [], [], []
    for sfx in (f"_l{layer}", f"_l{layer}_reverse"):
        ws.append(reorder(torch_params[f"rnn.weight_ih{sfx}"]))
        rs.append(reorder(torch_params[f"rnn.weight_hh{sfx}"]))
        bs.append(np.concatenate([reorder(torch_params[f"rnn.bias_ih{sfx}"]),
                                  reorder(torch_params[f"rnn.bias_hh{sfx}"])]))
    return np.stack(ws), np.stack(rs), np.stack(bs)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("how, exporter", [("training_step", "torchscript"),
                                           ("OnnxModule-compiled", "torchscript"),
                                           ("training_step", "dynamo")])
def test_torch_recurrent_classifier_trains_like_pytorch(tmp_path: Path, kind: str, how: str,
                                                        exporter: str) -> None:
    torch = pytest.importorskip("torch")
    model = _torch_classifier(torch, kind)
    path = tmp_path / f"{kind}.onnx"
    if exporter == "dynamo":
        # Its optimizer folds the zero initial states into initializers: they must not train.
        _dynamo_export(torch, model, path, optimize=True, example=torch.zeros(6, 4, 5))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(6, 4, 5),), str(path), dynamo=False,
                              opset_version=17, input_names=["x"], output_names=["logits"])
    assert kind in {n.op_type for n in onnx.load(path).graph.node}
    t_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # opset conversion
        if how == "training_step":
            step = og.training_step(path, lr=0.1, momentum=0.9)
            module = step.module
        else:
            module = nn.OnnxModule(path)
            opt = og.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)

            @og.compile
            def step(x, y):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(module(x), y)
                loss.backward()
                opt.step()
                return loss
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((6, 4, 5)).astype(np.float32)
        y = rng.integers(0, 3, 6)
        ours = step(x, y) if how == "training_step" else step(og.tensor(x), og.tensor(y))
        t_opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        t_opt.step()
        np.testing.assert_allclose(float(np.asarray(ours.item() if hasattr(ours, "item")
                                                    else ours)), loss.item(), **TOL)
    # Every parameter after 3 steps: SGD is elementwise, so PyTorch's tensors reordered into
    # ONNX's layout must equal the file's concatenated initializers.
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ours_state = {module.initializer_names.get(k, k): v.numpy()
                  for k, v in module.state_dict().items()}
    np.testing.assert_allclose(ours_state["fc.weight"], theirs["fc.weight"], **TOL)
    graph = onnx.load(path).graph
    recurrent = [n for n in graph.node if n.op_type == kind]
    # Exactly PyTorch's parameters train (in ONNX's layout): no initial state, no constant.
    assert sorted(_trained(module)) == sorted(
        ["fc.weight", "fc.bias"] + [name for n in recurrent for name in n.input[1:4]])
    for layer, node in enumerate(recurrent):
        for name, value in zip(node.input[1:4], _onnx_layout(theirs, kind, layer)):
            np.testing.assert_allclose(ours_state[name], value, **TOL, err_msg=name)


# --------------------------------------------------------------------------- what trains
def _trained(module: nn.OnnxModule) -> list[str]:
    """The file's names of the module's parameters."""
    return [module.initializer_names[q] for q, _ in module.named_parameters()]


def test_only_weights_train_by_default_scalars_and_settings_never() -> None:
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(a, n) for n, a in [
        ("w", rng.standard_normal((4, 3)).astype(np.float32)),       # MatMul weight
        ("b1", np.zeros(1, np.float32)),                              # Gemm bias of one element
        ("w2", rng.standard_normal((3, 1)).astype(np.float32)),
        ("scale", np.array(0.125, np.float32)),                       # attention-like scale
        ("half", np.array(0.5, np.float32)),                          # GELU's 0.5
        ("one", np.ones(1, np.float32)),                              # [1.0]: a constant
        ("lo", np.array(0.0, np.float32)), ("hi", np.array(6.0, np.float32)),
        ("shift", rng.standard_normal(3).astype(np.float32)),         # a learned offset
    ]]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("Mul", ["a", "scale"], ["b"]),
        helper.make_node("Mul", ["b", "half"], ["c"]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["d"]),
        helper.make_node("Add", ["d", "shift"], ["e"]),
        helper.make_node("Gemm", ["e", "w2", "b1"], ["f"]),
        helper.make_node("Add", ["f", "one"], ["y"]),
    ]
    model = _model(nodes, [_f("x", [2, 4])], [_f("y", [2, 1])], inits)
    module = nn.OnnxModule(model)
    assert sorted(_trained(module)) == ["b1", "shift", "w", "w2"]
    text = repr(module)
    assert "4 parameters" in text and "not trained" in text and "scale" in text
    # onnxgrad inspect / og.summary show the same choice for the file.
    assert "not trained when imported (5 float constants): scale, half, one, lo, hi" in \
        str(og.summary(model))
    # Overridable: by names (a scalar included, as asked) or by a predicate on the default.
    assert set(_trained(nn.OnnxModule(model, parameters=["w", "scale"]))) == \
        {"w", "scale"}
    assert set(_trained(nn.OnnxModule(model, parameters=lambda n: n != "w"))) \
        == {"b1", "shift", "w2"}
    x = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(module(og.tensor(x)).detach().numpy(),
                               _ort(model, {"x": x})[0], **TOL)


def _conv_model(bias: bool, bn: bool, producer: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                                          "conv.weight")]
    conv_in = ["x", "conv.weight"]
    if bias:
        inits.append(onnx.numpy_helper.from_array(np.zeros(4, np.float32), "conv.bias"))
        conv_in.append("conv.bias")
    nodes = [helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1])]
    if bn:
        for name, value in [("s", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0)]:
            inits.append(onnx.numpy_helper.from_array(np.full(4, value, np.float32), name))
        nodes.append(helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]))
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    return _model(nodes, [_f("x", [2, 3, 4, 4])], [_f("y", [2, 4, 4, 4])], inits, producer)


def test_folded_batchnorm_warns_once_with_what_to_do() -> None:
    from onnxgrad.nn.onnx_module import FoldedBatchNormWarning

    with pytest.warns(FoldedBatchNormWarning, match="folded eval-mode BatchNorm.*optimize=False"):
        nn.OnnxModule(_conv_model(bias=True, bn=False, producer="pytorch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these look folded
        nn.OnnxModule(_conv_model(bias=True, bn=True, producer="pytorch"))
        nn.OnnxModule(_conv_model(bias=False, bn=False, producer="pytorch"))
        nn.OnnxModule(_conv_model(bias=True, bn=False, producer="tf2onnx"))
        # The documented way to silence it.
        warnings.filterwarnings("ignore", category=FoldedBatchNormWarning)
        nn.OnnxModule(_conv_model(bias=True, bn=False, producer="pytorch"))


# --------------------------------------------------------------------------- dynamo exports
def _dynamo_net(torch: Any) -> Any:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            a, b = x.chunk(2, dim=1)  # SplitToSequence + SequenceAt when not optimized
            x = torch.cat([a * b * 0.5, a], 1).mean(dim=(2, 3))
            return self.fc(x)

    torch.manual_seed(0)
    return Net()


def _dynamo_export(torch: Any, model: Any, path: Path, optimize: bool,
                   example: Any = None) -> onnx.ModelProto:
    pytest.importorskip("onnxscript")
    model.eval()
    example = torch.zeros(4, 3, 8, 8) if example is None else example
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=True,
                          optimize=optimize, input_names=["x"], output_names=["logits"],
                          verbose=False)
    return onnx.load(path)


def test_dynamo_export_without_optimization_trains_like_pytorch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = _dynamo_net(torch)
    proto = _dynamo_export(torch, model, tmp_path / "net.onnx", optimize=False)
    ops = {n.op_type for n in proto.graph.node}
    assert {"SplitToSequence", "SequenceAt", "BatchNormalization"} <= ops
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # opset conversion, nothing else
        module = nn.OnnxModule(tmp_path / "net.onnx")
    assert sorted(_trained(module)) == sorted(n for n, _ in model.named_parameters())
    opt = og.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    t_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    module.train()

    @og.compile
    def step(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        return loss

    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
        y = rng.integers(0, 3, 4)
        ours = step(og.tensor(x), og.tensor(y)).item()
        t_opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        t_opt.step()
        np.testing.assert_allclose(ours, loss.item(), **TOL)
    theirs = model.state_dict()
    for name, value in module.state_dict().items():
        np.testing.assert_allclose(value.numpy(), theirs[name].numpy(), **TOL, err_msg=name)


def test_dynamo_export_with_folded_batchnorm_warns_and_keeps_scalars_fixed(
        tmp_path: Path) -> None:
    from onnxgrad.nn.onnx_module import FoldedBatchNormWarning

    torch = pytest.importorskip("torch")
    proto = _dynamo_export(torch, _dynamo_net(torch), tmp_path / "net.onnx", optimize=True)
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = nn.OnnxModule(tmp_path / "net.onnx")
    assert [w.category for w in caught].count(FoldedBatchNormWarning) == 1
    scalars = [t.name for t in proto.graph.initializer if not t.dims]
    assert scalars  # the exporter's 0.5
    assert not set(scalars) & set(_trained(module))
    assert set(_trained(module)) == {"conv.weight", "conv.bias", "fc.weight",
                                                      "fc.bias"}


def test_cast_like_replays_as_cast() -> None:
    nodes = [helper.make_node("CastLike", ["x", "like"], ["c"]),
             helper.make_node("Mul", ["c", "w"], ["y"])]
    inits = [onnx.numpy_helper.from_array(np.array([1.0, 2.0, 3.0]), "like"),
             onnx.numpy_helper.from_array(np.array([0.5, -1.0, 2.0]), "w")]
    model = _model(nodes, [_f("x", [3])], [helper.make_tensor_value_info(
        "y", TensorProto.DOUBLE, [3])], inits)
    module = nn.OnnxModule(model, parameters=["w"])
    x = og.tensor(np.array([1.0, 2.0, 4.0], np.float32))
    y = module(x)
    assert y.dtype == np.float64
    y.sum().backward()
    np.testing.assert_allclose(module.w.grad.numpy(), [1.0, 2.0, 4.0])


# --------------------------------------------------------------------------- missing shapes
def test_a_rule_missing_a_shape_names_the_node_and_the_value() -> None:
    import onnx_ir as ir
    from onnxgrad.passes.autodiff import ShapeUnknownError, gradients
    from onnxgrad.passes.builder import Builder

    x = ir.Value(name="table", type=ir.TensorType(ir.DataType.FLOAT))  # no shape at all
    idx = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2]))
    node = ir.Node("", "Gather", [x, idx], name="embedding", num_outputs=1)
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    seed = ir.Value(name="dy", type=ir.TensorType(ir.DataType.FLOAT))
    with pytest.raises(ShapeUnknownError, match=r"Gather node 'embedding'.*%table \(rank unknown"):
        gradients(Builder([]), [node.outputs[0]], [seed], [x])


# --------------------------------------------------------------------------- spatial ops
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo", "dynamo-unoptimized"])
def test_torch_decoder_with_pads_resizes_and_transposed_convs_trains_like_pytorch(
        tmp_path: Path, exporter: str) -> None:
    """Pad (reflect, replicate), Resize (nearest, bilinear) and ConvTranspose from a file."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.up = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)
            self.conv2 = torch.nn.Conv2d(6, 4, 3)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            f = torch.nn.functional
            x = torch.relu(self.conv(f.pad(x, (1, 1, 1, 1), mode="reflect")))
            x = torch.tanh(self.up(x))
            x = f.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = self.conv2(f.pad(x, (1, 1, 1, 1), mode="replicate"))
            x = f.interpolate(x, size=(5, 7), mode="nearest")
            return self.fc(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Net()
    path = tmp_path / "decoder.onnx"
    if exporter.startswith("dynamo"):
        _dynamo_export(torch, model, path, optimize=exporter == "dynamo",
                       example=torch.zeros(2, 3, 6, 6))
        model.train()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(2, 3, 6, 6),), str(path), dynamo=False,
                              opset_version=17, input_names=["x"], output_names=["logits"])
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"Pad", "Resize", "ConvTranspose"} <= ops
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # opset conversion; biased convs, no BN
        step = og.training_step(path, lr=0.1, momentum=0.9)
    t_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
        y = rng.integers(0, 3, 2)
        ours = float(np.asarray(step(x, y)))
        t_opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        t_opt.step()
        np.testing.assert_allclose(ours, loss.item(), **TOL)
    state = {step.module.initializer_names.get(k, k): v.numpy()
             for k, v in step.module.state_dict().items()}
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(state[name], value.numpy(), **TOL, err_msg=name)
