"""Inspection: the text dump (golden), summary counts against hand-counted graphs, DOT, loading
errors, ``og.inspect``/``og.summary`` on tensors and on objects that expose a model, pass dumps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxgrad.runtime.metadata import DATA_INPUTS, MODULE, ORIGIN, SOURCE, STATE

import onnxgrad as og
from onnxgrad.inspector import (
    InspectError,
    dump,
    format_graph,
    format_node,
    load_model,
    module_path,
    summary,
    to_dot,
)

F32 = TensorProto.FLOAT


def _node(op: str, ins: list[str], outs: list[str], origin: str | None = None,
          source: str | None = None, module: str | None = None, **attrs) -> onnx.NodeProto:
    node = helper.make_node(op, ins, outs, name=f"{op}_{outs[0]}", **attrs)
    for key, value in ((ORIGIN, origin), (SOURCE, source), (MODULE, module)):
        if value is not None:
            node.metadata_props.add(key=key, value=value)
    return node


def _model(nodes, inputs, outputs, initializers=(), name="g", **props) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                              producer_name="onnxgrad")
    model.ir_version = 10
    if props:
        helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


def step_model(*, metadata: bool = True) -> onnx.ModelProto:
    """A hand-made training step: conv -> relu -> flatten -> MatMul -> Gemm -> mean, one gradient
    node and an SGD-momentum update of the conv weight. Intermediate types are left to inference.

    Hand counts: 12 nodes (fwd 6, opt 5, grad 1); FLOPs: Conv 2*2*4*8*8*3*3*3 = 27648,
    MatMul 2*2*16*256 = 16384, Gemm 2*2*10*16 = 640; parameters: the state conv weight 4*3*3*3 =
    108 (the momentum buffer, read only by opt nodes, is 108 of optimizer state); without
    onnxgrad metadata the float initializers count instead: 256*16 + 10*16 + 10 = 4266.
    """
    weights = [numpy_helper.from_array(np.zeros(shape, np.float32), name) for name, shape in
               (("fc1.weight", (256, 16)), ("fc2.weight", (10, 16)), ("fc2.bias", (10,)))]
    axes = numpy_helper.from_array(np.array([0, 1], np.int64), "axes")
    mu = numpy_helper.from_array(np.array(0.9, np.float32))
    nodes = [
        _node("Conv", ["x", "conv.weight"], ["y"], "fwd", "model.py:12: y = conv(x)",
              "layer1.0.conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        _node("Relu", ["y"], ["r"], "fwd", "model.py:13: r = y.relu()", "layer1.0"),
        _node("Flatten", ["r"], ["flat"], "fwd", axis=1),
        _node("MatMul", ["flat", "fc1.weight"], ["h"], "fwd", module="fc1"),
        _node("Gemm", ["h", "fc2.weight", "fc2.bias"], ["logits"], "fwd", module="fc2",
              transB=1, alpha=0.5),
        _node("ReduceMean", ["logits", "axes"], ["loss"], "fwd", keepdims=0),
        _node("Mul", ["conv.weight", "lr"], ["grad.conv.weight"], "grad"),
        _node("Constant", [], ["mu"], "opt", value=mu),
        _node("Mul", ["momentum.conv.weight", "mu"], ["m_scaled"], "opt"),
        _node("Add", ["m_scaled", "grad.conv.weight"], ["momentum.conv.weight.new"], "opt"),
        _node("Mul", ["lr", "momentum.conv.weight.new"], ["step"], "opt"),
        _node("Sub", ["conv.weight", "step"], ["conv.weight.new"], "opt"),
    ]
    if not metadata:
        for node in nodes:
            del node.metadata_props[:]
    props = {
        STATE: json.dumps({"conv.weight.new": "conv.weight",
                           "momentum.conv.weight.new": "momentum.conv.weight"}),
        DATA_INPUTS: json.dumps(["x"]),
    } if metadata else {}
    w = [4, 3, 3, 3]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, [2, 3, 8, 8]),
         helper.make_tensor_value_info("conv.weight", F32, w),
         helper.make_tensor_value_info("momentum.conv.weight", F32, w),
         helper.make_tensor_value_info("lr", F32, [])],
        [helper.make_tensor_value_info("loss", F32, []),
         helper.make_tensor_value_info("conv.weight.new", F32, w),
         helper.make_tensor_value_info("momentum.conv.weight.new", F32, w)],
        [*weights, axes], name="step", **props)


GOLDEN_STEP = """\
graph step: 4 inputs, 4 initializers, 12 nodes, 3 outputs
inputs:
  %x: f32[2,3,8,8]  (data)
  %conv.weight: f32[4,3,3,3]  (state <- %conv.weight.new)
  %momentum.conv.weight: f32[4,3,3,3]  (state <- %momentum.conv.weight.new)
  %lr: f32[]
