"""The portable export format: a graph without state initializers, the state in a safetensors file.

Some runtimes treat an initializer that shares an input's name as a constant (OpenVINO) or never
let a caller override it (tract, tinygrad's runner), so a file whose state inputs carry their
values as initializers cannot be looped there. The portable file declares every input other than
the data without a default; their values (parameters, buffers, optimizer state, hyperparameters)
sit beside it in ``<name>.safetensors``, which the model's metadata ``onnxgrad.state_file`` names
(relative to the model's folder). Every runtime can feed inputs, and every language reads
safetensors (a JSON header and raw little-endian arrays).

NOTE: the safetensors format is written here with NumPy and json (the whole format is a length,
a JSON header and the arrays' bytes), so the export needs no optional package; the files are
exactly what ``safetensors.numpy.load_file`` reads (tested).
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from .export import save_model
from .files import atomic_write
from .metadata import STATE_FILE

# NumPy dtype -> safetensors dtype name (the format's own list).
_DTYPES = {
    np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
    np.dtype(np.int16): "I16", np.dtype(np.uint16): "U16", np.dtype(np.float16): "F16",
    np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32", np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.uint64): "U64",
}
_NAMES = {name: dtype for dtype, name in _DTYPES.items()}


def safetensors_bytes(arrays: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> bytes:
    """``arrays`` in the safetensors format: an 8-byte little-endian header length, the JSON
    header (padded with spaces to 8 bytes, as the reference writer does), then the data."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    chunks, offset = [], 0
    for name, value in arrays.items():
        array = np.asarray(value)
        dtype = array.dtype.newbyteorder("=") if array.dtype.byteorder not in "=|" else array.dtype
        if dtype not in _DTYPES:
            raise TypeError(f"safetensors: {name!r} has dtype {array.dtype}, which the format "
                            f"cannot hold")
        data = np.ascontiguousarray(array.astype(dtype.newbyteorder("<"), copy=False)).tobytes()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file, in file order (any writer's, not only ours)."""
    blob = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    header.pop("__metadata__", None)
    data = memoryview(blob)[8 + size:]
    arrays = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = _NAMES[entry["dtype"]].newbyteorder("<")
        array = np.frombuffer(data[begin:end], dtype=dtype).reshape(entry["shape"])
        arrays[name] = array.astype(dtype.newbyteorder("="))  # a writable native copy
    return arrays


def state_file_for(path: str | os.PathLike[str]) -> Path:
    """Where the portable export of ``path`` keeps its state: ``step.onnx`` -> ``step.safetensors``."""
    path = Path(path)
    return path.with_name(path.stem + ".safetensors")


def save_portable(model: onnx.ModelProto, path: str | os.PathLike[str],
                  values: Mapping[str, np.ndarray]) -> tuple[Path, Path]:
    """Write ``model`` (no initializer for any input) to ``path`` and ``values`` (one per input
    other than the data) to the safetensors file beside it; returns both paths.

    The state file is written first, then the model, each atomically (``runtime.files``); as with
    external data, the pair is not replaced as a whole (see ``save_model``).
    """
    path = Path(path)
    state_path = state_file_for(path)
    inputs = {i.name for i in model.graph.input}
    unknown = sorted(set(values) - inputs)
    if unknown:
        raise KeyError(f"export: {unknown} are not inputs of the model")
    shadowed = sorted(inputs & {t.name for t in model.graph.initializer})
    if shadowed:
        raise ValueError(f"export: the portable format gives inputs no initializer, but "
                         f"{shadowed} have one")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    entry = next((p for p in out.metadata_props if p.key == STATE_FILE), None)
    if entry is None:
        entry = out.metadata_props.add()
        entry.key = STATE_FILE
    entry.value = state_path.name
    blob = safetensors_bytes(values, {"format": "onnxgrad.state"})
    atomic_write(state_path, blob, make_folder=True)
    save_model(out, path)
    return path, state_path
