"""Op-table rows for the recurrent cells over a few time steps (``onnxgrad/nn/recurrent.py``).

The cells are compositions (MatMul, Split, Sigmoid, Tanh, Mul, Add, Concat), so these rows check
that the unrolled graph computes the cell equations (NumPy transcriptions of PyTorch's and ONNX's
documentation), that its float64 VJP matches central differences, and that ONNX Runtime and the
reference evaluator agree on the forward and gradient graphs. No PyTorch needed.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnxgrad.runtime import OPSET
from opcheck import arg, case, table_tests

import onnxgrad as og
from onnxgrad.nn import OnnxModule
from onnxgrad.nn.recurrent import GATES, _project, _run_direction

H = 3  # hidden size


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def np_cells(kind: str, x: np.ndarray, w_ih: np.ndarray, w_hh: np.ndarray, b_ih: np.ndarray,
             b_hh: np.ndarray, h: np.ndarray, c: np.ndarray | None, reverse: bool
             ) -> list[np.ndarray]:
    """PyTorch's cell equations (gate order LSTM i, f, g, o; GRU r, z, n), step by step."""
    steps = [None] * x.shape[0]
    for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
        gx, gh = x[t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        if kind == "LSTM":
            i, f, g, o = np.split(gx + gh, 4, axis=1)
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
        elif kind == "GRU":
            (xr, xz, xn), (hr, hz, hn) = np.split(gx, 3, axis=1), np.split(gh, 3, axis=1)
            r, z = _sigmoid(xr + hr), _sigmoid(xz + hz)
            h = (1 - z) * np.tanh(xn + r * hn) + z * h
        else:
            h = np.tanh(gx + gh)
        steps[t] = h
    out = [np.stack(steps), h] + ([c] if kind == "LSTM" else [])
    return [a.astype(x.dtype) for a in out]


def og_cells(kind: str, x: Any, w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any, h: Any,
             c: Any = None, reverse: bool = False) -> list[Any]:
    steps, h, c = _run_direction(kind, _project(x, w_ih, b_ih), h, c, w_hh, b_hh, reverse,
                                 range(GATES[kind]))
    return [og.stack(steps, 0), h] + ([c] if kind == "LSTM" else [])


def cell_row(kind: str, reverse: bool = False, length: int = 3):
    g = GATES[kind] * H
    inputs = [arg(length, 2, 4, low=-1, high=1), arg(g, 4, low=-0.7, high=0.7),
              arg(g, H, low=-0.7, high=0.7), arg(g, low=-0.5, high=0.5),
              arg(g, low=-0.5, high=0.5), arg(2, H, low=-1, high=1)]
    if kind == "LSTM":
        inputs.append(arg(2, H, low=-1, high=1))
    name = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN"}[kind]
    return case(f"{name.lower()}/{length}-steps" + ("-reverse" if reverse else ""),
                lambda *t: og_cells(kind, *t, reverse=reverse),
                lambda *a: np_cells(kind, *(list(a) + [None] * (7 - len(a))), reverse),
                *inputs, rtol=1e-5, atol=1e-6, grad_rtol=1e-6)


def onnx_node_row(op: str, direction: str, **attrs: Any):
    """An ONNX LSTM/GRU/RNN node replayed by OnnxModule (the import path), against ONNX's own
    reference implementation of the node."""
    from onnx.reference import ReferenceEvaluator

    gates, dirs = {"LSTM": 4, "GRU": 3, "RNN": 1}[op], 2 if direction == "bidirectional" else 1
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, ["X", "W", "R", "B"], outs, direction=direction,
                            hidden_size=H, **attrs)

    def model(elem: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            [node], "cell", [helper.make_tensor_value_info(n, elem, None) for n in "XWRB"],
            [helper.make_tensor_value_info(n, elem, None) for n in outs])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])

    # One module per dtype: the VJP check runs in float64, an OnnxModule takes its declared type.
    modules = {np.dtype(np.float32): OnnxModule(model(onnx.TensorProto.FLOAT)),
               np.dtype(np.float64): OnnxModule(model(onnx.TensorProto.DOUBLE))}
    reference = ReferenceEvaluator(model(onnx.TensorProto.FLOAT))

    def ref(*a: np.ndarray) -> list[np.ndarray]:
        return [r.astype(a[0].dtype) for r in reference.run(None, dict(zip("XWRB", a)))]

    suffix = "".join(f"-{k}{v}" for k, v in attrs.items())
    return case(f"onnx-{op.lower()}/{direction}{suffix}", lambda *t: modules[t[0].dtype](*t), ref,
                arg(3, 2, 4, low=-1, high=1), arg(dirs, gates * H, 4, low=-0.7, high=0.7),
                arg(dirs, gates * H, H, low=-0.7, high=0.7),
                arg(dirs, 2 * gates * H, low=-0.5, high=0.5), rtol=1e-5, atol=1e-6)


CASES = [
    cell_row("LSTM"),
    cell_row("LSTM", reverse=True, length=4),
    cell_row("GRU"),
    cell_row("GRU", reverse=True),
    cell_row("RNN_TANH", length=4),
    onnx_node_row("LSTM", "forward"),
    onnx_node_row("LSTM", "bidirectional"),
    onnx_node_row("GRU", "forward", linear_before_reset=1),
    onnx_node_row("GRU", "reverse"),
    onnx_node_row("RNN", "bidirectional"),
]

test_forward, test_vjp, test_runtimes, test_ids_are_unique = table_tests(CASES)
