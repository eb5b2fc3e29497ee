"""Time the standard-ONNX formulations of the Conv gradient on resnet18's layer shapes.

For every conv shape of resnet18 (batch 1 and 8 at 64x64, batch 4 at 224x224) this builds one
small ONNX model per formulation in ``passes/rules/nn.py`` (``CONV_INPUT_GRADS``,
``CONV_WEIGHT_GRADS``) plus the forward ``Conv``, runs each in ONNX Runtime with the engine's
session options, and prints the median times and their ratios to the forward conv, all measured
in one run. The rule's per-shape choice (``choose_conv_*_grad``) is marked with ``*``.

    python benchmarks/conv_grad.py                # all three configurations
    python benchmarks/conv_grad.py --config 1x64  # one of 1x64, 8x64, 4x224
    python benchmarks/conv_grad.py --resnet       # also resnet18's whole gradient graph
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnxgrad.passes.builder import Builder
from onnxgrad.passes.rules import nn as rules
from onnxgrad.runtime import IR_VERSION, OPSET, make_session
from onnxgrad.runtime.session import session_options

# (name, in channels, out channels, kernel, stride, padding, input size divisor, count in resnet18)
LAYERS = [
    ("stem 7x7/2", 3, 64, 7, 2, 3, 1, 1),
    ("layer1 3x3", 64, 64, 3, 1, 1, 4, 4),
    ("layer2 3x3/2", 64, 128, 3, 2, 1, 4, 1),
    ("layer2 3x3", 128, 128, 3, 1, 1, 8, 3),
    ("layer2 down 1x1/2", 64, 128, 1, 2, 0, 4, 1),
    ("layer3 3x3/2", 128, 256, 3, 2, 1, 8, 1),
    ("layer3 3x3", 256, 256, 3, 1, 1, 16, 3),
    ("layer3 down 1x1/2", 128, 256, 1, 2, 0, 8, 1),
    ("layer4 3x3/2", 256, 512, 3, 2, 1, 16, 1),
    ("layer4 3x3", 512, 512, 3, 1, 1, 32, 3),
    ("layer4 down 1x1/2", 256, 512, 1, 2, 0, 16, 1),
]
CONFIGS = {"1x64": (1, 64), "8x64": (8, 64), "4x224": (4, 224)}


def geometry(n: int, c: int, o: int, k: int, s: int, p: int, size: int) -> rules.ConvGeometry:
    out = (size + 2 * p - k) // s + 1
    return rules.ConvGeometry(n, c, o, 1, (size, size), (out, out), (k, k), (s, s), (1, 1),
                              (p, p), (p, p))


def _value(name: str, shape: tuple[int, ...]) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))


def build(geo: rules.ConvGeometry, make: Callable) -> tuple[bytes, list[str]] | None:
    """A model computing ``make(b, x, w, g, geo)``; None when the formulation does not apply."""
    x = _value("x", (geo.n, geo.c, *geo.size))
    w = _value("w", (geo.o, geo.c // geo.groups, *geo.kernel))
    g = _value("g", (geo.n, geo.o, *geo.out))
    b = Builder()
    out = make(b, x, w, g, geo)
    if out is None:
        return None
    used = {id(v) for node in b.nodes for v in node.inputs}
    inputs = [v for v in (x, w, g) if id(v) in used]
    graph = ir.Graph(inputs, [out], nodes=b.nodes, opset_imports={"": OPSET}, name="bench")
    model = ir.serde.serialize_model(ir.Model(graph, ir_version=IR_VERSION))
    return model.SerializeToString(), [v.name for v in inputs]


def forward(b, x, w, g, geo):
    return b.op("Conv", x, w, group=geo.groups, **geo.attrs())


def feeds_for(names: list[str], geo: rules.ConvGeometry) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"x": (geo.n, geo.c, *geo.size), "w": (geo.o, geo.c // geo.groups, *geo.kernel),
              "g": (geo.n, geo.o, *geo.out)}
    return {k: rng.standard_normal(shapes[k]).astype(np.float32) for k in names}


def _session(model: bytes, wall: bool) -> ort.InferenceSession:
    if wall:
        return make_session(model)
    options = session_options()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def timed(models: dict[str, tuple[bytes, list[str]]], geo: rules.ConvGeometry, budget: float,
          wall: bool, rounds: int = 5) -> dict[str, float]:
    """Seconds per run of each model: the minimum over interleaved rounds.

    NOTE: by default the cost is the CPU time of the calling thread with one ORT thread (so ORT
    computes on that thread): on a shared host (load averages of 60-360 on 2 cores were seen while
    this was written) wall-clock times swing by 10x, CPU time does not. ``--wall`` times the
    engine's own multi-threaded sessions instead. Rounds are round-robin and the minimum is kept,
    so every model meets the same contention and the least disturbed run counts.
    """
    clock = time.perf_counter if wall else time.thread_time
    sessions = {}
    for key, (model, names) in models.items():
        feeds = feeds_for(names, geo)
        session = _session(model, wall)
        session.run(None, feeds)  # warm-up: allocations, first-run kernel choices
        sessions[key] = (session, feeds)
    best = {key: float("inf") for key in sessions}
    start = time.perf_counter()
    done = 0
    while done < rounds or (time.perf_counter() - start < budget * len(sessions) and done < 100):
        for key, (session, feeds) in sessions.items():
            t0 = clock()
            session.run(None, feeds)
            best[key] = min(best[key], clock() - t0)
        done += 1
    return best


def whole_resnet18(n: int, size: int, wall: bool) -> None:
    """resnet18's whole gradient graph with the measured choice against ConvTranspose and the
    swapped Conv everywhere (the two formulations DESIGN names first)."""
    from onnxgrad.models import resnet18
    from onnxgrad.tracer.autograd import gradient_model

    import onnxgrad as og

    og.manual_seed(0)
    model, x = resnet18(), og.rand(n, 3, size, size)
    clock = time.perf_counter if wall else time.thread_time
    runs = {}
    for name, override in [("measured choice", {}),
                           ("ConvTranspose + swapped Conv", {"input": "transpose",
                                                              "weight": "conv"})]:
        rules.CONV_GRAD_OVERRIDE.clear()
        rules.CONV_GRAD_OVERRIDE.update(override)
        try:
            gm = gradient_model([model(x).sum()], [og.tensor(np.float32(1.0))])
        finally:
            rules.CONV_GRAD_OVERRIDE.clear()
        runs[name] = (_session(gm.model.SerializeToString(), wall), gm)
    best = {name: float("inf") for name in runs}
    for _ in range(5):
        for name, (session, gm) in runs.items():
            t0 = clock()
            session.run(gm.outputs, gm.feeds)
            best[name] = min(best[name], clock() - t0)
    base = best["ConvTranspose + swapped Conv"]
    print(f"resnet18 backward, batch {n} at {size}x{size}: " + ", ".join(
        f"{name} {t * 1e3:.1f} ms ({t / base:.2f}x)" for name, t in best.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), action="append",
                        help="batch x size (repeatable; default: all)")
    parser.add_argument("--budget", type=float, default=0.2, help="seconds per model and shape")
    parser.add_argument("--wall", action="store_true",
                        help="wall-clock time of the engine's multi-threaded sessions "
                             "(default: CPU time with one ORT thread)")
    parser.add_argument("--resnet", action="store_true",
                        help="also time resnet18's whole gradient graph, choice against baseline")
    args = parser.parse_args()
    variants = [("dX", name, lambda b, x, w, g, geo, f=f: f(b, g, w, geo))
                for name, f in rules.CONV_INPUT_GRADS.items()]
    variants += [("dW", name, lambda b, x, w, g, geo, f=f: f(b, x, g, geo))
                 for name, f in rules.CONV_WEIGHT_GRADS.items()]
    for config in args.config or list(CONFIGS):
        n, size = CONFIGS[config]
        what = "wall ms, engine threads" if args.wall else "CPU ms, 1 thread"
        print(f"\n== batch {n}, {size}x{size}: {what} per run (ratio to the forward Conv); "
              f"* = the rule's choice")
        header = f"{'layer':<20}{'fwd':>8}" + "".join(f"{k + ' ' + v:>20}" for k, v, _ in variants)
        print(header)
        totals = {"fwd": 0.0, "dX*": 0.0, "dW*": 0.0, "dX transpose": 0.0, "dW conv": 0.0}
        for name, c, o, k, s, p, div, count in LAYERS:
            geo = geometry(n, c, o, k, s, p, size // div)
            models = {("fwd", ""): build(geo, forward)}
            for kind, vname, make in variants:
                built = build(geo, make)
                if built is not None:
                    models[(kind, vname)] = built
            times = timed(models, geo, args.budget, args.wall)
            fwd = times[("fwd", "")]
            chosen = {"dX": rules.choose_conv_input_grad(geo),
                      "dW": rules.choose_conv_weight_grad(geo)}
            row = f"{name:<20}{fwd * 1e3:>8.2f}"
            totals["fwd"] += count * fwd
            for kind, vname, _ in variants:
                if (kind, vname) not in times:
                    row += f"{'n/a':>20}"
                    continue
                t = times[(kind, vname)]
                mark = "*" if chosen[kind] == vname else " "
                row += f"{t * 1e3:>10.2f} ({t / fwd:4.2f}x){mark}"
                if mark == "*":
                    totals[kind + "*"] += count * t
                if f"{kind} {vname}" in totals:
                    totals[f"{kind} {vname}"] += count * t
            print(row, flush=True)
        fwd_total = totals.pop("fwd")
        print(f"{'resnet18 total':<20}{fwd_total * 1e3:>8.2f}  " + ", ".join(
            f"{key.replace('*', ' chosen')} {t * 1e3:.2f} ({t / fwd_total:.2f}x)"
            for key, t in totals.items()))
        if args.resnet:
            whole_resnet18(n, size, args.wall)


if __name__ == "__main__":
    main()
