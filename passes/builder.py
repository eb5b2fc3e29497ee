"""The one node builder of the passes: gradient, optimizer and statistics nodes are made here."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

# The keys are defined once, in the bottom layer; re-exported here for the tracer.
from ..runtime.metadata import MODULE, ORIGIN, SOURCE  # noqa: F401

# Ops whose output dtype differs from their first input's (any other op: the first input's).
BOOL_OUT = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
            "IsNaN", "IsInf"}
INT64_OUT = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero"}
# Ops whose output has the shape of their first input. An op with a gradient rule declares it with
# the rule (``@rule("Exp", same_shape=True)``, passes/rules); listed here are those without one.
SAME_SHAPE = {"Sign", "Not", "Floor", "Ceil"}


def np_dtype(value: ir.Value) -> np.dtype:
    if value.dtype is None:
        raise ValueError(f"value {value.name!r} has no known dtype")
    return value.dtype.numpy()


def static_shape(value: ir.Value) -> tuple[int, ...] | None:
    """The shape as ints, or None when unknown or symbolic."""
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


def dims(value: ir.Value) -> list[int | str | None] | None:
    """Per-dimension ints, symbolic names or None; None when the rank is unknown."""
    shape = value.shape
    if shape is None:
        return None
    return [d if isinstance(d, int) else (d.value if d.value is not None else None) for d in shape]


class Builder:
    """Appends ONNX nodes to a node list (or graph), tagging them with an origin.

    ``op`` returns the new output value(s); dtypes (and shapes for elementwise ops) are filled in
    where they follow from the inputs, which is all the rules and the runtime need.
    """

    def __init__(self, target: ir.Graph | list[ir.Node] | None = None, *, origin: str = "grad",
                 prefix: str = "g", counter: itertools.count | None = None):
        self.nodes: list[ir.Node] = []
        self.target = target
        self.origin = origin
        self.prefix = prefix
        self.source: str | None = None
        self.module: str | None = None
        self._count = counter if counter is not None else itertools.count()

    def fresh(self, hint: str) -> str:
        return f"{self.prefix}{next(self._count)}_{hint}"

    def op(self, op_type: str, *inputs: ir.Value | None, _outputs: int = 1,
           _names: Sequence[str] | None = None, **attrs: Any) -> Any:
        attributes = ir.convenience.convert_attributes(
            {k: v for k, v in attrs.items() if v is not None}
        )
        names = _names or [self.fresh(op_type.lower()) for _ in range(_outputs)]
        outputs = [ir.Value(name=n) for n in names]
        node = ir.Node("", op_type, list(inputs), attributes, outputs=outputs,
                       name=self.fresh(op_type))
        node.metadata_props[ORIGIN] = self.origin
        if self.source:
            node.metadata_props[SOURCE] = self.source
        if self.module:
            node.metadata_props[MODULE] = self.module
        self._infer(node, attrs)
        self.nodes.append(node)
        if isinstance(self.target, ir.Graph):
            self.target.append(node)
        elif self.target is not None:
            self.target.append(node)
        return outputs[0] if _outputs == 1 else tuple(outputs)

    def _infer(self, node: ir.Node, attrs: dict[str, Any]) -> None:
        first = next((v for v in node.inputs if v is not None), None)
        out = node.outputs[0]
        op = node.op_type
        if op in BOOL_OUT:
            out.dtype = ir.DataType.BOOL
        elif op in INT64_OUT:
            out.dtype = ir.DataType.INT64
        elif op == "Cast":
            out.dtype = ir.DataType(attrs["to"])
        elif op == "Where":
            out.dtype = node.inputs[1].dtype
        elif op == "ConstantOfShape":
            out.dtype = attrs["value"].dtype
        elif op == "Constant":
            out.dtype = attrs["value"].dtype
            out.shape = ir.Shape(attrs["value"].shape)
        elif first is not None:
            for o in node.outputs:
                o.dtype = first.dtype
        if op in SAME_SHAPE and first is not None and first.shape is not None:
            out.shape = ir.Shape(first.shape)

    def const(self, value: Any, dtype: Any = None) -> ir.Value:
        """A ``Constant`` node holding ``value`` (NumPy-convertible) as ``dtype``."""
        array = np.asarray(value, dtype=dtype)
        out = self.op("Constant", value=ir.tensor(array), _names=[self.fresh("const")])
        # Known statically, so rules that need constant axes or shapes can read it.
        out.const_value = ir.tensor(array, name=out.name)
        return out

    def const_like(self, value: Any, like: ir.Value) -> ir.Value:
        """A scalar/array constant with the dtype of ``like``."""
        return self.const(value, np_dtype(like))

    def ints(self, values: Sequence[int]) -> ir.Value:
        return self.const(np.asarray(list(values), dtype=np.int64))

    # Small compositions the rules use everywhere.
    def sum_to(self, g: ir.Value, out_dims: list, in_dims: list) -> ir.Value:
        """Reduce a broadcast gradient of shape ``out_dims`` back to ``in_dims`` (NumPy rules)."""
        lead = len(out_dims) - len(in_dims)
        if lead > 0:
            g = self.op("ReduceSum", g, self.ints(range(lead)), keepdims=0)
        ones = [i for i, (o, d) in enumerate(zip(out_dims[lead:], in_dims)) if d == 1 and o != 1]
        if ones:
            g = self.op("ReduceSum", g, self.ints(ones), keepdims=1)
        return g


def name_outputs(values: list[ir.Value], names: list[str], nodes: list[ir.Node],
                 inputs: list[ir.Value]) -> list[ir.Value]:
    """Give root values their output names; a value needed twice, or a graph input, gets a copy."""
    seen: set[int] = set()
    input_ids = {id(v) for v in inputs}
    out = []
    for value, name in zip(values, names):
        if id(value) in seen or id(value) in input_ids or value.producer() is None:
            # NOTE: the only Identity outputs: a result that is an input, or one value twice.
            copy = ir.Value(name=name, shape=value.shape, type=value.type)
            node = ir.Node("", "Identity", [value], outputs=[copy], name=f"copy_{name}")
            nodes.append(node)
            value = copy
        value.name = name
        seen.add(id(value))
        out.append(value)
    return out
