"""Time PyTorch's autograd-tutorial loop on resnet18, onnxgrad eager against PyTorch eager.

One iteration is the tutorial: ``zero_grad``, ``prediction = model(data)``,
``loss = (prediction - labels).sum()``, ``loss.backward()``, ``optim.step()`` (SGD, momentum
0.9). Both sides start from the same weights, run interleaved (one onnxgrad iteration, then one
PyTorch iteration) after warm-up, and the medians are compared in the same run, so machine noise
hits both alike. onnxgrad's phases (forward, backward, step) are timed separately too.

    python benchmarks/eager_tutorial.py                    # batch 1 and 8 at 64x64
    python benchmarks/eager_tutorial.py --batches 8 --iters 20
    python benchmarks/eager_tutorial.py --profile          # plus a pyinstrument profile
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnxgrad.models import resnet18

import onnxgrad as og

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _torch_model() -> Any:
    from torch_reference import torch_resnet  # torchvision when installed, else its rebuild

    return torch_resnet("resnet18")


def tutorial_step(model: Any, optim: Any, data: Any, labels: Any,
                  phases: dict[str, list[float]]) -> None:
    """The tutorial's loop body, timed by phase; onnxgrad and PyTorch run the same code."""
    t0 = time.perf_counter()
    optim.zero_grad()
    prediction = model(data)
    loss = (prediction - labels).sum()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    optim.step()
    t3 = time.perf_counter()
    phases["forward"].append(t1 - t0)
    phases["backward"].append(t2 - t1)
    phases["step"].append(t3 - t2)


def _timed(fn, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bench(batch: int, size: int, iters: int, warmup: int) -> dict[str, float]:
    import torch

    torch.manual_seed(0)
    t_model = _torch_model().train()
    model = resnet18().train()
    model.load_state_dict({k: v.detach().numpy() for k, v in t_model.state_dict().items()})
    rng = np.random.default_rng(0)
    data = rng.random((batch, 3, size, size), dtype=np.float32)
    labels = rng.random((batch, 1000), dtype=np.float32)
    og_data, og_labels = og.tensor(data), og.tensor(labels)
    t_data, t_labels = torch.from_numpy(data), torch.from_numpy(labels)
    # NOTE: lr 1e-4 keeps 1000-class sum-loss training finite over many iterations (timing
    # only; values are not compared here).
    og_opt = og.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    t_opt = torch.optim.SGD(t_model.parameters(), lr=1e-4, momentum=0.9)
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    t_phases: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    ours, theirs = [], []
    for i in range(warmup + iters):
        # Alternate which side goes first, so neither always runs right after the other's
        # thread pools (spinning workers, warm caches) in the same slot.
        first, second = ((tutorial_step, model, og_opt, og_data, og_labels, phases),
                         (tutorial_step, t_model, t_opt, t_data, t_labels, t_phases))
        if i % 2:
            a, b = _timed(*first), _timed(*second)
        else:
            b, a = _timed(*second), _timed(*first)
        if i >= warmup:
            ours.append(a)
            theirs.append(b)
    out = {"onnxgrad": statistics.median(ours), "torch": statistics.median(theirs)}
    for name in phases:
        out[name] = statistics.median(phases[name][warmup:])
        out["torch " + name] = statistics.median(t_phases[name][warmup:])
    return out


def profile(batch: int, size: int, iters: int) -> None:
    from pyinstrument import Profiler

    model = resnet18().train()
    optim = og.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    data, labels = og.rand(batch, 3, size, size), og.rand(batch, 1000)
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    tutorial_step(model, optim, data, labels, phases)  # warm: sessions built outside the profile
    profiler = Profiler(interval=0.0005)
    profiler.start()
    for _ in range(iters):
        tutorial_step(model, optim, data, labels, phases)
    profiler.stop()
    print(profiler.output_text(unicode=False, color=False, show_all=False))


def _set_threads(n: int) -> None:
    """Both libraries on ``n`` intra-op threads (before any session exists)."""
    import torch
    from onnxgrad.runtime import session

    torch.set_num_threads(n)
    make_options = session.session_options

    def options(**kwargs: Any):
        opts = make_options(**kwargs)
        opts.intra_op_num_threads = n
        return opts

    session.session_options = options  # benchmark-only: make_session reads the module global


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for both PyTorch and ONNX Runtime (0: defaults); "
                             "1 is far less sensitive to other processes on a busy machine")
    parser.add_argument("--profile", action="store_true",
                        help="profile onnxgrad's loop with pyinstrument (batch 1)")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import torch

    if args.threads:
        _set_threads(args.threads)

    threads = args.threads or "default"
    print(f"resnet18 eager tutorial loop, {args.size}x{args.size}, medians of {args.iters} "
          f"after {args.warmup} warm-up; torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), onnxruntime {ort.__version__} {og.get_providers()} ({threads} threads)")
    # The machine's load average, since other processes' threads skew both sides' timings.
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    print(f"load average before: {load:.1f} ({cpus} CPUs)")
    if load > cpus and args.threads != 1:
        # Measured here: with other processes competing, PyTorch's OpenMP barriers stall on
        # descheduled threads (steps 10-40x slower), so multi-threaded ratios mean little.
        print("note: the machine is busy; --threads 1 gives comparable figures")
    print(f"{'batch':>5} {'onnxgrad ms':>12} {'torch ms':>9} {'ratio':>6}   phase medians ms, "
          "onnxgrad | torch (forward / backward / step)")
    for batch in (int(b) for b in args.batches.split(",")):
        r = bench(batch, args.size, args.iters, args.warmup)
        ph = " / ".join(f"{r[k] * 1e3:.1f}" for k in ("forward", "backward", "step"))
        t_ph = " / ".join(f"{r['torch ' + k] * 1e3:.1f}" for k in ("forward", "backward", "step"))
        print(f"{batch:>5} {r['onnxgrad'] * 1e3:>12.1f} {r['torch'] * 1e3:>9.1f} "
              f"{r['onnxgrad'] / r['torch']:>6.2f}   {ph} | {t_ph}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.profile:
        profile(1, args.size, max(3, args.iters // 2))


if __name__ == "__main__":
    main()
