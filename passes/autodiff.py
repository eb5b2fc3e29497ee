"""Reverse-mode autodiff over ONNX graphs: one VJP rule per ONNX op type.

The driver walks in reverse topological order, sums fan-out, un-broadcasts gradients of
broadcasting ops, checks each rule's arity, and only differentiates nodes that lie on a path
from a ``wrt`` value to an output. Rules live in ``passes.rules`` and build their nodes with the
same :class:`Builder`, so gradient nodes are ONNX nodes and can be differentiated again.
"""
from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from .builder import MODULE, SOURCE, Builder, dims
from .rules import BROADCASTING, RULES

# In-memory node metadata (not serialized): set by the tracer on nodes it recorded without
# gradient (under no_grad, detach, non-differentiable ops), which a graph alone cannot tell.
STOP_GRADIENT = "onnxgrad.stop_gradient"


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
        for value in reversed(node.inputs):
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
) -> list[ir.Value | None]:
    """Append nodes computing d(sum(seeds * outputs))/d(wrt); None where wrt is unreachable."""
    nodes = topological_nodes(outputs)
    active: set[int] = {id(v) for v in wrt}
    on_path: list[ir.Node] = []
    for node in nodes:
        if node.meta.get(STOP_GRADIENT):
            continue  # traced under no_grad, detach(): no gradient flows through it
        if any(v is not None and id(v) in active for v in node.inputs):
            on_path.append(node)
            active.update(id(v) for v in node.outputs)

    pending: dict[int, list[ir.Value]] = {}
    for out, seed in zip(outputs, seeds):
        if id(out) in active:
            pending.setdefault(id(out), []).append(seed)

    def total(value: ir.Value) -> ir.Value | None:
        parts = pending.pop(id(value), None)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else b.op("Sum", *parts)

    results: dict[int, ir.Value | None] = {}
    for node in reversed(on_path):
        grad_out = [total(v) for v in node.outputs]
        if all(g is None for g in grad_out):
            continue
        rule = RULES.get(node.op_type)
        if rule is None:
            raise NoGradientRule(
                f"no gradient rule for ONNX op '{node.op_type}' (node {node.name}): {describe(node)}"
            )
        needs = [v is not None and id(v) in active for v in node.inputs]
        b.source = node.metadata_props.get(SOURCE)
        b.module = node.metadata_props.get(MODULE)  # gradient nodes cluster with their layer
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
    for v in wrt:
        results[id(v)] = total(v)
    return [results[id(v)] for v in wrt]


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
