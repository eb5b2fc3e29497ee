"""``export(path, portable=True, opset=...)``: the portable format and its exact rewrites.

The portable file is the default export's step rewritten op for op (``passes/portable.py``) and
lowered to opset 17; ONNX Runtime runs it bit for bit as it runs the default file (every rewrite
reproduces ONNX Runtime's own kernel: same operations in the same order), so the loops are
compared with ``assert_array_equal``. The reference evaluator (NumPy, its own summation order) is
compared with rtol 1e-4 / atol 1e-5, as in test_compile.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxgrad.passes.portable import lower_opset, rewrite_portable
from onnxgrad.runtime import OPSET
from onnxgrad.runtime.metadata import DATA_INPUTS, STATE, STATE_FILE
from onnxgrad.runtime.portable import read_safetensors, safetensors_bytes

import onnxgrad as og
from onnxgrad import nn
from onnxgrad.training import train_graph_main

F = og.nn.functional


# --------------------------------------------------------------------------- helpers
def _cnn() -> nn.Module:
    """Conv-BatchNorm-ReLU, resnet's stem pool (3x3, stride 2, padding 1: overlapping windows),
    a second Conv whose small output takes the Col2Im input gradient, Linear."""
    og.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def _step(model: nn.Module, **sgd) -> Callable:
    optim = og.optim.SGD(model.parameters(), **{"lr": 0.05, "momentum": 0.9, **sgd})

    @og.compile
    def step(x, y):
        optim.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
        return loss

    return step


def _batch(seed: int, n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 3, 8, 8), dtype=np.float32),
            "y": rng.integers(0, 5, n)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same trained step written both ways (after one step: BatchNorm statistics moved)."""
    folder = tmp_path_factory.mktemp("portable")
    step = _step(_cnn())
    step(_batch(0)["x"], _batch(0)["y"])
    step.export(folder / "default.onnx")
    step.export(folder / "step.onnx", portable=True)
    return {"default": folder / "default.onnx", "portable": folder / "step.onnx"}


