"""Where the tracer reports each graph it makes, for ``ONNXGRAD_DUMP=DIR``.

The tracer calls :func:`report_graph` after each pass (``backward``, ``traced``, ``cleanup``);
the writer of the dump files lives with the inspection code, which renders the text dump, and
registers itself with :func:`observe_graphs` when ``onnxgrad`` is imported. So the tracer and the
runtime import nothing above them.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

Observer = Callable[[str, Any], Any]
_observers: list[Observer] = []


def observe_graphs(observer: Observer) -> None:
    """Call ``observer(name, model_or_graph)`` for every graph the tracer reports (once each)."""
    if observer not in _observers:
        _observers.append(observer)


def report_graph(name: str, graph_or_model: Any) -> None:
    for observer in _observers:
        observer(name, graph_or_model)
