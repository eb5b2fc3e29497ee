"""Eager composites in one ONNX Runtime run: ``@fused`` op builders (a training BatchNorm's dozen
nodes) get their nodes' results from one session of all of them, not one session run per node.

The builder's Python still runs at every call, as it would unfused: its checks, its records for
autograd, its in-place updates and whatever it reads. Only where each node's result comes from
changes. A call is *captured* (its nodes logged as they run one by one, with where each input came
from: an argument, an earlier node's output, a constant); from the second capture of a signature
(the arguments' dtypes, shapes, ``requires_grad`` and plain values, and grad mode) one session
holds those nodes and outputs all their results. Later calls with that signature run it first,
then *replay* the builder: each node it emits is checked against the log (op, attributes, the
same inputs: the same argument, the same earlier node's output, equal constants) and takes its
result from the run. A node that differs ends the replay: it and the rest run one by one as
unfused code does, and the signature is not fused again. So a replay never gives a result other
than running the builder's nodes one at a time: the session runs the same nodes with no graph
optimization, and the CPU kernels' bits are those of the single-node kernels
(``tests/test_fusion.py`` compares them).

Not fused: calls while ``og.compile`` traces (the trace records node by node), calls inside a
fused call, and calls with an argument whose buffer NumPy shares (``og.from_numpy``,
``.numpy()``), which an in-place op could write over during the call.

NOTE: measured on the eager autograd tutorial's resnet18 at 64x64 (2 threads, one process,
fused and unfused calls alternating): a training BatchNorm is 13 nodes (the batch statistics, the
running statistics, the normalization), 260 of the forward's 315; fused, the forward runs 90
sessions instead of 315 and takes 1.3-1.6 ms less at batch 1 (e.g. 19.3 -> 17.8 ms, 18.2 ->
16.8 ms over five runs); at batch 8 the difference is within the noise (41.6 -> 40.3, 46.2 ->
50.1 ms). What remains per node is Python (checks, records), not the runs.
"""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..runtime.lowering import lower_small_convs, static_shapes
from ..runtime.session import cached_group, find_group, get_providers, make_session, typed_model
from . import state

#: Whether ``@fused`` builders run fused (tests turn it off to compare).
ENABLED = True
#: An input made inside the builder that is not an earlier node's output (a ``ones`` scale) is
#: baked into the session and compared at each replay, up to this many elements.
MAX_BAKED_ELEMENTS = 64
#: Signatures remembered (capture counts and those not fused), least recently used first out.
MAX_SIGNATURES = 1024

#: A signature's session is made at most this many times: once, and again after an eviction
#: (or ``set_providers``); a loop whose shapes change at every step evicts groups before they
#: are used again, and then runs them unfused rather than making sessions at every call.
MAX_BUILDS = 2

_local = threading.local()
_UNFUSABLE = object()
# signature -> captures so far (an int), _UNFUSABLE, or ("fused", sessions made): the session
# is in runtime/session.py's bounded cache of node groups.
_seen: OrderedDict[Any, Any] = OrderedDict()


def active() -> _Capture | _Replay | None:
    """The capture or replay ``emit`` reports to in this thread, if any."""
    return getattr(_local, "active", None)


class _Node:
    __slots__ = ("attrs", "key", "n_out", "op", "refs")

    def __init__(self, op: str, attrs: dict[str, Any], key: Any, refs: tuple, n_out: int):
        self.op, self.attrs, self.key, self.refs, self.n_out = op, attrs, key, refs, n_out


def _data_ref(kind: str, data: np.ndarray) -> tuple:
    return (kind, data.dtype.str, data.shape, data.tobytes())