initializers:
  %fc1.weight: f32[256,16]
  %fc2.weight: f32[10,16]
  %fc2.bias: f32[10]
  %axes: i64[2] = [0,1]
nodes:
  %y: f32[2,4,8,8] = Conv(%x, %conv.weight) {kernel_shape=[3,3], pads=[1,1,1,1], strides=[1,1]}  # fwd  (model.py:12: y = conv(x))
  %r: f32[2,4,8,8] = Relu(%y)  # fwd  (model.py:13: r = y.relu())
  %flat: f32[2,256] = Flatten(%r) {axis=1}  # fwd
  %h: f32[2,16] = MatMul(%flat, %fc1.weight)  # fwd
  %logits: f32[2,10] = Gemm(%h, %fc2.weight, %fc2.bias) {alpha=0.5, transB=1}  # fwd
  %loss: f32[] = ReduceMean(%logits, %axes) {keepdims=0}  # fwd
  %grad.conv.weight: f32[4,3,3,3] = Mul(%conv.weight, %lr)  # grad
  %mu: f32[] = Constant() {value=<tensor f32[]: 0.9>}  # opt
  %m_scaled: f32[4,3,3,3] = Mul(%momentum.conv.weight, %mu)  # opt
  %momentum.conv.weight.new: f32[4,3,3,3] = Add(%m_scaled, %grad.conv.weight)  # opt
  %step: f32[4,3,3,3] = Mul(%lr, %momentum.conv.weight.new)  # opt
  %conv.weight.new: f32[4,3,3,3] = Sub(%conv.weight, %step)  # opt
