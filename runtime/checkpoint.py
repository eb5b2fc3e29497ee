"""Checkpoint files: named arrays plus one metadata string, as ``.npz`` or ``.safetensors``.

The bottom layer of ``og.save`` / ``og.load``: it knows nothing of tensors or state dicts. The
front flattens a state dict into arrays and a JSON description of the rest; this module writes
and reads them. The format follows the file's extension.

- ``.npz``: NumPy's zip of ``.npy`` members, one per array. The metadata, when there is any, is
  one more member, :data:`NPZ_METADATA_KEY`, a 0-d unicode array (readable without pickle).
  Without metadata the file is a plain ``np.savez`` archive that any NumPy reads.
- ``.safetensors``: the metadata sits in the header's ``__metadata__`` under
  :data:`SAFETENSORS_METADATA_KEY`, so the arrays are exactly what ``safetensors`` (or
  ``safetensors.torch``) loads. Needs the optional ``safetensors`` package
  (``pip install 'onnxgrad[safetensors]'``).

Writes are atomic (``runtime.files``): the file is written beside the target under a temporary
name, flushed to disk, then renamed over the target, so a crash mid-write leaves the old file (or
none) and never a partial one.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .files import atomic_file

NPZ_METADATA_KEY = "__onnxgrad__"
SAFETENSORS_METADATA_KEY = "onnxgrad"
SUFFIXES = (".npz", ".safetensors")


class CheckpointError(ValueError):
    """A checkpoint path or file that cannot be written or read."""


def corrupt(where: str) -> CheckpointError:
    """The one error for a file that is not a readable checkpoint (empty, truncated, damaged,
    or something else entirely); the reader's own exception text (zipfile's, NumPy's) is left
    out because it describes the reader, not the file."""
    return CheckpointError(f"not an onnxgrad/PyTorch checkpoint: truncated or corrupt ({where})")


def _check_readable(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a checkpoint file", str(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise CheckpointError(f"checkpoint {str(path)!r}: unsupported extension {suffix!r}; "
                              f"use one of {', '.join(SUFFIXES)}")
    return suffix[1:]


def _safetensors_numpy(path: Path, action: str):
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            f"{action} {str(path)!r} needs the optional 'safetensors' package: "
            "pip install 'onnxgrad[safetensors]' (or pip install safetensors), or use a .npz "
            "path") from None
    return safetensors.numpy


def _c_order(array: np.ndarray) -> np.ndarray:
    # NOTE: not np.ascontiguousarray, which turns 0-d arrays (num_batches_tracked) into shape [1].
    array = np.asarray(array)
    return array if array.flags.c_contiguous else array.copy(order="C")


def write_arrays(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray],
                 metadata: str | None = None) -> Path:
    """Write ``arrays`` (and the ``metadata`` string) to ``path`` atomically; returns the path."""
    path = Path(path)
    fmt = _format(path)
    if fmt == "npz" and NPZ_METADATA_KEY in arrays:
        raise CheckpointError(f"checkpoint: the array name {NPZ_METADATA_KEY!r} is reserved")
    arrays = {name: _c_order(a) for name, a in arrays.items()}
    blob = None
    if fmt == "safetensors":
        st = _safetensors_numpy(path, "writing")
        header = None if metadata is None else {SAFETENSORS_METADATA_KEY: metadata}
        # Serialized before the temporary file exists: safetensors refuses object/unicode arrays.
        blob = st.save(arrays, metadata=header)
    with atomic_file(path, make_folder=True) as f:
        if blob is not None:
            f.write(blob)
        else:
            members = dict(arrays)
            if metadata is not None:
                members[NPZ_METADATA_KEY] = np.array(metadata)
            np.savez(f, **members)  # a file object, so NumPy appends no second ".npz"
    return path


def read_arrays(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], str | None]:
    """The arrays of a checkpoint (in file order) and its metadata string (None if it has none).

    Reads any ``.npz`` or ``.safetensors`` file, not only those :func:`write_arrays` wrote.
    """
    path = Path(path)
    fmt = _format(path)
    _check_readable(path)
    if fmt == "safetensors":
        _safetensors_numpy(path, "reading")
    try:
        if fmt == "npz":
            # allow_pickle=False: loading a checkpoint must never run code from the file.
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
            meta = arrays.pop(NPZ_METADATA_KEY, None)
            if any(not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf"
                   for a in arrays.values()):
                # A zip with members that are not .npy arrays (NumPy hands those out as bytes).
                raise ValueError("not an array archive")
            return arrays, None if meta is None else str(meta[()])
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            arrays = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safe_open handle)
        return arrays, header.get(SAFETENSORS_METADATA_KEY)
    except (PermissionError, IsADirectoryError, MemoryError):
        raise
    except Exception:  # noqa: BLE001 (untrusted bytes: any failure means corrupt)
        # NOTE: everything else (zipfile's BadZipFile, NumPy's EOFError or "Header info
        # length" ValueError, safetensors' SafetensorError) means the bytes are not a checkpoint.
        raise corrupt(str(path)) from None
