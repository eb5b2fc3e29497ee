"""Inspection of ONNX models: loading with clear errors, a typed text dump, a summary, DOT/SVG.

Works on any ONNX model (``onnx.ModelProto``, ``onnx_ir.Model`` or ``onnx_ir.Graph``), not only
onnxgrad's; the metadata onnxgrad writes (node origins, source lines, module paths, the state
mapping) is shown when present. Inspection only reads graphs and metadata, so it sits beside the
runtime rather than in it, and imports nothing above it (no tensors, no passes). One module per
job:

- :mod:`.load`: :func:`load_model` and :class:`InspectError`;
- :mod:`.view`: a graph with its metadata and inferred types, and the spelling of types;
- :mod:`.text`: the typed text dump (:func:`format_graph`, :func:`format_node`);
- :mod:`.summarize`: :func:`summary`, counts, parameters, FLOPs;
- :mod:`.dot`: Graphviz DOT (:func:`to_dot`) and SVG (:func:`write_svg`);
- :mod:`.dump`: ``ONNXGRAD_DUMP=DIR``, the graph after each pass written to files (registered
  with ``runtime.dump``, where the tracer reports its graphs).

The user-facing front is ``og.inspect`` / ``og.summary`` (``onnxgrad.inspection``) and the
``onnxgrad inspect`` command.
"""
from __future__ import annotations

from ..runtime.dump import observe_graphs
from .dot import MAX_DOT_NODES, ORIGIN_COLOURS, find_dot, module_path, to_dot, write_svg
from .dump import dump_graph
from .load import InspectError, load_model
from .summarize import Summary, TensorInfo, summary
from .text import format_graph, format_node
from .view import GraphLike

observe_graphs(dump_graph)  # ONNXGRAD_DUMP: the graphs the tracer reports

__all__ = [
    "MAX_DOT_NODES",
    "ORIGIN_COLOURS",
    "GraphLike",
    "InspectError",
    "Summary",
    "TensorInfo",
    "find_dot",
    "format_graph",
    "format_node",
    "load_model",
    "module_path",
    "summary",
    "to_dot",
    "write_svg",
]
