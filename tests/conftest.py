"""Test-wide setup: every model that reaches ONNX Runtime is checked as standard ONNX."""
from __future__ import annotations

from collections.abc import Callable

import onnx
import pytest
from onnxgrad.runtime import add_model_check
from opcheck import check_onnx_model

checked_models: list[str] = []  # graph names, in the order their sessions were made
_remove: Callable[[], None] | None = None


def _check(model: onnx.ModelProto) -> None:
    check_onnx_model(model)
    checked_models.append(model.graph.name)


def pytest_configure(config: pytest.Config) -> None:
    """The issue's rule: every graph sent to ORT passes check_model(full_check=True), ai.onnx only.

    The hook sits in ``runtime.make_session``, the one door to ORT, so single-node eager kernels,
    backward graphs, compiled steps and anything later issues add are all covered. It is installed
    here, before collection, so kernels made while test modules import are checked too.
    """
    global _remove
    _remove = add_model_check(_check)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _remove
    if _remove is not None:
        _remove()
        _remove = None
