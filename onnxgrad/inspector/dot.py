"""Pictures of a graph: Graphviz DOT text, and SVG rendered by Graphviz's ``dot``.

Nodes are coloured by origin (forward, gradient, optimizer, BatchNorm statistics, unknown) and
clustered by the module that recorded them (``layer1`` > ``layer1.0``). A graph too big to draw
node by node (over :data:`MAX_DOT_NODES`) is drawn collapsed, one box per module and origin.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter

import onnx_ir as ir

from ..runtime.files import atomic_write
from ..runtime.metadata import MODULE, ORIGINS, SOURCE, UNKNOWN_ORIGIN
from .load import InspectError
from .view import Dims, GraphLike, View, make_view, op_name, origin_of, type_str

__all__ = ["MAX_DOT_NODES", "ORIGIN_COLOURS", "find_dot", "module_path", "to_dot", "write_svg"]

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
    view = make_view(model, infer=True)
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
        label = f"{v.name}{role}\n{type_str(*view.type_and_dims(v))}"
        lines.append(f"  in_{i} [label={_q(label)}, shape=ellipse, fillcolor={_q(_IO_COLOUR)}];")

    clusters: dict[tuple[str, ...], list[str]] = {}
    for i, node in enumerate(g):
        ids[id(node)] = f"n{i}"
        origin = origin_of(node)
        colour = ORIGIN_COLOURS.get(origin, ORIGIN_COLOURS[UNKNOWN_ORIGIN])
        tooltip = "\n".join(
            s for s in (node.name, f"origin: {origin}", node.metadata_props.get(SOURCE)) if s
        )
        clusters.setdefault(_cluster_key(module_path(node)), []).append(
            f"n{i} [label={_q(op_name(node))}, fillcolor={_q(colour)}, tooltip={_q(tooltip)}];"
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
        label = f"{v.name}\n{type_str(*view.type_and_dims(v))}"
        lines.append(
            f"  out_{i} [label={_q(label)}, shape=ellipse, peripheries=2, "
            f"fillcolor={_q(_IO_COLOUR)}];"
        )
        edge(v, f"out_{i}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _collapsed_dot(view: View) -> str:
    """One box per (module, origin) with its node count and op mix; edges between boxes."""
    g = view.graph
    groups: dict[tuple[str, str], list[ir.Node]] = {}
    group_of: dict[int, str] = {}
    for node in g:
        key = _cluster_key(module_path(node))
        path = key[-1] if key else "(top)"
        key = (path, origin_of(node))
        groups.setdefault(key, []).append(node)
    ids = {key: f"g{i}" for i, key in enumerate(groups)}
    for key, nodes in groups.items():
        for node in nodes:
            group_of[id(node)] = ids[key]
    lines = [
        f"digraph {_q(g.name or 'graph')} {{",
        ('  graph [rankdir=TB, fontname="Helvetica", fontsize=10, '
         f'label={_q(f"{len(g)} nodes drawn as {len(groups)} module groups")}];'),
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
                              timeout=SVG_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise InspectError(f"Graphviz 'dot' took over {SVG_TIMEOUT_S} s to lay out the graph; "
                           f"write --dot and render it with another layout (e.g. sfdp)") from None
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise InspectError(
            f"Graphviz 'dot' failed (exit {proc.returncode})" + (f": {detail[0]}" if detail else "")
        )
    atomic_write(path, proc.stdout)

