"""The CPU session's rewrites (runtime/lowering.py): same results as the node they replace."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnxgrad.runtime import IR_VERSION, OPSET, lowering, make_session


def _conv_model(x: tuple[int, ...], w: tuple[int, ...], bias: bool, **attrs: Any
                ) -> onnx.ModelProto:
    names = ["x", "w", "b"] if bias else ["x", "w"]
    shapes = {"x": x, "w": w, "b": (w[0],)}
    node = helper.make_node("Conv", names, ["y"], **attrs)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in names]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "conv", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


CASES = [
    ((2, 8, 2, 2), (16, 8, 3, 3), True, {"pads": [1, 1, 1, 1]}),
    ((3, 4, 4, 4), (6, 4, 3, 3), False, {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ((2, 4, 5, 6), (5, 4, 2, 3), True, {"pads": [0, 1, 1, 0], "strides": [2, 1]}),
    ((2, 3, 5, 5), (4, 3, 2, 2), False, {"dilations": [2, 2], "strides": [2, 2]}),
    ((4, 6, 3, 3), (7, 6, 1, 1), True, {}),
    ((2, 6, 4, 4), (7, 6, 1, 1), False, {"strides": [3, 3]}),
]


@pytest.mark.parametrize(("x", "w", "bias", "attrs"), CASES,
                         ids=[str(i) for i in range(len(CASES))])
def test_a_lowered_conv_computes_the_conv(x, w, bias, attrs, monkeypatch) -> None:
    monkeypatch.setattr(lowering, "MIN_WEIGHT_BYTES", 0)  # small shapes, same rewrite
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(x, dtype=np.float32),
             "w": rng.standard_normal(w, dtype=np.float32)}
    if bias:
        feeds["b"] = rng.standard_normal(w[:1], dtype=np.float32)
    model = _conv_model(x, w, bias, **attrs)
    want = make_session(model).run(None, feeds)[0]
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    assert lowering.lower_small_convs(lowered, lowering.static_shapes(lowered.graph)) == 1
    assert "Conv" not in {n.op_type for n in lowered.graph.node}
    onnx.checker.check_model(lowered, full_check=True)
    got = make_session(lowered).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    reference = ReferenceEvaluator(lowered).run(None, feeds)[0]
    np.testing.assert_allclose(reference, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("x", "w", "attrs"), [
    ((1, 512, 2, 2), (512, 512, 3, 3), {"pads": [1, 1, 1, 1]}),     # one image
    ((8, 512, 8, 8), (512, 512, 3, 3), {"pads": [1, 1, 1, 1]}),     # 64 positions
    ((8, 64, 2, 2), (64, 64, 3, 3), {"pads": [1, 1, 1, 1]}),        # a 147 KB weight
    ((8, 512, 2, 2), (512, 1, 3, 3), {"pads": [1, 1, 1, 1], "group": 512}),
    # a swapped-Conv weight gradient: 2,304 taps would be as many Slices
    ((3, 8, 96, 96), (32, 8, 48, 48), {"pads": [1, 1, 0, 0], "dilations": [2, 2]}),
])
def test_where_the_conv_kernel_is_kept(x, w, attrs) -> None:
    assert not lowering.conv_lowered(attrs, x, w)
