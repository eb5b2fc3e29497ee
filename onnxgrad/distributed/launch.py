"""``onnxgrad launch -n N script.py [args...]``: run a training script on N processes with MPI.

A thin wrapper over the ``mpiexec`` installed with the ``distributed`` extra (the ``mpich`` wheel
puts it beside this Python), so ``pip install 'onnxgrad[distributed]'`` is the whole set-up;
``--hostfile`` spreads the processes across machines as ``mpiexec -hostfile`` does.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

INSTALL = "pip install 'onnxgrad[distributed]'"


class LaunchError(Exception):
    """A launch that cannot start (no MPI, no script): one line for the user."""


def find_mpiexec() -> str:
    """The ``mpiexec`` of this environment's MPI, else the first on ``PATH``."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise LaunchError(f"no MPI launcher (mpiexec) found beside {sys.executable} or on PATH; "
                          f"install the extra: {INSTALL}")
    return found


def command(nproc: int, script: str, args: list[str], hostfile: str | None = None) -> list[str]:
    """The ``mpiexec`` command line that runs ``script`` on ``nproc`` processes."""
    if nproc < 1:
        raise LaunchError(f"-n must be at least 1, got {nproc}")
    if not os.path.isfile(script):  # the user's own mistake first
        raise LaunchError(f"{script}: no such file")
    if importlib.util.find_spec("mpi4py") is None:
        raise LaunchError(f"mpi4py is not installed, so the processes could not talk to each "
                          f"other; install the extra: {INSTALL}")
    line = [find_mpiexec(), "-n", str(nproc)]
    if hostfile is not None:
        if not os.path.isfile(hostfile):
            raise LaunchError(f"{hostfile}: no such host file")
        line += ["-hostfile", hostfile]
    return line + [sys.executable, script, *args]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="onnxgrad launch",
        description="Run a training script on N processes with MPI (mpiexec -n N python SCRIPT); "
        "inside it, onnxgrad.distributed.init_process_group() reads rank and world size.")
    parser.add_argument("-n", "--nproc", type=int, required=True, metavar="N",
                        help="number of processes")
    parser.add_argument("--hostfile", metavar="FILE",
                        help="MPI host file, to run across machines")
    parser.add_argument("script", help="the Python script to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    ns = parser.parse_args(argv)
    try:
        line = command(ns.nproc, ns.script, ns.args, ns.hostfile)
    except LaunchError as exc:
        print(f"onnxgrad launch: error: {exc}", file=sys.stderr)
        return 2
    return subprocess.run(line, check=False).returncode
