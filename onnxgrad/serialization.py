"""``og.save`` / ``og.load``: state dicts (and nested containers of them) in checkpoint files.

``og.save(obj, f)`` takes what ``torch.save`` is mostly used for: a model's ``state_dict()``,
an optimizer's ``state_dict()``, or dicts, lists and tuples nesting them with ints, floats, bools,
strings, bytes and None. ``og.load(f)`` rebuilds the object with every array as an ``og.Tensor``,
as ``torch.load`` gives tensors back.

The format follows the path:

- ``.pth``, ``.pt``, any other extension, and file objects: **PyTorch's own format** (the zip of
  ``data.pkl`` plus one member per storage that ``torch.save`` writes; ``runtime.torch_format``).
  ``torch.load(path, weights_only=True)`` reads what ``og.save`` wrote, and ``og.load`` reads
  state dicts and optimizer states that ``torch.save`` wrote, without importing torch and
  without running code from the file: only tensor data, numbers, strings and containers are
  admitted; any other global in the pickle is refused with an error naming it
  (``weights_only=False`` does not lift that). NumPy arrays and scalars are saved as tensors and
  Python numbers (they load as ``og.Tensor`` and ``int``/``float``); bfloat16 tensors load as
  float32 with a warning; views of one storage load as separate tensors. PyTorch's legacy
  format (torch < 1.6, ``_use_new_zipfile_serialization=False``) is read too, never written.
- ``.npz`` (NumPy's archive) and ``.safetensors`` (with the optional package): onnxgrad's
  earlier format, arrays plus one JSON metadata entry (nothing pickled). A flat
  ``{name: tensor}`` dict saved as ``.npz`` is a plain ``np.savez`` archive, and any ``.npz`` /
  ``.safetensors`` state dict (from NumPy or ``safetensors.torch``) loads as
  ``{name: og.Tensor}``.

Files are written atomically (see ``runtime.files``); a file that is empty, truncated, damaged
or not a checkpoint at all raises ``CheckpointError`` "not an onnxgrad/PyTorch checkpoint:
truncated or corrupt (<path>)".
"""
from __future__ import annotations

import io
import json
import math
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .runtime import torch_format
from .runtime.checkpoint import SUFFIXES, CheckpointError, corrupt, read_arrays, write_arrays
from .runtime.files import atomic_file
from .runtime.torch_format import UnsafeCheckpointError
from .tracer.tensor import Tensor, Val, _contig

__all__ = ["CheckpointError", "UnsafeCheckpointError", "load", "save"]

_FORMAT = "onnxgrad.checkpoint"
_VERSION = 1
# Tags of encoded nodes: JSON objects with exactly one of these keys (plain JSON values, and lists,
# stand for themselves).
_ARRAY, _DICT, _ODICT, _TUPLE = "array", "dict", "odict", "tuple"
_SCALAR, _FLOAT = "scalar", "float"


# The first bytes of PyTorch's legacy (pre-1.6) format: a pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def save(obj: Any, f: str | os.PathLike[str] | BinaryIO, pickle_module: Any = None,
         pickle_protocol: int = 2, _use_new_zipfile_serialization: bool = True,
         _disable_byteorder_record: bool = False) -> None:
    """Write ``obj`` (a state dict, or containers of them) to ``f``: a path or a binary file
    object. ``.npz`` / ``.safetensors`` paths get onnxgrad's array format, everything else
    PyTorch's zip format (see the module's docstring). PyTorch's other arguments are accepted;
    the pickle is always protocol 2, as ``torch.save`` writes it."""
    if not _use_new_zipfile_serialization:
        raise ValueError("og.save writes PyTorch's zip format only; "
                         "_use_new_zipfile_serialization=False (the legacy format) is not "
                         "supported")
    if isinstance(f, (str, os.PathLike)) and str(f).lower().endswith(SUFFIXES):
        _save_arrays(obj, f)
        return
    if isinstance(f, (str, os.PathLike)):
        # Serialized before the temporary file exists, so a bad value leaves no file behind.
        blob = io.BytesIO()
        torch_format.write(blob, obj, _as_array, _unsupported, _what)
        with atomic_file(f, make_folder=True) as out:
            out.write(blob.getbuffer())
        return
    if not callable(getattr(f, "write", None)):
        raise TypeError(f"og.save: f must be a path or a binary file object with write(), got "
                        f"{type(f).__name__}")
    torch_format.write(f, obj, _as_array, _unsupported, _what)


