"""The portable profile of an exported step: the same computation in ops every runtime implements.

``portable_model`` rewrites a step's ``onnx.ModelProto`` so that the runtimes onnxgrad's exports
are tested on (ONNX Runtime, the reference evaluator, OpenVINO, tract, tinygrad's runner) load and
loop it, each rewrite an exact equivalent of what it replaces:

- ``Col2Im`` (the conv input gradient chosen for small outputs: MatMul + Col2Im) becomes the
  ``ConvTranspose`` it spells out; tinygrad and tract have no ``Col2Im``.
- ``BatchNormalization`` whose scale, bias, mean or variance are computed (batch statistics in
  training) or fed (state inputs) becomes the elementwise ops ONNX Runtime's kernel runs
  (``x * s + (bias - mean * s)`` with ``s = scale / sqrt(var + eps)``): tract needs constant
  parameters.
- ``MaxPool``'s ``Indices`` output (which the max-pool gradient scatters through) is computed from
  the input with Pad/Slice/ArgMax/Gather instead: tinygrad's runner computes other indices than
  the ONNX definition, and this keeps ONNX Runtime's values (first maximum in window order).
- ``CastLike`` becomes ``Cast`` (a runtime may lack the opset-15 op).

Then :func:`lower_opset` writes the graph at the lowest opset (from 17) that ``onnx``'s version
converter reaches with every op defined, since older runtimes and converters (onnx2torch) refuse
newer versions of common ops.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.metadata import MODULE, ORIGIN, SOURCE
from .rules.nn import resolve_pads

#: The lowest opset the portable export tries (LayerNormalization and the ops onnxgrad emits
#: exist from it on).
LOWEST_OPSET = 17

_KEPT_METADATA = (ORIGIN, MODULE, SOURCE)


class PortableExportError(ValueError):
    """A step that the portable profile cannot write (a node without a portable equivalent)."""


# --------------------------------------------------------------------------- the graph helper
class _Rewriter:
    """The model's nodes rebuilt into a new list, with the static types of every value."""

    def __init__(self, model: onnx.ModelProto, prefix: str = "portable"):
        self.model = model
        self.prefix = prefix
        graph = model.graph
        self.types: dict[str, tuple[int, tuple[int | None, ...] | None]] = {}
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            tt = vi.type.tensor_type
            shape = (tuple(d.dim_value if d.HasField("dim_value") else None
                           for d in tt.shape.dim) if tt.HasField("shape") else None)
            self.types[vi.name] = (tt.elem_type, shape)
        self.consts: dict[str, np.ndarray] = {}
        for t in graph.initializer:
            self.types[t.name] = (t.data_type, tuple(t.dims))
            self.consts[t.name] = numpy_helper.to_array(t)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.nodes: list[onnx.NodeProto] = []
        self._count = itertools.count()
        self._origin: onnx.NodeProto | None = None

    def fresh(self, hint: str) -> str:
        return f"{self.prefix}{next(self._count)}_{hint}"

    def shape(self, name: str, what: str, node: onnx.NodeProto) -> tuple[int, ...]:
        shape = self.types.get(name, (0, None))[1]
        if shape is None or any(d is None for d in shape):
            raise PortableExportError(f"portable export: {node.op_type} node {_label(node)} needs "
                                      f"the static shape of its {what} {name!r}")
        return tuple(int(d) for d in shape)

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1,
           outputs: Sequence[str] | None = None, **attrs: Any) -> Any:
        names = list(outputs) if outputs else [self.fresh(op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type),
                                **{k: v for k, v in attrs.items() if v is not None})
        if self._origin is not None:  # the replaced node's origin, module and source line
            for p in self._origin.metadata_props:
                if p.key in _KEPT_METADATA:
                    node.metadata_props.add(key=p.key, value=p.value)
        self.nodes.append(node)
        return names[0] if len(names) == 1 else names

    def const(self, value: Any, dtype: Any = None) -> str:
        array = np.asarray(value, dtype=dtype)
        name = self.fresh("const")
        self.op("Constant", [], outputs=[name], value=numpy_helper.from_array(array, name))
        self.consts[name] = array
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64))


