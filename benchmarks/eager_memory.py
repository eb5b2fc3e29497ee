"""Resident memory of an eager training loop whose batch size changes at every step.

Every new batch size makes a new gradient plan (a session), and used to make new single-node
kernels too; this loop shows that the caches' bounds hold native memory flat. Prints the RSS
every ``--every`` steps and its growth from the first report after ``--warmup`` steps to the end.

    python benchmarks/eager_memory.py                    # 1,000 steps, batch sizes 1..256
    python benchmarks/eager_memory.py --steps 300 --max-batch 64
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from onnxgrad.runtime import session

import onnxgrad as og
from onnxgrad import nn
from onnxgrad.nn import functional as F


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=300)
    args = parser.parse_args()

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = og.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    first = None
    start = time.perf_counter()
    print(f"{'step':>6} {'RSS MiB':>8} {'plans':>6} {'kernels':>8}")
    for step in range(1, args.steps + 1):
        batch = int(rng.integers(1, args.max_batch + 1))
        x = og.tensor(rng.standard_normal((batch, 32)).astype(np.float32))
        y = og.tensor(rng.integers(0, 10, batch))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % args.every == 0:
            rss = rss_mib()
            if first is None and step >= args.warmup:
                first = (step, rss)
            print(f"{step:>6} {rss:>8.1f} {len(session._plans):>6} {len(session._kernels):>8}",
                  flush=True)
    if first is not None:
        print(f"RSS growth from step {first[0]} to {args.steps}: {rss_mib() - first[1]:+.1f} MiB "
              f"({(time.perf_counter() - start) / args.steps * 1e3:.1f} ms per step)")


if __name__ == "__main__":
    main()