outputs:
  %loss: f32[]
  %conv.weight.new: f32[4,3,3,3]  (state -> %conv.weight)
  %momentum.conv.weight.new: f32[4,3,3,3]  (state -> %momentum.conv.weight)"""


# --------------------------------------------------------------------------- text dump


def test_text_dump_golden() -> None:
    model = step_model()
    assert format_graph(model) == GOLDEN_STEP
    # The same text from every form of the same model.
    assert format_graph(ir.serde.deserialize_model(model)) == GOLDEN_STEP
    assert str(og.inspect(model)) == GOLDEN_STEP


def test_text_dump_leaves_the_callers_graph_alone() -> None:
    model = ir.serde.deserialize_model(step_model())
    before = [(v.name, v.type, v.shape) for node in model.graph for v in node.outputs]
    format_graph(model)
    assert [(v.name, v.type, v.shape) for node in model.graph for v in node.outputs] == before
    # Without inference, the types the graph does not carry stay unknown.
    assert "  %r: ? = Relu(%y)  # fwd" in format_graph(model, infer_shapes=False)


def test_text_dump_of_a_foreign_model_has_no_origin_comments() -> None:
    text = format_graph(step_model(metadata=False))
    assert "#" not in text
    assert "  %x: f32[2,3,8,8]\n" in text  # no (data) mark without metadata


def test_format_node_is_one_line() -> None:
    node = ir.serde.deserialize_model(step_model()).graph.node(0)
    node.metadata_props[SOURCE] = "model.py:12:   y = conv(\n x)"
    assert format_node(node) == (
        "%y: ? = Conv(%x, %conv.weight) {kernel_shape=[3,3], pads=[1,1,1,1], strides=[1,1]}"
        "  # fwd  (model.py:12: y = conv( x))"
    )


# --------------------------------------------------------------------------- summary


def test_summary_counts_a_hand_counted_step() -> None:
    s = summary(step_model())
    assert (s.graph_name, s.producer, s.ir_version, s.opsets) == ("step", "onnxgrad", 10,
                                                                  {"ai.onnx": 21})
    assert [str(t) for t in s.inputs] == ["x: f32[2,3,8,8]", "conv.weight: f32[4,3,3,3]",
                                          "momentum.conv.weight: f32[4,3,3,3]", "lr: f32[]"]
    assert [t.name for t in s.outputs] == ["loss", "conv.weight.new", "momentum.conv.weight.new"]
    assert s.state == {"conv.weight.new": "conv.weight",
                       "momentum.conv.weight.new": "momentum.conv.weight"}
    assert s.data_inputs == ["x"]
    assert s.num_nodes == 12 and s.num_subgraph_nodes == 0
    assert s.origin_counts == {"fwd": 6, "opt": 5, "grad": 1}
    assert s.op_counts["Mul"] == 3 and sum(s.op_counts.values()) == 12
    assert (s.param_count, s.param_bytes) == (108, 432)
    assert (s.opt_state_count, s.opt_state_bytes) == (108, 432)
    assert s.flops_by_op == {"Conv": 27648, "MatMul": 16384, "Gemm": 640}
    assert s.flops == 27648 + 16384 + 640 and not s.flops_unknown
    largest = [(t.name, t.type, t.nbytes) for t in s.largest_intermediates]
    assert largest[:4] == [("flat", "f32[2,256]", 2048), ("r", "f32[2,4,8,8]", 2048),
                           ("y", "f32[2,4,8,8]", 2048), ("grad.conv.weight", "f32[4,3,3,3]", 432)]
    assert all(t.name not in ("loss", "conv.weight.new") for t in s.largest_intermediates)
    assert not s.warnings

    text = str(s)
    assert repr(s) == text
    for line in ("  conv.weight           f32[4,3,3,3]  state <- conv.weight.new",
                 "  by origin: fwd 6, opt 5, grad 1",
                 "parameters: 108 (432 B)",
                 "optimizer state: 108 (432 B)",
                 "FLOPs per run: 44,672 (44.67 KFLOP)",
                 "  flat              f32[2,256]    2.00 KiB"):
        assert line in text.splitlines(), line


def test_summary_of_a_foreign_model() -> None:
    s = summary(step_model(metadata=False))
    assert s.origin_counts == {"unknown": 12}
    assert s.state == {} and s.data_inputs == []
    # Without onnxgrad's metadata, the float initializers are the parameters (not the i64 axes).
    assert (s.param_count, s.param_bytes) == (4266, 4266 * 4)
    assert s.opt_state_count == 0 and "optimizer state" not in str(s)
    assert "by origin: unknown 12" in str(s)


def test_flops_of_conv_variants_matmul_and_gemm() -> None:
    init = [numpy_helper.from_array(np.zeros(shape, np.float32), name) for name, shape in
            (("wg", (6, 2, 3, 3)), ("wt", (4, 5, 2, 2)), ("b", (7, 2)), ("gb", (7, 3)))]
    nodes = [
        # Grouped, strided conv: Hout = Wout = (8 + 2 - 3) // 2 + 1 = 4.
        _node("Conv", ["x", "wg"], ["c"], group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
        _node("ConvTranspose", ["xt", "wt"], ["ct"], strides=[2, 2]),
        _node("MatMul", ["a", "b"], ["m"]),
        _node("Gemm", ["ga", "gb"], ["gm"], transA=1),
        _node("MatMul", ["d", "b"], ["dm"]),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, [1, 4, 8, 8]),
         helper.make_tensor_value_info("xt", F32, [1, 4, 4, 4]),
         helper.make_tensor_value_info("a", F32, [3, 5, 7]),
         helper.make_tensor_value_info("ga", F32, [7, 5]),
         helper.make_tensor_value_info("d", F32, ["N", 7])],
        [helper.make_tensor_value_info(n, F32, [None] * rank)
         for n, rank in (("c", 4), ("ct", 4), ("m", 3), ("gm", 2), ("dm", 2))],
        init)
    s = summary(model)
    conv = 2 * 1 * 6 * 4 * 4 * (4 // 2) * 3 * 3  # 2*N*Cout*Hout*Wout*Cin/groups*kh*kw
    conv_t = 2 * (1 * 4 * 4 * 4) * (5 * 2 * 2)  # each input element scattered to Cout*kh*kw
    matmul = 2 * (3 * 5 * 2) * 7 + 2 * (1 * 2) * 7  # the second with its batch N taken as 1
    gemm = 2 * 5 * 3 * 7  # A is [K, M] with transA
    assert s.flops_by_op == {"Conv": conv, "ConvTranspose": conv_t, "MatMul": matmul,
                             "Gemm": gemm}
    assert s.symbols_as_1 == ["N"]
    assert "FLOPs per run with N=1:" in str(s)


def test_flops_of_unknown_shapes_are_reported_not_guessed() -> None:
    model = _model([_node("MatMul", ["a", "b"], ["m"])],
                   [helper.make_tensor_value_info("a", F32, [None, 4]),  # a dim without a name
                    helper.make_tensor_value_info("b", F32, [4, 2])],
                   [helper.make_tensor_value_info("m", F32, [None, 2])])
    s = summary(model)
    assert s.flops == 0 and s.flops_unknown == ["MatMul_m"]
    assert "plus 1 node(s) with unknown shapes" in str(s)


def test_malformed_metadata_is_a_warning() -> None:
    model = step_model()
    helper.set_model_props(model, {STATE: "[not json", DATA_INPUTS: '{"x": 1}'})
    s = summary(model)
    assert s.state == {} and len(s.warnings) == 2


# --------------------------------------------------------------------------- DOT


def test_dot_colours_by_origin_and_clusters_by_module() -> None:
    dot = to_dot(step_model())
    assert dot.startswith('digraph "step" {') and dot.rstrip().endswith("}")
    assert 'label="layer1"' in dot and 'label="layer1.0"' in dot and 'label="fc2"' in dot
    lines = dot.splitlines()
    conv = next(line for line in lines if '[label="Conv"' in line)
    assert 'fillcolor="#cfe2ff"' in conv and "model.py:12" in conv
    grad = next(line for line in lines if '[label="Mul"' in line and "origin: grad" in line)
    assert 'fillcolor="#f8d7da"' in grad
    # Conv is nested two clusters deep (layer1 > layer1.0), Gemm one (fc2), Flatten in none.
    indent = {line.split()[0]: len(line) - len(line.lstrip()) for line in lines
              if line.strip() and "->" not in line}
    assert (indent["n0"], indent["n4"], indent["n2"]) == (6, 4, 2)
    assert "in_0 -> n0" in dot and "n11 -> out_1" in dot
    assert "fc1.weight" not in dot  # initializers are not drawn


def test_module_path_from_metadata_or_node_names() -> None:
    def node(name: str, module: str | None = None) -> ir.Node:
        n = ir.Node("", "Relu", [ir.Value(name="x")], name=name)
        if module:
            n.metadata_props[MODULE] = module
        return n

    assert module_path(node("/layer1/layer1.0/conv1/Conv")) == "layer1.0.conv1"
    assert module_path(node("layer1.0.conv1/Conv_3")) == "layer1.0.conv1"
    assert module_path(node("Relu_7")) == ""
    assert module_path(node("whatever", "fc")) == "fc"


# --------------------------------------------------------------------------- loading


def test_load_model_errors_are_one_line(tmp_path: Path) -> None:
    good = step_model().SerializeToString()
    cases = {"missing.onnx": None, "empty.onnx": b"", "text.onnx": b"hello, I am not a model\n",
             "noise.onnx": bytes(range(256)) * 4}
    # Cuts inside a message fail to decode; a cut between fields parses, so the checker has to
    # catch it (the opset imports come after the graph).
    cuts = [10, len(good) // 2, len(good) - 3, good.rindex(b"\x42") if b"\x42" in good else 20]
    for i, cut in enumerate(cuts):
        cases[f"cut{i}.onnx"] = good[:cut]
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(InspectError) as info:
            load_model(path)
        message = str(info.value)
        assert "\n" not in message and message.startswith(str(path)), message
    with pytest.raises(InspectError, match="is a directory"):
        load_model(tmp_path)
    (tmp_path / "ok.onnx").write_bytes(good)
    assert load_model(tmp_path / "ok.onnx").graph.name == "step"


# --------------------------------------------------------------------------- og.inspect/summary


def test_inspect_a_tensor_history() -> None:
    x = og.tensor(np.ones((2, 3), np.float32))
    w = og.tensor(np.ones((3, 4), np.float32), requires_grad=True)
    y = og.relu(og.matmul(x, w))  # the line the dump must show
    z = og.transpose(y, 0, 1) * 2.0

    text = og.inspect(z)
    lines = text.splitlines()
    assert lines[0] == "graph history: 2 inputs, 1 initializers, 4 nodes, 1 outputs"
    assert lines[2:4] == ["  %in0: f32[2,3]  (data)", "  %in1: f32[3,4]  (parameter)"]
    assert "  %in2: f32[] = 2.0" in lines
    matmul = next(line for line in lines if "= MatMul(" in line)
    assert matmul.startswith("  %r0_0: f32[2,4] = MatMul(%in0, %in1)  # fwd  (test_inspect.py:")
    assert matmul.endswith(": y = og.relu(og.matmul(x, w)) # the line the dump must show)")
    assert any("= Transpose(%r1_0) {perm=[1,0]}" in line for line in lines)
    assert repr(text) == str(text)  # shown as text in a REPL

    s = og.summary(z)
    assert (s.param_count, s.num_nodes, s.flops) == (12, 4, 2 * 2 * 4 * 3)
    assert s.data_inputs == ["in0"]


def test_inspect_a_tensor_without_history() -> None:
    x = og.tensor([1.0, 2.0])
    assert "no recorded history" in og.inspect(x * 2)
    w = og.tensor([1.0, 2.0], requires_grad=True)
    assert "leaf that requires grad" in og.inspect(w)
    y = w * w
    y.backward(og.ones(2))
    assert "freed by backward()" in og.inspect(y)
    with pytest.raises(ValueError, match="no recorded history"):
        og.summary(x)


def test_inspect_accepts_models_paths_and_the_protocol(tmp_path: Path) -> None:
    proto = step_model()
    path = tmp_path / "step.onnx"
    path.write_bytes(proto.SerializeToString())

    class Compiled:  # how a compiled step plugs in
        def __onnxgrad_model__(self):
            return ir.serde.deserialize_model(proto)

    class HasModel:
        model = proto

    class Exports:
        def to_onnx(self):
            return proto

    class Wrapper:
        graph = Compiled()

    for obj in (proto, ir.serde.deserialize_model(proto), str(path), path, Compiled(),
                HasModel(), Exports(), Wrapper()):
        assert og.inspect(obj) == GOLDEN_STEP, type(obj)
    assert og.summary(Compiled()).flops == 44672
    assert og.inspect(ir.serde.deserialize_model(proto).graph).startswith("graph step:")
    with pytest.raises(TypeError, match="cannot inspect a int"):
        og.inspect(3)
    with pytest.raises(InspectError, match="no such file"):
        og.inspect(tmp_path / "missing.onnx")


def test_inspect_a_compiled_step_and_its_export(tmp_path: Path) -> None:
    nn = og.nn
    og.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    optim = og.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    @og.compile
    def step(x, y):
        optim.zero_grad()
        loss = og.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optim.step()
        return loss

    step(np.ones((5, 3), np.float32), np.zeros(5, np.int64))
    s = og.summary(step)  # through __onnxgrad_model__
    assert {"fwd", "grad", "opt"} <= set(s.origin_counts)
    n_params = 3 * 4 + 4 + 4 * 2 + 2
    assert (s.param_count, s.opt_state_count) == (n_params, n_params)
    assert set(s.data_inputs) == {"x", "y"} and len(s.state) == 2 * 4
    text = og.inspect(step)
    assert "# fwd  (test_inspect.py:" in text and "optim.step())" in text

    path = tmp_path / "step.onnx"
    step.export(path)
    assert og.summary(path).param_count == n_params


# --------------------------------------------------------------------------- ONNXGRAD_DUMP


def test_dump_is_off_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dump.ENV_VAR, raising=False)
    assert dump.dump_graph("x", step_model()) is None


def test_onnxgrad_dump_writes_the_backward_graph(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "dumps"
    monkeypatch.setenv(dump.ENV_VAR, str(out))
    # Shapes no other test uses, so backward builds (and dumps) a fresh plan.
    x = og.tensor(np.ones((3, 5), np.float32))
    w = og.tensor(np.ones((5, 7), np.float32), requires_grad=True)
    og.relu(og.matmul(x, w)).backward(og.ones(3, 7))
    assert sorted(p.name for p in out.iterdir()) == ["001-backward.onnx", "001-backward.txt"]
    text = (out / "001-backward.txt").read_text()
    assert text.startswith("graph backward:") and "  # grad" in text
    model = load_model(out / "001-backward.onnx")
    assert format_graph(model) + "\n" == text

    # Numbering continues; names are made file-safe.
    paths = dump.dump_graph("compile/autodiff pass", ir.serde.deserialize_model(step_model()).graph)
    assert [p.name for p in paths] == ["002-compile_autodiff_pass.onnx",
                                       "002-compile_autodiff_pass.txt"]
    assert load_model(paths[0], check=False).graph.name == "step"


def test_large_graphs_are_drawn_by_module_group() -> None:
    from onnx import TensorProto, helper

    from onnxgrad.inspector import MAX_DOT_NODES, to_dot

    n = MAX_DOT_NODES + 10
    nodes = [helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"]) for i in range(n)]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("v0", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info(f"v{n}", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    collapsed = to_dot(model)
    assert f"{n} nodes drawn as 1 module groups" in collapsed
    assert collapsed.count("->") == 0
    full = to_dot(model, collapse=False)
    assert full.count(" -> ") >= n