class _Capture:
    """Logs a call's nodes and where their inputs came from; ``failed`` when one cannot be fused
    (an input from outside that is neither an argument nor a small constant)."""

    def __init__(self, args: Sequence[Any]):
        self.args = args  # the tensor arguments' Vals at the call
        self.nodes: list[_Node] = []
        self.made: dict[int, tuple[int, int]] = {}  # id(Val) -> (node, output)
        self.keep: list[Any] = []  # the logged Vals, alive so that their ids stay theirs
        self.failed = False

    def take(self, op: str, key: Any, inputs: Sequence[Any], n_out: int) -> None:
        return None  # capturing: every node runs on its own

    def _argument(self, v: Any) -> int | None:
        """The index of the argument whose Val ``v`` is, if any."""
        return next((i for i, a in enumerate(self.args) if v is a), None)

    def made_vals(self, op: str, attrs: dict[str, Any], key: Any, inputs: Sequence[Any],
                  vals: Sequence[Any]) -> None:
        refs = []
        for v in inputs:
            if v is None:
                refs.append(None)
            elif id(v) in self.made:
                refs.append(("o",) + self.made[id(v)])
            elif (arg := self._argument(v)) is not None:
                refs.append(("a", arg))
            elif v.const or (v.rec is None and v.data.size <= MAX_BAKED_ELEMENTS):
                refs.append(_data_ref("c", v.data))
            else:
                self.failed = True
                refs.append(None)
        j = len(self.nodes)
        self.nodes.append(_Node(op, attrs, key, tuple(refs), len(vals)))
        for k, v in enumerate(vals):
            self.made[id(v)] = (j, k)
        self.keep.extend(vals)


class _Replay:
    """Hands each emitted node its result from the fused run while the builder emits the logged
    nodes in order; ``diverged`` from the first node that differs."""

    def __init__(self, nodes: list[_Node], args: Sequence[Any], outs: list[np.ndarray]):
        self.nodes = nodes
        self.args = args
        self.outs = outs
        self.produced: list[Sequence[Any]] = []
        self.pos = 0
        self.offset = 0  # index in outs of the next node's first output
        self.diverged = False

    def _matches(self, node: _Node, op: str, key: Any, inputs: Sequence[Any], n_out: int) -> bool:
        if node.op != op or node.key != key or node.n_out != n_out \
                or len(node.refs) != len(inputs):
            return False
        for ref, v in zip(node.refs, inputs):
            if ref is None or v is None:
                if ref is not v:
                    return False
            elif ref[0] == "a":
                if v is not self.args[ref[1]]:
                    return False
            elif ref[0] == "o":
                if v is not self.produced[ref[1]][ref[2]]:
                    return False
            elif ref != _data_ref("c", v.data):
                return False
        return True

    def take(self, op: str, key: Any, inputs: Sequence[Any], n_out: int) -> list | None:
        if self.diverged or self.pos >= len(self.nodes) \
                or not self._matches(self.nodes[self.pos], op, key, inputs, n_out):
            self.diverged = True
            return None
        outs = self.outs[self.offset:self.offset + n_out]
        self.offset += n_out
        self.pos += 1
        return outs

    def made_vals(self, op: str, attrs: dict[str, Any], key: Any, inputs: Sequence[Any],
                  vals: Sequence[Any]) -> None:
        if not self.diverged:
            self.produced.append(vals)


def _model(nodes: list[_Node], args: Sequence[Any]) -> onnx.ModelProto:
    """The logged nodes as one model: the arguments they read are its inputs, their constants
    its initializers, every node output a graph output."""
    graph_inputs, initializers, onnx_nodes, outputs = [], [], [], []
    used: set[int] = set()
    for j, node in enumerate(nodes):
        names = []
        for p, ref in enumerate(node.refs):
            if ref is None:
                names.append("")
            elif ref[0] == "a":
                names.append(f"a{ref[1]}")
                if ref[1] not in used:
                    used.add(ref[1])
                    data = args[ref[1]].data
                    graph_inputs.append(helper.make_tensor_value_info(
                        f"a{ref[1]}", helper.np_dtype_to_tensor_dtype(data.dtype), data.shape))
            elif ref[0] == "o":
                names.append(f"o{ref[1]}_{ref[2]}")
            else:
                _, dtype, shape, raw = ref
                name = f"c{j}_{p}"
                array = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
                initializers.append(numpy_helper.from_array(array, name))
                names.append(name)
        outs = [f"o{j}_{k}" for k in range(node.n_out)]
        onnx_nodes.append(helper.make_node(node.op, names, outs, name=f"n{j}", **node.attrs))
        outputs.extend(helper.make_empty_tensor_value_info(o) for o in outs)
    graph = helper.make_graph(onnx_nodes, "fused", graph_inputs, outputs, initializer=initializers)
    model = typed_model(graph)
    if get_providers()[0] == "CPUExecutionProvider":
        # The Convs run_node lowers at these sizes, lowered alike (runtime/lowering.py).
        lower_small_convs(model, static_shapes(model.graph))
    return model


