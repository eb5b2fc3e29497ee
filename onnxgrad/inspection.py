"""``og.inspect`` and ``og.summary``: look at what was recorded, compiled or exported.

Both accept, in this order of precedence:

- a :class:`~onnxgrad.Tensor`: the ONNX graph of its recorded history (what ``backward`` would
  differentiate), with the user's source line on each node;
- an ``onnx.ModelProto``, ``onnx_ir.Model`` or ``onnx_ir.Graph``;
- a path to an ``.onnx`` file (``str`` or ``os.PathLike``);
- any object implementing the :class:`OnnxModelSource` protocol, ``__onnxgrad_model__()``
  returning one of the above (this is how a compiled training step plugs in);
- failing that, any object with a ``model`` or ``graph`` attribute, or a ``to_onnx()`` or
  ``model_proto()`` method, returning one of the above.
"""
from __future__ import annotations

import json
import os
from typing import Any, Protocol, Union, runtime_checkable

import onnx
import onnx_ir as ir

from .inspector import GraphLike, Summary, format_graph, load_model
from .inspector import summary as _summary
from .runtime import OPSET
from .runtime.metadata import DATA_INPUTS, PARAMETERS
from .tracer.graph import CONST, DATA, WRT, GraphFreedError, Walk, ir_type
from .tracer.tensor import Tensor, Val

__all__ = ["GraphText", "OnnxModelSource", "as_model", "history_graph", "inspect", "summary"]

ModelLike = Union[onnx.ModelProto, ir.Model, ir.Graph]


@runtime_checkable
class OnnxModelSource(Protocol):
    """An object that can show its ONNX model (a compiled step, an exporter, a wrapper)."""

    def __onnxgrad_model__(self) -> onnx.ModelProto | ir.Model | ir.Graph:
        """The model to inspect; called once per ``og.inspect``/``og.summary``."""
        ...


class GraphText(str):
    """A text dump: a plain ``str`` that the REPL shows as text rather than an escaped repr."""

    def __repr__(self) -> str:
        return str(self)


def inspect(obj: Any) -> GraphText:
    """The typed text dump of ``obj``: one line per node with its origin and source line.

    A tensor without recorded history gets a one-line explanation instead of a graph.
    """
    if isinstance(obj, Tensor):
        graph = _history(obj)
        if isinstance(graph, str):
            return GraphText(graph)
        return GraphText(format_graph(graph))
    return GraphText(format_graph(as_model(obj)))


def summary(obj: Any) -> Summary:
    """Inputs, outputs, state, node counts by op and origin, parameters, FLOPs of ``obj``.

    ``str()`` of the result is the rendered report; its fields are plain data for code.
    """
    return _summary(as_model(obj))


# Attributes and zero-argument methods tried, in order, on objects without the protocol.
_ATTRIBUTES = ("model", "graph")
_METHODS = ("to_onnx", "model_proto")
_MAX_DEPTH = 4  # a wrapper of a wrapper of ... a model; deeper means a cycle


def as_model(obj: Any) -> GraphLike:
    """``obj`` as something :mod:`onnxgrad.inspector` reads (see the module docstring for what works).

    Raises ``TypeError`` for anything else and ``ValueError`` (``InspectError``) for a bad file
    or a tensor without recorded history.
    """
    found = _resolve(obj, _MAX_DEPTH)
    if found is None:
        raise TypeError(
            f"cannot inspect a {type(obj).__name__}: expected a Tensor, an ONNX model or graph, "
            "a path to an .onnx file, or an object with __onnxgrad_model__()"
        )
    return found


def _resolve(obj: Any, depth: int) -> GraphLike | None:
    if isinstance(obj, (onnx.ModelProto, ir.Model, ir.Graph)):
        return obj
    if isinstance(obj, Tensor):
        graph = _history(obj)
        if isinstance(graph, str):
            raise ValueError(graph)
        return graph
    if isinstance(obj, (str, os.PathLike)):
        return load_model(obj)
    if depth == 0 or obj is None or isinstance(obj, (bytes, int, float, bool)):
        return None
    hook = getattr(type(obj), "__onnxgrad_model__", None)
    if hook is not None:
        return _resolve(hook(obj), depth - 1)
    for name in _ATTRIBUTES:
        found = _resolve(getattr(obj, name, None), depth - 1)
        if found is not None:
            return found
    for name in _METHODS:
        method = getattr(obj, name, None)
        if callable(method):
            found = _resolve(method(), depth - 1)
            if found is not None:
                return found
    return None


# --------------------------------------------------------------------------------------------
# A tensor's recorded history as an onnx_ir graph


def history_graph(t: Tensor) -> ir.Graph:
    """The recorded ops that produced ``t``, as a standalone ONNX graph.

    Inputs are the leaves: tensors that require grad (named by their parameter name when they
    have one; listed in the ``onnxgrad.parameters`` metadata) and data (``onnxgrad.data_inputs``);
    attribute-like constants (axes, shapes, scalars) become initializers. Raises ``ValueError`` when there is no history.
    """
    graph = _history(t)
    if isinstance(graph, str):
        raise ValueError(graph)
    return graph


def _history(t: Tensor) -> ir.Graph | str:
    """The history graph of ``t``, or a sentence saying why it has none."""
    v = t._v
    what = f"tensor {v.data.dtype}{list(v.data.shape)}"
    if v.rec is None:
        if v.requires_grad:
            return f"{what} has no recorded history: it is a leaf that requires grad"
        return (f"{what} has no recorded history: nothing is recorded unless an input requires "
                "grad (and grad mode is on) or og.compile is tracing")
    try:
        # NOTE: follow every recorded producer, not only the requires_grad ones that backward
        # follows, so integer outputs and traced no-grad ops show up as they were recorded.
        walk = Walk([v], lambda _: True, _classify)
    except GraphFreedError:
        return (f"{what}: its recorded history was freed by backward(); call "
                "backward(retain_graph=True) to inspect it afterwards")
    used: set[str] = set()

    def leaf_value(k: int, leaf: Val, kind: str) -> ir.Value:
        value = ir.Value(name=_leaf_name(k, leaf, kind, used), shape=ir.Shape(leaf.data.shape),
                         type=ir_type(leaf.data))
        if kind == CONST:
            value.const_value = ir.tensor(leaf.data, name=value.name)
        return value

    leaves, nodes, roots = walk.materialize(leaf_value)
    graph = ir.Graph(
        [value for value, kind in zip(leaves, walk.kinds) if kind != CONST],
        roots,
        nodes=nodes,
        initializers=[value for value, kind in zip(leaves, walk.kinds) if kind == CONST],
        opset_imports={"": OPSET},
        name="history",
    )
    for key, wanted in ((DATA_INPUTS, DATA), (PARAMETERS, WRT)):
        names = [value.name for value, kind in zip(leaves, walk.kinds) if kind == wanted]
        graph.metadata_props[key] = json.dumps(names)
    return graph


def _classify(v: Val) -> str:
    if v.const:
        return CONST
    if v.requires_grad and v.rec is None:
        return WRT
    return DATA


def _leaf_name(k: int, leaf: Val, kind: str, used: set[str]) -> str:
    """A parameter's qualified name when the module system gave it one, else ``in<k>``."""
    tensor = leaf.leaf() if kind == WRT and leaf.leaf is not None else None
    name = getattr(tensor, "_name", None)
    if not name or name in used:
        name = f"in{k}"
    used.add(name)
    return name

