"""Rewrites of the graph ONNX Runtime's CPU provider runs, where its kernel for a node is slow at
some shapes: the same result spelled with other standard ONNX nodes. The model users trace,
inspect and export keeps the node; only the session's copy is rewritten.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

# A Conv is lowered when it makes at most this many output positions per image...
MAX_POSITIONS = 16
# ...over more than one image, with a weight at least this large (the 1 MiB L2 of one core here)
# and at most this many kernel taps (each is a Slice node).
MIN_WEIGHT_BYTES = 1 << 20
MAX_TAPS = 9


def static_shapes(graph: onnx.GraphProto) -> dict[str, list[int] | None]:
    """Each typed value's static shape (None where a dimension is symbolic or unknown)."""
    shapes: dict[str, list[int] | None] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            shapes[info.name] = None
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        shapes[info.name] = None if None in dims else dims
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def conv_lowered(attrs: Mapping[str, Any], x: Sequence[int] | None,
                 w: Sequence[int] | None) -> bool:
    """Whether ``lower_small_convs`` rewrites a Conv with these attributes and input shapes."""
    if not x or not w or len(x) != 4 or len(w) != 4 or attrs.get("group", 1) != 1:
        return False
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "", b""):
        return False
    positions = int(np.prod(_out_size(attrs, x, w)))
    return x[0] > 1 and 0 < positions <= MAX_POSITIONS and w[2] * w[3] <= MAX_TAPS and \
        int(np.prod(w)) * 4 >= MIN_WEIGHT_BYTES


def _out_size(attrs: Mapping[str, Any], x: Sequence[int], w: Sequence[int]) -> list[int]:
    """The output's spatial sizes of a 2-D Conv with explicit (or no) pads."""
    strides = attrs.get("strides", [1, 1])
    dilations = attrs.get("dilations", [1, 1])
    pads = attrs.get("pads", [0, 0, 0, 0])
    return [max((x[2 + i] + pads[i] + pads[2 + i] - dilations[i] * (w[2 + i] - 1) - 1)
                // strides[i] + 1, 0) for i in range(2)]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def lower_small_convs(model: onnx.ModelProto, shapes: Mapping[str, list[int] | None]) -> int:
    """Each 2-D ungrouped float32 ``Conv`` (its weight's type known) over a batch with few
    output positions and a large weight becomes one matrix product over every image:
    W[O, C*k*k] @ unfold(X)[C*k*k, N*L], the unfold k*k strided Slices of the padded input.
    Returns how many were rewritten.

    NOTE: ONNX Runtime's CPU Conv multiplies the weight by each image's columns in turn, so
    with few columns per image (layer4 of resnet18 at 64x64: 2x2) it reads the 9.4 MB weight
    once per image. Measured, one node alone, 2 threads: [8, 512, 2, 2] by [512, 512, 3, 3]
    5.94 -> 2.31 ms, [8, 256, 4, 4] stride 2 to 512: 2.60 -> 1.31 ms, [8, 256, 4, 4] to 256
    (16 positions): 2.84 -> 2.50 ms; mobilenet_v2's and efficientnet_b0's last 1x1 convs at
    8x96 (9 positions, 1.2-1.6 MB): 0.80-0.95x; 64 positions 1.05x, 49 positions 1.01x, a 147 KB
    weight 1.44-2.89x, batch 1 1.37x, and a swapped-Conv weight gradient's 48x48 "kernel" (2,304
    Slices: mobilenet_v2's step 10 ms slower) are kept as Conv. The whole resnet18 8x64 step:
    105.7 -> 96.4, 101.6 -> 94.0 and 109.9 -> 99.3 ms (one process, alternating).
    """
    graph = model.graph
    nodes = list(graph.node)
    floats = {v.name for v in (*graph.input, *graph.value_info)
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    floats |= {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    todo = [i for i, node in enumerate(nodes)
            if node.op_type == "Conv" and node.domain in ("", "ai.onnx")
            and node.input[1] in floats
            and conv_lowered(_attrs(node), shapes.get(node.input[0]), shapes.get(node.input[1]))]
    if not todo:
        return 0
    for i in reversed(todo):
        nodes[i:i + 1] = _lowered(graph, nodes[i], shapes)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(todo)


def _lowered(graph: onnx.GraphProto, node: onnx.NodeProto,
             shapes: Mapping[str, list[int] | None]) -> list[onnx.NodeProto]:
    x, w, y = node.input[0], node.input[1], node.output[0]
    n, c, _, _ = shapes[x]
    o, _, *kernel = shapes[w]
    attrs = _attrs(node)
    out = _out_size(attrs, shapes[x], shapes[w])
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    prefix = f"{y}.lowered"
    made: list[onnx.NodeProto] = []

    def value(what: str) -> str:
        return f"{prefix}.{what}"

    def ints(what: str, values: list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), value(what)))
        return value(what)

    def op(op_type: str, inputs: list[str], what: str, **attrs) -> str:
        made.append(helper.make_node(op_type, inputs, [value(what)], **attrs))
        return value(what)

    # [C, N, H, W]: each tap's Slice is then [C, N, Ho, Wo], concatenated as (tap, image).
    planes = op("Transpose", [x], "planes", perm=[1, 0, 2, 3])
    if any(pads):
        planes = op("Pad", [planes, ints("pads", [0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]])],
                    "padded")
    taps = []
    for t, offset in enumerate(itertools.product(*(range(k) for k in kernel))):
        start = [i * d for i, d in zip(offset, dilations)]
        stop = [s + (m - 1) * st + 1 for s, m, st in zip(start, out, strides)]
        taps.append(op("Slice", [planes, ints(f"start{t}", start), ints(f"stop{t}", stop),
                                 ints(f"axes{t}", [2, 3]), ints(f"steps{t}", strides)],
                       f"tap{t}"))
    cols = taps[0] if len(taps) == 1 else op("Concat", taps, "taps", axis=1)
    taps_n = int(np.prod(kernel))
    length = out[0] * out[1]
    product = op("MatMul", [op("Reshape", [w, ints("wshape", [o, c * taps_n])], "weight"),
                            op("Reshape", [cols, ints("cshape", [c * taps_n, n * length])],
                               "cols")], "product")
    if len(node.input) > 2 and node.input[2]:
        product = op("Add", [product, op("Reshape", [node.input[2], ints("bshape", [o, 1])],
                                         "bias")], "biased")
    grid = op("Reshape", [product, ints("yshape", [o, n, *out])], "grid")
    made.append(helper.make_node("Transpose", [grid], [y], perm=[1, 0, 2, 3]))
    return made
