"""Test-wide fixtures: every model that reaches ONNX Runtime is checked as standard ONNX."""
from __future__ import annotations

from collections.abc import Iterator

import onnx
import pytest
from opcheck import check_onnx_model

from onnxgrad.runtime import add_model_check

checked_models: list[str] = []


def _check(model: onnx.ModelProto) -> None:
    check_onnx_model(model)
    checked_models.append(model.graph.name)


@pytest.fixture(autouse=True, scope="session")
def _every_ort_model_is_valid_onnx() -> Iterator[None]:
    """The issue's rule: every graph sent to ORT passes check_model(full_check=True), ai.onnx only.

    The hook sits in ``runtime.make_session``, the one door to ORT, so single-node eager kernels,
    backward graphs and anything later issues add are all covered.
    """
    remove = add_model_check(_check)
    yield
    remove()