def _meta(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _loop(run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], model: onnx.ModelProto,
          state: dict[str, np.ndarray], batches: list[dict[str, np.ndarray]]
          ) -> list[dict[str, np.ndarray]]:
    """What any runtime does with the metadata alone: feed the state, then feed it back."""
    feeds_for = json.loads(_meta(model)[STATE])
    names = [o.name for o in model.graph.output]
    results = []
    for batch in batches:
        out = dict(zip(names, run({**state, **batch})))
        state = {**state, **{feeds_for[name]: out[name] for name in feeds_for}}
        results.append(out)
    return results


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the default file's defaults are initializers: meant
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _portable_state(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(path)
    return read_safetensors(path.parent / _meta(model)[STATE_FILE])


# --------------------------------------------------------------------------- the format
def test_portable_file_is_checked_standard_onnx_at_opset_17(exported: dict[str, Path]) -> None:
    model = onnx.load(exported["portable"])
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert {n.domain for n in model.graph.node} <= {""}
    # No input has an initializer: OpenVINO would make it a constant, tract would never let a
    # feed override it.
    inputs = {i.name for i in model.graph.input}
    assert not inputs & {t.name for t in model.graph.initializer}


def test_state_file_holds_every_input_but_the_data(exported: dict[str, Path]) -> None:
    portable, default = onnx.load(exported["portable"]), onnx.load(exported["default"])
    meta = _meta(portable)
    assert meta[STATE_FILE] == "step.safetensors"
    # The metadata the default file has is the same.
    assert {k: v for k, v in meta.items() if k != STATE_FILE} == _meta(default)
    state = _portable_state(exported["portable"])
    data = json.loads(meta[DATA_INPUTS])
    assert data == ["x", "y"]
    assert set(state) == {i.name for i in portable.graph.input} - set(data)
    # The values are the default file's defaults, dtype and shape included (a 0-d int64 counter).
    defaults = {t.name: numpy_helper.to_array(t) for t in default.graph.initializer}
    for name, value in state.items():
        assert value.dtype == defaults[name].dtype and value.shape == defaults[name].shape, name
        np.testing.assert_array_equal(value, defaults[name], err_msg=name)
    assert state["1.num_batches_tracked"].shape == () and state["lr"] == np.float32(0.05)


def test_portable_ops_avoid_what_other_runtimes_lack(exported: dict[str, Path]) -> None:
    default, portable = onnx.load(exported["default"]), onnx.load(exported["portable"])
    before = {n.op_type for n in default.graph.node}
    # The default file has what the rewrites remove, or this test checks nothing.
    assert {"Col2Im", "BatchNormalization"} <= before
    assert any(n.op_type == "MaxPool" and len(n.output) == 2 for n in default.graph.node)
    ops = {n.op_type for n in portable.graph.node}
    assert not ops & {"Col2Im", "CastLike", "BatchNormalization"}
    pools = [n for n in portable.graph.node if n.op_type == "MaxPool"]
    # (with gradients, max_pool2d pools a NaN-as-inf key only for its Indices, which the
    # portable rewrite computes without MaxPool: no pool may be left with two outputs)
    assert all(len(n.output) == 1 for n in pools)
    # Rewritten nodes keep the origin and module of the node they replace (inspection).
    origins = {p.value for n in portable.graph.node for p in n.metadata_props
               if p.key == "onnxgrad.origin"}
    assert {"fwd", "grad", "opt"} <= origins


def test_safetensors_file_is_what_the_safetensors_package_reads(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "count": np.array(7, np.int64),
              "mask": np.array([True, False]), "d": np.linspace(0, 1, 5),
              "empty": np.zeros((0, 3), np.float16)}
    path = tmp_path / "s.safetensors"
    path.write_bytes(safetensors_bytes(arrays, {"k": "v"}))
    loaded = st.load_file(str(path))
    assert set(loaded) == set(arrays)
    for name, value in arrays.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        np.testing.assert_array_equal(loaded[name], value)
    # And ours reads the package's files.
    theirs = tmp_path / "t.safetensors"
    st.save_file(arrays, str(theirs))
    for name, value in read_safetensors(theirs).items():
        np.testing.assert_array_equal(value, arrays[name])


# --------------------------------------------------------------------------- the loops
def test_three_steps_from_the_files_alone_match_the_default_export(
        exported: dict[str, Path]) -> None:
    default, portable = onnx.load(exported["default"]), onnx.load(exported["portable"])
    batches = [_batch(seed) for seed in (1, 2, 3)]
    defaults = {t.name: numpy_helper.to_array(t) for t in default.graph.initializer
                if t.name in json.loads(_meta(default)[STATE]).values()}
    plain = _session(exported["default"])
    expected = _loop(lambda f: plain.run(None, f), default, defaults, batches)

    state = _portable_state(exported["portable"])
    session = _session(exported["portable"])
    got = _loop(lambda f: session.run(None, f), portable, state, batches)
    reference = ReferenceEvaluator(portable)
    ref = _loop(lambda f: reference.run(None, f), portable, state, batches)
    assert set(got[0]) == set(expected[0])
    for k in range(3):
        for name, value in expected[k].items():
            # The rewrites are ONNX Runtime's own arithmetic: the same bits.
            np.testing.assert_array_equal(got[k][name], value, err_msg=f"ort, step {k}: {name}")
            np.testing.assert_allclose(ref[k][name], value, rtol=1e-4, atol=1e-5,
                                       err_msg=f"reference, step {k}: {name}")
    assert int(got[2]["1.num_batches_tracked.new"]) == 4


def test_the_loop_matches_onnxgrads_own_steps(tmp_path: Path) -> None:
    model = _cnn()
    step = _step(model, momentum=0.0, weight_decay=1e-2)
    step(_batch(0)["x"], _batch(0)["y"])
    step.export(tmp_path / "step.onnx", portable=True)
    batches = [_batch(seed) for seed in (1, 2, 3)]
    portable = onnx.load(tmp_path / "step.onnx")
    session = _session(tmp_path / "step.onnx")
    got = _loop(lambda f: session.run(None, f), portable, _portable_state(tmp_path / "step.onnx"),
                batches)
    for k, batch in enumerate(batches):
        np.testing.assert_array_equal(got[k]["output"], step(batch["x"], batch["y"]).numpy())
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(got[-1][f"{name}.new"], value.numpy(), err_msg=name)


# --------------------------------------------------------------------------- opsets
def test_opset_is_chosen_or_given(tmp_path: Path) -> None:
    step = _step(_cnn())
    step(_batch(0)["x"], _batch(0)["y"])
    step.export(tmp_path / "p19.onnx", portable=True, opset=19)
    assert onnx.load(tmp_path / "p19.onnx").opset_import[0].version == 19
    # The single-file format at a lower opset: still defaults as initializers, same results.
    step.export(tmp_path / "d18.onnx", opset=18)
    step.export(tmp_path / "d.onnx")
    low, default = onnx.load(tmp_path / "d18.onnx"), onnx.load(tmp_path / "d.onnx")
    assert low.opset_import[0].version == 18 and default.opset_import[0].version == OPSET
    onnx.checker.check_model(low, full_check=True)
    assert STATE_FILE not in _meta(low) and len(low.graph.initializer) >= len(
        json.loads(_meta(low)[STATE]))
    feeds = _batch(1)
    np.testing.assert_array_equal(_session(tmp_path / "d18.onnx").run(["output"], feeds)[0],
                                  _session(tmp_path / "d.onnx").run(["output"], feeds)[0])
    with pytest.raises(ValueError, match=r"opset 22 is newer than the step's opset 21"):
        step.export(tmp_path / "x.onnx", portable=True, opset=22)
    # Col2Im exists from opset 18 only: the default profile cannot go below it.
    with pytest.raises(ValueError, match=r"opset 17: Col2Im is not defined before opset 18.*"
                       r"\(portable=True rewrites BatchNormalization, Col2Im, MaxPool\)"):
        step.export(tmp_path / "x.onnx", opset=17)
    assert not (tmp_path / "x.onnx").exists()


def test_lowering_converts_reduction_axes_and_keeps_the_bits() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 4), dtype=np.float32)
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
             helper.make_node("Pad", ["m", "pads", "zero"], ["p"]),
             helper.make_node("Split", ["p"], ["a", "b"], axis=2, num_outputs=2),
             helper.make_node("Cast", ["a"], ["c"], to=TensorProto.DOUBLE)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("c", TensorProto.DOUBLE, [2, 1, 3]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 1, 3])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes"),
         numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 1], np.int64), "pads"),
         numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    low = lower_opset(model, 17)
    onnx.checker.check_model(low, full_check=True)
    mean = next(n for n in low.graph.node if n.op_type == "ReduceMean")
    assert list(mean.input) == ["x"] and helper.get_attribute_value(mean.attribute[-1]) == [1]
    a = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    b = ort.InferenceSession(low.SerializeToString()).run(None, {"x": x})
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