def _label(node: onnx.NodeProto) -> str:
    return repr(node.name) if node.name else f"with output {node.output[0]!r}"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _spatial_pads(attrs: dict[str, Any], size: Sequence[int], kernel: Sequence[int],
                  strides: Sequence[int], dilations: Sequence[int], node: onnx.NodeProto
                  ) -> tuple[list[int], list[int]]:
    """Begin and end pads, resolving the deprecated ``auto_pad`` (as the gradient rules do)."""
    return resolve_pads(attrs.get("auto_pad", b"NOTSET"), attrs.get("pads"), size, kernel,
                        strides, dilations)


# --------------------------------------------------------------------------- the rewrites
def _col2im(r: _Rewriter, node: onnx.NodeProto) -> bool:
    """``Col2Im`` as one zero-padded placement of each kernel tap's columns, added in tap order.

    ONNX Runtime's kernel zeroes the image and adds every column channel (c, tap) into it in that
    order, so each pixel is ``((0 + v_a) + v_b) + ...`` over the taps that reach it, ascending;
    adding the taps' placed planes in the same order (every other tap adds an exact zero) gives
    the same bits. Placing a tap: the columns [.., Ho, Wo] upsampled by the stride (zero-padded
    [Ho, 1, Wo, 1] -> [Ho, s, Wo, s], reshaped), shifted by the tap's offset (a Pad); one Slice
    at the end drops the padding."""
    attrs = _attrs(node)
    size = [int(v) for v in r.consts[node.input[1]]] if node.input[1] in r.consts else None
    kernel = [int(v) for v in r.consts[node.input[2]]] if node.input[2] in r.consts else None
    if size is None or kernel is None:
        raise PortableExportError(f"portable export: Col2Im node {_label(node)} has computed "
                                  f"image or block shapes, which have no portable form")
    rank = len(size)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    pads = list(attrs.get("pads", [0] * (2 * rank)))
    begin = pads[:rank]
    out = [(n + pb + pe - d * (k - 1) - 1) // s + 1 for n, pb, pe, k, s, d in
           zip(size, begin, pads[rank:], kernel, strides, dilations)]
    taps = int(np.prod(kernel))
    # [N, C*taps, L] -> [N, C, taps, o1, 1, o2, 1, ...] -> (zero pads) [.., o1, s1, o2, s2, ..]
    # -> [N, C, taps, o1*s1, o2*s2, ...]: each column at its window's corner.
    spread = [v for o in out for v in (o, 1)]
    planes = r.op("Reshape", [node.input[0], r.ints([0, -1, taps] + spread)])
    if any(s > 1 for s in strides):
        ends = [v for s in strides for v in (0, s - 1)]
        planes = r.op("Pad", [planes, r.ints([0] * (3 + 2 * rank) + [0, 0, 0] + ends)])
    planes = r.op("Reshape", [planes, r.ints([0, 0, taps] + [o * s for o, s in
                                                             zip(out, strides)])])
    # Every tap's plane shifted into one padded frame of extent P per axis.
    frame = [max(n + pb, (k - 1) * d + o * s) for n, pb, k, d, o, s in
             zip(size, begin, kernel, dilations, out, strides)]
    total = None
    for t, tap in enumerate(itertools.product(*[range(k) for k in kernel])):
        plane = r.op("Slice", [planes, r.ints([t]), r.ints([t + 1]), r.ints([2])])
        shift = [i * d for i, d in zip(tap, dilations)]
        rest = [p - sh - o * s for p, sh, o, s in zip(frame, shift, out, strides)]
        if any(shift) or any(rest):
            plane = r.op("Pad", [plane, r.ints([0, 0, 0] + shift + [0, 0, 0] + rest)])
        total = plane if total is None else r.op("Add", [total, plane])
    image = r.op("Slice", [total, r.ints(begin), r.ints([pb + n for pb, n in zip(begin, size)]),
                           r.ints(list(range(3, 3 + rank)))])
    r.op("Reshape", [image, r.ints([0, 0] + size)], outputs=[node.output[0]])
    return True


