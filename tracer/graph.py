"""From recorded Vals to onnx_ir: an iterative walk, a structural key, and materialization."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from ..passes.autodiff import CUSTOM_INPUTS, CUSTOM_VJP, STOP_GRADIENT
from ..passes.builder import MODULE, ORIGIN, SOURCE, Builder
from .tensor import Record, Val

WRT, DATA, CONST = "w", "d", "c"


class GraphFreedError(RuntimeError):
    pass


def ir_type(array: np.ndarray) -> ir.TensorType:
    return ir.TensorType(ir.DataType.from_numpy(array.dtype))


class Walk:
    """The records behind some root Vals, in topological order, with their leaves classified.

    ``follow(val)`` decides whether a Val's producer is walked (True) or the Val is a leaf.
    ``classify(val)`` names a leaf's kind: WRT (gets a gradient), DATA (fed), CONST (baked in).
    """

    def __init__(self, roots: Sequence[Val], follow: Callable[[Val], bool],
                 classify: Callable[[Val], str]):
        self.records: list[Record] = []
        self.leaves: list[Val] = []
        self.kinds: list[str] = []
        rec_index: dict[int, int] = {}
        leaf_index: dict[int, int] = {}
        key: list[Any] = []

        def ref(v: Val | None):
            if v is None:
                return None
            if v.rec is not None and follow(v):
                return ("r", rec_index[id(v.rec)], v.index)
            k = leaf_index.get(id(v))
            if k is None:
                k = leaf_index[id(v)] = len(self.leaves)
                kind = classify(v)
                self.leaves.append(v)
                self.kinds.append(kind)
                entry = (kind, v.data.dtype.str, v.data.shape)
                if kind == CONST:
                    entry += (v.data.tobytes(),)
                key.append(entry)
            return ("l", k)

        stack: list[tuple[Record, bool]] = []
        for v in roots:
            if v.rec is not None and follow(v):
                stack.append((v.rec, False))
        visiting: set[int] = set()
        while stack:
            rec, expanded = stack.pop()
            rid = id(rec)
            if expanded:
                if rid in rec_index:
                    continue
                rec_index[rid] = len(self.records)
                self.records.append(rec)
                key.append((rec.op, rec.key, tuple(ref(v) for v in rec.inputs),
                            tuple((o.dtype.str, o.shape) for o in rec.outs)))
                continue
            if rid in rec_index or rid in visiting:
                continue
            if rec.freed:
                raise GraphFreedError(
                    "Trying to backward through the graph a second time (or directly access saved "
                    "tensors after they have already been freed). Specify retain_graph=True if you "
                    "need to backward through the graph a second time."
                )
            visiting.add(rid)
            stack.append((rec, True))
            for v in reversed(rec.inputs):
                if v is not None and v.rec is not None and follow(v) and id(v.rec) not in rec_index:
                    stack.append((v.rec, False))
        self.root_refs = [ref(v) for v in roots]
        key.append(("roots", tuple(self.root_refs)))
        self.key = tuple(key)
        self._rec_index = rec_index
        self._leaf_index = leaf_index

    def value_name(self, ref: tuple) -> str:
        return f"in{ref[1]}" if ref[0] == "l" else f"r{ref[1]}_{ref[2]}"

    def data_of(self, name: str) -> np.ndarray:
        if name.startswith("in"):
            return self.leaves[int(name[2:])].data
        i, j = name[1:].split("_")
        return self.records[int(i)].outs[int(j)]

    def materialize(self, leaf_value: Callable[[int, Val, str], ir.Value] | None = None,
                    readable: bool = False
                    ) -> tuple[list[ir.Value], list[ir.Node], list[ir.Value]]:
        """onnx_ir values for leaves, nodes for records, and the root values.

        Values are named ``r<record>_<output>`` (what ``data_of`` reads back), or with
        ``readable`` after the module and op that made them (``layer1.0.conv1.conv_12``) for
        graphs people read: compiled steps and their exports.
        """
        leaves: list[ir.Value] = []
        for k, (v, kind) in enumerate(zip(self.leaves, self.kinds)):
            if leaf_value is not None:
                value = leaf_value(k, v, kind)
            else:
                value = ir.Value(name=f"in{k}", shape=ir.Shape(v.data.shape), type=ir_type(v.data))
                if kind == CONST:
                    value.const_value = ir.tensor(v.data, name=value.name)
            leaves.append(value)
        nodes: list[ir.Node] = []
        produced: list[list[ir.Value]] = []  # output values of each record
        builder = Builder(nodes, prefix="m")

        def lookup(ref):
            if ref is None:
                return None
            if ref[0] == "l":
                return leaves[ref[1]]
            return produced[ref[1]][ref[2]]

        for i, rec in enumerate(self.records):
            inputs = [lookup(self._ref(v)) for v in rec.inputs]
            if rec.extra is None:
                stem = (f"{rec.module}.{rec.op.lower()}_{i}" if rec.module else
                        f"{rec.op.lower()}_{i}") if readable else f"r{i}"
                node = record_node(rec, inputs, [stem if readable and len(rec.outs) == 1
                                                 else f"{stem}_{j}" for j in range(len(rec.outs))])
                nodes.append(node)
                produced.append(list(node.outputs))
                continue
            # A macro record: its pass appends the nodes (tagged with the record's origin).
            builder.origin, builder.source = rec.origin, rec.source() or None
            if readable:
                builder.prefix = rec.origin  # grad12_mul, opt40_sub
            builder.module = rec.module
            outs = rec.extra(builder, inputs)
            for value, data in zip(outs, rec.outs):
                value.shape, value.dtype = ir.Shape(data.shape), ir.DataType.from_numpy(data.dtype)
            produced.append(list(outs))
        return leaves, nodes, [lookup(r) for r in self.root_refs]

    def _ref(self, v: Val | None):
        if v is None:
            return None
        idx = self._rec_index.get(id(v.rec)) if v.rec is not None else None
        if idx is not None and self.records[idx] is v.rec:
            return ("r", idx, v.index)
        return ("l", self._leaf_index[id(v)])


def record_node(rec: Record, inputs: Iterable[ir.Value | None], names: Sequence[str]) -> ir.Node:
    attributes = ir.convenience.convert_attributes(
        {k: (ir.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in rec.attrs.items()}
    )
    outputs = [ir.Value(name=n, shape=ir.Shape(o.shape), type=ir_type(o))
               for n, o in zip(names, rec.outs)]
    inputs = list(inputs)
    extra: list[ir.Value | None] = []
    if rec.meta and CUSTOM_VJP in rec.meta:
        # A custom Function's boundary: an Identity of its forward's output; the inputs and saved
        # tensors its gradient reads ride along as node metadata (passes/autodiff.py).
        inputs, extra = inputs[:1], inputs[1:]
    node = ir.Node("", rec.op, inputs, attributes, outputs=outputs,
                   name=(f"{rec.module}/" if rec.module else "") + f"{rec.op}_{names[0]}")
    node.metadata_props[ORIGIN] = rec.origin
    if not rec.grad:
        node.meta[STOP_GRADIENT] = True
    if rec.meta:
        node.meta.update(rec.meta)
        if extra:
            node.meta[CUSTOM_INPUTS] = extra
    source = rec.source()
    if source:
        node.metadata_props[SOURCE] = source
    if rec.module:
        node.metadata_props[MODULE] = rec.module
    return node