# --------------------------------------------------------------------------- each rewrite
def _single(node: onnx.NodeProto, inputs: dict[str, np.ndarray],
            outputs: list[tuple[str, int]], consts: dict[str, np.ndarray] | None = None,
            shapes: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [helper.make_tensor_value_info(n, t, (shapes or {}).get(n)) for n, t in outputs],
        [numpy_helper.from_array(v, k) for k, v in (consts or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _both(model: onnx.ModelProto, feeds: dict[str, np.ndarray]
          ) -> tuple[list[np.ndarray], list[np.ndarray], onnx.ModelProto]:
    rewritten = rewrite_portable(onnx.shape_inference.infer_shapes(model))
    onnx.checker.check_model(rewritten, full_check=True)
    before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    after = ort.InferenceSession(rewritten.SerializeToString()).run(None, feeds)
    return before, after, rewritten


@pytest.mark.parametrize("kernel,strides,pads,dilations", [
    ([3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
    ([3, 3], [2, 2], [1, 1, 1, 1], [1, 1]),
    ([2, 3], [2, 1], [0, 1, 1, 0], [2, 1]),
    ([1, 1], [2, 2], [0, 0, 0, 0], [1, 1]),
], ids=["3x3", "stride2", "mixed", "1x1-stride2"])
def test_col2im_rewrite_is_bit_identical(kernel, strides, pads, dilations) -> None:
    size = [7, 6]
    out = [(n + pads[i] + pads[i + 2] - d * (k - 1) - 1) // s + 1
           for i, (n, k, s, d) in enumerate(zip(size, kernel, strides, dilations))]
    c = 3
    cols = np.random.default_rng(1).standard_normal((2, c * kernel[0] * kernel[1],
                                                     out[0] * out[1]), dtype=np.float32)
    node = helper.make_node("Col2Im", ["cols", "size", "kernel"], ["y"], strides=strides,
                            pads=pads, dilations=dilations)
    model = _single(node, {"cols": cols}, [("y", TensorProto.FLOAT)],
                    {"size": np.array(size, np.int64), "kernel": np.array(kernel, np.int64)})
    before, after, rewritten = _both(model, {"cols": cols})
    assert "Col2Im" not in {n.op_type for n in rewritten.graph.node}
    assert after[0].shape == (2, c, *size)
    np.testing.assert_array_equal(after[0], before[0])


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 2], "strides": [2, 1], "ceil_mode": 1},
    {"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 0, 0, 1]},
], ids=["stem", "2x2", "ceil", "dilated"])
def test_max_pool_indices_rewrite_is_identical(attrs) -> None:
    # Rounded values: many ties, which both break by the first maximum in window order.
    x = np.round(np.random.default_rng(2).standard_normal((2, 3, 7, 6)), 0).astype(np.float32)
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], **attrs)
    model = _single(node, {"x": x}, [("y", TensorProto.FLOAT), ("i", TensorProto.INT64)])
    before, after, rewritten = _both(model, {"x": x})
    pools = [n for n in rewritten.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 1 and list(pools[0].output) == ["y"]
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    ref = ReferenceEvaluator(rewritten).run(None, {"x": x})
    np.testing.assert_array_equal(ref[1], before[1])


def test_batch_norm_with_fed_parameters_becomes_elementwise_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((4, 5, 3, 3), dtype=np.float32),
             **{k: rng.standard_normal(5, dtype=np.float32) for k in ("s", "b", "m")},
             "v": rng.uniform(0.1, 2, 5).astype(np.float32)}
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
                            epsilon=1e-3)
    model = _single(node, feeds, [("y", TensorProto.FLOAT)])
    before, after, rewritten = _both(model, feeds)
    assert "BatchNormalization" not in {n.op_type for n in rewritten.graph.node}
    np.testing.assert_array_equal(after[0], before[0])
    # Constant parameters (every runtime folds them) stay a BatchNormalization.
    consts = {k: v for k, v in feeds.items() if k != "x"}
    model = _single(node, {"x": feeds["x"]}, [("y", TensorProto.FLOAT)], consts)
    assert "BatchNormalization" in {n.op_type for n in rewrite_portable(model).graph.node}


