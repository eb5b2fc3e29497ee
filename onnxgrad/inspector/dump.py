"""``ONNXGRAD_DUMP=DIR``: write the graph after each pass, so users see what each pass appended.

Every call of :func:`dump_graph` while the variable is set writes ``DIR/NNN-<name>.onnx`` and
``DIR/NNN-<name>.txt`` (the typed text dump), each atomically, numbered in the order the graphs
were made. Numbering continues after the files already in ``DIR``, so a second run appends rather
than overwrites. Unset (or empty), it costs one environment lookup.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import onnx
import onnx_ir as ir

from ..runtime.files import atomic_write
from ..runtime.opset import IR_VERSION
from .text import format_graph
from .view import GraphLike

ENV_VAR = "ONNXGRAD_DUMP"

_lock = threading.Lock()  # one number per dump, even when threads run backward concurrently
_NUMBERED = re.compile(r"^(\d+)-")


def dump_dir() -> Path | None:
    """The dump directory named by ``ONNXGRAD_DUMP``, or None when dumps are off."""
    value = os.environ.get(ENV_VAR)
    return Path(value) if value else None


def dump_graph(name: str, graph_or_model: GraphLike) -> list[Path] | None:
    """Write ``graph_or_model`` as ``NNN-<name>.onnx`` and ``.txt`` when dumps are on.

    Returns the paths written, or None when ``ONNXGRAD_DUMP`` is not set. ``name`` says which
    pass produced the graph (``backward``, ``compile.autodiff``...); characters unsafe in file
    names become ``_``.
    """
    directory = dump_dir()
    if directory is None:
        return None
    proto = _as_proto(graph_or_model)
    text = format_graph(proto) + "\n"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "graph"
    with _lock:
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"{_next_number(directory):03d}-{safe}"
        paths = [directory / f"{stem}.onnx", directory / f"{stem}.txt"]
        atomic_write(paths[0], proto.SerializeToString())
        atomic_write(paths[1], text.encode())
    return paths


def _as_proto(obj: GraphLike) -> onnx.ModelProto:
    if isinstance(obj, onnx.ModelProto):
        return obj
    if isinstance(obj, ir.Graph):
        # A bare graph (a pass's output) needs a model around it to be a loadable .onnx file.
        obj = ir.Model(obj, ir_version=IR_VERSION, producer_name="onnxgrad")
    if isinstance(obj, ir.Model):
        return ir.serde.serialize_model(obj)
    raise TypeError(
        f"dump_graph expects onnx.ModelProto, onnx_ir.Model or onnx_ir.Graph, got "
        f"{type(obj).__name__}"
    )


def _next_number(directory: Path) -> int:
    numbers = [int(m.group(1)) for p in directory.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=0) + 1
