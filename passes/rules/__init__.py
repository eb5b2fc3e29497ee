"""VJP rules, one per ONNX op type.

A rule is ``rule(b, node, grads, needs) -> list[grad per input]``: ``grads`` holds the gradient
of each node output (None where no gradient flows), ``needs[i]`` says whether input ``i`` wants a
gradient. Rules of ops in ``BROADCASTING`` may return gradients in the output's shape; the driver
reduces them to the input's shape.

``same_shape=True`` declares that the op's output has its first input's shape (unary elementwise
ops, softmax): the Builder then gives the nodes it makes of that type their shape, so a new
elementwise op needs its rule and nothing else here.
"""
from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from ..builder import SAME_SHAPE

Rule = Callable[..., list]
RULES: dict[str, Rule] = {}
BROADCASTING: set[str] = set()


def rule(*op_types: str, broadcasting: bool = False,
         same_shape: bool = False) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op_type in op_types:
            if op_type in RULES:
                raise ValueError(f"two gradient rules for {op_type}")
            RULES[op_type] = fn
            if broadcasting:
                BROADCASTING.add(op_type)
            if same_shape:
                SAME_SHAPE.add(op_type)
        return fn
    return register


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def const_ints(value: ir.Value | None, what: str, node: ir.Node) -> list[int] | None:
    """The integer constant fed to ``value`` (axes, shapes, pads...), which rules need statically."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        raise ValueError(
            f"{node.op_type} node {node.name}: its {what} input must be a constant to differentiate it"
        )
    return [int(x) for x in tensor.numpy().reshape(-1)]


from . import (  # noqa: F401  (registers the rules)
    activations,
    elementwise,
    nn,
    reduce,
    shape,
    spatial,
    transformer,
)

from . import math  # noqa: E402, F401  (registers the rules of tracer/math_ops.py)
from . import index  # noqa: F401  # isort: skip  (indexing rules: ScatterND, GatherND...)
from . import imported  # noqa: F401  # isort: skip  (InstanceNormalization, Range)
