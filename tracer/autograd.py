"""``backward``: differentiate what was recorded and run the gradient graph as one ORT session."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnx_ir as ir

from ..passes import gradient_graph
from ..runtime import IR_VERSION, OPSET, make_session
from ..runtime.dump import report_graph
from ..runtime.session import cached
from . import state
from .graph import CONST, DATA, WRT, Walk
from .tensor import Tensor, Val, _contig

stats = {"sessions_created": 0, "backward_runs": 0}


def _classify(v: Val) -> str:
    if v.requires_grad and v.rec is None and v.leaf is not None and v.leaf() is not None:
        return WRT
    return CONST if v.const else DATA


def _follow(v: Val) -> bool:
    return v.requires_grad


def _seed(root: Tensor, gradient: Any, i: int) -> np.ndarray:
    if gradient is None:
        if root.numel() != 1:
            raise RuntimeError("grad can be implicitly created only for scalar outputs "
                               f"(output {i} has shape {list(root.shape)}); pass gradient=...")
        return np.ones(root.shape, dtype=root.dtype)
    data = gradient._v.data if isinstance(gradient, Tensor) else np.asarray(gradient)
    if data.shape != root.shape:
        raise RuntimeError(f"Mismatch in shape: grad_output[{i}] has a shape of {list(data.shape)} "
                           f"and output[{i}] has a shape of {list(root.shape)}.")
    return _contig(data, dtype=root.dtype)


class _Plan:
    __slots__ = ("feeds", "kept", "outputs", "session")

    def __init__(self, session, feeds, kept, outputs):
        self.session = session
        self.feeds = feeds      # session input names, in order
        self.kept = kept        # indices into the WRT leaves that get a gradient
        self.outputs = outputs  # session output names


class GradientModel(NamedTuple):
    """The gradient graph of a recorded computation as a standalone ONNX model.

    Running ``model`` on ``feeds`` (with any ONNX runtime) yields one output per entry of
    ``wrt``, in order: exactly what ``backward`` would accumulate into each leaf's ``.grad``.
    """

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    outputs: list[str]
    wrt: list[Tensor]


def _gradient_ir(walk: Walk) -> tuple[ir.Model, list[int]]:
    """The gradient model of a walk and the indices of its WRT leaves that get a gradient."""
    leaves, _nodes, roots = walk.materialize()
    seeds = [ir.Value(name=f"seed{i}", shape=ir.Shape(r.shape), type=r.type)
             for i, r in enumerate(roots)]
    wrt = [v for v, kind in zip(leaves, walk.kinds) if kind == WRT]
    names = [f"grad{k}" for k in range(len(wrt))]
    graph, kept = gradient_graph(roots, seeds, wrt, grad_names=names, opset=OPSET)
    return ir.Model(graph, ir_version=IR_VERSION, producer_name="onnxgrad"), kept


def _build_plan(walk: Walk) -> _Plan:
    model, kept = _gradient_ir(walk)
    report_graph("backward", model)  # ONNXGRAD_DUMP=DIR: what autodiff appended
    session = make_session(ir.serde.serialize_model(model))
    stats["sessions_created"] += 1
    graph = model.graph
    return _Plan(session, [v.name for v in graph.inputs], kept, [v.name for v in graph.outputs])


def _feeds(walk: Walk, names: Sequence[str], seeds: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Seeds and the saved forward values, by gradient-graph input name (nothing recomputed)."""
    return {name: (seeds[int(name[4:])] if name.startswith("seed") else walk.data_of(name))
            for name in names}


def _prepare(tensors: Sequence[Tensor], grad_tensors: Sequence[Any] | None
             ) -> tuple[list[Tensor], list[np.ndarray]]:
    """Validate backward's arguments (before anything is built) and make the seed arrays."""
    tensors = list(tensors)
    grads = list(grad_tensors) if grad_tensors is not None else [None] * len(tensors)
    if len(grads) != len(tensors):
        raise RuntimeError(f"got {len(tensors)} tensors and {len(grads)} gradients")
    for i, t in enumerate(tensors):
        if not t.requires_grad:
            raise RuntimeError(f"element {i} of tensors does not require grad and does not have "
                               "a grad_fn")
    return tensors, [_seed(t, g, i) for i, (t, g) in enumerate(zip(tensors, grads))]


