"""Collectives on NumPy buffers behind one small interface, so another engine can be added.

:class:`Collectives` is what the rest of onnxgrad uses (``DistributedDataParallel``, the
``dist.all_reduce`` front); :class:`MPICollectives` implements it with mpi4py's buffer API
(``Allreduce(MPI.IN_PLACE, buf)``, ``Bcast``: no pickling, no copy of the buffer), and
:class:`LocalCollectives` is the world of one process, which needs no MPI at all.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["REDUCE_OPS", "Collectives", "LocalCollectives", "MPICollectives", "launched_size"]

REDUCE_OPS = ("sum", "avg", "product", "min", "max")

# Environment variables MPI launchers set in every process they start (MPICH/Hydra, Open MPI,
# Slurm's PMI): a process started by `mpiexec -n 4` without mpi4py must not train alone.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def launched_size() -> int:
    """The world size an MPI launcher announced in the environment (1 when none did)."""
    for var in _SIZE_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 1


@runtime_checkable
class Collectives(Protocol):
    """One process's end of a group: rank, size and the collectives on NumPy buffers.

    Buffers are C-contiguous arrays; ``all_reduce`` and ``broadcast`` work in place and return
    the buffer. Every process of the group must call the same collectives in the same order.
    """

    name: str
    rank: int
    world_size: int

    def all_reduce(self, buffer: np.ndarray, op: str = "sum") -> np.ndarray: ...

    def broadcast(self, buffer: np.ndarray, src: int = 0) -> np.ndarray: ...

    def all_gather(self, buffer: np.ndarray) -> np.ndarray: ...

    def barrier(self) -> None: ...

    def abort(self, code: int = 1) -> None: ...

    def close(self) -> None: ...


def _check(buffer: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(buffer, np.ndarray):
        raise TypeError(f"{what}: expects a NumPy array, got {type(buffer).__name__}")
    if not buffer.flags.c_contiguous or not buffer.flags.writeable:
        raise ValueError(f"{what}: the buffer must be C-contiguous and writeable (it is reduced "
                         f"in place)")
    return buffer


def _check_op(op: str) -> str:
    if op not in REDUCE_OPS:
        raise ValueError(f"all_reduce: unknown reduce op {op!r}; expected one of "
                         f"{', '.join(REDUCE_OPS)}")
    return op


class LocalCollectives:
    """The world of one process: every collective is the identity (no MPI needed)."""

    name = "local"
    rank = 0
    world_size = 1

    def all_reduce(self, buffer: np.ndarray, op: str = "sum") -> np.ndarray:
        _check_op(op)
        return _check(buffer, "all_reduce")

    def broadcast(self, buffer: np.ndarray, src: int = 0) -> np.ndarray:
        if src != 0:
            raise ValueError(f"broadcast: src {src} is not a rank of a world of size 1")
        return _check(buffer, "broadcast")

    def all_gather(self, buffer: np.ndarray) -> np.ndarray:
        return np.array(buffer)[None]

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        os._exit(code)

    def close(self) -> None:
        pass


class MPICollectives:
    """MPI through mpi4py on ``MPI.COMM_WORLD`` (rank and size from ``mpiexec``)."""

    name = "mpi"

    def __init__(self) -> None:
        from mpi4py import MPI  # optional: imported on use

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self._ops = {"sum": MPI.SUM, "avg": MPI.SUM, "product": MPI.PROD, "min": MPI.MIN,
                     "max": MPI.MAX}
        self._hook: Any = None
        if self.world_size > 1:
            self._abort_on_uncaught_exception()

    def _abort_on_uncaught_exception(self) -> None:
        # NOTE: a rank that raises and exits normally would leave the others blocked in their
        # next collective forever; MPI_Abort ends the whole job with the error printed once.
        previous = sys.excepthook

        def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
            previous(kind, value, tb)
            sys.stderr.write(f"onnxgrad.distributed: rank {self.rank} raised "
                             f"{kind.__name__}; aborting all {self.world_size} processes\n")
            sys.stderr.flush()
            self.abort(1)

        self._hook, self._previous_hook = hook, previous
        sys.excepthook = hook

    def all_reduce(self, buffer: np.ndarray, op: str = "sum") -> np.ndarray:
        _check(buffer, "all_reduce")
        self.comm.Allreduce(self._mpi.IN_PLACE, buffer, op=self._ops[_check_op(op)])
        if op == "avg":
            if np.issubdtype(buffer.dtype, np.integer):
                np.floor_divide(buffer, self.world_size, out=buffer)
            else:
                np.divide(buffer, self.world_size, out=buffer)
        return buffer

    def broadcast(self, buffer: np.ndarray, src: int = 0) -> np.ndarray:
        _check(buffer, "broadcast")
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast: src {src} is not a rank of a world of size "
                             f"{self.world_size}")
        self.comm.Bcast(buffer, root=src)
        return buffer

    def all_gather(self, buffer: np.ndarray) -> np.ndarray:
        send = np.ascontiguousarray(buffer)
        out = np.empty((self.world_size,) + send.shape, send.dtype)
        self.comm.Allgather(send, out)
        return out

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        # NOTE: the launcher forwards each rank's output on its own time, and an abort that
        # follows a message at once can end the job before the message is forwarded (measured:
        # MPICH's mpiexec lost a failing rank's traceback in 1 of 5 runs of
        # tests/test_distributed.py; none in 8 with the pause).
        time.sleep(0.5)
        self.comm.Abort(code)

    def close(self) -> None:
        if self._hook is not None and sys.excepthook is self._hook:
            sys.excepthook = self._previous_hook
        self._hook = None
