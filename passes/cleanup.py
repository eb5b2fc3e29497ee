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
    for p in (CommonSubexpressionEliminationPass(), RemoveUnusedNodesPass(), TopologicalSortPass()):
        p(model)
    return model