def test_cast_like_becomes_cast() -> None:
    feeds = {"x": np.array([1.5, -2.25], np.float32), "like": np.zeros(1, np.float64)}
    node = helper.make_node("CastLike", ["x", "like"], ["y"])
    before, after, rewritten = _both(_single(node, feeds, [("y", TensorProto.DOUBLE)]), feeds)
    assert [n.op_type for n in rewritten.graph.node] == ["Cast"]
    np.testing.assert_array_equal(after[0], before[0])


# --------------------------------------------------------------------------- the command
def test_train_graph_portable_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _cnn()
    model.eval()
    forward = og.compile(model)
    forward(np.zeros((2, 3, 8, 8), np.float32))
    forward.export(tmp_path / "cnn.onnx")
    out = tmp_path / "cnn_train.onnx"
    assert train_graph_main([str(tmp_path / "cnn.onnx"), str(out), "--portable",
                             "--opset", "18", "--momentum", "0.9"]) == 0
    trained = onnx.load(out)
    assert trained.opset_import[0].version == 18
    assert _meta(trained)[STATE_FILE] == "cnn_train.safetensors"
    state = read_safetensors(tmp_path / "cnn_train.safetensors")
    assert set(state) == {i.name for i in trained.graph.input} - set(
        json.loads(_meta(trained)[DATA_INPUTS]))
    assert not {"Col2Im", "BatchNormalization"} & {n.op_type for n in trained.graph.node}
    assert train_graph_main([str(tmp_path / "cnn.onnx"), str(out), "--opset", "30"]) == 2
    assert "opset 30 is newer" in capsys.readouterr().err


# --------------------------------------------------------------------------- dynamic batch
@pytest.mark.parametrize("portable", [False, True], ids=["default", "portable"])
def test_dynamic_batch_trains_any_batch_size_as_onnxgrad_does(tmp_path: Path,
                                                               portable: bool) -> None:
    model = _cnn()
    step = _step(model)
    step(_batch(0)["x"], _batch(0)["y"])
    path = tmp_path / "step.onnx"
    traces = step.traces
    step.export(path, dynamic_batch=True, portable=portable)
    assert step.traces == traces  # the traces at other sizes are not kept
    exported = onnx.load(path)
    onnx.checker.check_model(exported, full_check=True)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in exported.graph.input}
    assert dims["x"] == ["batch", 3, 8, 8] and dims["y"] == ["batch"]
    if portable:
        state = _portable_state(path)
    else:
        feeds_for = json.loads(_meta(exported)[STATE])
        state = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer
                 if t.name in feeds_for.values()}
    # The traced size, smaller (an epoch's last batch), larger: each step as onnxgrad's own
    # (which traces each size), bit for bit.
    batches = [_batch(1, n=3), _batch(2, n=2), _batch(3, n=5)]
    got = _loop(lambda f: _session(path).run(None, f), exported, state, batches)
    for k, batch in enumerate(batches):
        np.testing.assert_array_equal(got[k]["output"], step(batch["x"], batch["y"]).numpy())
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(got[-1][f"{name}.new"], value.numpy(), err_msg=name)
    if portable:  # and the reference evaluator at another size
        one = _loop(lambda f: ReferenceEvaluator(exported).run(None, f), exported, state,
                    [_batch(1, n=2)])
        assert one[0]["output"].shape == ()


