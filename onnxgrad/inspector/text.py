"""The typed text dump: one line per node, ``%y: f32[2,4] = Relu(%x)  # fwd  (model.py:3: ...)``.

:func:`format_graph` prints a graph's inputs (with their roles: state, data, parameter, default),
initializers, nodes and outputs (with the input each state output feeds next step); attributes and
small constants print their values. :func:`format_node` is the same line for one node, for error
messages about a node (DESIGN: errors include the node's line).
"""
from __future__ import annotations

import json
import math

import numpy as np
import onnx_ir as ir

from ..runtime.metadata import ORIGIN, SOURCE, UNKNOWN_ORIGIN
from .view import (
    GraphLike,
    View,
    dims_of,
    dtype_str,
    input_roles,
    make_view,
    op_name,
    shape_str,
    static_dims,
    type_str,
    value_ref,
)

__all__ = ["format_graph", "format_node"]

_SHOW_VALUES = 8  # constants with at most this many elements print their values (axes, scalars)


def _float_str(v: float) -> str:
    # ONNX stores floats as float32: print the shortest float32 text (0.1, not 0.100000001).
    return str(np.float32(v))


def _values_str(t: ir.TensorProtocol) -> str | None:
    """The values of a small tensor (``0.9``, ``[0,2]``), or None for a big or unreadable one."""
    dims = static_dims(dims_of(t.shape))
    if dims is None or math.prod(dims) > _SHOW_VALUES or t.dtype in (
        ir.DataType.STRING, ir.DataType.UNDEFINED
    ):
        return None
    try:
        array = np.asarray(t.numpy())
    except Exception:  # noqa: BLE001 - exotic dtypes, missing external data: just the type
        return None
    items = [_float_str(x) if array.dtype.kind == "f" else str(x) for x in array.reshape(-1).tolist()]
    return items[0] if array.ndim == 0 else "[" + ",".join(items) + "]"


def _tensor_str(t: ir.TensorProtocol) -> str:
    values = _values_str(t)
    text = dtype_str(t.dtype) + shape_str(dims_of(t.shape))
    return f"<tensor {text}" + (f": {values}>" if values is not None else ">")


def _graph_str(g: ir.Graph) -> str:
    return f"<graph {g.name or 'graph'}: {len(g)} nodes>"


def _attr_str(attr: ir.Attr) -> str:
    if attr.is_ref():
        return f"@{attr.ref_attr_name}"
    t, v = attr.type, attr.value
    A = ir.AttributeType
    if t == A.FLOAT:
        return _float_str(v)
    if t == A.INT:
        return str(int(v))
    if t == A.STRING:
        return json.dumps(v)
    if t in (A.TENSOR, A.SPARSE_TENSOR):
        return _tensor_str(v)
    if t == A.GRAPH:
        return _graph_str(v)
    if t == A.FLOATS:
        return "[" + ",".join(_float_str(x) for x in v) + "]"
    if t == A.INTS:
        return "[" + ",".join(str(int(x)) for x in v) + "]"
    if t == A.STRINGS:
        return "[" + ",".join(json.dumps(x) for x in v) + "]"
    if t in (A.TENSORS, A.SPARSE_TENSORS):
        return "[" + ",".join(_tensor_str(x) for x in v) + "]"
    if t == A.GRAPHS:
        return "[" + ",".join(_graph_str(x) for x in v) + "]"
    if t == A.TYPE_PROTO:
        return f"<type {type_str(getattr(v, 'type', None), dims_of(getattr(v, 'shape', None)))}>"
    return str(v)


def _format_node(node: ir.Node, view: View) -> str:
    outs = ", ".join(view.typed(v) if v.name else "_" for v in node.outputs)
    args = ", ".join(value_ref(v) for v in node.inputs)
    line = f"{op_name(node)}({args})"
    if outs:
        line = f"{outs} = {line}"
    if node.attributes:
        attrs = ", ".join(
            f"{name}={_attr_str(node.attributes[name])}" for name in sorted(node.attributes)
        )
        line += f" {{{attrs}}}"
    # NOTE: nodes without an origin (any model onnxgrad did not make) get no comment rather than
    # "# unknown" on every line; the summary counts them as "unknown".
    origin = node.metadata_props.get(ORIGIN)
    source = node.metadata_props.get(SOURCE)
    if origin or source:
        line += f"  # {origin or UNKNOWN_ORIGIN}"
        if source:
            line += f"  ({' '.join(source.split())})"  # keep it one line
    return line


def format_node(node: ir.Node) -> str:
    """One typed line for a node: ``%y: f32[2,4] = Relu(%x)  # fwd  (model.py:3: y = x.relu())``.

    Meant for error messages about a node (DESIGN: errors include the node's line).
    """
    # Only value types are read from the view, so a node outside any graph works too.
    return _format_node(node, View(node.graph, None, {}))  # type: ignore[arg-type]


def format_graph(graph_or_model: GraphLike, *, infer_shapes: bool = True) -> str:
    """A typed text dump: inputs, initializers, one line per node, outputs.

    Types missing from the graph are filled in by ONNX shape inference (best effort) unless
    ``infer_shapes=False``; the caller's graph is never modified.
    """
    view = make_view(graph_or_model, infer=infer_shapes)
    g = view.graph
    state = view.state()
    feeds = {inp: out for out, inp in state.items()}
    data_inputs = set(view.data_inputs())
    parameters = set(view.parameters())
    input_names = {v.name for v in g.inputs}
    initializers = [v for name, v in g.initializers.items() if name not in input_names]

    lines = [
        (f"graph {g.name or '(unnamed)'}: {len(g.inputs)} inputs, {len(g.initializers)} "
         f"initializers, {len(g)} nodes, {len(g.outputs)} outputs"),
        "inputs:",
    ]
    defaults = set(g.initializers)
    for v in g.inputs:
        marks = input_roles(v.name, feeds, data_inputs, defaults, parameters, ref="%")
        lines.append(f"  {view.typed(v)}" + (f"  ({', '.join(marks)})" if marks else ""))
    if initializers:
        lines.append("initializers:")
        for v in initializers:
            values = _values_str(v.const_value) if v.const_value is not None else None
            lines.append(f"  {view.typed(v)}" + (f" = {values}" if values is not None else ""))
    lines.append("nodes:")
    lines.extend(f"  {_format_node(node, view)}" for node in g)
    lines.append("outputs:")
    for v in g.outputs:
        feeds_next = f"  (state -> %{state[v.name]})" if v.name in state else ""
        lines.append(f"  {view.typed(v)}{feeds_next}")
    return "\n".join(lines)


