"""Inspection of ONNX models: loading with clear errors, a typed text dump, a summary, DOT/SVG.

Works on any ONNX model (``onnx.ModelProto``, ``onnx_ir.Model`` or ``onnx_ir.Graph``), not only
onnxgrad's. onnxgrad's own graphs carry extra metadata (keys in ``runtime.metadata``) that is shown
when present: each node's origin (``fwd``, ``grad``, ``opt``, ``bn-stats``; "unknown" elsewhere),
the user's source line and module path, and the model's state mapping and data inputs.

Only onnx, onnx_ir, numpy and the standard library are used (``runtime`` is the bottom layer).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from .metadata import (
    DATA_INPUTS,
    MODULE,
    ORIGIN,
    ORIGINS,
    PARAMETERS,
    SOURCE,
    STATE,
    UNKNOWN_ORIGIN,
)
from .opset import IR_VERSION

__all__ = [
    "ORIGIN_COLOURS",
    "GraphLike",
    "InspectError",
    "Summary",
    "TensorInfo",
    "atomic_write",
    "find_dot",
    "format_graph",
    "format_node",
    "load_model",
    "module_path",
    "summary",
    "to_dot",
    "write_svg",
]

GraphLike = Union[onnx.ModelProto, ir.Model, ir.Graph]
Dims = tuple[Union[int, str, None], ...]  # int: static, str: symbolic, None: unknown dim


class InspectError(ValueError):
    """A user-facing inspection failure; the message is one line, fit for a CLI error."""


# --------------------------------------------------------------------------------------------
# Loading


def load_model(path: str | os.PathLike[str], *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model (and its external data), raising `InspectError` with a one-line reason.

    ``check=False`` skips ``onnx.checker.check_model``, for models the installed checker is too old
    or too strict for.
    """
    p = Path(path)
    if not p.exists():
        raise InspectError(f"{p}: no such file")
    if p.is_dir():
        raise InspectError(f"{p}: is a directory, not an ONNX file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InspectError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    if not data:
        raise InspectError(f"{p}: empty file, not an ONNX model")

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as exc:
        if _looks_like_text(data):
            raise InspectError(f"{p}: not an ONNX model (the file is text)") from exc
        raise InspectError(
            f"{p}: not a valid ONNX model: protobuf decoding failed "
            "(the file is truncated, corrupt or not ONNX)"
        ) from exc
    # NOTE: protobuf happily parses many non-ONNX byte strings into a message made only of
    # unknown fields, so a successful parse still has to look like a model.
    if not model.HasField("graph") or model.ir_version <= 0:
        what = "the file is text" if _looks_like_text(data) else "no graph or IR version found"
        raise InspectError(f"{p}: not an ONNX model ({what})")

    if check:
        try:
            # The path form resolves external data relative to the file and handles > 2 GB models.
            # It also catches truncation at a field boundary, which protobuf parses without error
            # (e.g. a model cut just before its opset imports).
            onnx.checker.check_model(str(p))
        except Exception as exc:  # noqa: BLE001 - any checker failure means "invalid model"
            raise InspectError(
                f"{p}: invalid ONNX model (truncated or corrupt?): {_first_line(exc)}"
            ) from exc

    try:
        # A no-op for models without external data.
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    except (OSError, ValueError) as exc:
        raise InspectError(f"{p}: cannot load external data: {_first_line(exc)}") from exc
    return model


def _looks_like_text(data: bytes) -> bool:
    sample = data[:4096]
    if b"\x00" in sample:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in sample)
    return printable >= 0.95 * len(sample)


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


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


def _dtype_str(dtype: ir.DataType | None) -> str:
    if dtype is None or dtype == ir.DataType.UNDEFINED:
        return "?"
    return _DTYPE_NAMES.get(dtype) or dtype.name.lower()  # float8 and friends by their ONNX name


def _dtype_bits(dtype: ir.DataType | None) -> int | None:
    if dtype is None or dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
        return None
    return int(dtype.bitwidth)


def _is_float(dtype: ir.DataType | None) -> bool:
    return dtype is not None and dtype.is_floating_point()


def _dims(shape: ir.Shape | None) -> Dims | None:
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else getattr(d, "value", None) for d in shape)


def _shape_str(dims: Dims | None) -> str:
    if dims is None:
        return "[?]"
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _static(dims: Dims | None, symbols: set[str] | None = None) -> tuple[int, ...] | None:
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


