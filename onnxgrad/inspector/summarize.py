"""What a model holds and costs: :func:`summary` and the :class:`Summary` report.

Inputs and outputs with their roles, the state mapping, node counts by op type and by origin,
parameters and optimizer state (count and bytes), FLOPs of the compute-heavy ops (Conv,
ConvTranspose, MatMul, Gemm) and the largest intermediate tensors. Symbolic dims (a dynamic batch)
are costed as 1 and named in the report, so a dynamic-shape model gets per-unit costs rather than
none. ``str()`` of a :class:`Summary` is the report ``onnxgrad inspect`` prints.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx_ir as ir

from ..runtime.metadata import DATA_INPUTS, PARAMETERS, STATE
from .view import (
    Dims,
    GraphLike,
    View,
    dtype_str,
    input_roles,
    is_float,
    json_meta,
    make_view,
    nbytes_of,
    op_name,
    origin_of,
    shape_str,
    static_dims,
    type_str,
    value_ref,
)

__all__ = ["Summary", "TensorInfo", "summary"]


@dataclass(frozen=True)
class TensorInfo:
    """A named tensor as inspection sees it; unknown parts are None (dtype "?")."""

    name: str
    dtype: str
    shape: Dims | None
    nbytes: int | None = None

    @property
    def type(self) -> str:
        return self.dtype + shape_str(self.shape)

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
    # Foreign models: the float initializers OnnxModule / training_step keep constant by default
    # (scalars, BatchNorm statistics, settings), see onnxgrad.nn.onnx_module.default_parameters.
    not_trained: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return _render_summary(self)

    __repr__ = __str__


_FLOP_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_LARGEST = 10


def summary(model: GraphLike) -> Summary:
    """Inputs/outputs, state mapping, node counts, parameters, FLOPs, largest intermediates."""
    view = make_view(model, infer=True)
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
        if key in meta and json_meta(meta, key, kind) is None:
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
        dtype_text = dtype_str(dtype) if isinstance(type_, ir.TensorType) else type_str(type_, None)
        return TensorInfo(v.name or "", dtype_text, dims, nbytes_of(dtype, dims, symbols))

    declared = set(state.values()) | set(view.parameters())
    if declared:
        # NOTE: initializers of onnxgrad's graphs are baked constants (axes, scalars), not weights.
        carried = {v.name: v for v in g.inputs if v.name in declared}
    else:
        carried = dict(g.initializers)
    not_trained: list[str] = []
    if not declared:
        from ..nn.onnx_module import default_parameters, float_initializers

        overridable = {v.name for v in g.inputs if v.name in g.initializers}
        trained = set(default_parameters(g, overridable))
        not_trained = [n for n in float_initializers(g) if n not in trained]
    params = [0, 0]
    opt_state = [0, 0]
    for v in carried.values():
        dtype, dims = view.dtype(v), static_dims(view.dims(v))
        if not is_float(dtype):
            continue
        if dims is None:
            warnings.append(f"parameter {v.name!r} has an unknown shape; not counted")
            continue
        readers = {origin_of(use.node) for use in v.uses()}
        bucket = opt_state if readers == {"opt"} else params
        bucket[0] += math.prod(dims)
        bucket[1] += nbytes_of(dtype, dims) or 0

    flops = 0
    flops_by_op: Counter[str] = Counter()
    flops_unknown: list[str] = []
    symbols: set[str] = set()  # symbolic dims taken as 1 in FLOPs and intermediate sizes
    for node in g:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _FLOP_OPS:
            continue
        n = _node_flops(node, view, symbols)
        if n is None:
            flops_unknown.append(node.name or f"{node.op_type} -> {value_ref(node.outputs[0])}")
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
        op_counts=_most_common(Counter(op_name(n) for n in g)),
        origin_counts=_most_common(Counter(origin_of(n) for n in g)),
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
        not_trained=not_trained,
    )


def _most_common(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _node_flops(node: ir.Node, view: View, symbols: set[str]) -> int | None:
    """2 x multiply-adds of a Conv/ConvTranspose/MatMul/Gemm node; None when shapes are unknown.

    Symbolic dims count as 1 and are added to ``symbols``.
    """
    inputs = list(node.inputs)
    a = static_dims(view.dims(inputs[0] if inputs else None), symbols)
    b = static_dims(view.dims(inputs[1] if len(inputs) > 1 else None), symbols)
    y = static_dims(view.dims(node.outputs[0] if node.outputs else None), symbols)
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
        return ", ".join(input_roles(t.name, feeds, data, defaults))

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
    if s.not_trained:
        shown = ", ".join(s.not_trained[:10]) + (", ..." if len(s.not_trained) > 10 else "")
        lines.append(f"  not trained when imported ({len(s.not_trained)} float constants): "
                     f"{shown}")
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


