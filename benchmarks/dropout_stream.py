"""Cost of onnxgrad's portable dropout (counter-based stream from integer ONNX ops) against ONNX
``Dropout`` (the runtime's own generator), in ONNX Runtime on the CPU, one run of each in turn.

    python benchmarks/dropout_stream.py [--n 1048576] [--repeat 50]

Prints the median time of each graph and their ratio (both graphs: x -> dropout(x, 0.1)).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnxgrad.runtime.session import make_session

import onnxgrad as og


def onnx_dropout_model(n: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Dropout", ["x", "ratio", "training"], ["y"])]
    graph = helper.make_graph(
        nodes, "onnx_dropout", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        [helper.make_tensor("ratio", TensorProto.FLOAT, [], [0.1]),
         helper.make_tensor("training", TensorProto.BOOL, [], [True])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def stream_dropout_model(n: int) -> onnx.ModelProto:
    @og.compile
    def step(x):
        return og.nn.functional.dropout(x, 0.1)
    step.trace(og.ones(n))
    return step.last.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1 << 20)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal(args.n, dtype=np.float32)
    ours = stream_dropout_model(args.n)
    feeds_ours = {"x": x, "rng.seed": np.asarray(7, np.int64),
                  "rng.offset": np.asarray(0, np.int64)}
    assert sorted(i.name for i in ours.graph.input) == sorted(feeds_ours)
    sessions = {"ONNX Dropout": (make_session(onnx_dropout_model(args.n)), {"x": x}),
                "onnxgrad stream": (make_session(ours), feeds_ours)}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.repeat):
        for name, (sess, feeds) in sessions.items():
            t = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>16}: {v:.2f} ms for {args.n} values")
    print(f"ratio stream / ONNX Dropout: {med['onnxgrad stream'] / med['ONNX Dropout']:.2f}")


if __name__ == "__main__":
    main()