def _batch_norm(r: _Rewriter, node: onnx.NodeProto) -> bool:
    """Inference-form BatchNormalization with non-constant parameters, as ONNX Runtime's CPU
    kernel computes it: ``s = scale * (1 / sqrt(var + eps))``, ``y = x * s + (bias - mean * s)``."""
    attrs = _attrs(node)
    if attrs.get("training_mode", 0) or len(node.output) > 1:
        return False  # training mode: its running variance is not PyTorch's; leave it as is
    if all(name in r.consts for name in node.input[1:5]):
        return False  # constant parameters: every runtime folds those
    x, scale, bias, mean, var = node.input[:5]
    xs = r.types.get(x, (0, None))[1]
    if xs is None:
        raise PortableExportError(f"portable export: BatchNormalization node {_label(node)} "
                                  f"needs the rank of its input {x!r}")
    dtype = helper.tensor_dtype_to_np_dtype(r.types[x][0])
    eps = r.const(np.asarray(attrs.get("epsilon", 1e-5), dtype=dtype))
    inv = r.op("Reciprocal", [r.op("Sqrt", [r.op("Add", [var, eps])])])
    s = r.op("Mul", [inv, scale])
    shift = r.op("Sub", [bias, r.op("Mul", [mean, s])])
    if len(xs) > 2:  # per channel: [C, 1, ..., 1] broadcasts against [N, C, ...]
        shape = r.ints([-1] + [1] * (len(xs) - 2))
        s, shift = r.op("Reshape", [s, shape]), r.op("Reshape", [shift, shape])
    r.op("Add", [r.op("Mul", [x, s]), shift], outputs=[node.output[0]])
    return True


def _max_pool(r: _Rewriter, node: onnx.NodeProto) -> bool:
    """MaxPool's ``Indices`` (flat over N*C*spatial, row-major, the first maximum of each window
    in window order: ONNX Runtime's) computed as Pad(-inf) + one strided Slice per kernel tap +
    ArgMax over the taps + the tap's flat offset; the MaxPool keeps only ``Y``."""
    if len(node.output) < 2 or not node.output[1]:
        return False
    attrs = _attrs(node)
    if attrs.get("storage_order", 0):
        raise PortableExportError(f"portable export: MaxPool node {_label(node)} has column-major "
                                  f"indices (storage_order=1), which have no portable form")
    x, (y, indices) = node.input[0], node.output[:2]
    xs, ys = r.shape(x, "input", node), r.shape(y, "output", node)
    size, out = xs[2:], ys[2:]
    rank = len(size)
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    begin, _ = _spatial_pads(attrs, size, kernel, strides, dilations, node)
    kept = {k: v for k, v in attrs.items() if k != "storage_order"}
    r.op("MaxPool", [x], outputs=[y], **kept)
    # Pad with -inf (padding never wins, as in the kernel) so that every tap of every window,
    # ceil mode's windows past the end included, lies inside the padded input.
    ends = [max((o - 1) * s + d * (k - 1) + 1 - n - pb, 0)
            for n, o, k, s, d, pb in zip(size, out, kernel, strides, dilations, begin)]
    dtype = helper.tensor_dtype_to_np_dtype(r.types[x][0])
    padded = x
    if any(begin) or any(ends):
        padded = r.op("Pad", [x, r.ints([0, 0] + begin + [0, 0] + ends),
                              r.const(np.asarray(-np.inf, dtype=dtype))])
    axes = list(range(2, 2 + rank))
    taps, offsets = [], []
    row = [int(np.prod(size[a + 1:])) for a in range(rank)]  # flat stride of each spatial axis
    for tap in itertools.product(*[range(k) for k in kernel]):
        starts = [t * d for t, d in zip(tap, dilations)]
        stops = [st + (o - 1) * s + 1 for st, o, s in zip(starts, out, strides)]
        window = r.op("Slice", [padded, r.ints(starts), r.ints(stops), r.ints(axes),
                                r.ints(strides)])
        taps.append(r.op("Unsqueeze", [window, r.ints([0])]))
        offsets.append(sum(st * w for st, w in zip(starts, row)))
    stacked = r.op("Concat", taps, axis=0)
    best = r.op("ArgMax", [stacked], axis=0, keepdims=0, select_last_index=0)
    # Flat index = (n*C + c) * prod(size) + sum over axes of (o*s - pb + tap*d) * row stride.
    # The plane term from the input's batch size at run time (Shape, Range), not a constant,
    # so that the graph does not depend on the batch (export's dynamic_batch).
    c, area = xs[1], int(np.prod(size))
    batch = r.op("Squeeze", [r.op("Shape", [x], start=0, end=1), r.ints([0])])
    planes = r.op("Range", [r.const(np.asarray(0, np.int64)),
                            r.op("Mul", [batch, r.const(np.asarray(c * area, np.int64))]),
                            r.const(np.asarray(area, np.int64))])
    plane = r.op("Reshape", [planes, r.ints([-1, c] + [1] * rank)])
    corner = np.zeros(out, dtype=np.int64)
    for a in range(rank):
        along = (np.arange(out[a], dtype=np.int64) * strides[a] - begin[a]) * row[a]
        corner = corner + along.reshape([-1 if i == a else 1 for i in range(rank)])
    tap_offset = r.op("Gather", [r.const(np.asarray(offsets, dtype=np.int64)), best], axis=0)
    r.op("Add", [r.op("Add", [tap_offset, r.const(corner)]), plane], outputs=[indices])
    return True


