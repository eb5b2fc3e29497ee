"""Reverse-mode autodiff over ONNX graphs: one VJP rule per ONNX op type.

The driver walks in reverse topological order, sums fan-out, un-broadcasts gradients of
broadcasting ops, checks each rule's arity, and only differentiates nodes that lie on a path
from a ``wrt`` value to an output. Rules live in ``passes.rules`` and build their nodes with the
same :class:`Builder`, so gradient nodes are ONNX nodes and can be differentiated again.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir

from .builder import MODULE, SOURCE, Builder, dims
from .rules import BROADCASTING, RULES

# In-memory node metadata (not serialized): set by the tracer on nodes it recorded without
# gradient (under no_grad, detach, non-differentiable ops), which a graph alone cannot tell.
STOP_GRADIENT = "onnxgrad.stop_gradient"
# In-memory node metadata set by this pass on every node a rule appends: the op type of the node
# it differentiates, so that differentiating a gradient again (``create_graph=True``) can name the
# forward op whose gradient nodes lack a rule.
GRAD_OF = "onnxgrad.grad_of"
# In-memory node metadata of a custom-gradient boundary (``og.autograd.Function``): the node is an
# ``Identity`` of one output of the function's forward; ``CUSTOM_VJP`` holds a :class:`CustomVJP`
# shared by the boundary nodes of one application, ``CUSTOM_INPUTS`` the values its gradient
# flows to and reads (the function's inputs, then its saved tensors), which are not ONNX inputs of
# the node. See onnxgrad/autograd/function.py.
CUSTOM_VJP = "onnxgrad.custom_vjp"
CUSTOM_INPUTS = "onnxgrad.custom_inputs"
# Piecewise-constant ops: their derivative is zero wherever it exists, so a gradient reaching them
# stops there (rules use Sign for Abs, for instance) unless a rule says otherwise.
ZERO_DERIVATIVE = frozenset({"Sign", "Floor", "Ceil", "Round"})


class CustomVJP:
    """The gradient of one custom function application, which the pass calls instead of a rule.

    ``vjp(b, grads, inputs, saved, needs) -> grads per input``: ``grads`` holds the gradient of
    each output (None where none flows), ``inputs`` and ``saved`` the values of the function's
    inputs and saved tensors in the graph being differentiated.
    """

    n_inputs: int = 0
    n_outputs: int = 0
    name: str = "Function"

    def vjp(self, b: Builder, grads: list[ir.Value | None], inputs: list[ir.Value | None],
            saved: list[ir.Value | None], needs: list[bool],
            outputs: list[ir.Value | None]) -> list[ir.Value | None]:
        raise NotImplementedError


class NoGradientRule(NotImplementedError):
    """Autodiff reached an ONNX op type that has no gradient rule."""


class ShapeUnknownError(ValueError):
    """A gradient rule needs a static shape that the graph does not give."""


def _unknown_shapes(node: ir.Node) -> list[str]:
    """The node's inputs and outputs whose rank or some dimension is not statically known."""
    out = []
    for kind, values in (("input", node.inputs), ("output", node.outputs)):
        for value in values:
            if value is None:
                continue
            d = dims(value)
            if d is None:
                out.append(f"{kind} %{value.name} (rank unknown)")
            elif any(not isinstance(x, int) for x in d):
                shown = ["?" if x is None else x for x in d]
                out.append(f"{kind} %{value.name} (dims {shown})")
    return out


def describe(node: ir.Node) -> str:
    """The node's one-line typed form plus the user's source line when it was traced."""
    outs = ", ".join(f"%{v.name}" for v in node.outputs)
    ins = ", ".join("_" if v is None else f"%{v.name}" for v in node.inputs)
    text = f"{outs} = {node.op_type}({ins})"
    source = node.metadata_props.get(SOURCE)
    return f"{text}  (from {source})" if source else text


def _custom(node: ir.Node) -> tuple[Any, int, list[ir.Value | None]] | None:
    """(CustomVJP, output index, extra inputs) of a custom-gradient boundary node, else None."""
    found = node.meta.get(CUSTOM_VJP)
    if found is None:
        return None
    return found[0], found[1], list(node.meta.get(CUSTOM_INPUTS, ()))


def _all_inputs(node: ir.Node) -> list[ir.Value | None]:
    """The node's inputs plus, on a custom boundary, the values its gradient reads."""
    custom = _custom(node)
    return list(node.inputs) if custom is None else list(node.inputs) + custom[2]