def _wrt_leaves(walk: Walk) -> list[Val]:
    return [v for v, kind in zip(walk.leaves, walk.kinds) if kind == WRT]


def gradient_model(tensors: Sequence[Tensor] | Tensor,
                   grad_tensors: Sequence[Any] | None = None) -> GradientModel:
    """The ONNX model ``backward(tensors, grad_tensors)`` would run, with its feeds.

    Nothing is run, accumulated or freed, so it can be called before ``backward`` (tests compare
    runtimes on it; tools export it).
    """
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    tensors, seeds = _prepare(tensors, grad_tensors)
    walk = Walk([t._v for t in tensors], _follow, _classify)
    model, kept = _gradient_ir(walk)
    feeds = _feeds(walk, [v.name for v in model.graph.inputs], seeds)
    wrt_leaves = _wrt_leaves(walk)
    return GradientModel(ir.serde.serialize_model(model), feeds,
                         [v.name for v in model.graph.outputs],
                         [wrt_leaves[k].leaf() for k in kept])


def backward(tensors: Sequence[Tensor], grad_tensors: Sequence[Any] | None = None, *,
             retain_graph: bool | None = None, create_graph: bool = False) -> None:
    """Accumulate d(sum(grad * tensor))/d(leaf) into each reachable leaf's ``.grad``."""
    if create_graph:
        raise NotImplementedError("create_graph=True is not supported in eager mode; "
                                  "differentiate the exported graph with onnxgrad.passes instead")
    tensors, seeds = _prepare(tensors, grad_tensors)
    trace = state.active_trace()
    if trace is not None:
        trace.backward(tensors, seeds)
        return
    walk = Walk([t._v for t in tensors], _follow, _classify)
    plan = cached(("backward", walk.key), lambda: _build_plan(walk), len(walk.records))
    results = plan.session.run(plan.outputs, _feeds(walk, plan.feeds, seeds))
    stats["backward_runs"] += 1
    wrt_leaves = _wrt_leaves(walk)
    for k, g in zip(plan.kept, results):
        accumulate(wrt_leaves[k], g)
    if not retain_graph:
        for rec in walk.records:
            rec.freed = True
            rec.inputs = ()


def accumulate(leaf: Val, g: np.ndarray) -> None:
    tensor = leaf.leaf() if leaf.leaf is not None else None
    if tensor is None:
        return
    if tensor.grad is None:
        tensor.grad = Tensor(Val(g))
    else:
        tensor.grad = Tensor(Val(tensor.grad._v.data + g))


def grad(outputs: Sequence[Tensor] | Tensor, inputs: Sequence[Tensor] | Tensor,
         grad_outputs: Sequence[Any] | None = None, retain_graph: bool | None = None,
         allow_unused: bool = False) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad``: gradients of ``outputs`` w.r.t. ``inputs``, without touching .grad."""
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    saved = [t.grad for t in inputs]
    for t in inputs:
        t.grad = None
    try:
        backward(outputs, grad_outputs, retain_graph=retain_graph)
        result = tuple(t.grad for t in inputs)
    finally:
        for t, g in zip(inputs, saved):
            t.grad = g
    if not allow_unused and any(r is None for r in result):
        raise RuntimeError("One of the differentiated Tensors appears to not have been used in the "
                           "graph. Set allow_unused=True if this is the desired behavior.")
    return result


def zero_grads(params: Iterable[Tensor], set_to_none: bool = True) -> None:
    """``zero_grad`` of optimizers and modules: clear each ``.grad`` (or zero it).

    While tracing, the step is told which gradients it cleared itself: those never carry a value
    in from before the step, so whether they are set at call time does not change the graph.
    """
    trace = state.active_trace()
    for p in params:
        if trace is not None:
            trace.cleared.add(id(p))
        if set_to_none:
            p.grad = None
        elif p.grad is not None:
            p.grad = Tensor(Val(np.zeros_like(p.grad._v.data)))