def _nbytes(dtype: ir.DataType | None, dims: Dims | None,
            symbols: set[str] | None = None) -> int | None:
    static = _static(dims, symbols)
    bits = _dtype_bits(dtype)
    if static is None or bits is None:
        return None
    return (math.prod(static) * bits + 7) // 8


def _type_str(type_: ir.TypeProtocol | None, dims: Dims | None) -> str:
    if type_ is None:
        return "?" if dims is None else "?" + _shape_str(dims)
    if isinstance(type_, ir.SequenceType):
        return f"seq<{_type_str(type_.elem_type, None)}>"
    if isinstance(type_, ir.OptionalType):
        return f"opt<{_type_str(type_.elem_type, dims)}>"
    prefix = "sparse " if isinstance(type_, ir.SparseTensorType) else ""
    return prefix + _dtype_str(type_.dtype) + _shape_str(dims)


# --------------------------------------------------------------------------------------------
# A graph as inspection sees it


@dataclass
class _View:
    """A graph plus what inspection knows beside it: its model, metadata and inferred types."""

    graph: ir.Graph
    model: ir.Model | None
    metadata: dict[str, str]
    inferred: dict[str, tuple[ir.TypeProtocol | None, ir.Shape | None]] = field(
        default_factory=dict
    )

    def type_and_dims(self, value: ir.Value) -> tuple[ir.TypeProtocol | None, Dims | None]:
        """The value's own type and dims, completed by inference where they are unknown."""
        type_, dims = value.type, _dims(value.shape)
        if value.name not in self.inferred:
            return type_, dims
        inf_type, inf_shape = self.inferred[value.name]
        inf_dims = _dims(inf_shape)
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
        return f"{_value_ref(value)}: {_type_str(*self.type_and_dims(value))}"

    def state(self) -> dict[str, str]:
        return _json_meta(self.metadata, STATE, dict) or {}

    def data_inputs(self) -> list[str]:
        return _json_meta(self.metadata, DATA_INPUTS, list) or []

    def parameters(self) -> list[str]:
        return _json_meta(self.metadata, PARAMETERS, list) or []


def _better_dim(declared: int | str | None, inferred: int | str | None) -> int | str | None:
    """A static size beats a symbol, a symbol beats unknown; ties keep the declared dim."""
    def rank(d: int | str | None) -> int:
        return 2 if isinstance(d, int) else 1 if isinstance(d, str) else 0

    return declared if rank(declared) >= rank(inferred) else inferred


def _json_meta(metadata: Mapping[str, str], key: str, kind: type) -> dict | list | None:
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


def _view(obj: GraphLike, *, infer: bool) -> _View:
    if isinstance(obj, onnx.ModelProto):
        model = ir.serde.deserialize_model(obj)
        return _View(model.graph, model, _metadata(model), _infer_types(obj) if infer else {})
    if isinstance(obj, ir.Model):
        # NOTE: inference runs on a serialized copy so that the caller's ir.Model is never mutated.
        inferred = _infer_types(_serialize(obj)) if infer else {}
        return _View(obj.graph, obj, _metadata(obj), inferred)
    if isinstance(obj, ir.Graph):
        inferred = _infer_types(_serialize(ir.Model(obj, ir_version=IR_VERSION))) if infer else {}
        return _View(obj, None, dict(obj.metadata_props), inferred)
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
        except Exception:  # noqa: BLE001 - a type onnx_ir cannot read stays unknown
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


def _origin(node: ir.Node) -> str:
    return node.metadata_props.get(ORIGIN) or UNKNOWN_ORIGIN


# --------------------------------------------------------------------------------------------
# Text dump

_SHOW_VALUES = 8  # constants with at most this many elements print their values (axes, scalars)


def _value_ref(value: ir.Value | None) -> str:
    if value is None:
        return "_"
    return f"%{value.name}" if value.name else "%<unnamed>"