def _cast_like(r: _Rewriter, node: onnx.NodeProto) -> bool:
    to = r.types.get(node.input[1], (0, None))[0]
    if not to:
        raise PortableExportError(f"portable export: CastLike node {_label(node)} needs the "
                                  f"dtype of {node.input[1]!r}")
    r.op("Cast", [node.input[0]], outputs=[node.output[0]], to=to)
    return True


_REWRITES = {"Col2Im": _col2im, "BatchNormalization": _batch_norm, "MaxPool": _max_pool,
             "CastLike": _cast_like}


def rewrite_portable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose nodes are the portable equivalents (module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    r = _Rewriter(out)
    for node in out.graph.node:
        rewrite = _REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        r._origin = node
        if rewrite is None or not rewrite(r, node):
            r._origin = None
            r.nodes.append(node)
    r._origin = None
    nodes = _live(r.nodes, {o.name for o in out.graph.output})
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    # Drop what the removed nodes left: their values' shapes and unused initializers.
    used = {i for n in nodes for i in n.input} | {o.name for o in out.graph.output}
    made = {o for n in nodes for o in n.output}
    keep_info = [vi for vi in out.graph.value_info if vi.name in made]
    del out.graph.value_info[:]
    out.graph.value_info.extend(keep_info)
    inputs = {i.name for i in out.graph.input}
    keep_init = [t for t in out.graph.initializer if t.name in used or t.name in inputs]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep_init)
    return out


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing reads (the replaced formulations)."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    return keep


# --------------------------------------------------------------------------- the opset
# NOTE: onnx's version converter (1.23) has no down-adapter for most ops changed after 17
# (ConstantOfShape 20 -> 19 fails first), so lowering is done here, op by op, from what each
# version changed (onnx/defs changelog) and refused for anything else:
# - only types added (the older version's type constraints are checked by the full checker):
_TYPES_ONLY = {"Cast", "CastLike", "Constant", "ConstantOfShape", "Equal", "Flatten", "Identity",
               "IsInf", "IsNaN", "Reshape", "Shape", "Size", "Squeeze", "Unsqueeze", "Transpose",
               "QLinearMatMul"}
# - an attribute or input added, exact when the node does not use it (attribute: its default):
_UNUSED_ADDITIONS: dict[str, dict[int, dict[str, Any]]] = {
    "AveragePool": {19: {"dilations": "ones"}},
    "Cast": {19: {"saturate": 1}},
    "CastLike": {19: {"saturate": 1}},
    "QuantizeLinear": {19: {"saturate": 1}, 21: {"block_size": 0, "output_dtype": 0}},
    "Pad": {18: {"input3": None}, 19: {"mode": ("constant", "reflect", "edge")}, 21: {}},
    "ReduceMax": {20: {}},  # types only (bool)
    "ReduceMin": {20: {}},
    "DequantizeLinear": {19: {}, 21: {"block_size": 0}},
    "Resize": {18: {"antialias": 0, "axes": None, "keep_aspect_ratio_policy": "stretch"},
               19: {"coordinate_transformation_mode": ("half_pixel", "pytorch_half_pixel",
                                                       "align_corners", "asymmetric",
                                                       "tf_crop_and_resize")}},
    "ScatterElements": {18: {"reduction": ("none", "add", "mul")}},
    "ScatterND": {18: {"reduction": ("none", "add", "mul")}},
    "LpPool": {18: {"ceil_mode": 0, "dilations": "ones"}},
}
# - the axes of a reduction moved from an attribute to an input (opset 18): constant axes go back.
_REDUCE_AXES_INPUT = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                      "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare"}


