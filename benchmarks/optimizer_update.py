"""Time the optimizer update alone for resnet18's parameters: onnxgrad against PyTorch.

onnxgrad's eager ``optimizer.step()`` is a compiled update (the optimizer's ONNX nodes for every
parameter in one model, state written over in place by the runner); PyTorch's is its CPU default (the
single-tensor loop: on CPU ``foreach`` defaults to False), its ``foreach=True`` multi-tensor
path and, for AdamW, ``fused=True``. Gradients are set once (random, fixed); each timed call is
one ``step()`` over resnet18's 62 parameter tensors (11.7M parameters).

As in ``compiled_step.py``, each framework runs in a worker process of its own (ONNX Runtime's
and PyTorch's intra-op threads spin after a run and starve each other in one process); the
driver asks the workers in turn for a block of steps of each contender, rotating who goes
first, and reports medians and the ratios onnxgrad / PyTorch (below 1.0: onnxgrad is faster).

    python benchmarks/optimizer_update.py               # default threads
    python benchmarks/optimizer_update.py --threads 1   # both frameworks on one thread
    python benchmarks/optimizer_update.py --rounds 12 --block 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # workers.py, beside this script
from workers import Worker, answer

ADAMW = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
SGD = {"lr": 1e-2, "momentum": 0.9}
OG = ["og:adamw", "og:sgd"]
TORCH = ["torch:adamw", "torch:adamw-foreach", "torch:adamw-fused", "torch:sgd",
         "torch:sgd-foreach"]
WARMUP = 2


def _shapes() -> list[tuple[int, ...]]:
    from onnxgrad.models import resnet18

    return [tuple(p.shape) for p in resnet18().parameters()]


def _gradients(shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s, dtype=np.float32) * 1e-2 for s in shapes]


def _use_threads(threads: int) -> None:
    """The update's session (made by the runtime's step runner) on ``threads`` threads."""
    import onnxruntime as ort
    from onnxgrad.runtime import session as session_module
    from onnxgrad.runtime import step as step_module

    def make(model_bytes: bytes, optimized: str | None = None) -> ort.InferenceSession:
        options = session_module.session_options()
        options.intra_op_num_threads = threads
        if optimized is not None:  # where the runner reads the graph that runs
            options.optimized_model_filepath = optimized
        return ort.InferenceSession(model_bytes, options,
                                    providers=session_module.get_providers())

    step_module.make_session = make


def _og_contenders(threads: int | None) -> dict[str, Callable[[], None]]:
    from onnxgrad.models import resnet18

    import onnxgrad as og

    if threads is not None:
        _use_threads(threads)
    steps: dict[str, Callable[[], None]] = {}
    for name in OG:
        og.manual_seed(0)
        params = list(resnet18().parameters())  # a model per optimizer: no shared buffers
        for p, g in zip(params, _gradients([tuple(p.shape) for p in params])):
            p.grad = og.tensor(g)
        opt = (og.optim.AdamW(params, **ADAMW) if name == "og:adamw"
               else og.optim.SGD(params, **SGD))

        def one(opt: Any = opt) -> None:
            opt.step()  # ONNX Runtime's run on CPU returns when the update is done

        steps[name] = one
    return steps


def _torch_contenders(threads: int | None) -> dict[str, Callable[[], None]]:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    # NOTE: onnxgrad's sessions keep subnormals (PyTorch's default); PyTorch flushes them here,
    # which can only make its side faster.
    torch.set_flush_denormal(True)
    shapes = _shapes()
    steps: dict[str, Callable[[], None]] = {}
    for name in TORCH:
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        for p, g in zip(params, _gradients(shapes)):
            p.grad = torch.from_numpy(g)
        kind, _, variant = name.partition(":")[2].partition("-")
        extra = {variant: True} if variant else {}
        opt = (torch.optim.AdamW(params, **ADAMW, **extra) if kind == "adamw"
               else torch.optim.SGD(params, **SGD, **extra))

        def one(opt: Any = opt) -> None:
            opt.step()

        steps[name] = one
    return steps


def serve(framework: str, threads: int | None) -> None:
    """A worker: build its contenders, warm them up, then run blocks on request."""
    steps = (_og_contenders if framework == "og" else _torch_contenders)(threads)
    for one in steps.values():
        for _ in range(WARMUP):
            one()
    if framework == "og":
        import onnxruntime as ort
        version = f"onnxruntime {ort.__version__}"
    else:
        import torch
        version = f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads"
    answer(steps, {"version": version})


def run(threads: int | None, rounds: int, block: int) -> None:
    extra = [] if threads is None else ["--threads", str(threads)]
    workers = {name: Worker(__file__, [name, *extra], name) for name in ("og", "torch")}
    times: dict[str, list[float]] = {name: [] for name in OG + TORCH}
    order = OG + TORCH
    try:
        for r in range(rounds):
            k = (r * 3) % len(order)  # who goes first rotates
            for name in order[k:] + order[:k]:
                time.sleep(0.1)  # the other worker's threads stop spinning
                times[name] += workers[name.partition(":")[0]].block(block, name)
    finally:
        for w in workers.values():
            w.close()
    n = sum(int(np.prod(s)) for s in _shapes())
    print(f"optimizer update alone, resnet18 ({len(_shapes())} tensors, {n / 1e6:.1f}M "
          f"parameters), threads: {threads or 'default'}")
    print(f"  {workers['og'].report['version']}; {workers['torch'].report['version']}")
    median = {name: statistics.median(ts) for name, ts in times.items()}
    for name in order:
        print(f"  {name:22s} median {median[name] * 1e3:8.2f} ms  ({len(times[name])} steps)")
    for og_name, kind in (("og:adamw", "adamw"), ("og:sgd", "sgd")):
        for name in TORCH:
            if name.split(":")[1].split("-")[0] == kind:
                print(f"  ratio {og_name} / {name:20s} {median[og_name] / median[name]:6.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of both frameworks (default: theirs)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=3, help="steps per block")
    parser.add_argument("--serve", choices=["og", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.threads)
    else:
        run(args.threads, args.rounds, args.block)


if __name__ == "__main__":
    main()
