"""``backward``: differentiate what was recorded and run the gradient graph as one ORT session.

Two ways to run a gradient:

- the **session** path (``backward`` of a plain training step): the autodiff pass builds the
  gradient graph of the recording, which runs as one cached ONNX Runtime session fed the saved
  forward values;
- the **replay** path (``create_graph=True``, hooks and ``retain_grad`` of non-leaves, ``grad``
  with respect to non-leaves): the pass builds the same gradient nodes, and each is emitted as an
  eager recorded op as soon as the pass appends it (:class:`_Replay`). Gradients are then tensors
  with a history made of the rules' ONNX nodes, so they can be differentiated again, and a hook
  sees (and may replace) the gradient of its tensor before it flows further. Inside ``og.compile``
  the replayed nodes are recorded into the step like any op.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnx_ir as ir

from ..passes import gradient_graph, gradients
from ..passes.autodiff import GRAD_OF
from ..passes.builder import Builder
from ..runtime import IR_VERSION, OPSET, make_session
from ..runtime.dump import report_graph
from ..runtime.session import cached_plan
from ..runtime.step import outputs_before_reshape
from . import state
from .graph import CONST, DATA, WRT, Walk
from .tensor import Tensor, Val, _contig, emit

stats = {"sessions_created": 0, "backward_runs": 0, "replay_runs": 0}


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
    __slots__ = ("feeds", "kept", "outputs", "session", "views")

    def __init__(self, session, feeds, kept, outputs, views):
        self.session = session
        self.feeds = feeds      # session input names, in order
        self.kept = kept        # indices into the WRT leaves that get a gradient
        self.outputs = outputs  # session output names
        self.views = views      # per output: the shape to view it in (None: as it comes)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.session.run(self.outputs, feeds)
        return [r if shape is None else r.reshape(shape) for r, shape in zip(results, self.views)]


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
    proto = ir.serde.serialize_model(model)
    outputs = [o.name for o in proto.graph.output]
    # A weight gradient made by a Reshape of its matrix product is output before the Reshape,
    # which copied it, and viewed in its shape here (resnet18 8x64: 14 ms of copies a backward).
    viewed = outputs_before_reshape(proto, outputs)
    session = make_session(proto)
    stats["sessions_created"] += 1
    return _Plan(session, [i.name for i in proto.graph.input], kept, outputs,
                 [viewed.get(name) for name in outputs])


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


# --------------------------------------------------------------------------- hooks
# Hooks and retain_grad live beside the tensors, not in them: a leaf's by the tensor (its Val is
# replaced by each optimizer step), a non-leaf's by the Val it had when the hook was registered
# (what gradients flow to).
class _ByTensor:
    """A weak table keyed by tensor identity (a WeakKeyDictionary would compare tensors with
    ``==``, which is elementwise)."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref, Any]] = {}

    def _drop(self, key: int) -> Callable[[weakref.ref], None]:
        return lambda ref: self._items.pop(key, None)

    def get(self, t: Tensor, default: Any = None) -> Any:
        item = self._items.get(id(t))
        return item[1] if item is not None and item[0]() is t else default

    def setdefault(self, t: Tensor, value: Any) -> Any:
        item = self._items.get(id(t))
        if item is None or item[0]() is not t:
            self._items[id(t)] = (weakref.ref(t, self._drop(id(t))), value)
            return value
        return item[1]

    def __contains__(self, t: Any) -> bool:
        return self.get(t) is not None

    def __bool__(self) -> bool:
        return bool(self._items)


_LEAF_HOOKS = _ByTensor()
_VAL_HOOKS: weakref.WeakKeyDictionary[Val, dict[int, Callable]] = weakref.WeakKeyDictionary()
_RETAINED: weakref.WeakKeyDictionary[Val, weakref.ref] = weakref.WeakKeyDictionary()
_hook_ids = iter(range(1, 1 << 62))


