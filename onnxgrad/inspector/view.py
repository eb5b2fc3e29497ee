"""A graph as inspection sees it: types, shapes, metadata, and ONNX shape inference.

:func:`make_view` wraps any ``onnx.ModelProto``, ``onnx_ir.Model`` or ``onnx_ir.Graph`` in a
:class:`View`: the graph, its model and metadata, and the types shape inference found for values
the file leaves untyped (best effort, on a copy: the caller's graph is never modified). The text
dump, the summary and the DOT picture all read graphs through it, and share its short spelling of
types (``f32[2,4]``, ``i64[?]``, ``seq<f32>``), value references (``%x``) and op names.

onnxgrad's own graphs carry metadata (keys in ``runtime.metadata``): each node's origin (``fwd``,
``grad``, ``opt``, ``bn-stats``; "unknown" elsewhere), and the model's state mapping, data inputs
and parameters, read here with :meth:`View.state`, :meth:`View.data_inputs` and
:meth:`View.parameters`; malformed metadata of a foreign file reads as absent.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from ..runtime.metadata import DATA_INPUTS, ORIGIN, PARAMETERS, STATE, UNKNOWN_ORIGIN
from ..runtime.opset import IR_VERSION

__all__ = [
    "Dims",
    "GraphLike",
    "View",
    "dims_of",
    "dtype_bits",
    "dtype_str",
    "input_roles",
    "is_float",
    "json_meta",
    "make_view",
    "nbytes_of",
    "op_name",
    "origin_of",
    "shape_str",
    "static_dims",
    "type_str",
    "value_ref",
]

GraphLike = onnx.ModelProto | ir.Model | ir.Graph
Dims = tuple[int | str | None, ...]  # int: static, str: symbolic, None: unknown dim

# --------------------------------------------------------------------------------------------
# Types and shapes

_DTYPE_NAMES = {
    ir.DataType.FLOAT: "f32",
    ir.DataType.FLOAT16: "f16",
    ir.DataType.BFLOAT16: "bf16",
    ir.DataType.DOUBLE: "f64",
    ir.DataType.INT8: "i8",
    ir.DataType.INT16: "i16",
    ir.DataType.INT32: "i32",
    ir.DataType.INT64: "i64",
    ir.DataType.UINT8: "u8",
    ir.DataType.UINT16: "u16",
    ir.DataType.UINT32: "u32",
    ir.DataType.UINT64: "u64",
    ir.DataType.BOOL: "bool",
    ir.DataType.STRING: "str",
    ir.DataType.COMPLEX64: "c64",
    ir.DataType.COMPLEX128: "c128",
}


def dtype_str(dtype: ir.DataType | None) -> str:
    if dtype is None or dtype == ir.DataType.UNDEFINED:
        return "?"
    return _DTYPE_NAMES.get(dtype) or dtype.name.lower()  # float8 and friends by their ONNX name


def dtype_bits(dtype: ir.DataType | None) -> int | None:
    if dtype is None or dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
        return None
    return int(dtype.bitwidth)


def is_float(dtype: ir.DataType | None) -> bool:
    return dtype is not None and dtype.is_floating_point()


def dims_of(shape: ir.Shape | None) -> Dims | None:
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else getattr(d, "value", None) for d in shape)


def shape_str(dims: Dims | None) -> str:
    if dims is None:
        return "[?]"
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def static_dims(dims: Dims | None, symbols: set[str] | None = None) -> tuple[int, ...] | None:
    """Dims as ints, or None when any is unknown.

    With ``symbols`` given, symbolic dims (a dynamic batch ``N``) count as 1 and their names are
    added to it, so costs of dynamic-shape models come out "per N=1" instead of unknown.
    """
    if dims is None:
        return None
    out: list[int] = []
    for d in dims:
        if isinstance(d, int) and d >= 0:
            out.append(d)
        elif isinstance(d, str) and symbols is not None:
            symbols.add(d)
            out.append(1)
        else:
            return None
    return tuple(out)


def nbytes_of(dtype: ir.DataType | None, dims: Dims | None,
            symbols: set[str] | None = None) -> int | None:
    static = static_dims(dims, symbols)
    bits = dtype_bits(dtype)
    if static is None or bits is None:
        return None
    return (math.prod(static) * bits + 7) // 8


def type_str(type_: ir.TypeProtocol | None, dims: Dims | None) -> str:
    if type_ is None:
        return "?" if dims is None else "?" + shape_str(dims)
    if isinstance(type_, ir.SequenceType):
        return f"seq<{type_str(type_.elem_type, None)}>"
    if isinstance(type_, ir.OptionalType):
        return f"opt<{type_str(type_.elem_type, dims)}>"
    prefix = "sparse " if isinstance(type_, ir.SparseTensorType) else ""
    return prefix + dtype_str(type_.dtype) + shape_str(dims)


# --------------------------------------------------------------------------------------------
# A graph as inspection sees it


@dataclass
class View:
    """A graph plus what inspection knows beside it: its model, metadata and inferred types."""

    graph: ir.Graph
    model: ir.Model | None
    metadata: dict[str, str]
    inferred: dict[str, tuple[ir.TypeProtocol | None, ir.Shape | None]] = field(
        default_factory=dict
    )

    def type_and_dims(self, value: ir.Value) -> tuple[ir.TypeProtocol | None, Dims | None]:
        """The value's own type and dims, completed by inference where they are unknown."""
        type_, dims = value.type, dims_of(value.shape)
        if value.name not in self.inferred:
            return type_, dims
        inf_type, inf_shape = self.inferred[value.name]
        inf_dims = dims_of(inf_shape)
        if dims is None:
            dims = inf_dims
        elif inf_dims is not None and len(inf_dims) == len(dims):
            # Files often declare outputs as [?,?] that inference can size.
            dims = tuple(map(_better_dim, dims, inf_dims))
        return (type_ if type_ is not None else inf_type), dims

    def dtype(self, value: ir.Value) -> ir.DataType | None:
        type_, _ = self.type_and_dims(value)
        return type_.dtype if isinstance(type_, ir.TensorType) else None

    def dims(self, value: ir.Value | None) -> Dims | None:
        return None if value is None else self.type_and_dims(value)[1]

    def typed(self, value: ir.Value) -> str:
        return f"{value_ref(value)}: {type_str(*self.type_and_dims(value))}"

    def state(self) -> dict[str, str]:
        return json_meta(self.metadata, STATE, dict) or {}

    def data_inputs(self) -> list[str]:
        return json_meta(self.metadata, DATA_INPUTS, list) or []

    def parameters(self) -> list[str]:
        return json_meta(self.metadata, PARAMETERS, list) or []


