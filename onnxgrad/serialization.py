"""``og.save`` / ``og.load``: state dicts (and nested containers of them) in checkpoint files.

``og.save(obj, path)`` takes what ``torch.save`` is mostly used for: a model's ``state_dict()``,
an optimizer's ``state_dict()``, or dicts, lists and tuples nesting them with ints, floats, bools,
strings and None. Arrays (tensors and NumPy arrays) become the file's arrays, named by their path
in the object (``conv1.weight``, ``optim.state.0.momentum_buffer``); everything else is described
by one JSON metadata entry, so nothing is pickled and loading never runs code from the file.
``og.load(path)`` rebuilds the object with every array as an ``og.Tensor``, as ``torch.load``
gives tensors back.

The format follows the extension (``.npz``, or ``.safetensors`` with the optional package); files
are written atomically (see ``runtime.checkpoint``). A flat ``{name: tensor}`` dict saved as
``.npz`` is a plain ``np.savez`` archive, and any ``.npz`` / ``.safetensors`` state dict (from
NumPy or ``safetensors.torch``) loads as ``{name: og.Tensor}``.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from .runtime.checkpoint import CheckpointError, read_arrays, write_arrays
from .tracer.tensor import Tensor, Val, _contig

__all__ = ["load", "save"]

_FORMAT = "onnxgrad.checkpoint"
_VERSION = 1
# Tags of encoded nodes: JSON objects with exactly one of these keys (plain JSON values, and lists,
# stand for themselves).
_ARRAY, _DICT, _ODICT, _TUPLE = "array", "dict", "odict", "tuple"
_SCALAR, _FLOAT = "scalar", "float"


def save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` (a state dict, or containers of them) to ``path`` (.npz or .safetensors)."""
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(obj, [], arrays)
    plain = (str(path).lower().endswith(".npz") and isinstance(obj, dict)
             and all(isinstance(v, dict) and set(v) == {_ARRAY} and v[_ARRAY] == k
                     for k, v in next(iter(tree.values()))))
    # A flat {str: array} dict as .npz needs no metadata: it stays a plain np.savez archive.
    metadata = None if plain else json.dumps(
        {"format": _FORMAT, "version": _VERSION, "tree": tree}, allow_nan=False)
    write_arrays(path, arrays, metadata)


def load(path: str | os.PathLike[str]) -> Any:
    """Read what :func:`save` wrote (or any .npz / .safetensors state dict); arrays as tensors."""
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
    raise _unsupported(where, f"values of type {type(obj).__name__}")


def _put(array: np.ndarray, where: list[str], arrays: dict[str, np.ndarray]) -> str:
    """Store ``array`` under its dotted path (``state.0.momentum_buffer``), made unique."""
    base = ".".join(where) or "tensor"
    name, n = base, 1
    while name in arrays:  # {"a.b": x, "a": {"b": y}} would otherwise collide
        name, n = f"{base}#{n}", n + 1
    arrays[name] = array
    return name


def _unsupported(where: list[str], what: str) -> TypeError:
    at = ".".join(where) or "the top level"
    return TypeError(f"og.save: cannot save {what} (at {at}); checkpoints "
                     "hold tensors, arrays, numbers, bools, strings, None, and dicts, lists and "
                     "tuples of them")


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

