"""``og.nn.parallel.DistributedDataParallel``: data parallelism across processes, as PyTorch's DDP.

Each process holds a full replica and trains on its own share of the data. Wrapping broadcasts
rank 0's parameters and buffers; after each eager ``loss.backward()`` the gradients of the
wrapped parameters are averaged across processes before ``backward`` returns (an after-backward
callback of tracer/autograd.py), so any optimizer steps with the same averaged gradients on every
rank and the replicas stay identical. Gradients travel packed in a few contiguous buckets (one
``all_reduce`` per bucket, ``bucket_cap_mb`` each, PyTorch's default 25 MB), never one message
per parameter.
"""
from __future__ import annotations

import contextlib
import time
import weakref
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..tracer import split, state
from ..tracer.autograd import register_post_backward_hook
from ..tracer.tensor import Tensor, Val
from .modules import Module

__all__ = ["DistributedDataParallel"]


def _buckets(params: list[Tensor], cap_bytes: int) -> list[list[Tensor]]:
    """Parameters in reverse registration order (the order backward finishes them, as
    PyTorch's buckets), grouped by dtype into runs of at most ``cap_bytes`` (a larger tensor
    gets a bucket of its own)."""
    buckets: list[list[Tensor]] = []
    open_by_dtype: dict[np.dtype, tuple[list[Tensor], list[int]]] = {}
    for p in reversed(params):
        dtype = p._v.data.dtype
        nbytes = p._v.data.nbytes
        bucket, size = open_by_dtype.get(dtype, (None, [0]))
        if bucket is None or (bucket and size[0] + nbytes > cap_bytes):
            bucket, size = [], [0]
            buckets.append(bucket)
            open_by_dtype[dtype] = (bucket, size)
        bucket.append(p)
        size[0] += nbytes
    return buckets


class _Counters:
    """What DDP keeps between calls that is no setting: not a plain scalar attribute, which
    og.compile's key reads (a counter there would retrace compiled steps)."""

    def __init__(self) -> None:
        self.sync_pending = False
        self.reduce_count = 0
        self.reduce_seconds = 0.0
        self.reduce_bytes = 0
        self.bucket_count = 0

    def add(self, seconds: float, nbytes: int, buckets: int) -> None:
        self.reduce_count += 1
        self.reduce_seconds += seconds
        self.reduce_bytes += nbytes
        self.bucket_count = buckets