def load(f: str | os.PathLike[str] | BinaryIO, map_location: Any = None,
         pickle_module: Any = None, *, weights_only: bool | None = True, mmap: bool | None = None,
         **pickle_load_args: Any) -> Any:
    """Read what :func:`save` or ``torch.save`` wrote (or any .npz / .safetensors state dict);
    arrays come back as ``og.Tensor``.

    PyTorch's arguments are accepted: ``map_location`` has nothing to choose (onnxgrad keeps
    loaded tensors in host memory), and ``weights_only`` is always in force: a checkpoint may
    only hold tensors, numbers, strings and containers, and anything else is refused
    (``UnsafeCheckpointError``), never run.
    """
    if isinstance(f, (str, os.PathLike)):
        path = Path(f)
        where = os.fspath(f)
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder, not a checkpoint file", where)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {where!r} does not exist")
        with open(path, "rb") as stream:
            if torch_format.is_torch_zip(stream):
                return _load_torch(stream, where, weights_only)
            head = stream.read(len(_LEGACY_MAGIC))
            if head == _LEGACY_MAGIC:
                stream.seek(0)
                return _load_torch(stream, where, weights_only, legacy=True)
        if not where.lower().endswith(SUFFIXES):
            raise corrupt(where)
        return _load_arrays(path)
    if not callable(getattr(f, "read", None)):
        raise TypeError(f"og.load: f must be a path or a binary file object with read(), got "
                        f"{type(f).__name__}")
    where = str(getattr(f, "name", "<file object>"))
    stream = f if _seekable(f) else io.BytesIO(f.read())
    if torch_format.is_torch_zip(stream):
        return _load_torch(stream, where, weights_only)
    start = stream.tell()
    if stream.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC:
        stream.seek(start)
        return _load_torch(stream, where, weights_only, legacy=True)
    raise corrupt(where)


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _load_torch(stream: BinaryIO, where: str, weights_only: bool | None,
                legacy: bool = False) -> Any:
    try:
        if legacy:
            return torch_format.read_legacy(stream, _make_tensor)
        return torch_format.read(stream, _make_tensor)
    except UnsafeCheckpointError as exc:
        note = (" (weights_only=False does not change this: onnxgrad never runs code from a "
                "checkpoint)" if weights_only is False else "")
        raise UnsafeCheckpointError(f"og.load({where!r}): {exc}{note}") from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception:  # noqa: BLE001 (untrusted bytes: any failure means corrupt)
        # NOTE: zipfile's, pickle's and struct's errors (BadZipFile, EOFError, KeyError of a
        # missing member...) all mean damaged bytes; their text describes the reader.
        raise corrupt(where) from None


def _as_array(obj: Any) -> tuple[np.ndarray, bool] | None:
    if isinstance(obj, Tensor):
        return obj._v.data, bool(obj.requires_grad)
    if isinstance(obj, np.ndarray):
        return obj, False
    return None


def _make_tensor(array: np.ndarray, requires_grad: bool) -> Tensor:
    t = Tensor(Val(_contig(array)))
    t._v.owner = weakref.ref(t)
    if requires_grad and array.dtype.kind == "f":
        t.requires_grad_(True)
    return t


def _save_arrays(obj: Any, path: str | os.PathLike[str]) -> None:
    """onnxgrad's array format (.npz / .safetensors)."""
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(obj, [], arrays)
    plain = (str(path).lower().endswith(".npz") and isinstance(obj, dict)
             and all(isinstance(v, dict) and set(v) == {_ARRAY} and v[_ARRAY] == k
                     for k, v in next(iter(tree.values()))))
    # A flat {str: array} dict as .npz needs no metadata: it stays a plain np.savez archive.
    metadata = None if plain else json.dumps(
        {"format": _FORMAT, "version": _VERSION, "tree": tree}, allow_nan=False)
    write_arrays(path, arrays, metadata)


