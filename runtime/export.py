"""Export of a training step as a standard ONNX file that any runtime can loop.

The model's ``metadata_props`` say how: ``onnxgrad.state`` maps each state output to the input it
feeds on the next step, ``onnxgrad.data_inputs`` lists the per-step inputs. State inputs carry
their current values as initializers (defaults a caller may override). Files are written
atomically (``runtime.files``): a reader never sees a half-written export.

The portable format (``export(path, portable=True)``) gives inputs no initializer and keeps their
values in a safetensors file beside the model instead: ``runtime.portable``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .files import atomic_path, atomic_paths, write_target

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
    """Write ``model`` (plus ``defaults``) to ``path`` atomically; external data when over 2 GB.

    A large model is two files, ``path`` and ``path.data`` beside it. Both are written and fsynced
    under temporary names before either is renamed, and the data file is renamed first, so a
    failure while writing leaves both old files as they were and the new model never points at
    old data. NOTE: the pair is not replaced atomically as a whole: a reader that opens it
    between the two renames, or a crash between them, pairs the old model with the new data.
    """
    path = Path(path)
    full = with_defaults(model, defaults or {})
    large = full.ByteSize() > _PROTOBUF_LIMIT - 64 * 1024**2 if _size_known(full) else True
    if not large:
        # NOTE: an in-memory check serializes the whole model, which protobuf refuses over 2 GB;
        # a large model is checked from its file instead (below).
        onnx.checker.check_model(full, full_check=False)
        with atomic_path(path, make_folder=True) as tmp:
            onnx.save_model(full, str(tmp))
        return path
    # The data file goes beside the file actually written (a symbolic link's target), since
    # the model names it relative to its own folder.
    data_path = write_target(path).with_name(path.name + ".data")
    with atomic_paths(data_path, path, make_folder=True) as (tmp_data, tmp):
        # The external-data location is relative to the model's folder, which both share.
        onnx.save_model(full, str(tmp), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=tmp_data.name,
                        size_threshold=1024)
        onnx.checker.check_model(str(tmp), full_check=False)  # by path: no 2 GB limit
        _point_external_data(str(tmp), data_path.name)
    return path


def _size_known(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
    except Exception:  # noqa: BLE001 - protobuf refuses to size messages over 2 GB
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
