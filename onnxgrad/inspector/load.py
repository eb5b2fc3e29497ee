"""Loading an ONNX file for inspection, and the one error inspection raises.

:func:`load_model` turns every way a file can fail to be a model (missing, a folder, empty, text,
truncated, corrupt, failing the checker, missing external data) into an :class:`InspectError`
whose message is one line naming the file and the reason, fit for a CLI error.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

__all__ = ["InspectError", "load_model"]


class InspectError(ValueError):
    """A user-facing inspection failure; the message is one line, fit for a CLI error."""



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
        except Exception as exc:  # any checker failure means "invalid model"
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