def _better_dim(declared: int | str | None, inferred: int | str | None) -> int | str | None:
    """A static size beats a symbol, a symbol beats unknown; ties keep the declared dim."""
    def rank(d: int | str | None) -> int:
        return 2 if isinstance(d, int) else 1 if isinstance(d, str) else 0

    return declared if rank(declared) >= rank(inferred) else inferred


def json_meta(metadata: Mapping[str, str], key: str, kind: type) -> dict | list | None:
    """Metadata JSON of the expected kind, or None when absent or malformed (foreign files)."""
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, kind):
        return None
    if kind is dict:
        return {str(k): str(v) for k, v in value.items()}
    return [str(v) for v in value]


def make_view(obj: GraphLike, *, infer: bool) -> View:
    if isinstance(obj, onnx.ModelProto):
        model = ir.serde.deserialize_model(obj)
        return View(model.graph, model, _metadata(model), _infer_types(obj) if infer else {})
    if isinstance(obj, ir.Model):
        # NOTE: inference runs on a serialized copy so that the caller's ir.Model is never mutated.
        inferred = _infer_types(_serialize(obj)) if infer else {}
        return View(obj.graph, obj, _metadata(obj), inferred)
    if isinstance(obj, ir.Graph):
        inferred = _infer_types(_serialize(ir.Model(obj, ir_version=IR_VERSION))) if infer else {}
        return View(obj, None, dict(obj.metadata_props), inferred)
    raise TypeError(
        f"expected onnx.ModelProto, onnx_ir.Model or onnx_ir.Graph, got {type(obj).__name__}"
    )


