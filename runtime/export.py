"""Export of a training step as a standard ONNX file that any runtime can loop.

The model's ``metadata_props`` say how: ``onnxgrad.state`` maps each state output to the input it
feeds on the next step, ``onnxgrad.data_inputs`` lists the per-step inputs. State inputs carry
their current values as initializers (defaults a caller may override). Files are written
atomically: a temporary file in the target folder, then a rename.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .checkpoint import file_mode

_PROTOBUF_LIMIT = 2 * 1024**3


def with_defaults(model: onnx.ModelProto, defaults: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs named in ``defaults`` get those values as initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inputs = {i.name for i in out.graph.input}
    for name, value in defaults.items():
        if name not in inputs:
            raise KeyError(f"export: {name!r} is not an input of the model")
        out.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return out


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str],
               defaults: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write ``model`` (plus ``defaults``) to ``path`` atomically; external data when over 2 GB."""
    path = Path(path)
    full = with_defaults(model, defaults or {})
    large = full.ByteSize() > _PROTOBUF_LIMIT - 64 * 1024**2 if _size_known(full) else True
    if not large:
        # NOTE: an in-memory check serializes the whole model, which protobuf refuses over 2 GB;
        # a large model is checked from its file instead (below).
        onnx.checker.check_model(full, full_check=False)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.chmod(tmp, file_mode())  # mkstemp's file is private (0600); an export is an ordinary file
    data_name = path.name + ".data"
    tmp_data = folder / f".{data_name}.tmp"
    try:
        if large:
            onnx.save_model(full, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            onnx.checker.check_model(tmp, full_check=False)  # by path: no 2 GB limit
            _point_external_data(tmp, data_name)
            os.replace(tmp_data, folder / data_name)
        else:
            onnx.save_model(full, tmp)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (Path(tmp), tmp_data):
            leftover.unlink(missing_ok=True)
        raise
    return path


def _size_known(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
    except Exception:  # protobuf refuses to size messages over 2 GB
        return False
    return True


def _point_external_data(model_path: str, location: str) -> None:
    """Rewrite the external-data location from the temporary data file to its final name."""
    model = onnx.load_model(model_path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, model_path)