def test_dynamic_batch_refuses_a_step_whose_graph_depends_on_the_batch(tmp_path: Path) -> None:
    model = _cnn()
    optim = og.optim.SGD(model.parameters(), lr=0.1)

    @og.compile
    def step(x, y):
        optim.zero_grad()
        half = x.shape[0] // 2  # a Python number of the batch size, baked into the trace
        loss = F.cross_entropy(model(x[:half]), y[:half])
        loss.backward()
        optim.step()
        return loss

    step(_batch(0, n=4)["x"], _batch(0, n=4)["y"])
    with pytest.raises(ValueError, match=r"dynamic_batch: .*not multiples of the batch size"):
        step.export(tmp_path / "step.onnx", dynamic_batch=True)
    assert not (tmp_path / "step.onnx").exists()
    step.export(tmp_path / "step.onnx")  # the static file still writes


# --------------------------------------------------------------------------- the plain loop
# The README's loop for the portable format (no onnxgrad import: onnxruntime, json, safetensors).
PLAIN_LOOP = '''
import json
import onnxruntime as ort
from safetensors.numpy import load_file

session = ort.InferenceSession("train_step.onnx", providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
feeds_for = json.loads(meta["onnxgrad.state"])          # state output -> input it feeds next step
data_inputs = json.loads(meta["onnxgrad.data_inputs"])  # fed fresh every step, e.g. ["x", "y"]
state = load_file(meta["onnxgrad.state_file"])          # every other input's first value
outputs = [o.name for o in session.get_outputs()]
for batch in batches:
    results = dict(zip(outputs, session.run(outputs, {**state, **dict(zip(data_inputs, batch))})))
    state.update({feeds_for[name]: results[name] for name in feeds_for})
    print(results["output"])                            # what the step returned: the loss
'''
# The same with onnx's reference evaluator: only the session lines differ.
REFERENCE_LOOP = PLAIN_LOOP.replace(
    'import onnxruntime as ort\n', 'import onnx\nfrom onnx.reference import ReferenceEvaluator\n'
).replace(
    'session = ort.InferenceSession("train_step.onnx", providers=["CPUExecutionProvider"])\n'
    'meta = session.get_modelmeta().custom_metadata_map\n',
    'model = onnx.load("train_step.onnx")\n'
    'session = ReferenceEvaluator(model)\n'
    'meta = {p.key: p.value for p in model.metadata_props}\n',
).replace('[o.name for o in session.get_outputs()]', 'session.output_names')