class RemovableHandle:
    """What ``register_hook`` returns: ``handle.remove()`` unregisters the hook (also as a
    context manager, as ``torch.utils.hooks.RemovableHandle``)."""

    def __init__(self, table: dict[int, Callable], key: int):
        self._table = table
        self.id = key

    def remove(self) -> None:
        self._table.pop(self.id, None)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register_hook(tensor: Tensor, hook: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
    """``Tensor.register_hook``: ``hook(grad)`` runs when the tensor's gradient is computed and may
    return a gradient to use instead (``torch.Tensor.register_hook``)."""
    if not tensor.requires_grad:
        raise RuntimeError("cannot register a hook on a tensor that doesn't require gradient")
    if not callable(hook):
        raise TypeError(f"register_hook expects a callable, got {type(hook).__name__}")
    if tensor.is_leaf:
        table = _LEAF_HOOKS.setdefault(tensor, {})
    else:
        table = _VAL_HOOKS.setdefault(tensor._v, {})
    key = next(_hook_ids)
    table[key] = hook
    return RemovableHandle(table, key)


_POST_BACKWARD: dict[int, Callable[[list[Tensor]], None]] = {}


def register_post_backward_hook(hook: Callable[[list[Tensor]], None]) -> RemovableHandle:
    """``hook(leaves)`` runs after each eager ``backward`` has accumulated every ``.grad``, with the
    leaves that received a gradient (the place where DistributedDataParallel averages gradients
    across processes, as PyTorch's reducer does before ``backward`` returns). A backward traced
    by ``og.compile`` calls it too, with the leaves it differentiates (the gradients are graph
    values then: a hook that cannot be recorded raises); ``og.autograd.grad`` does not."""
    key = next(_hook_ids)
    _POST_BACKWARD[key] = hook
    return RemovableHandle(_POST_BACKWARD, key)


def _after_backward(leaves: list[Tensor]) -> None:
    for hook in list(_POST_BACKWARD.values()):
        hook(leaves)


def _leaf_tensors(vals: Iterable[Val]) -> list[Tensor]:
    """The live tensors of leaf Vals (a leaf whose tensor was dropped has none)."""
    tensors = (v.leaf() if v.leaf is not None else None for v in vals)
    return [t for t in tensors if t is not None]


def retain_grad(tensor: Tensor) -> None:
    """``Tensor.retain_grad``: a non-leaf keeps its ``.grad`` after backward (no-op on leaves)."""
    if not tensor.requires_grad:
        raise RuntimeError("can't retain_grad on Tensor that has requires_grad=False")
    if tensor.is_leaf:
        return
    _RETAINED[tensor._v] = weakref.ref(tensor)


def retains_grad(tensor: Tensor) -> bool:
    ref = _RETAINED.get(tensor._v)
    return ref is not None and ref() is tensor


def non_leaf_grad_warning() -> None:
    """PyTorch's warning for ``.grad`` of a non-leaf that does not retain it."""
    warnings.warn(
        "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad "
        "attribute won't be populated during autograd.backward(). If you indeed want the .grad "
        "field to be populated for a non-leaf Tensor, use .retain_grad() on the non-leaf Tensor. "
        "If you access the non-leaf Tensor by mistake, make sure you access the leaf Tensor "
        "instead.", UserWarning, stacklevel=3)


def _run_hooks(hooks: Iterable[Callable], g: Tensor) -> Tensor:
    trace = state.active_trace()
    for hook in list(hooks):
        result = hook(g)
        if result is None:
            if trace is not None:
                # NOTE: inside og.compile a hook runs once, while tracing, on the traced gradient:
                # what it returns is compiled into the step, but a hook that only looks (prints,
                # stores the gradient) would see the trace's values and never the later calls'.
                warnings.warn(
                    f"og.compile: the tensor hook {getattr(hook, '__name__', hook)!r} returned "
                    "None while tracing; hooks run once, at trace time, so its side effects do "
                    "not happen on later calls (only a gradient it returns is compiled in)",
                    UserWarning, stacklevel=2)
            continue
        if not isinstance(result, Tensor):
            raise TypeError(f"a tensor hook must return a Tensor or None, got "
                            f"{type(result).__name__}")
        if result.shape != g.shape:
            raise RuntimeError(f"hook '{getattr(hook, '__name__', 'hook')}' has changed the "
                               f"size of value: expected {list(g.shape)}, got "
                               f"{list(result.shape)}")
        if result.dtype != g.dtype:
            raise RuntimeError(f"hook '{getattr(hook, '__name__', 'hook')}' has changed the type "
                               f"of value (was {g.dtype} got {result.dtype})")
        g = result
    return g


def leaf_hooks_key(tensors: Sequence[Tensor]) -> tuple:
    """Which hooks these leaves have (og.compile's key: a trace runs them, so a hook added or
    removed later must trace again, never reuse a step that has the old ones baked in)."""
    if not _LEAF_HOOKS:
        return ()
    key = tuple(tuple(_LEAF_HOOKS.get(t) or ()) for t in tensors)
    return key if any(key) else ()


def _leaf_hooked(tensor: Tensor, g: Val) -> Val:
    hooks = _LEAF_HOOKS.get(tensor)
    if not hooks:
        return g
    return _run_hooks(hooks.values(), Tensor(g))._v


def _special(walk: Walk, roots: Sequence[Val]) -> dict[tuple[int, int], Val]:
    """The non-leaf Vals under the walk that have hooks or retain their gradient, by
    (record, output): the replay path calls their hooks while the gradient flows."""
    if not _VAL_HOOKS and not _RETAINED:
        return {}
    found: dict[tuple[int, int], Val] = {}
    for v in list(roots) + [u for rec in walk.records for u in rec.inputs if u is not None]:
        if v.rec is not None and (v in _VAL_HOOKS or v in _RETAINED):
            found[(id(v.rec), v.index)] = v
    return found


# --------------------------------------------------------------------------- the replay path
class _Replay(list):
    """The node list of a Builder that emits each node as an eager op as it is appended."""

    def __init__(self, vals: dict[int, Val]):
        super().__init__()
        self.vals = vals
        self.records: list[tuple[ir.Node, Any]] = []

    def append(self, node: ir.Node) -> None:
        super().append(node)
        outs = replay_node(node, self.vals)
        if outs and outs[0].rec is not None:
            self.records.append((node, outs[0].rec))

    def tag(self) -> None:
        """Copy the pass's GRAD_OF marks (set once a rule returns) onto the replayed records."""
        for node, rec in self.records:
            grad_of = node.meta.get(GRAD_OF)
            if grad_of is not None:
                rec.meta = {**(rec.meta or {}), GRAD_OF: grad_of}


def replay_node(node: ir.Node, vals: dict[int, Val]) -> list[Val]:
    """Emit one onnx_ir node as an eager op on the Vals of its inputs (``vals``: id of an ir.Value
    -> its Val, extended with the outputs)."""
    ins = [None if v is None else vals[id(v)] for v in node.inputs]
    if node.op_type == "Constant":
        outs = [Val(_contig(node.attributes["value"].value.numpy()), const=True)]
    elif node.op_type == "ConstantOfShape":
        # Data with no gradient, from a static shape: made here (single-node sessions take no
        # tensor attributes).
        attr = node.attributes.get("value")
        fill = attr.value.numpy().reshape(-1) if attr is not None else np.zeros(1, np.float32)
        outs = [Val(np.full(tuple(int(d) for d in ins[0].data), fill[0], fill.dtype),
                    const=ins[0].const)]
    else:
        attrs: dict[str, Any] = {}
        for name, a in node.attributes.items():
            value = a.value
            if a.type == ir.AttributeType.TENSOR:
                value = _contig(value.numpy())
            elif isinstance(value, (tuple, list)):
                value = list(value)
            attrs[name] = value
        outs = emit(node.op_type, ins, attrs, n_out=len(node.outputs))
    for value, val in zip(node.outputs, outs):
        vals[id(value)] = val
    return outs


def _output_val(rec: Any, j: int) -> Val:
    """A Val of output ``j`` of a record (the original may be gone; recording keys on the record)."""
    data = rec.outs[j]
    return Val(data, rec, j, rec.grad and data.dtype.kind == "f")


def _replay_gradients(roots: Sequence[Val], seeds: Sequence[Val], wrt: Sequence[Val], *,
                      create_graph: bool) -> list[Val | None]:
    """Gradients of ``roots`` (weighted by ``seeds``) with respect to ``wrt`` by the replay path.

    ``wrt`` may hold non-leaves. Hooks and ``retain_grad`` of non-leaves run as the gradient
    flows; leaves' hooks are the caller's (they run when a gradient is accumulated or returned).
    """
    walk = Walk(list(roots), _follow, lambda v: CONST if v.const else DATA)
    special = _special(walk, roots)
    leaves, nodes, root_values = walk.materialize()
    vals: dict[int, Val] = {}
    by_val: dict[int, ir.Value] = {}  # id(leaf Val) or (record, output) -> its ir value
    for value, v in zip(leaves, walk.leaves):
        vals[id(value)] = v
        by_val[id(v)] = value
    rec_index = {id(rec): i for i, rec in enumerate(walk.records)}
    for node in nodes:
        for value in node.outputs:
            i, j = (int(x) for x in value.name[1:].split("_"))
            vals[id(value)] = _output_val(walk.records[i], j)
    produced = {value.name: value for node in nodes for value in node.outputs}
    seed_values = []
    for k, (root, seed) in enumerate(zip(root_values, seeds)):
        value = ir.Value(name=f"seed{k}", shape=root.shape, type=root.type)
        vals[id(value)] = seed
        seed_values.append(value)

    def ir_of(v: Val) -> ir.Value | None:
        if v.rec is not None and id(v.rec) in rec_index:
            return produced.get(f"r{rec_index[id(v.rec)]}_{v.index}")
        if v.rec is None or not _follow(v):
            return by_val.get(id(v))
        return None

    wrt_values = [ir_of(v) for v in wrt]
    replay = _Replay(vals)
    b = Builder(replay, prefix="replay")
    counter = iter(range(1 << 62))

    def on_total(value: ir.Value, g: ir.Value) -> ir.Value:
        name = value.name
        if not name.startswith("r") or "_" not in name:
            return g
        i, j = (int(x) for x in name[1:].split("_"))
        original = special.get((id(walk.records[i]), j))
        if original is None:
            return g
        grad = Tensor(vals[id(g)])
        hooks = _VAL_HOOKS.get(original)
        if hooks:
            grad = _run_hooks(hooks.values(), grad)
        ref = _RETAINED.get(original)
        owner = ref() if ref is not None else None
        if owner is not None:
            kept = grad._v if create_graph else Val(grad._v.data)
            if owner._grad is None:
                owner._grad = Tensor(kept)
            else:
                owner._grad = Tensor(emit("Add", [owner._grad._v, kept])[0])
        if grad._v is vals[id(g)]:
            return g
        new = ir.Value(name=f"hooked{next(counter)}", shape=g.shape, type=g.type)
        vals[id(new)] = grad._v
        return new

    previous = state.grad_enabled()
    state.set_grad_enabled(create_graph)
    try:
        present = [(k, v) for k, v in enumerate(wrt_values) if v is not None]
        found = gradients(b, root_values, seed_values, [v for _, v in present], on_total)
        replay.tag()
    finally:
        state.set_grad_enabled(previous)
    results: list[Val | None] = [None] * len(wrt)
    for (k, _), g in zip(present, found):
        if g is not None:
            results[k] = vals[id(g)]
    stats["replay_runs"] += 1
    return results


def _free(roots: Sequence[Val]) -> None:
    walk = Walk(list(roots), _follow, _classify)
    for rec in walk.records:
        rec.freed = True
        rec.inputs = ()


# --------------------------------------------------------------------------- backward and grad
def backward(tensors: Sequence[Tensor] | Tensor, grad_tensors: Sequence[Any] | Any = None, *,
             retain_graph: bool | None = None, create_graph: bool = False,
             inputs: Sequence[Tensor] | Tensor | None = None) -> None:
    """Accumulate d(sum(grad * tensor))/d(leaf) into each reachable leaf's ``.grad``
    (``torch.autograd.backward``)."""
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    if isinstance(grad_tensors, Tensor) or (grad_tensors is not None
                                            and not isinstance(grad_tensors, (list, tuple))):
        grad_tensors = [grad_tensors]
    if retain_graph is None:
        retain_graph = create_graph
    tensors, seeds = _prepare(tensors, grad_tensors)
    trace = state.active_trace()
    walk = Walk([t._v for t in tensors], _follow, _classify)
    wrt_leaves = _wrt_leaves(walk)
    if inputs is not None:
        only = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        if not only:
            raise RuntimeError("'inputs' argument to backward() cannot be empty.")
        wrt_leaves = [v for v in wrt_leaves if any(v.leaf() is t for t in only)]
    hooked = any(v.leaf() in _LEAF_HOOKS for v in wrt_leaves) if _LEAF_HOOKS else False
    if not create_graph and inputs is None and not _special(walk, [t._v for t in tensors]) \
            and not (hooked and trace is not None):
        if trace is not None:
            trace.backward(tensors, seeds)
            if _POST_BACKWARD:
                _after_backward(_leaf_tensors(wrt_leaves))
            return
        # No leaf left (og.rand(3, requires_grad=True) * x): nothing to run, as in PyTorch,
        # where the gradient lands in a leaf no one holds.
        kept: list[int] = []
        results: list[np.ndarray] = []
        if wrt_leaves:
            plan = cached_plan(("backward", walk.key), lambda: _build_plan(walk),
                               lambda: sum(o.nbytes for rec in walk.records for o in rec.outs))
            results = plan.run(_feeds(walk, plan.feeds, seeds))
            kept = plan.kept
            stats["backward_runs"] += 1
        for k, g in zip(kept, results):
            accumulate(wrt_leaves[k], g)
        if not retain_graph:
            for rec in walk.records:
                rec.freed = True
                rec.inputs = ()
        if _POST_BACKWARD:
            _after_backward(_leaf_tensors(wrt_leaves[k] for k in kept))
        return
    seed_vals = _seed_vals(tensors, grad_tensors, seeds)
    found = _replay_gradients([t._v for t in tensors], seed_vals, wrt_leaves,
                              create_graph=create_graph)
    reached: list[Tensor] = []
    for leaf, g in zip(wrt_leaves, found):
        if g is None:
            continue
        tensor = leaf.leaf()
        if tensor is None:
            continue
        reached.append(tensor)
        g = _leaf_hooked(tensor, g)
        if trace is not None:
            trace.accumulate(tensor, g)
        elif tensor._grad is None:
            tensor._grad = Tensor(g if create_graph else Val(g.data))
        elif create_graph:
            tensor._grad = Tensor(emit("Add", [tensor._grad._v, g])[0])
        else:
            tensor._grad = Tensor(Val(tensor._grad._v.data + g.data))
    if not retain_graph and trace is None:
        _free([t._v for t in tensors])
    if _POST_BACKWARD:
        _after_backward(reached)


def _seed_vals(tensors: Sequence[Tensor], grad_tensors: Sequence[Any] | None,
               seeds: Sequence[np.ndarray]) -> list[Val]:
    """The seeds as Vals; a seed tensor keeps its history (a gradient of it is differentiable)."""
    given = list(grad_tensors) if grad_tensors is not None else [None] * len(tensors)
    return [g._v if isinstance(g, Tensor) and g._v.data.dtype == s.dtype else Val(s)
            for g, s in zip(given, seeds)]


def accumulate(leaf: Val, g: np.ndarray) -> None:
    tensor = leaf.leaf() if leaf.leaf is not None else None
    if tensor is None:
        return
    if tensor in _LEAF_HOOKS:
        g = _leaf_hooked(tensor, Val(g)).data
    if tensor._grad is None:
        tensor._grad = Tensor(Val(g))
    else:
        tensor._grad = Tensor(Val(tensor._grad._v.data + g))


def grad(outputs: Sequence[Tensor] | Tensor, inputs: Sequence[Tensor] | Tensor,
         grad_outputs: Sequence[Any] | Any = None, retain_graph: bool | None = None,
         create_graph: bool = False, only_inputs: bool = True, allow_unused: bool | None = None,
         is_grads_batched: bool = False, materialize_grads: bool = False
         ) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad``: gradients of ``outputs`` w.r.t. ``inputs``, without touching .grad.

    With ``create_graph=True`` the gradients are recorded tensors (the rules' ONNX nodes), so they
    can be differentiated again: Hessian-vector products, gradient penalties.
    """
    if is_grads_batched:
        raise NotImplementedError("grad: is_grads_batched=True is not supported")
    if allow_unused is None:
        allow_unused = materialize_grads
    if materialize_grads and not allow_unused:
        raise ValueError("Expected allow_unused to be True or not passed when materialize_grads"
                         "=True, but got: allow_unused=False.")
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if isinstance(grad_outputs, Tensor) or (grad_outputs is not None
                                            and not isinstance(grad_outputs, (list, tuple))):
        grad_outputs = [grad_outputs]
    if not inputs:
        raise RuntimeError("grad requires non-empty inputs.")
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise TypeError(f"grad: inputs[{i}] must be a Tensor, got {type(t).__name__}")
        if not t.requires_grad:
            raise RuntimeError("One of the differentiated Tensors does not require grad")
    if retain_graph is None:
        retain_graph = create_graph
    simple = (not create_graph and all(t.is_leaf for t in inputs)
              and len({id(t) for t in inputs}) == len(inputs))
    if simple:
        walk = Walk([t._v for t in outputs if t.requires_grad], _follow, _classify)
        simple = not _special(walk, [t._v for t in outputs])
    if simple:
        saved = [t._grad for t in inputs]
        for t in inputs:
            t._grad = None
        try:
            backward(outputs, grad_outputs, retain_graph=retain_graph)
            result = tuple(t._grad for t in inputs)
        finally:
            for t, g in zip(inputs, saved):
                t._grad = g
    else:
        outputs, seeds = _prepare(outputs, grad_outputs)
        found = _replay_gradients([t._v for t in outputs], _seed_vals(outputs, grad_outputs, seeds),
                                  [t._v for t in inputs], create_graph=create_graph)
        result = tuple(None if g is None else
                       Tensor(_leaf_hooked(t, g) if t.is_leaf else g)
                       for t, g in zip(inputs, found))
        if not retain_graph and state.active_trace() is None:
            _free([t._v for t in outputs])
    if not allow_unused and any(r is None for r in result):
        raise RuntimeError("One of the differentiated Tensors appears to not have been used in the "
                           "graph. Set allow_unused=True if this is the desired behavior.")
    if materialize_grads:
        result = tuple(Tensor(Val(np.zeros(t.shape, t.dtype))) if r is None else r
                       for r, t in zip(result, inputs))
    return result


# --------------------------------------------------------------------------- grad modes
class inference_mode:
    """``torch.inference_mode``: a context manager and decorator in which nothing is recorded
    (``inference_mode(False)`` leaves recording as it is)."""

    def __init__(self, mode: bool = True):
        if callable(mode):  # used as @inference_mode without parentheses
            fn, self.mode, self._fn = mode, True, None
            self._fn = self(fn)
        else:
            self.mode = bool(mode)
            self._fn = None

    def __enter__(self) -> None:
        self._prev = state.grad_enabled()
        self._prev_inference = _inference[0]
        if self.mode:
            state.set_grad_enabled(False)
            _inference[0] = True

    def __exit__(self, *exc: object) -> None:
        state.set_grad_enabled(self._prev)
        _inference[0] = self._prev_inference

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fn is not None:
            return self._fn(*args, **kwargs)
        (fn,) = args
        mode = self.mode

        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            with inference_mode(mode):
                return fn(*a, **k)

        return wrapper


_inference = [False]


def is_inference_mode_enabled() -> bool:
    return _inference[0]


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


# --------------------------------------------------------------------------- grad_fn
# PyTorch's autograd node names for the ONNX op types that an op records, where one op maps to
# one node clearly (composite ops name their last node; an op without a PyTorch twin is
# ``<OnnxType>Backward0``).
_NODE_NAMES = {
    "Add": "AddBackward0", "Sub": "SubBackward0", "Mul": "MulBackward0", "Div": "DivBackward0",
    "Neg": "NegBackward0", "Exp": "ExpBackward0", "Log": "LogBackward0", "Sqrt": "SqrtBackward0",
    "Reciprocal": "ReciprocalBackward0", "Abs": "AbsBackward0", "Sin": "SinBackward0",
    "Cos": "CosBackward0", "Tanh": "TanhBackward0", "Sigmoid": "SigmoidBackward0",
    "Relu": "ReluBackward0", "Where": "WhereBackward0", "Clip": "ClampBackward1",
    "Erf": "ErfBackward0", "Softmax": "SoftmaxBackward0", "LogSoftmax": "LogSoftmaxBackward0",
    "Expand": "ExpandBackward0", "Transpose": "PermuteBackward0", "Concat": "CatBackward0",
    "Unsqueeze": "UnsqueezeBackward0", "Squeeze": "SqueezeBackward1", "Reshape": "ViewBackward0",
    "Flatten": "ViewBackward0", "Slice": "SliceBackward0", "GatherElements": "GatherBackward0",
    "Cast": "ToCopyBackward0", "Identity": "CloneBackward0", "Gemm": "AddmmBackward0",
    "Conv": "ConvolutionBackward0", "ConvTranspose": "ConvolutionBackward0",
    "MaxPool": "MaxPool2DWithIndicesBackward0", "AveragePool": "AvgPool2DBackward0",
    "BatchNormalization": "NativeBatchNormBackward0",
    "LayerNormalization": "NativeLayerNormBackward0", "Softplus": "SoftplusBackward0",
    "LeakyRelu": "LeakyReluBackward0", "Gelu": "GeluBackward0", "Split": "SplitBackward0",
    "Max": "MaximumBackward0", "Min": "MinimumBackward0", "ReduceMax": "AmaxBackward0",
    "ReduceMin": "AminBackward0", "Tile": "RepeatBackward0", "Dropout": "NativeDropoutBackward0",
    "Pad": "ConstantPadNdBackward0", "ReduceLogSumExp": "LogsumexpBackward0",
}


def _node_name(rec: Any) -> str:
    custom = (rec.meta or {}).get("onnxgrad.custom_vjp")
    if custom is not None:
        return f"{custom[0].name}Backward"
    op = rec.op
    inputs = [v for v in rec.inputs if v is not None]
    if op in ("ReduceSum", "ReduceMean"):
        base = "SumBackward" if op == "ReduceSum" else "MeanBackward"
        return base + ("0" if len(inputs) == 1 else "1")
    if op == "Pow":
        return "PowBackward1" if len(inputs) > 1 and inputs[1].requires_grad else "PowBackward0"
    if op == "Sub" and _rsub(rec):
        return "RsubBackward1"
    if op == "MatMul" and len(inputs) == 2:
        ranks = (inputs[0].data.ndim, inputs[1].data.ndim)
        return {(2, 2): "MmBackward0", (1, 1): "DotBackward0", (2, 1): "MvBackward0",
                (3, 3): "BmmBackward0"}.get(ranks, "UnsafeViewBackward0")
    if op == "Gather":
        index = inputs[1] if len(inputs) > 1 else None
        return "SelectBackward0" if index is not None and index.data.ndim == 0 \
            else "IndexSelectBackward0"
    return _NODE_NAMES.get(op, f"{op}Backward0")


def _rsub(rec: Any) -> bool:
    """``2 - x``: a Sub of a constant scalar (PyTorch's rsub)."""
    a = rec.inputs[0]
    return a is not None and a.const and a.data.size == 1


class Node:
    """``tensor.grad_fn``: the recorded op that made a tensor, as PyTorch's autograd node."""

    def __init__(self, rec: Any):
        self._rec = rec

    def name(self) -> str:
        return _node_name(self._rec)

    @property
    def next_functions(self) -> tuple[tuple[Any, int], ...]:
        rec = self._rec
        inputs = list(rec.inputs)
        custom = (rec.meta or {}).get("onnxgrad.custom_vjp")
        if custom is not None:
            inputs = inputs[1:1 + custom[0].n_inputs]
        out: list[tuple[Any, int]] = []
        # A scalar operand is an input of PyTorch's node (x * 2: (None, 0)); axes, an exponent
        # (x ** 2) and rsub's scalar are not.
        operands = rec.op in ("Add", "Sub", "Mul", "Div", "Where", "Max", "Min") \
            and not (rec.op == "Sub" and _rsub(rec))
        for v in inputs:
            if v is None or (v.const and not operands):
                continue  # attribute-like constants (axes, shapes) are not autograd inputs
            if v.requires_grad and v.rec is not None:
                out.append((_node_of(v.rec), v.index))
            elif v.requires_grad and v.leaf is not None:
                # NOTE: the graph holds its leaves weakly (PyTorch's holds them): a leaf nobody
                # holds any more still shows its AccumulateGrad, whose ``variable`` is None.
                leaf = v.leaf()
                out.append((_accumulate_of(leaf) if leaf is not None else AccumulateGrad(None), 0))
            else:
                out.append((None, 0))
        return tuple(out)

    @property
    def metadata(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"<{self.name()} object at {hex(id(self))}>"


class AccumulateGrad:
    """The node that accumulates a leaf's gradient into ``.grad``; ``variable`` is the leaf."""

    next_functions: tuple = ()

    def __init__(self, variable: Tensor | None):
        # Weak: the table of these is global, and must not keep leaves alive.
        self._variable = weakref.ref(variable) if variable is not None else lambda: None

    @property
    def variable(self) -> Tensor | None:
        return self._variable()

    def name(self) -> str:
        return "torch::autograd::AccumulateGrad"

    @property
    def metadata(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"<AccumulateGrad object at {hex(id(self))}>"


# One node object per record and per leaf while someone holds it: ``a.grad_fn is a.grad_fn``.
_NODES: weakref.WeakValueDictionary[int, Node] = weakref.WeakValueDictionary()
_ACCUMULATORS = _ByTensor()


def _node_of(rec: Any) -> Node:
    node = _NODES.get(id(rec))
    if node is None or node._rec is not rec:
        node = _NODES[id(rec)] = Node(rec)
    return node


def _accumulate_of(tensor: Tensor) -> AccumulateGrad:
    node = _ACCUMULATORS.get(tensor)
    if node is None:
        node = _ACCUMULATORS.setdefault(tensor, AccumulateGrad(tensor))
    return node


def grad_fn_of(tensor: Tensor) -> Node | None:
    v = tensor._v
    if v.rec is None or not v.requires_grad:
        return None
    return _node_of(v.rec)