def model_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _since(op_type: str, opset: int) -> int | None:
    try:
        return onnx.defs.get_schema(op_type, opset, "").since_version
    except onnx.defs.SchemaError:
        return None


def _unused(node: onnx.NodeProto, attrs: dict[str, Any], name: str, allowed: Any) -> bool:
    if name.startswith("input"):
        index = int(name[5:])
        return len(node.input) <= index or not node.input[index]
    if name not in attrs:
        return True
    value = attrs[name]
    value = value.decode() if isinstance(value, bytes) else value
    if allowed == "ones":
        return all(v == 1 for v in value)
    if isinstance(allowed, tuple):
        return value in allowed
    return value == allowed


def _lower_node(r: _Rewriter, node: onnx.NodeProto, current: int, target: int) -> str | None:
    """Append ``node`` as valid at ``target``; or return why it cannot be (nothing appended)."""
    op = node.op_type
    now, then = _since(op, current), _since(op, target)
    if then is None:
        return f"{op} is not defined before opset {now}"
    if now == then:
        r.nodes.append(node)
        return None
    changed = [v for v in range(then + 1, now + 1) if _since(op, v) == v]
    attrs = _attrs(node)
    for version in changed:
        additions = _UNUSED_ADDITIONS.get(op, {}).get(version)
        if additions is not None:
            used = [name for name, allowed in additions.items()
                    if not _unused(node, attrs, name, allowed)]
            if used:
                return f"{op} node {_label(node)} uses {used} (new in opset {version})"
        elif op in _REDUCE_AXES_INPUT and version == 18:
            if attrs.get("noop_with_empty_axes", 0):
                return f"{op} node {_label(node)} uses noop_with_empty_axes (new in opset 18)"
            if len(node.input) > 1 and node.input[1] and node.input[1] not in r.consts:
                return f"{op} node {_label(node)} has computed axes (an input from opset 18)"
        elif op == "Split" and version == 18:
            if "num_outputs" in attrs and (len(node.input) < 2 or not node.input[1]):
                dim = r.types.get(node.input[0], (0, None))[1]
                axis = attrs.get("axis", 0)
                if dim is None or dim[axis] is None:
                    return f"Split node {_label(node)} uses num_outputs on a dynamic axis"
        elif op not in _TYPES_ONLY:
            return f"{op} changed in opset {version} (no exact lowering known)"
    lowered = onnx.NodeProto()
    lowered.CopyFrom(node)
    for version in changed:  # unused additions: their (default) values go too
        for name in _UNUSED_ADDITIONS.get(op, {}).get(version, {}):
            if not name.startswith("input") and name not in ("mode", "reduction",
                                                             "coordinate_transformation_mode"):
                _drop_attribute(lowered, name)
    if op in _REDUCE_AXES_INPUT and then < 18 <= now:
        if len(lowered.input) > 1 and lowered.input[1]:
            axes = [int(a) for a in r.consts[lowered.input[1]].reshape(-1)]
            lowered.attribute.append(helper.make_attribute("axes", axes))
        del lowered.input[1:]
        _drop_attribute(lowered, "noop_with_empty_axes")
    if op == "Split" and then < 18 <= now and "num_outputs" in attrs:
        _drop_attribute(lowered, "num_outputs")
        if len(lowered.input) < 2 or not lowered.input[1]:
            length = r.types[node.input[0]][1][attrs.get("axis", 0)]
            count = attrs["num_outputs"]
            chunk = -(-length // count)
            sizes = [min(chunk, length - i * chunk) for i in range(count)]
            del lowered.input[1:]
            lowered.input.append(r.ints(sizes))
    r.nodes.append(lowered)
    return None


def _drop_attribute(node: onnx.NodeProto, name: str) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)