def _serialize(model: ir.Model) -> onnx.ModelProto | None:
    try:
        return ir.serde.serialize_model(model)
    except Exception:  # noqa: BLE001 - a graph under construction may not serialize; no inference
        return None


def _metadata(model: ir.Model) -> dict[str, str]:
    return {**model.graph.metadata_props, **model.metadata_props}


# Initializers up to this many elements keep their values for shape inference (shape, axes, pads,
# Resize scales feed data propagation); bigger ones (weights) only need their type.
_INFER_KEEP_ELEMENTS = 1024


def _infer_types(
    proto: onnx.ModelProto | None,
) -> dict[str, tuple[ir.TypeProtocol | None, ir.Shape | None]]:
    """Value name -> (type, shape) from ONNX shape inference; best effort, {} on failure."""
    if proto is None:
        return {}
    try:
        graph = onnx.shape_inference.infer_shapes(
            _inference_skeleton(proto), strict_mode=False, data_prop=True
        ).graph
    except Exception:  # noqa: BLE001 - inference is best effort: custom ops, odd models
        return {}
    out: dict[str, tuple[ir.TypeProtocol | None, ir.Shape | None]] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        if not info.HasField("type") or info.type.WhichOneof("value") is None:
            continue
        try:
            out[info.name] = (
                ir.serde.deserialize_type_proto_for_type(info.type),
                ir.serde.deserialize_type_proto_for_shape(info.type),
            )
        except Exception:  # noqa: BLE001, S112 - a type onnx_ir cannot read stays unknown
            continue
    return out


def _inference_skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with large initializers replaced by typed graph inputs.

    Shape inference needs only the types of weights, and copying hundreds of MB of weights (or
    hitting protobuf's 2 GB limit) just to infer shapes is wasteful.
    """
    g = proto.graph
    skeleton = onnx.ModelProto(ir_version=proto.ir_version)
    skeleton.opset_import.extend(proto.opset_import)
    skeleton.functions.extend(proto.functions)
    sg = skeleton.graph
    sg.name = g.name
    sg.node.extend(g.node)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    sg.sparse_initializer.extend(g.sparse_initializer)
    inputs = {i.name: i for i in g.input}
    extra: list[onnx.ValueInfoProto] = []
    for t in g.initializer:
        external = t.data_location == onnx.TensorProto.EXTERNAL
        if not external and math.prod(t.dims) <= _INFER_KEEP_ELEMENTS:
            sg.initializer.append(t)
            continue
        info = onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        if t.name in inputs:
            inputs[t.name] = info
        else:
            extra.append(info)
    sg.input.extend(inputs.values())
    sg.input.extend(extra)
    return skeleton


# --------------------------------------------------------------------------------------------
# Spellings shared by the text dump, the summary and the picture


def origin_of(node: ir.Node) -> str:
    """The stage that made the node (``fwd``, ``grad``, ...), "unknown" without metadata."""
    return node.metadata_props.get(ORIGIN) or UNKNOWN_ORIGIN


def value_ref(value: ir.Value | None) -> str:
    """``%name``; ``_`` for an omitted optional input."""
    if value is None:
        return "_"
    return f"%{value.name}" if value.name else "%<unnamed>"


def op_name(node: ir.Node) -> str:
    """The op type, qualified by its domain unless it is standard ONNX."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def input_roles(name: str, feeds: Mapping[str, str], data: set[str], defaults: set[str],
                 parameters: set[str] = frozenset(), ref: str = "") -> list[str]:
    """What a graph input is for, as the text dump and the summary both label it."""
    roles = []
    if name in feeds:
        roles.append(f"state <- {ref}{feeds[name]}")
    if name in data:
        roles.append("data")
    if name in parameters:
        roles.append("parameter")
    if name in defaults:
        roles.append("has default")
    return roles