def topological_nodes(outputs: Sequence[ir.Value]) -> list[ir.Node]:
    """Producers of ``outputs`` and their ancestors, in topological order (iterative DFS)."""
    order: list[ir.Node] = []
    state: dict[int, int] = {}  # id(node) -> 1 visiting, 2 done
    stack: list[tuple[ir.Node, bool]] = [
        (v.producer(), False) for v in reversed(outputs) if v.producer() is not None
    ]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if expanded:
            if state.get(key) != 2:
                state[key] = 2
                order.append(node)
            continue
        if state.get(key):
            continue
        state[key] = 1
        stack.append((node, True))
        for value in reversed(_all_inputs(node)):
            if value is not None:
                producer = value.producer()
                if producer is not None and not state.get(id(producer)):
                    stack.append((producer, False))
    return order


def gradients(
    b: Builder,
    outputs: Sequence[ir.Value],
    seeds: Sequence[ir.Value],
    wrt: Sequence[ir.Value],
    on_total: Callable[[ir.Value, ir.Value], ir.Value] | None = None,
) -> list[ir.Value | None]:
    """Append nodes computing d(sum(seeds * outputs))/d(wrt); None where wrt is unreachable.

    ``on_total(value, grad)``, when given, is called with the total gradient of each value once it
    is complete (before it flows further) and returns the gradient to use instead: tensor hooks
    and ``retain_grad`` of the eager tracer.
    """
    nodes = topological_nodes(outputs)
    active: set[int] = {id(v) for v in wrt}
    on_path: list[ir.Node] = []
    groups: dict[int, list[ir.Node]] = {}  # id(CustomVJP) -> its boundary nodes on the path
    for node in nodes:
        if node.meta.get(STOP_GRADIENT):
            continue  # traced under no_grad, detach(): no gradient flows through it
        custom = _custom(node)
        if custom is not None:
            fn, _, extra = custom
            if any(v is not None and id(v) in active for v in extra[:fn.n_inputs]):
                on_path.append(node)
                groups.setdefault(id(fn), []).append(node)
                active.update(id(v) for v in node.outputs)
            continue
        if any(v is not None and id(v) in active for v in node.inputs):
            on_path.append(node)
            active.update(id(v) for v in node.outputs)

    pending: dict[int, list[ir.Value]] = {}
    for out, seed in zip(outputs, seeds):
        if id(out) in active:
            pending.setdefault(id(out), []).append(seed)
    done: dict[int, ir.Value | None] = {}

    def total(value: ir.Value) -> ir.Value | None:
        if id(value) in done:
            return done[id(value)]
        parts = pending.pop(id(value), None)
        g = None
        if parts:
            g = parts[0] if len(parts) == 1 else b.op("Sum", *parts)
            if on_total is not None:
                g = on_total(value, g)
        done[id(value)] = g
        return g

    for node in reversed(on_path):
        custom = _custom(node)
        if custom is not None:
            _custom_vjp(b, node, custom, groups, total, active, pending)
            continue
        grad_out = [total(v) for v in node.outputs]
        if all(g is None for g in grad_out):
            continue
        rule = RULES.get(node.op_type)
        if rule is None:
            if node.op_type in ZERO_DERIVATIVE:
                continue
            grad_of = node.meta.get(GRAD_OF)
            if grad_of is not None:
                raise NoGradientRule(
                    f"create_graph through {grad_of} is not supported: no gradient rule for "
                    f"{node.op_type} (a node of {grad_of}'s gradient): {describe(node)}")
            raise NoGradientRule(
                f"no gradient rule for ONNX op '{node.op_type}' (node {node.name}): {describe(node)}"
            )
        needs = [v is not None and id(v) in active for v in node.inputs]
        b.source = node.metadata_props.get(SOURCE)
        b.module = node.metadata_props.get(MODULE)  # gradient nodes cluster with their layer
        first = len(b.nodes)
        try:
            grad_in = rule(b, node, grad_out, needs)
        except (TypeError, AttributeError, IndexError) as exc:
            unknown = _unknown_shapes(node)
            if not unknown:
                raise
            # NOTE: rules read static shapes (ranks, axis sizes); a value whose shape inference
            # could not give one would otherwise crash inside the rule with a bare TypeError.
            raise ShapeUnknownError(
                f"cannot differentiate {node.op_type} node {node.name!r}: the shape of "
                f"{', '.join(unknown)} is unknown, and its gradient rule needs it ({exc}): "
                f"{describe(node)}") from exc
        for made in b.nodes[first:]:
            made.meta[GRAD_OF] = node.op_type
        if len(grad_in) != len(node.inputs):
            raise RuntimeError(
                f"gradient rule for '{node.op_type}' returned {len(grad_in)} gradients for "
                f"{len(node.inputs)} inputs: {describe(node)}"
            )
        for value, g, need in zip(node.inputs, grad_in, needs):
            if not need or g is None:
                continue
            if node.op_type in BROADCASTING:
                out_dims, in_dims = dims(node.outputs[0]), dims(value)
                if out_dims is None or in_dims is None:
                    raise ValueError(f"cannot un-broadcast without ranks: {describe(node)}")
                if out_dims != in_dims:
                    g = b.sum_to(g, out_dims, in_dims)
            pending.setdefault(id(value), []).append(g)
    b.source = b.module = None
    return [total(v) for v in wrt]