def _lowered(model: onnx.ModelProto, target: int) -> tuple[onnx.ModelProto | None, list[str]]:
    current = model_opset(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    r = _Rewriter(out)
    if any(n.op_type == "Split" for n in out.graph.node):  # num_outputs needs the input's shape
        typed = _Rewriter(onnx.shape_inference.infer_shapes(model))
        r.types = {**typed.types, **r.types}
    problems = []
    for node in out.graph.node:
        if node.domain not in ("", "ai.onnx"):
            r.nodes.append(node)
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            problems.append(f"{node.op_type} node {_label(node)} has a subgraph")
            continue
        why = _lower_node(r, node, current, target)
        if why is not None:
            problems.append(why)
    if problems:
        return None, problems
    del out.graph.node[:]
    out.graph.node.extend(r.nodes)
    for entry in out.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = target
    return out, []


def lower_opset(model: onnx.ModelProto, opset: int | None = None) -> onnx.ModelProto:
    """``model`` at ``opset`` (None: the lowest from :data:`LOWEST_OPSET` it lowers to exactly),
    each node rewritten only where its op changed between the two versions (see above) and the
    result checked by ``onnx.checker.check_model(full_check=True)``."""
    current = model_opset(model)
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool)):
        raise TypeError(f"export: opset must be an int, got {type(opset).__name__}")
    if opset is not None and opset > current:
        raise ValueError(f"export: opset {opset} is newer than the step's opset {current}; "
                         f"give an opset <= {current}")
    targets = [opset] if opset is not None else list(range(LOWEST_OPSET, current + 1))
    reasons = []
    for target in targets:
        if target == current:
            return model
        lowered, problems = _lowered(model, target)
        if lowered is None:
            reasons.append(f"opset {target}: {'; '.join(dict.fromkeys(problems))}")
            continue
        try:
            onnx.checker.check_model(lowered, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            reasons.append(f"opset {target}: the lowered graph fails onnx's checker "
                           f"({str(exc).splitlines()[0][:300]})")
            continue
        return lowered
    rewritten = {n.op_type for n in model.graph.node} & set(_REWRITES)
    hint = (f" (portable=True rewrites {', '.join(sorted(rewritten))})" if rewritten else "")
    raise ValueError(f"export: the step cannot be written at opset "
                     f"{opset if opset is not None else f'{LOWEST_OPSET} to {current - 1}'}: "
                     f"{' | '.join(reasons)}{hint}")


def portable_model(model: onnx.ModelProto, opset: int | None = None) -> onnx.ModelProto:
    """``model`` in the portable profile (:func:`rewrite_portable`) at the lowest opset
    (:func:`lower_opset`; ``opset`` forces one)."""
    return lower_opset(rewrite_portable(model), opset)


# --------------------------------------------------------------------------- dynamic batch
BATCH = "batch"  # the symbolic dimension's name in the file


class DynamicBatchError(ValueError):
    """A traced shape that depends on the batch size in a way a graph cannot compute."""


def dynamic_batch(a: onnx.ModelProto, b: onnx.ModelProto, n_a: int, n_b: int,
                  data_inputs: Sequence[str]) -> onnx.ModelProto:
    """``a`` (traced at batch ``n_a``) with a symbolic batch dimension, from its difference to
    ``b``, the same step traced at batch ``n_b``.

    The two graphs must be the same nodes; where a constant differs it must be a function of
    the batch the graph can compute from the first data input's leading dimension: integers
    proportional to it (reshape and expand shapes, ``k * N``), or float scalars ``k * N``,
    ``1 / (k * N)`` (means) or ``k*N / (k*N - 1)`` (unbiased variance), computed in float64 and
    cast as Python computed them. Anything else raises :class:`DynamicBatchError` naming the node.
    """
    mismatch = first_difference(a, b)
    if mismatch is not None:
        raise DynamicBatchError(f"export: dynamic_batch: the step's graph depends on the batch "
                                f"size: {mismatch} at batch {n_a}, not at batch {n_b}")
    out = onnx.ModelProto()
    out.CopyFrom(a)
    r = _Rewriter(out, prefix="batch")
    first = data_inputs[0]
    batch = r.op("Shape", [first], start=0, end=1)           # int64 [1]
    batch_scalar = r.op("Squeeze", [batch, r.ints([0])])       # int64 []
    batch_double = r.op("Cast", [batch_scalar], to=TensorProto.DOUBLE)
    prologue = list(r.nodes)
    r.nodes.clear()

    def computed(name: str, x: np.ndarray, y: np.ndarray, where: str) -> None:
        """Nodes making ``name``: ``x`` at batch n_a, ``y`` at n_b."""
        if x.shape != y.shape:
            raise DynamicBatchError(f"export: dynamic_batch: {where} has shape {list(x.shape)} "
                                    f"at batch {n_a} and {list(y.shape)} at batch {n_b}")
        if np.issubdtype(x.dtype, np.integer):
            k = np.where(x == y, 0, x // n_a)
            if np.any((x != y) & ((x % n_a != 0) | (k * n_b != y))):
                raise DynamicBatchError(f"export: dynamic_batch: {where} holds {x.tolist()} at "
                                        f"batch {n_a} and {y.tolist()} at batch {n_b}, not "
                                        f"multiples of the batch size")
            base = np.where(x == y, x, 0).astype(x.dtype)
            scale = batch_scalar if x.ndim == 0 else batch
            if x.dtype != np.int64:
                scale = r.op("Cast", [scale], to=helper.np_dtype_to_tensor_dtype(x.dtype))
            r.op("Add", [r.const(base), r.op("Mul", [scale, r.const(k.astype(x.dtype))])],
                 outputs=[name])
            return
        if x.size != 1 or not np.issubdtype(x.dtype, np.floating):
            raise DynamicBatchError(f"export: dynamic_batch: {where} ({x.dtype} "
                                    f"{list(x.shape)}) differs between batch {n_a} and {n_b}")
        u, v = float(x.reshape(())), float(y.reshape(()))
        fit = _fit_batch_function(u, v, n_a, n_b, x.dtype)
        if fit is None:
            raise DynamicBatchError(
                f"export: dynamic_batch: {where} is {u!r} at batch {n_a} and {v!r} at batch "
                f"{n_b}, no function of the batch size onnxgrad knows (c*N, c/N, "
                f"c*k*N/(k*N-1))")
        form, c, k = fit
        coef = r.const(np.asarray(c, np.float64))
        if form == "c*N":
            value = r.op("Mul", [coef, batch_double])
        elif form == "c/N":
            value = r.op("Div", [coef, batch_double])
        else:
            kn = r.op("Mul", [r.const(np.asarray(k, np.float64)), batch_double])
            value = r.op("Div", [r.op("Mul", [coef, kn]),
                                 r.op("Sub", [kn, r.const(np.asarray(1.0, np.float64))])])
        cast = r.op("Cast", [value], to=helper.np_dtype_to_tensor_dtype(x.dtype))
        r.op("Reshape", [cast, r.ints(list(x.shape))], outputs=[name])

    inits_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    kept = []
    for t in out.graph.initializer:
        x = numpy_helper.to_array(t)
        y = inits_b.get(t.name)
        if y is None or (x.shape == y.shape and np.array_equal(x, y)):
            kept.append(t)
        else:
            computed(t.name, x, y, f"constant {t.name!r}")
    prologue += r.nodes  # before every node, as the initializers they replace
    r.nodes.clear()
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    for node, other in zip(out.graph.node, b.graph.node):
        where = f"{node.op_type} node {_label(node)}"
        if (node.op_type != other.op_type or list(node.input) != list(other.input)
                or list(node.output) != list(other.output)):
            raise DynamicBatchError(f"export: dynamic_batch: {where} is {other.op_type} node "
                                    f"{_label(other)} at batch {n_b}: the step's graph depends "
                                    f"on the batch size")
        attrs, others = _attrs(node), _attrs(other)
        changed = [k for k in attrs if not _same(attrs[k], others.get(k))]
        if not changed:
            r.nodes.append(node)
            continue
        if node.op_type == "Constant" and changed == ["value"]:
            r._origin = node
            computed(node.output[0], numpy_helper.to_array(attrs["value"]),
                     numpy_helper.to_array(others["value"]), where)
            r._origin = None
            continue
        raise DynamicBatchError(f"export: dynamic_batch: {where} has {changed[0]}="
                                f"{attrs[changed[0]]!r} at batch {n_a} and "
                                f"{others.get(changed[0])!r} at batch {n_b}")
    del out.graph.node[:]
    out.graph.node.extend(prologue + r.nodes)
    _symbolic_shapes(out, b, n_a, n_b, set(data_inputs))
    return out


_FORMS = {
    "c*N": lambda c, k, n: c * n,
    "c/N": lambda c, k, n: c / n,
    "c*k*N/(k*N-1)": lambda c, k, n: c * (k * n) / (k * n - 1),  # BatchNorm's unbiased factor
}


def _fit_batch_function(u: float, v: float, n_a: int, n_b: int, dtype: np.dtype
                        ) -> tuple[str, float, int] | None:
    """(form, c, k) of :data:`_FORMS` giving exactly ``u`` at batch ``n_a`` and ``v`` at
    ``n_b`` once cast to ``dtype``; c is the shortest decimal that does (0.1, not 0.1000000015:
    the value Python computed from)."""
    def exact(form: str, c: float, k: int) -> bool:
        f = _FORMS[form]
        return (np.asarray(f(c, k, n_a), dtype) == np.asarray(u, dtype)
                and np.asarray(f(c, k, n_b), dtype) == np.asarray(v, dtype))

    estimates: list[tuple[str, float, int]] = [("c*N", u / n_a, 1), ("c/N", u * n_a, 1)]
    if u and v:
        # c = u (kn_a - 1) / (kn_a) = v (kn_b - 1) / (kn_b): the k where both agree.
        k = np.arange(1, 1 << 20, dtype=np.float64)
        c_a, c_b = u * (k * n_a - 1) / (k * n_a), v * (k * n_b - 1) / (k * n_b)
        # NOTE: the closest first: near the true k the two estimates agree within the tolerance
        # for several k (251-261 for BatchNorm's k = 256 at batches 8 and 9), and the first few
        # in order missed it.
        gap = np.abs(c_a - c_b)
        close = np.flatnonzero(gap <= 1e-6 * np.abs(c_a))
        close = close[np.argsort(gap[close], kind="stable")]
        estimates += [("c*k*N/(k*N-1)", float(c_a[i]), int(k[i])) for i in close[:8]]
    # NOTE: the fit with the shortest c, not the first: float32 cannot tell some neighbours apart
    # (0.1 with k = 1024 and 0.10000001 with k = 1025 at batches 8 and 19).
    best: tuple[int, str, float, int] | None = None
    for form, c, k in estimates:
        for digits in range(1, 18):
            short = float(f"{c:.{digits}g}")
            if exact(form, short, k):
                if best is None or digits < best[0]:
                    best = (digits, form, short, k)
                break
    return None if best is None else best[1:]


def first_difference(a: onnx.ModelProto, b: onnx.ModelProto) -> str | None:
    """The first node of ``a`` that ``b`` does not have in its place (op type, inputs, outputs),
    described with its module and source line; None when they are the same nodes."""
    for i, node in enumerate(a.graph.node):
        other = b.graph.node[i] if i < len(b.graph.node) else None
        if (other is None or node.op_type != other.op_type or node.input != other.input
                or node.output != other.output):
            meta = {p.key: p.value for p in node.metadata_props}
            where = "".join(f", {what} {meta[key]}" for what, key in
                            (("module", MODULE), ("origin", ORIGIN), ("from", SOURCE))
                            if key in meta)
            return f"{node.op_type} node {_label(node)} ({where[2:] or 'no origin'})"
    if len(b.graph.node) > len(a.graph.node):
        return f"{len(b.graph.node) - len(a.graph.node)} more nodes"
    return None


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, onnx.TensorProto) and isinstance(y, onnx.TensorProto):
        u, v = numpy_helper.to_array(x), numpy_helper.to_array(y)
        return u.shape == v.shape and np.array_equal(u, v)
    return x == y


def _symbolic_shapes(out: onnx.ModelProto, b: onnx.ModelProto, n_a: int, n_b: int,
                     data: set[str]) -> None:
    """Dims that are ``n_a`` in ``out`` and ``n_b`` in ``b`` become ``batch``; other dims that
    differ become unknown. State inputs must not change."""
    other = {vi.name: vi for vi in [*b.graph.input, *b.graph.value_info, *b.graph.output]}
    for vi in [*out.graph.input, *out.graph.value_info, *out.graph.output]:
        twin = other.get(vi.name)
        if twin is None:
            continue
        dims, dims_b = vi.type.tensor_type.shape.dim, twin.type.tensor_type.shape.dim
        if len(dims) != len(dims_b):
            continue
        for d, e in zip(dims, dims_b):
            if d.HasField("dim_value") and e.HasField("dim_value") and d.dim_value != e.dim_value:
                if vi in out.graph.input and vi.name not in data:
                    raise DynamicBatchError(f"export: dynamic_batch: state input {vi.name!r} "
                                            f"has a shape that depends on the batch size")
                if d.dim_value == n_a and e.dim_value == n_b:
                    d.dim_param = BATCH
                else:
                    d.Clear()