class _Fused:
    """A signature's session and the log its replays follow."""

    def __init__(self, nodes: list[_Node], args: Sequence[Any]):
        self.nodes = nodes
        self.inputs = sorted({ref[1] for node in nodes for ref in node.refs
                              if ref is not None and ref[0] == "a"})
        self.session = make_session(_model(nodes, args), level="disabled", spinning=False,
                                    arena=False)


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a plain argument (tensors by dtype, shape and requires_grad);
    raises TypeError for what has none."""
    from .tensor import Tensor

    if isinstance(value, Tensor):
        return ("T", value.dtype.str, tuple(value.shape), value.requires_grad)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_freeze(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str, np.generic)):
        return (type(value).__name__, value)
    raise TypeError(type(value).__name__)


def _remember(signature: Any, what: Any) -> None:
    _seen[signature] = what
    _seen.move_to_end(signature)
    while len(_seen) > MAX_SIGNATURES:
        _seen.popitem(last=False)


def fused(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run the op builder ``fn``'s nodes as one session where it is called again with a
    signature seen before (module docstring); its Python runs at every call."""
    from .tensor import Tensor

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not ENABLED or active() is not None or state.active_trace() is not None:
            return fn(*args, **kwargs)
        try:
            signature = (fn, state.grad_enabled(), _freeze(args), _freeze(sorted(kwargs.items())))
        except TypeError:
            return fn(*args, **kwargs)
        tensors = [a._v for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        if any(getattr(v, "shared", None) is True for v in tensors):
            # NOTE: an in-place op writes a NumPy-shared buffer over (Tensor._through), so an
            # argument's data could change during the call, after the fused run read it.
            return fn(*args, **kwargs)
        seen = _seen.get(signature, 0)
        if seen is _UNFUSABLE:
            return fn(*args, **kwargs)
        if isinstance(seen, int):
            return _capture(fn, args, kwargs, signature, tensors, seen, 0)
        entry = find_group(signature)
        if entry is None:  # evicted: captured and made again, as a signature seen twice
            return _capture(fn, args, kwargs, signature, tensors, 1, seen[1])
        try:
            outs = entry.session.run(None, {f"a{i}": tensors[i].data for i in entry.inputs})
        except Exception:  # noqa: BLE001 - the nodes one by one raise onnxgrad's own error
            _remember(signature, _UNFUSABLE)
            return fn(*args, **kwargs)
        replay = _Replay(entry.nodes, tensors, outs)
        _local.active = replay
        try:
            result = fn(*args, **kwargs)
        finally:
            _local.active = None
        if replay.diverged or replay.pos != len(entry.nodes):
            _remember(signature, _UNFUSABLE)
        return result

    return wrapper


def _capture(fn: Callable[..., Any], args: tuple, kwargs: dict, signature: Any,
             tensors: list[Any], seen: int, builds: int) -> Any:
    capture = _Capture(tensors)
    _local.active = capture
    try:
        result = fn(*args, **kwargs)
    finally:
        _local.active = None
    if capture.failed or len(capture.nodes) < 2 or builds >= MAX_BUILDS:
        _remember(signature, _UNFUSABLE)
    elif seen == 0:
        _remember(signature, 1)  # a session only for a signature seen twice
    else:
        try:
            cached_group(signature, lambda: _Fused(capture.nodes, tensors))
        except Exception:  # noqa: BLE001 - a node ONNX's inference rejects in a graph: unfused
            _remember(signature, _UNFUSABLE)
        else:
            _remember(signature, ("fused", builds + 1))
    return result