def _op_name(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _float_str(v: float) -> str:
    # ONNX stores floats as float32: print the shortest float32 text (0.1, not 0.100000001).
    return str(np.float32(v))


def _values_str(t: ir.TensorProtocol) -> str | None:
    """The values of a small tensor (``0.9``, ``[0,2]``), or None for a big or unreadable one."""
    dims = _static(_dims(t.shape))
    if dims is None or math.prod(dims) > _SHOW_VALUES or t.dtype in (
        ir.DataType.STRING, ir.DataType.UNDEFINED
    ):
        return None
    try:
        array = np.asarray(t.numpy())
    except Exception:  # noqa: BLE001 - exotic dtypes, missing external data: just the type
        return None
    items = [_float_str(x) if array.dtype.kind == "f" else str(x) for x in array.reshape(-1).tolist()]
    return items[0] if array.ndim == 0 else "[" + ",".join(items) + "]"


def _tensor_str(t: ir.TensorProtocol) -> str:
    values = _values_str(t)
    text = _dtype_str(t.dtype) + _shape_str(_dims(t.shape))
    return f"<tensor {text}" + (f": {values}>" if values is not None else ">")


def _graph_str(g: ir.Graph) -> str:
    return f"<graph {g.name or 'graph'}: {len(g)} nodes>"


def _attr_str(attr: ir.Attr) -> str:
    if attr.is_ref():
        return f"@{attr.ref_attr_name}"
    t, v = attr.type, attr.value
    A = ir.AttributeType
    if t == A.FLOAT:
        return _float_str(v)
    if t == A.INT:
        return str(int(v))
    if t == A.STRING:
        return json.dumps(v)
    if t in (A.TENSOR, A.SPARSE_TENSOR):
        return _tensor_str(v)
    if t == A.GRAPH:
        return _graph_str(v)
    if t == A.FLOATS:
        return "[" + ",".join(_float_str(x) for x in v) + "]"
    if t == A.INTS:
        return "[" + ",".join(str(int(x)) for x in v) + "]"
    if t == A.STRINGS:
        return "[" + ",".join(json.dumps(x) for x in v) + "]"
    if t in (A.TENSORS, A.SPARSE_TENSORS):
        return "[" + ",".join(_tensor_str(x) for x in v) + "]"
    if t == A.GRAPHS:
        return "[" + ",".join(_graph_str(x) for x in v) + "]"
    if t == A.TYPE_PROTO:
        return f"<type {_type_str(getattr(v, 'type', None), _dims(getattr(v, 'shape', None)))}>"
    return str(v)


def _format_node(node: ir.Node, view: _View) -> str:
    outs = ", ".join(view.typed(v) if v.name else "_" for v in node.outputs)
    args = ", ".join(_value_ref(v) for v in node.inputs)
    line = f"{_op_name(node)}({args})"
    if outs:
        line = f"{outs} = {line}"
    if node.attributes:
        attrs = ", ".join(
            f"{name}={_attr_str(node.attributes[name])}" for name in sorted(node.attributes)
        )
        line += f" {{{attrs}}}"
    # NOTE: nodes without an origin (any model onnxgrad did not make) get no comment rather than
    # "# unknown" on every line; the summary counts them as "unknown".
    origin = node.metadata_props.get(ORIGIN)
    source = node.metadata_props.get(SOURCE)
    if origin or source:
        line += f"  # {origin or UNKNOWN_ORIGIN}"
        if source:
            line += f"  ({' '.join(source.split())})"  # keep it one line
    return line


def format_node(node: ir.Node) -> str:
    """One typed line for a node: ``%y: f32[2,4] = Relu(%x)  # fwd  (model.py:3: y = x.relu())``.

    Meant for error messages about a node (DESIGN: errors include the node's line).
    """
    # Only value types are read from the view, so a node outside any graph works too.
    return _format_node(node, _View(node.graph, None, {}))  # type: ignore[arg-type]


def _input_roles(name: str, feeds: Mapping[str, str], data: set[str], defaults: set[str],
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


def format_graph(graph_or_model: GraphLike, *, infer_shapes: bool = True) -> str:
    """A typed text dump: inputs, initializers, one line per node, outputs.

    Types missing from the graph are filled in by ONNX shape inference (best effort) unless
    ``infer_shapes=False``; the caller's graph is never modified.
    """
    view = _view(graph_or_model, infer=infer_shapes)
    g = view.graph
    state = view.state()
    feeds = {inp: out for out, inp in state.items()}
    data_inputs = set(view.data_inputs())
    parameters = set(view.parameters())
    input_names = {v.name for v in g.inputs}
    initializers = [v for name, v in g.initializers.items() if name not in input_names]

    lines = [
        f"graph {g.name or '(unnamed)'}: {len(g.inputs)} inputs, {len(g.initializers)} "
        f"initializers, {len(g)} nodes, {len(g.outputs)} outputs",
        "inputs:",
    ]
    defaults = set(g.initializers)
    for v in g.inputs:
        marks = _input_roles(v.name, feeds, data_inputs, defaults, parameters, ref="%")
        lines.append(f"  {view.typed(v)}" + (f"  ({', '.join(marks)})" if marks else ""))
    if initializers:
        lines.append("initializers:")
        for v in initializers:
            values = _values_str(v.const_value) if v.const_value is not None else None
            lines.append(f"  {view.typed(v)}" + (f" = {values}" if values is not None else ""))
    lines.append("nodes:")
    lines.extend(f"  {_format_node(node, view)}" for node in g)
    lines.append("outputs:")
    for v in g.outputs:
        feeds_next = f"  (state -> %{state[v.name]})" if v.name in state else ""
        lines.append(f"  {view.typed(v)}{feeds_next}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Summary


@dataclass(frozen=True)
class TensorInfo:
    """A named tensor as inspection sees it; unknown parts are None (dtype "?")."""

    name: str
    dtype: str
    shape: Dims | None
    nbytes: int | None = None

    @property
    def type(self) -> str:
        return self.dtype + _shape_str(self.shape)

    def __str__(self) -> str:
        return f"{self.name}: {self.type}"


@dataclass(repr=False)
class Summary:
    """What a model holds and costs; ``str()`` (and the REPL) shows a readable report."""

    graph_name: str
    producer: str
    ir_version: int | None
    opsets: dict[str, int]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    state: dict[str, str]  # state output name -> input it feeds on the next step
    data_inputs: list[str]
    defaults: list[str]  # inputs with an initializer default
    num_nodes: int
    num_subgraph_nodes: int
    op_counts: dict[str, int]  # most frequent first
    origin_counts: dict[str, int]
    num_initializers: int
    # Float tensors carried from run to run, each counted once: the state inputs and declared
    # parameters of onnxgrad's graphs, else (foreign models) the initializers. Those read only by
    # optimizer nodes (momentum buffers) are optimizer state, the rest are parameters (BatchNorm
    # running statistics included, as in any ONNX file).
    param_count: int
    param_bytes: int
    opt_state_count: int
    opt_state_bytes: int
    flops: int  # known part; see flops_unknown
    flops_by_op: dict[str, int]
    flops_unknown: list[str]  # nodes of counted op types whose shapes are unknown
    largest_intermediates: list[TensorInfo]  # nbytes with symbols_as_1 set to 1
    symbols_as_1: list[str] = field(default_factory=list)  # symbolic dims (batch) costed as 1
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return _render_summary(self)

    __repr__ = __str__


_FLOP_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_LARGEST = 10


def summary(model: GraphLike) -> Summary:
    """Inputs/outputs, state mapping, node counts, parameters, FLOPs, largest intermediates."""
    view = _view(model, infer=True)
    g, meta = view.graph, view.metadata
    ir_model = view.model
    if ir_model is not None:
        producer = " ".join(p for p in (ir_model.producer_name, ir_model.producer_version) if p)
        ir_version: int | None = ir_model.ir_version
    else:
        producer, ir_version = "", None
    opsets = {(d or "ai.onnx"): v for d, v in g.opset_imports.items()}

    warnings: list[str] = []
    for key, kind in ((STATE, dict), (DATA_INPUTS, list), (PARAMETERS, list)):
        if key in meta and _json_meta(meta, key, kind) is None:
            warnings.append(f"metadata {key!r} is not a JSON {kind.__name__}; ignored")
    state = view.state()
    input_names = {v.name for v in g.inputs}
    output_names = {v.name for v in g.outputs}
    for out, inp in state.items():
        if out not in output_names or inp not in input_names:
            warnings.append(f"state entry {out!r} -> {inp!r} names a missing output or input")

    def info(v: ir.Value, symbols: set[str] | None = None) -> TensorInfo:
        type_, dims = view.type_and_dims(v)
        dtype = view.dtype(v)
        dtype_text = _dtype_str(dtype) if isinstance(type_, ir.TensorType) else _type_str(type_, None)
        return TensorInfo(v.name or "", dtype_text, dims, _nbytes(dtype, dims, symbols))

    declared = set(state.values()) | set(view.parameters())
    if declared:
        # NOTE: initializers of onnxgrad's graphs are baked constants (axes, scalars), not weights.
        carried = {v.name: v for v in g.inputs if v.name in declared}
    else:
        carried = dict(g.initializers)
    params = [0, 0]
    opt_state = [0, 0]
    for v in carried.values():
        dtype, dims = view.dtype(v), _static(view.dims(v))
        if not _is_float(dtype):
            continue
        if dims is None:
            warnings.append(f"parameter {v.name!r} has an unknown shape; not counted")
            continue
        readers = {_origin(use.node) for use in v.uses()}
        bucket = opt_state if readers == {"opt"} else params
        bucket[0] += math.prod(dims)
        bucket[1] += _nbytes(dtype, dims) or 0

    flops = 0
    flops_by_op: Counter[str] = Counter()
    flops_unknown: list[str] = []
    symbols: set[str] = set()  # symbolic dims taken as 1 in FLOPs and intermediate sizes
    for node in g:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _FLOP_OPS:
            continue
        n = _node_flops(node, view, symbols)
        if n is None:
            flops_unknown.append(node.name or f"{node.op_type} -> {_value_ref(node.outputs[0])}")
        else:
            flops += n
            flops_by_op[node.op_type] += n

    intermediates = [
        info(v, symbols) for node in g for v in node.outputs
        if v.name and v.name not in output_names
    ]
    largest = sorted(
        (t for t in intermediates if t.nbytes is not None), key=lambda t: (-t.nbytes, t.name)
    )[:_LARGEST]

    total_nodes = sum(1 for _ in ir.traversal.RecursiveGraphIterator(g))
    return Summary(
        graph_name=g.name or "",
        producer=producer,
        ir_version=ir_version,
        opsets=opsets,
        inputs=[info(v) for v in g.inputs],
        outputs=[info(v) for v in g.outputs],
        state=state,
        data_inputs=view.data_inputs(),
        defaults=[v.name for v in g.inputs if v.name in g.initializers],
        num_nodes=len(g),
        num_subgraph_nodes=total_nodes - len(g),
        op_counts=_most_common(Counter(_op_name(n) for n in g)),
        origin_counts=_most_common(Counter(_origin(n) for n in g)),
        num_initializers=len(g.initializers),
        param_count=params[0],
        param_bytes=params[1],
        opt_state_count=opt_state[0],
        opt_state_bytes=opt_state[1],
        flops=flops,
        flops_by_op=_most_common(flops_by_op),
        flops_unknown=flops_unknown,
        largest_intermediates=largest,
        symbols_as_1=sorted(symbols),
        warnings=warnings,
    )


def _most_common(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _node_flops(node: ir.Node, view: _View, symbols: set[str]) -> int | None:
    """2 x multiply-adds of a Conv/ConvTranspose/MatMul/Gemm node; None when shapes are unknown.

    Symbolic dims count as 1 and are added to ``symbols``.
    """
    inputs = list(node.inputs)
    a = _static(view.dims(inputs[0] if inputs else None), symbols)
    b = _static(view.dims(inputs[1] if len(inputs) > 1 else None), symbols)
    y = _static(view.dims(node.outputs[0] if node.outputs else None), symbols)
    op = node.op_type
    if op == "Conv":
        # W is [Cout, Cin/group, k...]: each output element costs Cin/group * prod(k) multiply-adds.
        if y is None or b is None:
            return None
        return 2 * math.prod(y) * math.prod(b[1:])
    if op == "ConvTranspose":
        # W is [Cin, Cout/group, k...]: each input element is scattered into Cout/group * prod(k).
        if a is None or b is None:
            return None
        return 2 * math.prod(a) * math.prod(b[1:])
    if op == "MatMul":
        # Every output element is a dot product over A's last dim (batch dims broadcast).
        if a is None or y is None or not a:
            return None
        return 2 * math.prod(y) * a[-1]
    if op == "Gemm":
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if _int_attr(node, "transA") else a
        n = b[0] if _int_attr(node, "transB") else b[1]
        return 2 * m * n * k
    return None


def _int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        return default
    return int(attr.value)


def _human(n: float, unit: str, base: int = 1000) -> str:
    """``1.50 MFLOP``, ``2.00 KiB``; plain integers below one ``base``."""
    prefixes = ("K", "M", "G", "T", "P") if base == 1000 else ("Ki", "Mi", "Gi", "Ti", "Pi")
    if abs(n) < base:
        return f"{n:.0f} {unit}"
    value, prefix = float(n), ""
    for prefix in prefixes:
        value /= base
        if abs(value) < base:
            break
    return f"{value:.2f} {prefix}{unit}"


def _table(rows: Iterable[tuple[str, ...]], indent: str = "  ") -> list[str]:
    rows = list(rows)
    if not rows:
        return [f"{indent}(none)"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [
        (indent + "  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]])).rstrip()
        for r in rows
    ]


def _render_summary(s: Summary) -> str:
    opsets = ", ".join(f"{d} {v}" for d, v in s.opsets.items()) or "none"
    ir_version = s.ir_version if s.ir_version is not None else "-"
    lines = [
        f"graph: {s.graph_name or '(unnamed)'}",
        f"producer: {s.producer or '(unknown)'}   ir_version: {ir_version}   opsets: {opsets}",
        "",
        f"inputs ({len(s.inputs)}):",
    ]
    feeds = {inp: out for out, inp in s.state.items()}
    data, defaults = set(s.data_inputs), set(s.defaults)

    def input_role(t: TensorInfo) -> str:
        return ", ".join(_input_roles(t.name, feeds, data, defaults))

    lines += _table((t.name, t.type, input_role(t)) for t in s.inputs)
    lines.append(f"outputs ({len(s.outputs)}):")
    lines += _table(
        (t.name, t.type, f"state -> {s.state[t.name]}" if t.name in s.state else "")
        for t in s.outputs
    )
    lines.append("")
    sub = f" (+{s.num_subgraph_nodes} in subgraphs)" if s.num_subgraph_nodes else ""
    lines.append(f"nodes: {s.num_nodes}{sub}")
    lines.append("  by origin: " + ", ".join(f"{k} {v}" for k, v in s.origin_counts.items()))
    lines.append("  by op:     " + ", ".join(f"{k} {v}" for k, v in s.op_counts.items()))
    lines.append(f"initializers: {s.num_initializers}")
    lines.append(f"parameters: {s.param_count:,} ({_human(s.param_bytes, 'B', 1024)})")
    if s.opt_state_count:
        lines.append(
            f"optimizer state: {s.opt_state_count:,} ({_human(s.opt_state_bytes, 'B', 1024)})"
        )
    per = ", ".join(f"{name}=1" for name in s.symbols_as_1)
    per = f" with {per}" if per else ""
    flops = f"FLOPs per run{per}: {s.flops:,} ({_human(s.flops, 'FLOP')})"
    if s.flops_unknown:
        flops += f", plus {len(s.flops_unknown)} node(s) with unknown shapes"
    lines.append(flops)
    if s.flops_by_op:
        lines.append(
            "  by op: " + ", ".join(f"{k} {_human(v, 'FLOP')}" for k, v in s.flops_by_op.items())
        )
    lines.append(f"largest intermediate tensors{per}:")
    lines += _table(
        (t.name, t.type, _human(t.nbytes or 0, "B", 1024)) for t in s.largest_intermediates
    )
    if s.warnings:
        lines.append("warnings:")
        lines += [f"  {w}" for w in s.warnings]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Graphviz

ORIGIN_COLOURS = {
    **dict(zip(ORIGINS, ("#cfe2ff", "#f8d7da", "#d1e7dd", "#fff3cd"))),
    UNKNOWN_ORIGIN: "#e9ecef",
}
_IO_COLOUR = "#ffffff"
_MAX_CLUSTER_DEPTH = 2  # deeper nesting makes resnet-size graphs unreadable (and slow to lay out)


def _q(text: str) -> str:
    """A DOT quoted string; a newline in ``text`` becomes a DOT line break."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def module_path(node: ir.Node) -> str:
    """The dotted module path of a node (``layer1.0.conv1``), or "" for top-level nodes.

    From ``metadata_props["onnxgrad.module"]``, else from the node name: torch.onnx export names
    scopes by attribute (``/layer1/layer1.0/conv1/Conv``), onnxgrad by qualified module name
    (``layer1.0.conv1/Conv_3``); both end in the node's own name, which is dropped.
    """
    meta = node.metadata_props.get(MODULE)
    if meta:
        return meta
    parts = [p for p in (node.name or "").split("/")[:-1] if p]
    dotted = ""
    for part in parts:
        # torch repeats the prefix ("layer1", "layer1.0"): extend instead of appending twice.
        dotted = part if not dotted or part.startswith(dotted + ".") else f"{dotted}.{part}"
    return dotted


def _cluster_key(path: str) -> tuple[str, ...]:
    """``layer1.0.conv1`` -> ("layer1", "layer1.0"): the nested clusters a node is drawn in."""
    comps = [c for c in path.split(".") if c]
    return tuple(".".join(comps[: i + 1]) for i in range(min(len(comps), _MAX_CLUSTER_DEPTH)))


def _short_shape(dims: Dims | None) -> str:
    if dims is None:
        return ""
    if not dims:
        return "scalar"
    return "x".join("?" if d is None else str(d) for d in dims)


# Past this many nodes a picture of every node is unreadable, and Graphviz's layout of it takes
# minutes (a resnet18 training step: about 2,000 nodes, over 10 minutes): draw modules instead.
MAX_DOT_NODES = 600


def to_dot(model: GraphLike, *, collapse: bool | None = None) -> str:
    """Graphviz DOT of the top-level graph: nodes coloured by origin, clustered by module.

    Initializers are not drawn (a resnet has hundreds); graph inputs and outputs are. A graph of
    more than :data:`MAX_DOT_NODES` nodes is drawn collapsed (``collapse=None``): one box per
    module and origin, with the node count, and one edge per pair of boxes.
    """
    view = _view(model, infer=True)
    g = view.graph
    if collapse or (collapse is None and len(g) > MAX_DOT_NODES):
        return _collapsed_dot(view)
    feeds = {inp: out for out, inp in view.state().items()}
    data_inputs = set(view.data_inputs())

    lines = [
        f"digraph {_q(g.name or 'graph')} {{",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=10, newrank=true];',
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9];',
        '  edge [fontname="Helvetica", fontsize=8, color="#555555"];',
        "  subgraph cluster_legend {",
        '    label="origin"; style="dashed"; color="#999999";',
    ]
    for origin, colour in ORIGIN_COLOURS.items():
        lines.append(f"    {_q('legend_' + origin)} [label={_q(origin)}, fillcolor={_q(colour)}];")
    lines.append("    " + " -> ".join(_q("legend_" + o) for o in ORIGIN_COLOURS) + " [style=invis];")
    lines.append("  }")

    # Graph inputs: old exporters list every initializer as an input too; those stay hidden
    # unless metadata says they are state.
    ids: dict[int, str] = {}  # id(ir.Value or ir.Node) -> DOT id
    for i, v in enumerate(g.inputs):
        if v.name in g.initializers and v.name not in feeds:
            continue
        ids[id(v)] = f"in_{i}"
        role = " (state)" if v.name in feeds else " (data)" if v.name in data_inputs else ""
        label = f"{v.name}{role}\n{_type_str(*view.type_and_dims(v))}"
        lines.append(f"  in_{i} [label={_q(label)}, shape=ellipse, fillcolor={_q(_IO_COLOUR)}];")

    clusters: dict[tuple[str, ...], list[str]] = {}
    for i, node in enumerate(g):
        ids[id(node)] = f"n{i}"
        origin = _origin(node)
        colour = ORIGIN_COLOURS.get(origin, ORIGIN_COLOURS[UNKNOWN_ORIGIN])
        tooltip = "\n".join(
            s for s in (node.name, f"origin: {origin}", node.metadata_props.get(SOURCE)) if s
        )
        clusters.setdefault(_cluster_key(module_path(node)), []).append(
            f"n{i} [label={_q(_op_name(node))}, fillcolor={_q(colour)}, tooltip={_q(tooltip)}];"
        )
    lines += _render_clusters(clusters)

    def edge(v: ir.Value, dst: str) -> None:
        producer = v.producer()
        src = ids.get(id(producer) if producer is not None else id(v))
        if src is None:
            return  # an initializer or an outer-scope value
        label = _short_shape(view.dims(v))
        lines.append(f"  {src} -> {dst}" + (f" [label={_q(label)}]" if label else "") + ";")

    for node in g:
        for v in node.inputs:
            if v is not None:
                edge(v, ids[id(node)])
    for i, v in enumerate(g.outputs):
        label = f"{v.name}\n{_type_str(*view.type_and_dims(v))}"
        lines.append(
            f"  out_{i} [label={_q(label)}, shape=ellipse, peripheries=2, "
            f"fillcolor={_q(_IO_COLOUR)}];"
        )
        edge(v, f"out_{i}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _collapsed_dot(view: _View) -> str:
    """One box per (module, origin) with its node count and op mix; edges between boxes."""
    g = view.graph
    groups: dict[tuple[str, str], list[ir.Node]] = {}
    group_of: dict[int, str] = {}
    for node in g:
        key = _cluster_key(module_path(node))
        path = key[-1] if key else "(top)"
        key = (path, _origin(node))
        groups.setdefault(key, []).append(node)
    ids = {key: f"g{i}" for i, key in enumerate(groups)}
    for key, nodes in groups.items():
        for node in nodes:
            group_of[id(node)] = ids[key]
    lines = [
        f"digraph {_q(g.name or 'graph')} {{",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=10, '
        f'label={_q(f"{len(g)} nodes drawn as {len(groups)} module groups")}];',
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9];',
        '  edge [color="#555555"];',
    ]
    for (path, origin), nodes in groups.items():
        ops = Counter(n.op_type for n in nodes).most_common(3)
        mix = ", ".join(f"{op} {k}" for op, k in ops)
        label = f"{path}  [{origin}]\n{len(nodes)} nodes: {mix}"
        colour = ORIGIN_COLOURS.get(origin, ORIGIN_COLOURS[UNKNOWN_ORIGIN])
        lines.append(f"  {ids[(path, origin)]} [label={_q(label)}, fillcolor={_q(colour)}];")
    edges: set[tuple[str, str]] = set()
    for node in g:
        dst = group_of[id(node)]
        for v in node.inputs:
            producer = v.producer() if v is not None else None
            src = group_of.get(id(producer)) if producer is not None else None
            if src is not None and src != dst:
                edges.add((src, dst))
    lines += [f"  {a} -> {b};" for a, b in sorted(edges)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _render_clusters(clusters: dict[tuple[str, ...], list[str]]) -> list[str]:
    """Nested ``subgraph cluster_*`` blocks; keys are at most _MAX_CLUSTER_DEPTH long."""
    children: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for key in clusters:
        for depth in range(1, len(key) + 1):
            parent, child = key[: depth - 1], key[:depth]
            if child not in children.setdefault(parent, []):
                children[parent].append(child)
    lines: list[str] = []
    counter = 0

    # Depth is bounded by _MAX_CLUSTER_DEPTH, so an explicit stack buys nothing over recursion.
    def emit(key: tuple[str, ...], indent: str) -> None:
        nonlocal counter
        lines.extend(f"{indent}{decl}" for decl in clusters.get(key, []))
        for child in children.get(key, []):
            counter += 1
            lines.append(f"{indent}subgraph cluster_{counter} {{")
            lines.append(
                f'{indent}  label={_q(child[-1])}; style="rounded"; color="#999999"; '
                f'fontcolor="#555555";'
            )
            emit(child, indent + "  ")
            lines.append(f"{indent}}}")

    emit((), "  ")
    return lines


def find_dot() -> str:
    """The Graphviz ``dot`` executable, or `InspectError` saying how to get it."""
    exe = shutil.which("dot")
    if exe is None:
        raise InspectError(
            "Graphviz 'dot' not found on PATH: install graphviz (e.g. apt-get install graphviz, "
            "brew install graphviz) to render SVG, or write DOT text with --dot"
        )
    return exe


SVG_TIMEOUT_S = 300


def write_svg(dot_text: str, path: str | os.PathLike[str]) -> None:
    """Render DOT text to an SVG file with Graphviz (written atomically)."""
    try:
        proc = subprocess.run([find_dot(), "-Tsvg"], input=dot_text.encode(), capture_output=True,
                              timeout=SVG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise InspectError(f"Graphviz 'dot' took over {SVG_TIMEOUT_S} s to lay out the graph; "
                           f"write --dot and render it with another layout (e.g. sfdp)") from None
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise InspectError(
            f"Graphviz 'dot' failed (exit {proc.returncode})" + (f": {detail[0]}" if detail else "")
        )
    atomic_write(path, proc.stdout)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a half-written file."""
    path = Path(path)
    # A temp file in the target's own directory, so os.replace is a same-filesystem rename.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates 0600: keep the mode of the file being replaced, else a plain 0644.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