@pytest.mark.parametrize("loop", [PLAIN_LOOP, REFERENCE_LOOP], ids=["onnxruntime", "reference"])
def test_the_plain_loop_trains_from_the_portable_files(tmp_path: Path, loop: str) -> None:
    pytest.importorskip("safetensors")
    step = _step(_cnn())
    batches = [_batch(seed) for seed in range(4)]
    step(batches[0]["x"], batches[0]["y"])
    step.export(tmp_path / "train_step.onnx", portable=True)
    np.savez(tmp_path / "batches.npz", **{f"{k}{i}": b[k] for i, b in enumerate(batches[1:])
                                          for k in ("x", "y")})
    losses = [float(step(b["x"], b["y"])) for b in batches[1:]]
    prelude = ("import numpy as np\n"
               "with np.load('batches.npz') as f:\n"
               "    batches = [(f[f'x{i}'], f[f'y{i}']) for i in range(3)]\n")
    epilogue = ("import sys\n"
                "assert not [m for m in sys.modules if m.split('.')[0] == 'onnxgrad']\n")
    done = subprocess.run([sys.executable, "-c", prelude + loop + epilogue], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [float(line) for line in done.stdout.split()]
    np.testing.assert_allclose(printed, losses, rtol=1e-5 if loop is PLAIN_LOOP else 1e-4)


# --------------------------------------------------------------------------- training_step
def _dynamic_forward(path: Path) -> Path:
    """The CNN's inference model with a symbolic batch, as a model to train from."""
    model = _cnn()
    model.eval()
    forward = og.compile(model)
    forward(np.zeros((2, 3, 8, 8), np.float32))
    forward.export(path, dynamic_batch=True)
    return path


@pytest.mark.parametrize("portable", [False, True], ids=["default", "portable"])
def test_training_step_dynamic_batch_trains_any_batch_size(tmp_path: Path,
                                                           portable: bool) -> None:
    source = _dynamic_forward(tmp_path / "cnn.onnx")
    step = og.training_step(source, lr=0.05, momentum=0.9)
    step(_batch(0)["x"], _batch(0)["y"])
    path = tmp_path / "step.onnx"
    step.export(path, dynamic_batch=True, portable=portable)
    exported = onnx.load(path)
    onnx.checker.check_model(exported, full_check=True)
    meta = _meta(exported)
    assert json.loads(meta["onnxgrad.parameters"]) == [n for n, _ in step.named_parameters()]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in exported.graph.input}
    assert dims["xs"] == ["batch", 3, 8, 8] and dims["labels"] == ["batch"]
    data = json.loads(meta[DATA_INPUTS])
    if portable:
        state = _portable_state(path)
    else:
        inputs = {i.name for i in exported.graph.input} - set(data)
        state = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer
                 if t.name in inputs}
    batches = [_batch(1, n=3), _batch(2, n=2), _batch(3, n=5)]
    got = _loop(lambda f: _session(path).run(None, f), exported, state,
                [dict(zip(data, b.values())) for b in batches])
    for k, batch in enumerate(batches):  # as the step itself trains (one trace per size)
        np.testing.assert_allclose(got[k]["output"], step(batch["x"], batch["y"]).numpy(),
                                   rtol=1e-6, err_msg=f"step {k}")
    for name, value in step.state_dict().items():
        np.testing.assert_allclose(got[-1][f"{name}.new"], value, rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_train_graph_batch_is_dynamic_by_default_where_the_model_allows_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = str(_dynamic_forward(tmp_path / "cnn.onnx"))

    def batch_dims(path: Path) -> list:
        model = onnx.load(path)
        return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim][:1]
                for i in model.graph.input[:2]]

    # A model with a dynamic batch and no --batch-size: a file for any batch (was an error).
    assert train_graph_main([source, str(tmp_path / "auto.onnx"), "--portable",
                             "--momentum", "0.9", "--dampening", "0.1"]) == 0
    # The first step's dampening is said once, though the step was traced at three sizes.
    assert capsys.readouterr().err.count("(SGD with dampening)") == 1
    assert batch_dims(tmp_path / "auto.onnx") == [["batch"], ["batch"]]
    # --batch-size N: the file of that size, as before; --dynamic-batch with it: dynamic.
    assert train_graph_main([source, str(tmp_path / "three.onnx"), "--batch-size", "3"]) == 0
    assert batch_dims(tmp_path / "three.onnx") == [[3], [3]]
    assert train_graph_main([source, str(tmp_path / "dyn.onnx"), "--batch-size", "3",
                             "--dynamic-batch"]) == 0
    assert batch_dims(tmp_path / "dyn.onnx") == [["batch"], ["batch"]]
    capsys.readouterr()
    assert train_graph_main([source, str(tmp_path / "no.onnx"), "--no-dynamic-batch"]) == 2
    assert "give a batch size" in capsys.readouterr().err
    # A model whose batch is fixed cannot give a dynamic file: said in one line.
    model = _cnn()
    model.eval()
    forward = og.compile(model)
    forward(np.zeros((2, 3, 8, 8), np.float32))
    forward.export(tmp_path / "fixed.onnx")
    assert train_graph_main([str(tmp_path / "fixed.onnx"), str(tmp_path / "f.onnx"),
                             "--dynamic-batch"]) == 2
    err = capsys.readouterr().err.strip()
    assert "dynamic_batch: the model's inputs {'xs': [2, 3, 8, 8]} have a fixed batch" in err
    assert err.count("\n") == 0
    assert train_graph_main([str(tmp_path / "fixed.onnx"), str(tmp_path / "f.onnx")]) == 0
    assert batch_dims(tmp_path / "f.onnx") == [[2], [2]]
