"""Why an exported resnet18 step drifts from ONNX Runtime in other runtimes: ReLU kinks.

Looped for 3 steps, the portable resnet18 step (8x3x64x64, SGD with momentum) differs from ONNX
Runtime by 1e-2 to 1 (relative to each tensor's largest value) in one or two gradients in every
other runtime, the reference evaluator included, while most tensors agree to ~1e-6. This script
shows where that comes from: it runs single steps *from the same state* (ONNX Runtime's loop) in
each runtime with every ``Relu`` input as an extra output, and lists the ReLU inputs whose sign
differs from ONNX Runtime's, next to the largest output differences of that step.

What it printed here (onnxruntime 1.32, OpenVINO 2025, tract 0.23, the reference evaluator of
onnx 1.23): over 1.5 million ReLU inputs per step, a runtime that differs from ONNX Runtime by
more than 1e-4 at a step has exactly one ReLU input of the opposite sign there, of magnitude
<= 1e-6 in a tensor whose largest value is ~4.5 (float32 rounding of a BatchNorm output that is
0 to six digits); its ReLU gradient is 0 in one runtime and 1 in the other, which moves the
weight gradient of the convolution before it by 2-6% of that gradient's largest value. Runtimes
with no such crossing at that step agree to ~1e-5. ONNX Runtime itself is deterministic here
(the same bits with graph optimizations off and with one thread), and the same file evaluated in
float64 agrees with ONNX Runtime's float32 loop to 8e-6 over the 3 steps: no rewrite is wrong;
the step is a discontinuous function of its inputs, and float32 rounding lands on the other side
of a kink now and then (about one element per step at this size), after which the states differ
and later steps differ more.

    python benchmarks/portable_drift.py --runtimes reference,openvino,tract --steps 3
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnxgrad.verify import (
    RUNTIMES,
    StepFile,
    loop,
    not_installed,
    read_step,
    relative_difference,
)


def export(folder: Path, batch: int) -> tuple[StepFile, list[dict[str, np.ndarray]]]:
    """resnet18's portable step after one step, and 3 more batches: portable_runtimes.py's."""
    from onnxgrad.models import resnet18
    from portable_runtimes import _batches, export_both  # benchmarks/: the same step and data

    import onnxgrad as og

    og.manual_seed(0)
    shape = (batch, 3, 64, 64)
    files = export_both(lambda: resnet18(num_classes=10), shape, 10, folder)
    batches = [{"x": x, "y": y} for x, y in _batches(shape, 10, 4)[1:]]
    return read_step(files["portable"]), batches


def probe(step: StepFile, folder: Path, state: dict[str, np.ndarray]) -> tuple[StepFile, list[str]]:
    """The step with every Relu input as an extra output, starting from ``state``."""
    model = onnx.ModelProto()
    model.CopyFrom(step.model)
    relu = [n.input[0] for n in model.graph.node if n.op_type == "Relu"]
    for name in relu:
        value = model.graph.output.add()
        value.name = name
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    path = folder / "probe.onnx"
    onnx.save(model, str(path))
    return StepFile(path, model, step.data_inputs, step.feeds_for, state, True), relu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtimes", default="reference,openvino,tract")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    runtimes = [r for r in args.runtimes.split(",") if r and not not_installed(r)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        step, batches = export(folder, args.batch)
        states = [dict(step.state)]
        for out in loop(RUNTIMES["ort"].make(step), step, batches[:args.steps - 1])[0]:
            # NOTE: astype(str): ONNX Runtime's int64 results are NumPy's longlong, which
            # OpenVINO's binding does not take.
            states.append({**states[-1], **{step.feeds_for[o]: out[o].astype(out[o].dtype.str)
                                            for o in step.feeds_for}})
        for k in range(args.steps):
            probed, relu = probe(step, folder, states[k])
            feeds = {**states[k], **batches[k]}
            outs = {r: RUNTIMES[r].make(probed)(feeds) for r in ["ort", *runtimes]}
            size = sum(outs["ort"][n].size for n in relu)
            print(f"step {k + 1} from ONNX Runtime's state: {len(relu)} Relu nodes, {size} inputs")
            for r in runtimes:
                crossed = []
                for name in relu:
                    a, b = outs["ort"][name], outs[r][name]
                    flip = (a > 0) != (b > 0)
                    if flip.any():
                        crossed.append(f"{name}: {int(flip.sum())} of {a.size}, |x| <= "
                                       f"{max(np.abs(a[flip]).max(), np.abs(b[flip]).max()):.1e}"
                                       f" (tensor max {np.abs(a).max():.1f})")
                worst = sorted(((relative_difference(outs[r][n], v), n)
                                for n, v in outs["ort"].items() if n not in relu), reverse=True)
                print(f"  {r:<10} ReLU inputs of the other sign: {len(crossed)}; largest output "
                      f"differences: " + ", ".join(f"{n} {d:.1e}" for d, n in worst[:2]))
                for line in crossed:
                    print(f"  {'':<10}   {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
