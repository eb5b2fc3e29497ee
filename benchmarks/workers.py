"""The worker processes the benchmarks compare frameworks in.

Each framework runs in a process of its own (ONNX Runtime's and PyTorch's intra-op threads spin
after a run and starve each other in one process): the driver starts the benchmark script again
with ``--serve ...``, and the two talk in JSON lines, the worker answering each command line with
one JSON object. The driver asks the workers in turn for blocks of steps, so machine noise hits
every contender alike.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class Worker:
    """``script --serve <args>`` in a process of its own; ``report`` is its first answer."""

    def __init__(self, script: str, args: Sequence[str], name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, script, "--serve", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.report = self._read()
        self.times: list[float] = []

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def block(self, steps: int, *what: str) -> list[float]:
        """Time ``steps`` steps (of the contender ``what`` names, for workers that run several);
        the times are kept in ``times`` too."""
        times = self.ask(" ".join(["run", *what, str(steps)]))["times"]
        self.times += times
        return times

    def close(self, answers: bool = False) -> dict[str, Any] | None:
        """Tell the worker to quit; with ``answers``, its last word (a peak-memory report)."""
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        last = self._read() if answers else None
        self.proc.wait()
        return last


def answer(steps: Mapping[str, Callable[[], Any]], report: dict[str, Any]) -> None:
    """The worker's side: send ``report``, then time blocks of steps (``run [name] N``, the named
    step or the only one) until told to ``quit``."""
    print(json.dumps(report), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "quit":
            return
        *name, count = command[1:]
        one = steps[name[0]] if name else next(iter(steps.values()))
        times = []
        for _ in range(int(count)):
            start = time.perf_counter()
            one()
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times}), flush=True)
