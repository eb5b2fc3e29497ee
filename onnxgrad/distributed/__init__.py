"""``onnxgrad.distributed``: process groups and collectives, as ``torch.distributed``.

One default group over all processes of the job, run by an engine behind
:class:`~onnxgrad.distributed.collectives.Collectives` (MPI through mpi4py is the one shipped)::

    import onnxgrad.distributed as dist
    dist.init_process_group()          # rank and world size from `mpiexec -n N`
    dist.all_reduce(t)                 # in place, as PyTorch

NOTE: a world of one process needs no MPI: when mpi4py is not installed and no MPI launcher
started this process, ``init_process_group()`` makes a group of size 1 whose collectives are the
identity (``get_backend()`` is then ``"local"``), so one script runs with and without ``mpiexec``.
A process started by an MPI launcher without mpi4py raises instead of training alone.
"""
from __future__ import annotations

import importlib.util
from datetime import timedelta
from typing import Any

import numpy as np

from ..tracer import state as _state
from ..tracer.split import StepMismatchError
from ..tracer.tensor import Tensor, TraceError, Val
from .collectives import Collectives, LocalCollectives, MPICollectives, launched_size

__all__ = [
    "Backend", "Collectives", "ReduceOp", "StepMismatchError", "all_gather", "all_reduce", "barrier", "broadcast",
    "destroy_process_group", "get_backend", "get_rank", "get_world_size", "group",
    "init_process_group", "is_available", "is_initialized", "is_mpi_available",
]

_DEFAULT: Collectives | None = None
_NOT_INITIALIZED = ("Default process group has not been initialized, please make sure to call "
                    "init_process_group.")


class ReduceOp:
    """The reductions of :func:`all_reduce` (``torch.distributed.ReduceOp``)."""

    SUM = "sum"
    AVG = "avg"
    PRODUCT = "product"
    MIN = "min"
    MAX = "max"


class Backend:
    """Backend names (``torch.distributed.Backend``)."""

    MPI = "mpi"
    LOCAL = "local"


class group:  # PyTorch's name (dist.group.WORLD)
    """``dist.group.WORLD``: the default group (the only one so far)."""

    WORLD = None


def is_available() -> bool:
    """Always true: the package itself needs nothing; MPI is needed only for more than one
    process (``torch.distributed.is_available``)."""
    return True


def is_mpi_available() -> bool:
    """Whether mpi4py (the ``distributed`` extra) is installed."""
    return importlib.util.find_spec("mpi4py") is not None


def is_initialized() -> bool:
    return _DEFAULT is not None


def _default() -> Collectives:
    if _DEFAULT is None:
        raise ValueError(_NOT_INITIALIZED)
    return _DEFAULT


def init_process_group(backend: str | None = None, init_method: str | None = None,
                       timeout: timedelta | None = None, world_size: int = -1, rank: int = -1,
                       store: Any = None, group_name: str = "", pg_options: Any = None,
                       device_id: Any = None) -> None:
    """Join the default process group (``torch.distributed.init_process_group``).

    ``backend`` is ``"mpi"`` (the default) or ``None``; rank and size come from the MPI
    launcher. ``world_size`` and ``rank``, when given, are checked against it.
    """
    global _DEFAULT
    if _DEFAULT is not None:
        raise RuntimeError("trying to initialize the default process group twice!")
    if backend is not None and str(backend).lower() not in ("mpi", "local"):
        raise ValueError(f"init_process_group: backend {backend!r} is not available; onnxgrad "
                         f"ships the 'mpi' backend (pip install 'onnxgrad[distributed]')")
    if init_method not in (None, "env://") or store is not None:
        raise ValueError("init_process_group: rendezvous comes from the MPI launcher "
                         "(mpiexec); init_method and store are not supported")
    engine: Collectives
    if is_mpi_available() and str(backend).lower() != "local":
        engine = MPICollectives()
    elif launched_size() > 1:
        raise RuntimeError(f"init_process_group: this process was started by an MPI launcher "
                           f"with {launched_size()} processes but mpi4py is not installed; "
                           f"install the extra: pip install 'onnxgrad[distributed]'")
    else:
        engine = LocalCollectives()
    for name, given, actual in (("world_size", world_size, engine.world_size),
                                ("rank", rank, engine.rank)):
        if given != -1 and given != actual:
            engine.close()
            raise ValueError(f"init_process_group: {name}={given} but the launcher started "
                             f"this process with {name} {actual}")
    _DEFAULT = engine


def destroy_process_group(group: Any = None) -> None:
    """Leave the default group (``torch.distributed.destroy_process_group``)."""
    global _DEFAULT
    if _DEFAULT is not None:
        _DEFAULT.close()
    _DEFAULT = None


def get_rank(group: Any = None) -> int:
    return _default().rank


def get_world_size(group: Any = None) -> int:
    return _default().world_size


def get_backend(group: Any = None) -> str:
    return _default().name


def get_collectives() -> Collectives:
    """The default group's engine (NumPy-buffer collectives), for code that packs its own
    buffers (DistributedDataParallel's buckets)."""
    return _default()


def barrier(group: Any = None, async_op: bool = False, device_ids: Any = None) -> None:
    _default().barrier()


def _buffer(tensor: Tensor, what: str) -> np.ndarray:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{what}: expects a Tensor, got {type(tensor).__name__}")
    if _state.active_trace() is not None:
        raise TraceError(f"{what}: collectives cannot be traced by og.compile (ONNX has no "
                         f"collective operators); call it outside the compiled function")
    return np.array(tensor._v.data, copy=True, order="C")


def _store(tensor: Tensor, array: np.ndarray) -> None:
    # An in-place update of the tensor, as PyTorch's collectives are (leaves stay leaves).
    if tensor.is_leaf and tensor.requires_grad:
        tensor._set_leaf_data(array)
    else:
        tensor._write(Val(array))


def all_reduce(tensor: Tensor, op: str = ReduceOp.SUM, group: Any = None,
               async_op: bool = False) -> None:
    """Reduce ``tensor`` across all processes, in place (``torch.distributed.all_reduce``)."""
    buffer = _buffer(tensor, "all_reduce")
    _store(tensor, _default().all_reduce(buffer, op))


def broadcast(tensor: Tensor, src: int = 0, group: Any = None, async_op: bool = False) -> None:
    """Copy rank ``src``'s ``tensor`` into every process's, in place."""
    buffer = _buffer(tensor, "broadcast")
    _store(tensor, _default().broadcast(buffer, src))


def all_gather(tensor_list: list[Tensor], tensor: Tensor, group: Any = None,
               async_op: bool = False) -> None:
    """Fill ``tensor_list[i]`` with rank i's ``tensor`` (``torch.distributed.all_gather``)."""
    engine = _default()
    if len(tensor_list) != engine.world_size:
        raise ValueError(f"all_gather: tensor_list has {len(tensor_list)} tensors but the world "
                         f"size is {engine.world_size}")
    gathered = engine.all_gather(_buffer(tensor, "all_gather"))
    for out, part in zip(tensor_list, gathered):
        if tuple(out.shape) != part.shape:
            raise ValueError(f"all_gather: output tensor of shape {tuple(out.shape)} does not "
                             f"match the input's {part.shape}")
        _store(out, np.array(part, dtype=out._v.data.dtype))
