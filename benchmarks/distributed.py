"""Data-parallel (DDP) cost on this machine, and a projection to many machines.

    python benchmarks/distributed.py              # MLP and resnet18, 1 and 2 processes
    python benchmarks/distributed.py --model mlp  # one model

The driver launches itself under ``mpiexec -n 1`` and ``-n 2`` (the ``distributed`` extra). Each
run trains eagerly with ``DistributedDataParallel`` at a fixed batch per process (weak scaling)
and reports, from rank 0: the median step time, the all-reduce time per step and its share of
the step, the bytes all-reduced per step and the bucket count. Scaling efficiency from 1 to 2
processes is (samples/s with 2) / (2 x samples/s with 1).

The projection to N machines on a 10 Gb/s network uses a ring all-reduce, which sends
2 (N - 1) / N times the gradient bytes per process, plus a latency of 2 (N - 1) hops of 50 us,
with no overlap of the reduction and the computation (the eager DDP does not overlap yet):
efficiency(N) = t_step / (t_step + t_allreduce(N)), t_step the 1-process step time.

NOTE: this machine has 2 cores, so 2 processes also share the cores that 1 process used with
two threads: the measured 1 -> 2 efficiency mixes communication with core contention (about 50%
at best for a compute-bound step). Each process's ONNX Runtime gets cores / N threads that do
not spin (runtime/session.py does so under an MPI launcher); with ONNX Runtime's defaults the MLP's 2-process step measured
156 ms instead of 8.5 ms.

Measured here (2 cores, 10 steps, medians):
    mlp 784-256-256-10, batch 64/process, 1.03 MiB of gradients in 1 bucket: 1 process 3.1 ms;
        2 processes 8.5 ms, all-reduce 4.8 ms (57%); 1 -> 2 efficiency 37%;
        projected 59% at 8 machines, 28% at 64
    resnet18 at 3x32x32, batch 8/process, 42.65 MiB in 2 buckets: 1 process 135 ms;
        2 processes 305 ms, all-reduce 52 ms (17%, mostly waiting for the slower rank);
        1 -> 2 efficiency 44%; projected 68% at 8 machines, 64% at 64

Compiled steps (``og.compile`` of the same step: the gradients model, the all-reduce of the
buckets, the update model; tracer/split.py) are measured the same way, and after the steps the
buckets' all-reduce alone with the ranks already in step (after a barrier): the communication that
overlapping it with computation could hide at most, one bucket after the other and all started at
once (``Iallreduce``, then wait). Measured here on 2026-11-30 while the machine was shared (load
average far above its 2 cores, so the 1-process runs and the 1 -> 2 efficiencies swung from 20%
to over 100% between runs and are not reported); 2-process figures of three runs:
    mlp: compiled 6.8-8.8 ms a step vs eager DDP 9.3-17.5 ms (gradients model 1.2-1.7 ms,
        all-reduce 2.9-6.1 ms, update model 0.6 ms); the bucket's all-reduce with the ranks in
        step 0.15-5.0 ms, Iallreduce no faster
    resnet18: compiled 239-343 ms vs eager DDP 419-431 ms (gradients model 174-230 ms, all-reduce
        22-40 ms, update model 48-69 ms); the 2 buckets' all-reduce with the ranks in step
        17-25 ms, 7% of the compiled step; all started at once (Iallreduce) 18-24 ms: no gain
    the same-step check (a 16-byte all_gather before each compiled run): 0.01-0.13 ms, up to
        2.6 ms under the heaviest load
So on this machine overlapping the all-reduce with computation could hide at most ~7% of the
resnet18 step, and less in practice: with 2 processes on 2 cores the shared-memory transfer uses
the cores the computation would. Overlap with the backward needs a model per bucket (the backward
cut per bucket, activations passed between models or recomputed) and starting every bucket at
once measured no faster, so the compiled step does not overlap. On a cluster the projected ring
all-reduce of resnet18's 42.65 MiB at 64 machines on 10 Gb/s (~77 ms) is half a 155 ms step:
there, overlap would be worth measuring again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

NETWORK_BYTES_PER_S = 10e9 / 8
HOP_LATENCY_S = 50e-6


def worker(model_name: str, steps: int, compiled: bool) -> None:
    import numpy as np

    import onnxgrad as og
    import onnxgrad.distributed as dist
    import onnxgrad.nn.functional as F

    dist.init_process_group()
    og.manual_seed(0)
    if model_name == "mlp":
        net = og.nn.Sequential(og.nn.Linear(784, 256), og.nn.ReLU(), og.nn.Linear(256, 256),
                               og.nn.ReLU(), og.nn.Linear(256, 10))
        shape, batch = (784,), 64
    else:
        from onnxgrad.models import resnet18

        net = resnet18(num_classes=10)
        shape, batch = (3, 32, 32), 8
    model = og.nn.parallel.DistributedDataParallel(net)
    opt = og.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(dist.get_rank())
    x = og.tensor(rng.standard_normal((batch, *shape)).astype(np.float32))
    y = og.tensor(rng.integers(0, 10, batch))
    def train(x: og.Tensor, y: og.Tensor) -> og.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    step = og.compile(train) if compiled else train
    times = []
    for i in range(steps + 2):
        if i == 2:  # the first steps build sessions
            count, seconds, nbytes = model.reduce_count, model.reduce_seconds, model.reduce_bytes
            runner = getattr(step, "last", None) and step.last.runner
            stage_s = list(getattr(runner, "stage_seconds", []))
        dist.barrier()
        start = time.perf_counter()
        step(x, y)
        if i >= 2:
            times.append(time.perf_counter() - start)
    rounds = max(model.reduce_count - count, 1)
    stage_s = [(t - t0) / steps for t, t0 in zip(getattr(runner, "stage_seconds", []), stage_s)]
    transfer = _transfer_times(dist.get_collectives(), model) if dist.get_world_size() > 1 else {}
    if dist.get_rank() == 0:
        print(json.dumps({
            "world": dist.get_world_size(), "batch": batch, "step_s": statistics.median(times),
            "allreduce_s": (model.reduce_seconds - seconds) / rounds, "stage_s": stage_s,
            "bytes": (model.reduce_bytes - nbytes) // rounds, "buckets": model.bucket_count,
            "param_bytes": sum(p.numel() * 4 for p in model.parameters()), **transfer}),
            flush=True)
    dist.destroy_process_group()


def _transfer_times(collectives, model) -> dict:
    """The all-reduce of the step's buckets with the ranks already in step (after a barrier):
    the communication that overlapping it with computation could hide at most; blocking one
    bucket after the other, and all buckets started at once (MPI Iallreduce) then waited."""
    import numpy as np
    from mpi4py import MPI

    from onnxgrad.nn.parallel import _buckets

    params = [p for p in model.module.parameters() if p.requires_grad]
    buffers = [np.zeros(sum(p.numel() for p in b), np.float32)
               for b in _buckets(params, model.bucket_cap_bytes)]
    comm, blocking, started, checks = collectives.comm, [], [], []
    digest = np.zeros(2, np.int64)
    for _ in range(10):
        comm.Barrier()
        start = time.perf_counter()
        collectives.all_gather(digest)  # the compiled step's same-step check
        checks.append(time.perf_counter() - start)
        comm.Barrier()
        start = time.perf_counter()
        for b in buffers:
            comm.Allreduce(MPI.IN_PLACE, b)
        blocking.append(time.perf_counter() - start)
        comm.Barrier()
        start = time.perf_counter()
        MPI.Request.Waitall([comm.Iallreduce(MPI.IN_PLACE, b) for b in buffers])
        started.append(time.perf_counter() - start)
    return {"transfer_s": statistics.median(blocking), "check_s": statistics.median(checks),
            "transfer_nonblocking_s": statistics.median(started)}


def launch(model_name: str, n: int, steps: int, compiled: bool = False) -> dict:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // n)))
    done = subprocess.run([str(mpiexec), "-n", str(n), sys.executable, __file__, "--worker",
                           model_name, "--steps", str(steps)] + (["--compiled"] if compiled
                                                                 else []),
                          capture_output=True, text=True,
                          check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def project(step_s: float, grad_bytes: int, n: int) -> float:
    t_reduce = 2 * (n - 1) / n * grad_bytes / NETWORK_BYTES_PER_S + 2 * (n - 1) * HOP_LATENCY_S
    return step_s / (step_s + t_reduce)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["mlp", "resnet18", "all"], default="all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worker", choices=["mlp", "resnet18"], help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.compiled)
        return
    for name in (["mlp", "resnet18"] if args.model == "all" else [args.model]):
        one, two = launch(name, 1, args.steps), launch(name, 2, args.steps)
        efficiency = (2 * two["batch"] / two["step_s"]) / (2 * one["batch"] / one["step_s"])
        print(f"{name}: batch {one['batch']} per process; gradients "
              f"{one['param_bytes'] / 2**20:.2f} MiB")
        print(f"  1 process : step {one['step_s'] * 1e3:8.2f} ms")
        print(f"  2 processes: step {two['step_s'] * 1e3:8.2f} ms, all-reduce "
              f"{two['allreduce_s'] * 1e3:.2f} ms ({two['allreduce_s'] / two['step_s']:.1%} of "
              f"the step), {two['bytes'] / 2**20:.2f} MiB in {two['buckets']} bucket(s) per step")
        print(f"  scaling efficiency 1 -> 2 processes (this machine): {efficiency:.1%}")
        for n in (8, 64):
            print(f"  projected efficiency at {n} machines, 10 Gb/s ring all-reduce: "
                  f"{project(one['step_s'], two['bytes'], n):.1%}")
        c1, c2 = launch(name, 1, args.steps, True), launch(name, 2, args.steps, True)
        c_eff = (2 * c2["batch"] / c2["step_s"]) / (2 * c1["batch"] / c1["step_s"])
        a, b = (c2["stage_s"] + [0.0, 0.0])[:2]
        print(f"  compiled, 1 process : step {c1['step_s'] * 1e3:8.2f} ms")
        print(f"  compiled, 2 processes: step {c2['step_s'] * 1e3:8.2f} ms (eager DDP "
              f"{two['step_s'] * 1e3:.2f} ms): gradients model {a * 1e3:.2f} ms, all-reduce "
              f"{c2['allreduce_s'] * 1e3:.2f} ms ({c2['allreduce_s'] / c2['step_s']:.1%}), "
              f"update model {b * 1e3:.2f} ms; 1 -> 2 efficiency {c_eff:.1%}")
        print(f"  all-reduce of the buckets with the ranks in step (what overlap could hide at "
              f"most): {c2['transfer_s'] * 1e3:.2f} ms ({c2['transfer_s'] / c2['step_s']:.1%} "
              f"of the compiled step); all buckets started at once (Iallreduce) "
              f"{c2['transfer_nonblocking_s'] * 1e3:.2f} ms; the same-step check (16-byte "
              f"all_gather) {c2['check_s'] * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
