"""Compiled data-parallel steps: the traced step split at the gradient all-reduce.

ONNX has no collective operator, so a compiled step of a ``DistributedDataParallel`` model with
several processes is two ONNX models run in turn by one runner (``runtime.staged``), with MPI
between them:

    model A (gradients): forward, gradients, BatchNorm statistics; outputs the loss and the
        gradients packed into a few flat buckets (``bucket.<k>``: Concat of flattened gradients,
        PyTorch's bucket order and 25 MB cap, one dtype each)
    all-reduce of each bucket in place (sum / world size: the average)
    model B (update): unpacks the averaged buckets (Split, Reshape) into the gradients and runs
        the optimizer update (and whatever else the step did with the gradients: clipping, ...)

While tracing, DDP's after-backward hook calls :func:`average_in_step`: the bucket is recorded
(its Concat is an output of the traced graph) and a new leaf stands for its average (an input);
the step then reads ``.grad`` values unpacked from that leaf. ``og.compile`` builds the one graph as
for any step, and :func:`split_step` cuts it where the averages enter (``passes.split``).

Before each run every process checks, with one 16-byte all_gather, that all run the same step
(bucket layout, data shapes, graph): a mismatch raises on every rank, naming what differs, before
any all-reduce could pair up mismatched buffers or hang.

``export(path)`` writes both models: ``path`` (gradients) and ``<stem>.update.onnx`` beside it, each
with the metadata ``onnxgrad.allreduce`` naming the buckets, their parameters' layout and the files.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..passes.split import split_model
from ..runtime.metadata import ALLREDUCE, DATA_INPUTS, STATE
from ..runtime.staged import StagedRunner
from . import state
from .compile import Program, write_step
from .tensor import Tensor, Val, emit

__all__ = ["SplitProgram", "StepMismatchError", "average_in_step", "broadcast_in_step", "split_step",
           "update_path"]


class StepMismatchError(RuntimeError):
    """The processes of a data-parallel job are not running the same compiled step."""


@dataclass
class Cut:
    """One gradient bucket of a traced step: packed (an output of model A), averaged (an input
    of model B), and which parameters it holds."""

    name: str
    packed: Val
    averaged: Val
    params: list[Tensor]
    collectives: Any
    on_reduce: Callable[[float, int, int], None] | None = None


@dataclass
class Broadcast:
    """State that every process takes from rank 0 before each step (DDP's buffers)."""

    tensors: list[Tensor]
    collectives: Any


def _const(values: Sequence[int]) -> Val:
    return Val(np.asarray(values, dtype=np.int64), const=True)


def average_in_step(buckets: Sequence[Sequence[Tensor]], collectives: Any,
                    on_reduce: Callable[[float, int, int], None] | None = None) -> None:
    """While tracing: the ``.grad`` of each bucket's parameters packed into one flat tensor that
    the step averages across processes, then read back from the average (DDP's reducer)."""
    trace = state.active_trace()
    cuts: list[Cut] = trace.cuts
    for bucket in buckets:
        flats = []
        for p in bucket:
            g = p._grad._v if p._grad is not None else Val(np.zeros_like(p._v.data), const=True)
            flats.append(emit("Reshape", [g, _const([-1])])[0])
        packed = flats[0] if len(flats) == 1 else emit("Concat", flats, {"axis": 0})[0]
        averaged = Val(np.array(packed.data))  # a leaf: the input model B reads
        cuts.append(Cut(f"bucket.{len(cuts)}", packed, averaged, list(bucket), collectives,
                        on_reduce))
        sizes = [p._v.data.size for p in bucket]
        parts = ([averaged] if len(bucket) == 1 else
                 emit("Split", [averaged, _const(sizes)], {"axis": 0}, n_out=len(bucket)))
        for p, part in zip(bucket, parts):
            if p._grad is not None:  # zeros stood for a missing gradient: it stays None
                p._grad._v = emit("Reshape", [part, _const(p._v.data.shape)])[0]


def broadcast_in_step(tensors: Sequence[Tensor], collectives: Any) -> None:
    """While tracing: before each run of the step, every process takes rank 0's values of these
    state tensors (DDP's ``broadcast_buffers``)."""
    trace = state.active_trace()
    trace.broadcasts.append(Broadcast(list(tensors), collectives))


def update_path(path: str | os.PathLike[str]) -> Path:
    """The update model's file beside the gradients model's: ``step.onnx`` -> ``step.update.onnx``."""
    path = Path(path)
    suffix = path.suffix or ".onnx"
    return path.with_name(f"{path.stem if path.suffix else path.name}.update{suffix}")


# --------------------------------------------------------------------------- building
@dataclass
class Parts:
    """The two models (or one, without buckets), their runner and what export writes."""

    models: list[onnx.ModelProto]
    runner: StagedRunner
    layout: dict[str, Any]


def split_step(proto: onnx.ModelProto, trace: Any, names: dict[int, str],
               state_pairs: dict[str, str], initial: dict[str, np.ndarray],
               carried: Sequence[str], data_names: Sequence[str]) -> Parts:
    """The traced step ``proto`` (buckets as outputs ``bucket.<k>``, their averages as inputs
    ``bucket.<k>.averaged``) as models and the runner that all-reduces between them."""
    models, links = _split(proto, trace.cuts)
    outputs = {o.name for o in proto.graph.output}
    fed_back = set(state_pairs.values())
    bucket_names = {c.name for c in trace.cuts}
    returned = [n for n in links if n in outputs and n not in fed_back and n not in carried
                and n not in bucket_names]
    collectives = next((c.collectives for c in [*trace.cuts, *trace.broadcasts]), None)
    broadcast = [names[id(t)] for b in trace.broadcasts for t in b.tensors
                 if names.get(id(t)) in state_pairs]
    broadcast = list(dict.fromkeys(broadcast))
    buckets = []
    for cut in trace.cuts:
        offset, params = 0, []
        for p in cut.params:
            n = int(p._v.data.size)
            params.append({"parameter": names.get(id(p), "?"), "shape": list(p._v.data.shape),
                           "offset": offset, "numel": n})
            offset += n
        buckets.append({"name": cut.name, "op": "avg", "dtype": str(cut.packed.data.dtype),
                        "numel": offset, "parameters": params})
    layout = {"buckets": buckets, "broadcast_from_rank0": broadcast,
              "passed": [n for n in links if n not in bucket_names]}
    data = {i.name: _type_text(i) for i in models[0].graph.input if i.name in set(data_names)}
    graph = "|".join(f"{n.op_type}({','.join(n.input)})" for m in models for n in m.graph.node)
    check = {"inputs": data, "buckets": [[(q["parameter"], q["shape"]) for q in b["parameters"]]
                                         + [b["dtype"]] for b in buckets],
             "broadcast": broadcast, "graph": [zlib.crc32(graph.encode()), len(graph)]}
    sync = _Sync(collectives, trace.cuts, broadcast, check)
    runner = StagedRunner([m.SerializeToString() for m in models], state_pairs, initial,
                          carried=carried, links=links, returned=returned, between=sync)
    sync.runner = runner
    return Parts(models, runner, layout)


def _split(proto: onnx.ModelProto, cuts: Sequence[Cut]) -> tuple[list[onnx.ModelProto],
                                                                  list[str]]:
    if not cuts:
        return [proto], []
    a, b, links = split_model(proto, {f"{c.name}.averaged": c.name for c in cuts})
    return [a, b], links


def _type_text(value: onnx.ValueInfoProto) -> str:
    t = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
    return f"{onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)}{dims}"


class _Sync:
    """What runs between the models: before model A the check that every process runs this
    step, then rank 0's buffers; before model B the all-reduce of the buckets."""

    def __init__(self, collectives: Any, cuts: Sequence[Cut], broadcast: list[str],
                 check: dict[str, Any]):
        self.collectives = collectives
        # Names only: the traced values (bucket-sized arrays) are not kept with the program.
        self.buckets = [c.name for c in cuts]
        self.on_reduce = cuts[0].on_reduce if cuts else None
        self.broadcast = broadcast
        self.check = check
        text = json.dumps(check, sort_keys=True)
        self.digest = np.array([zlib.crc32(text.encode()), len(text)], dtype=np.int64)
        self.runner: StagedRunner | None = None

    def __call__(self, stage: int, links: dict[str, np.ndarray]) -> None:
        if self.collectives is None or self.collectives.world_size == 1:
            return
        if stage == 0:
            self._check_same_step()
            self._broadcast()
        elif stage == 1:
            start = time.perf_counter()
            nbytes = 0
            for name in self.buckets:
                buffer = links[name]
                self.collectives.all_reduce(buffer, "avg")
                nbytes += buffer.nbytes
            if self.on_reduce is not None:
                self.on_reduce(time.perf_counter() - start, nbytes, len(self.buckets))

    def _broadcast(self) -> None:
        runner = self.runner
        by_dtype: dict[np.dtype, list[str]] = {}
        for name in self.broadcast:
            by_dtype.setdefault(runner.current(name).dtype, []).append(name)
        for group in by_dtype.values():
            flat = np.concatenate([runner.current(n).reshape(-1) for n in group])
            self.collectives.broadcast(flat, 0)
            offset = 0
            for n in group:
                current = runner.current(n)
                runner.write(n, flat[offset:offset + current.size].reshape(current.shape))
                offset += current.size

    def _check_same_step(self) -> None:
        every = self.collectives.all_gather(self.digest)
        if (every == self.digest).all():
            return
        # Every rank sees the mismatch in the gathered digests: all describe their step.
        text = json.dumps(self.check, sort_keys=True).encode()
        sizes = self.collectives.all_gather(np.array([len(text)], dtype=np.int64))
        buffer = np.zeros(int(sizes.max()), dtype=np.uint8)
        buffer[:len(text)] = np.frombuffer(text, dtype=np.uint8)
        gathered = self.collectives.all_gather(buffer)
        checks = [json.loads(bytes(row[:int(n)]).decode())
                  for row, n in zip(gathered, sizes[:, 0])]
        raise StepMismatchError(_difference(checks, self.collectives.rank))


def _difference(checks: list[dict[str, Any]], me: int) -> str:
    """Names what differs between this rank's step and that of the first rank whose differs."""
    other = next(r for r, c in enumerate(checks) if c != checks[me])
    mine, theirs = checks[me], checks[other]
    head = ("og.compile: the processes do not run the same DistributedDataParallel step "
            "(checked before the gradient all-reduce): ")
    for name in sorted(set(mine["inputs"]) | set(theirs["inputs"])):
        a, b = mine["inputs"].get(name), theirs["inputs"].get(name)
        if a != b:
            return head + (f"input {name!r} is {a or 'absent'} on rank {me} but "
                           f"{b or 'absent'} on rank {other}")
    if mine["buckets"] != theirs["buckets"]:
        return head + (f"the gradient buckets differ: rank {me} has "
                       f"{_buckets_text(mine['buckets'])}, rank {other} has "
                       f"{_buckets_text(theirs['buckets'])}")
    if mine["broadcast"] != theirs["broadcast"]:
        return head + (f"the buffers broadcast from rank 0 differ: {mine['broadcast']} on rank "
                       f"{me}, {theirs['broadcast']} on rank {other}")
    return head + (f"the traced graphs differ between rank {me} and rank {other} (different "
                   f"code, modules or settings traced)")


def _buckets_text(buckets: list[list[Any]]) -> str:
    if not buckets:
        return "none (a step without a synchronized backward, e.g. inside no_sync())"
    return "; ".join(", ".join(f"{n}{list(s)}" for n, s in b[:-1]) for b in buckets)


# --------------------------------------------------------------------------- the program
class SplitProgram(Program):
    """A compiled data-parallel step: :class:`Program`'s bookkeeping, run by the staged runner."""

    def __init__(self, *args: Any, parts: Parts, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.parts = parts

    def run(self, args: Sequence[np.ndarray]) -> Any:
        sync = self.parts.runner.between
        if sync.broadcast and sync.collectives.world_size > 1 and sync.collectives.rank != 0:
            for name in sync.broadcast:
                # Rank 0's values are written over the buffer the tensors view: a value handed
                # out before (a kept state_dict) keeps its own copy.
                self.views.before_write(name, None)
        return super().run(args)

    def export(self, path: str | os.PathLike[str], *, portable: bool = False,
               opset: int | None = None, model: onnx.ModelProto | None = None) -> None:
        """Both models: ``path`` and :func:`update_path` (see :func:`export_parts`)."""
        export_parts(self.parts, path, self.defaults(), portable=portable, opset=opset,
                     model=model)


# --------------------------------------------------------------------------- export
def export_parts(parts: Parts, path: str | os.PathLike[str], defaults: dict[str, np.ndarray], *,
                 portable: bool = False, opset: int | None = None,
                 model: onnx.ModelProto | None = None) -> None:
    """Write model A to ``path`` and model B to :func:`update_path`, with the metadata naming
    the buckets to all-reduce, their parameters and the other file."""
    models = parts.models
    if model is not None:  # the step written otherwise (a symbolic batch): split the same way
        cuts = [b["name"] for b in parts.layout["buckets"]]
        models = (split_model(model, {f"{c}.averaged": c for c in cuts})[:2] if cuts
                  else [model])
    paths = [Path(path)] + ([update_path(path)] if len(models) > 1 else [])
    files = {"gradients": paths[0].name}
    if len(paths) > 1:
        files["update"] = paths[1].name
    for k, (m, p) in enumerate(zip(models, paths)):
        out = onnx.ModelProto()
        out.CopyFrom(m)
        props = {prop.key: prop.value for prop in out.metadata_props}
        inputs = {i.name for i in out.graph.input}
        outputs = {o.name for o in out.graph.output}
        state_map = {o: i for o, i in json.loads(props.get(STATE, "{}")).items() if o in outputs}
        data = [n for n in json.loads(props.get(DATA_INPUTS, "[]")) if n in inputs]
        meta = dict(parts.layout, files=files, stage=["gradients", "update"][k])
        del out.metadata_props[:]
        for key, value in props.items():
            out.metadata_props.add(key=key, value=value)
        _set_prop(out, STATE, json.dumps(state_map))
        _set_prop(out, DATA_INPUTS, json.dumps(data))
        _set_prop(out, ALLREDUCE, json.dumps(meta))
        write_step(out, p, {n: v for n, v in defaults.items() if n in inputs},
                   portable=portable, opset=opset)


def _set_prop(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)