class DistributedDataParallel(Module):
    """Replicate ``module`` on every process of the default group and average its gradients
    (``torch.nn.parallel.DistributedDataParallel``).

    Call ``onnxgrad.distributed.init_process_group()`` first. BatchNorm uses each process's
    local batch statistics (as DDP without SyncBatchNorm); with ``broadcast_buffers`` (the
    default) rank 0's buffers are copied to every process at each training forward.

    ``device_ids``, ``output_device``, ``process_group`` (only the default group exists),
    ``find_unused_parameters``, ``check_reduction``, ``gradient_as_bucket_view`` and
    ``static_graph`` are accepted for PyTorch's signature and change nothing.

    NOTE: a parameter that got no gradient on this process in a backward keeps ``grad=None``;
    zeros stand for it in the average, so the ranks that have a gradient for it divide by the
    full world size.

    In a step compiled with ``og.compile`` (several processes), the gradients leave the traced
    graph packed in the same buckets and the optimizer update is a second model run after their
    all-reduce (tracer/split.py); rank 0's buffers are broadcast before each run. A compiled step
    called inside ``no_sync()`` is another trace that accumulates without averaging.
    """

    def __init__(self, module: Module, device_ids: Any = None, output_device: Any = None,
                 dim: int = 0, broadcast_buffers: bool = True, process_group: Any = None,
                 bucket_cap_mb: float | None = None, find_unused_parameters: bool = False,
                 check_reduction: bool = False, gradient_as_bucket_view: bool = False,
                 static_graph: bool = False) -> None:
        from .. import distributed as dist

        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"DistributedDataParallel expects a Module, got "
                            f"{type(module).__name__}")
        if not dist.is_initialized():
            raise ValueError("DistributedDataParallel: " + dist._NOT_INITIALIZED)
        if not any(p.requires_grad for p in module.parameters()):
            raise RuntimeError("DistributedDataParallel is not needed when a module doesn't have "
                               "any parameter that requires a gradient.")
        self.module = module
        cap = 25.0 if bucket_cap_mb is None else float(bucket_cap_mb)
        extra = {"dim": dim, "broadcast_buffers": broadcast_buffers,
                 "bucket_cap_bytes": int(cap * 2**20), "require_backward_grad_sync": True,
                 "_collectives": dist.get_collectives(), "_counters": _Counters(),
                 "_handle": None}
        for name, value in extra.items():
            # Plain attributes: not parameters, and no retrace of compiled steps when they change.
            object.__setattr__(self, name, value)
        self._verify_same_model()
        self._sync_module_states()
        me = weakref.ref(self)

        def after_backward(leaves: list[Tensor]) -> None:
            ddp = me()
            if ddp is not None:
                ddp._after_backward(leaves)

        object.__setattr__(self, "_handle", register_post_backward_hook(after_backward))

    # ----------------------------------------------------------------- replicas
    # Counters for benchmarks/distributed.py: rounds, time in them, payload, buckets.
    reduce_count = property(lambda self: self._counters.reduce_count)
    reduce_seconds = property(lambda self: self._counters.reduce_seconds)
    reduce_bytes = property(lambda self: self._counters.reduce_bytes)
    bucket_count = property(lambda self: self._counters.bucket_count)

    @property
    def world_size(self) -> int:
        return self._collectives.world_size

    def _verify_same_model(self) -> None:
        """Every rank must wrap the same parameters (count, shapes, dtypes): checked with one
        all_gather, so all ranks raise together instead of hanging in a mismatched all-reduce."""
        if self.world_size == 1:
            return
        params = list(self.module.named_parameters())
        layout = ";".join(f"{k}:{tuple(p.shape)}:{p._v.data.dtype}" for k, p in params)
        mine = np.array([len(params), zlib.crc32(layout.encode())], dtype=np.int64)
        every = self._collectives.all_gather(mine)
        for rank, (count, digest) in enumerate(every.tolist()):
            if count != len(params):
                raise RuntimeError(f"DDP expects same model across all ranks, but Rank "
                                   f"{self._collectives.rank} has {len(params)} params, while "
                                   f"rank {rank} has inconsistent {count} params.")
            if digest != int(mine[1]):
                raise RuntimeError(f"DDP expects same model across all ranks, but rank "
                                   f"{self._collectives.rank} and rank {rank} have parameters "
                                   f"of different names, shapes or dtypes")

    def _sync_module_states(self) -> None:
        """Every process takes rank 0's parameters and buffers (one broadcast per dtype)."""
        self._broadcast([p for p in self.module.parameters()]
                        + [b for b in self.module.buffers() if b is not None])

    def _broadcast(self, tensors: list[Tensor]) -> None:
        if self.world_size == 1 or not tensors:
            return
        for bucket in _buckets(tensors, 1 << 62):
            flat = np.concatenate([t._v.data.reshape(-1) for t in bucket])
            self._collectives.broadcast(flat, 0)
            offset = 0
            for t in bucket:
                n = t._v.data.size
                value = flat[offset:offset + n].reshape(t._v.data.shape).copy()
                offset += n
                if t.requires_grad:
                    t._set_leaf_data(value)
                else:
                    t._assign(Tensor(Val(value)))

    # ----------------------------------------------------------------- calling
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if self.module.training and self.broadcast_buffers and self.world_size > 1:
            buffers = [b for b in self.module.buffers() if b is not None]
            if state.active_trace() is None:
                self._broadcast(buffers)
            elif buffers:
                # A compiled step's graph cannot hold a collective (ONNX has none): the step
                # takes rank 0's buffers before each run (tracer/split.py).
                split.broadcast_in_step(buffers, self._collectives)
        self._counters.sync_pending = self.require_backward_grad_sync and state.grad_enabled()
        return self.module(*inputs, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes of forwards run inside accumulate local gradients without averaging;
        the first synchronized backward after it averages the accumulated sums
        (``DistributedDataParallel.no_sync``)."""
        old = self.require_backward_grad_sync
        object.__setattr__(self, "require_backward_grad_sync", False)
        # A setting of the module: compiled steps read it again (a step traced inside no_sync
        # accumulates without averaging, one traced outside averages).
        state.settings_changed()
        try:
            yield
        finally:
            object.__setattr__(self, "require_backward_grad_sync", old)
            state.settings_changed()

    # ----------------------------------------------------------------- gradients
    def _after_backward(self, leaves: list[Tensor]) -> None:
        if not self._counters.sync_pending:
            return
        params = [p for p in self.module.parameters() if p.requires_grad]
        reached = {id(t) for t in leaves}
        if not any(id(p) in reached for p in params):
            return  # a backward of something else (this model's forward is still pending)
        self._counters.sync_pending = False
        if state.active_trace() is not None and self.world_size > 1:
            # NOTE: ONNX has no collective op: the compiled step is cut at the buckets into a
            # gradients model and an update model with the all-reduce between them.
            split.average_in_step(_buckets(params, self.bucket_cap_bytes), self._collectives,
                                  self._counters.add)
            return
        self.reduce_gradients(params)

    def reduce_gradients(self, params: list[Tensor] | None = None) -> None:
        """Average the ``.grad`` of ``params`` (default: all of the module's) across processes,
        one all-reduce per bucket."""
        if params is None:
            params = [p for p in self.module.parameters() if p.requires_grad]
        if self.world_size == 1:
            return
        start, nbytes = time.perf_counter(), 0
        buckets = _buckets(params, self.bucket_cap_bytes)
        for bucket in buckets:
            flat = np.concatenate([
                (p._grad._v.data if p._grad is not None
                 else np.zeros_like(p._v.data)).reshape(-1) for p in bucket])
            self._collectives.all_reduce(flat, "avg")
            nbytes += flat.nbytes
            offset = 0
            for p in bucket:
                n = p._v.data.size
                if p._grad is not None:
                    p._grad = Tensor(Val(flat[offset:offset + n].reshape(p._v.data.shape)))
                offset += n
        self._counters.add(time.perf_counter() - start, nbytes, len(buckets))

    def __del__(self) -> None:
        handle = self.__dict__.get("_handle")
        if handle is not None:
            handle.remove()

