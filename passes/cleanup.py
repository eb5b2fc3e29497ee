"""Cleanup after tracing and autodiff: onnx_ir's common-subexpression, dead-node and sort passes."""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    RemoveUnusedNodesPass,
    TopologicalSortPass,
)


def cleanup(model: ir.Model) -> ir.Model:
    """Remove duplicate and unused nodes and sort the graph; modifies ``model`` in place."""
    typed = [(v.shape, v.type) for v in model.graph.outputs]
    for p in (CommonSubexpressionEliminationPass(), RemoveUnusedNodesPass(), TopologicalSortPass()):
        p(model)
    # NOTE: where a graph output duplicated an earlier value, CSE makes that value the output
    # (under the output's name) without the output's shape and type.
    for value, (shape, type_) in zip(model.graph.outputs, typed):
        if value.shape is None:
            value.shape = shape
        if value.type is None:
            value.type = type_
    return model
