"""Test-wide setup: every model that reaches ONNX Runtime is checked as standard ONNX."""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

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


@pytest.fixture
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder no file can be created in (simulated for root, whom permissions do not stop)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_open = os.open

        def deny(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and Path(path).parent == folder:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", deny)
    yield folder
    folder.chmod(0o755)