def _custom_vjp(b: Builder, node: ir.Node, custom: tuple, groups: dict[int, list[ir.Node]],
                total: Callable[[ir.Value], ir.Value | None], active: set[int],
                pending: dict[int, list[ir.Value]]) -> None:
    """One custom function application, handled at its first boundary node in forward order.

    NOTE: in reverse order the first boundary node comes last, so every consumer of every output
    of the function has passed its gradient on by then; the others are skipped.
    """
    fn, _, extra = custom
    members = groups[id(fn)]
    if node is not members[0]:
        return
    grads: list[ir.Value | None] = [None] * fn.n_outputs
    outputs: list[ir.Value | None] = [None] * fn.n_outputs
    for member in members:
        k = member.meta[CUSTOM_VJP][1]
        grads[k] = total(member.outputs[0])
        outputs[k] = member.outputs[0]
    if all(g is None for g in grads):
        return
    inputs, saved = extra[:fn.n_inputs], extra[fn.n_inputs:]
    needs = [v is not None and id(v) in active for v in inputs]
    b.source = node.metadata_props.get(SOURCE)
    b.module = node.metadata_props.get(MODULE)
    first = len(b.nodes)
    grad_in = fn.vjp(b, grads, inputs, saved, needs, outputs)
    for made in b.nodes[first:]:
        made.meta[GRAD_OF] = fn.name
    for value, g, need in zip(inputs, grad_in, needs):
        if need and g is not None:
            pending.setdefault(id(value), []).append(g)


def gradient_graph(
    outputs: Sequence[ir.Value],
    seeds: Sequence[ir.Value],
    wrt: Sequence[ir.Value],
    *,
    grad_names: Sequence[str] | None = None,
    opset: int,
) -> tuple[ir.Graph, list[int]]:
    """A graph of only the gradient nodes; the forward values they read become its inputs.

    Returns the graph and the indices of ``wrt`` that received a gradient (its outputs, in order).
    Seeds must be graph-input-like values (no producer).
    """
    b = Builder()
    grads = gradients(b, outputs, seeds, wrt)
    produced = {id(v) for n in b.nodes for v in n.outputs}
    inputs: dict[int, ir.Value] = {id(s): s for s in seeds}

    def as_input(value: ir.Value) -> ir.Value:
        # Forward values keep their names but lose their producers: they are fed, not recomputed.
        if id(value) not in inputs:
            inputs[id(value)] = (
                value if value.producer() is None
                else ir.Value(name=value.name, shape=value.shape, type=value.type)
            )
        return inputs[id(value)]

    for node in b.nodes:
        for i, value in enumerate(node.inputs):
            if value is not None and id(value) not in produced:
                replacement = as_input(value)
                if replacement is not value:
                    node.replace_input_with(i, replacement)
    kept = [i for i, g in enumerate(grads) if g is not None]
    graph_outputs = []
    for i in kept:
        g, w = grads[i], wrt[i]
        if id(g) not in produced:
            # A seed or forward value passed straight through: outputs come from real nodes.
            g = b.op("Identity", as_input(g))
        if grad_names is not None:
            g.name = grad_names[i]
        g.shape = ir.Shape(w.shape) if w.shape is not None else None
        g.dtype = w.dtype
        graph_outputs.append(g)
    graph = ir.Graph(list(inputs.values()), graph_outputs, nodes=b.nodes,
                     opset_imports={"": opset}, name="backward")
    return graph, kept