def _load_arrays(path: Path) -> Any:
    arrays, metadata = read_arrays(path)
    if metadata is None:
        return {name: _tensor(a) for name, a in arrays.items()}
    try:
        header = json.loads(metadata)
        if header.get("format") != _FORMAT:
            raise ValueError(f"unknown format {header.get('format')!r}")
        if header.get("version", 0) > _VERSION:
            raise ValueError(f"format version {header['version']} is newer than this onnxgrad "
                             f"reads ({_VERSION})")
        return _decode(header["tree"], arrays)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"og.load({os.fspath(path)!r}): unreadable metadata: {exc}") from None


# --------------------------------------------------------------------------- encoding
def _encode(obj: Any, where: list[str], arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, Tensor):
        return {_ARRAY: _put(obj._v.data, where, arrays)}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise _unsupported(where, f"arrays of dtype {obj.dtype}")
        return {_ARRAY: _put(obj, where, arrays)}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)  # an IntEnum or int subclass is saved as its value
    if isinstance(obj, float):
        # JSON has no NaN or infinity; repr round-trips every finite float exactly.
        return float(obj) if math.isfinite(obj) else {_FLOAT: repr(float(obj))}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in "biuf":
            raise _unsupported(where, f"NumPy scalars of dtype {obj.dtype}")
        value = obj.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = repr(value)
        return {_SCALAR: [obj.dtype.str, value]}
    if isinstance(obj, dict):
        items = []
        for key, value in obj.items():
            if not (key is None or isinstance(key, (bool, int, float, str, tuple))):
                raise _unsupported(where, f"a dict key of type {type(key).__name__}")
            items.append([_encode(key, where, arrays), _encode(value, where + [str(key)], arrays)])
        return {_ODICT if isinstance(obj, OrderedDict) else _DICT: items}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, where + [str(i)], arrays) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {_TUPLE: items}
    raise _unsupported(where, _what(obj))


def _put(array: np.ndarray, where: list[str], arrays: dict[str, np.ndarray]) -> str:
    """Store ``array`` under its dotted path (``state.0.momentum_buffer``), made unique."""
    base = ".".join(where) or "tensor"
    name, n = base, 1
    while name in arrays:  # {"a.b": x, "a": {"b": y}} would otherwise collide
        name, n = f"{base}#{n}", n + 1
    arrays[name] = array
    return name


def _what(obj: Any) -> str:
    has_state = callable(getattr(obj, "state_dict", None))
    return f"values of type {type(obj).__name__}" + (" (it has a state_dict)" if has_state else "")


def _unsupported(where: list[str], what: str) -> TypeError:
    at = ".".join(where) or "the top level"
    # torch.save(model) pickles the module's code by reference; onnxgrad saves data only.
    hint = ("; save its state_dict() and load that into a new instance"
            if what.startswith("values of type") and "state_dict" in what else "")
    return TypeError(f"og.save: cannot save {what} (at {at}); checkpoints "
                     "hold tensors, arrays, numbers, bools, strings, None, and dicts, lists and "
                     f"tuples of them{hint}")


# --------------------------------------------------------------------------- decoding
def _tensor(array: np.ndarray) -> Tensor:
    return Tensor(Val(_contig(array)))


def _decode(node: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) != 1:
        raise ValueError(f"malformed node {node!r}")
    (tag, value), = node.items()
    if tag == _ARRAY:
        if value not in arrays:
            raise KeyError(f"the file has no array {value!r}")
        return _tensor(arrays[value])
    if tag in (_DICT, _ODICT):
        pairs = [(_decode(k, arrays), _decode(v, arrays)) for k, v in value]
        return OrderedDict(pairs) if tag == _ODICT else dict(pairs)
    if tag == _TUPLE:
        return tuple(_decode(v, arrays) for v in value)
    if tag == _FLOAT:
        return float(value)
    if tag == _SCALAR:
        dtype, item = value
        return np.dtype(dtype).type(float(item) if isinstance(item, str) else item)
    raise ValueError(f"unknown tag {tag!r}")

