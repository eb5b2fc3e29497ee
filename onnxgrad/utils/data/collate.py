"""``default_collate`` and ``default_convert``: samples into batches of ``og.Tensor``.

PyTorch's rules (``torch.utils.data.default_collate``): tensors are stacked along a new first
dimension; NumPy arrays become tensors of their dtype and are stacked; NumPy scalars become a
1-d tensor of their dtype; Python floats a float64 tensor, ints an int64 tensor, bools a bool
tensor; strings and bytes stay a list; mappings, namedtuples and lists are collated field by
field keeping their type; tuples become lists (as PyTorch, for backward compatibility).
"""
from __future__ import annotations

import collections.abc
import copy
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ...tracer import state
from ...tracer.ops import stack
from ...tracer.tensor import Tensor, tensor
from ...tracer.values import Val, get_default_dtype

__all__ = ["collate", "default_collate", "default_convert"]

_NP_STR_OBJ = re.compile(r"[SaUO]")
_ERR = ("default_collate: batch must contain tensors, numpy arrays, numbers, dicts or lists; "
        "found {}")


def _is_numpy(value: Any) -> bool:
    return isinstance(value, (np.ndarray, np.generic))


def _stack(batch: list[Tensor]) -> Tensor:
    """``og.stack(batch)``. NOTE: tensors that need no gradient, outside a compiled trace, are
    stacked in NumPy: a data pipeline should not cost one ONNX node per sample."""
    first = batch[0]
    if (state.active_trace() is not None or any(t.requires_grad for t in batch)
            or any(t.shape != first.shape for t in batch)):
        return stack(batch, 0)  # records the op, or raises PyTorch's shape-mismatch error
    out = Tensor(Val(np.stack([t._v.data for t in batch])))
    out._v.owner = weakref.ref(out)
    return out


def _from_numbers(batch: list[Any], dtype: Any) -> Tensor:
    array = np.array(batch, dtype=dtype)
    return tensor(array)


def collate(batch: Sequence[Any], *,
            collate_fn_map: dict[type | tuple[type, ...], Callable] | None = None) -> Any:
    """The general collate, with optional per-type functions ``collate_fn_map`` (as PyTorch's
    ``torch.utils.data._utils.collate.collate``): ``fn(batch, collate_fn_map=...)``."""
    elem = batch[0]
    elem_type = type(elem)
    if collate_fn_map is not None:
        if elem_type in collate_fn_map:
            return collate_fn_map[elem_type](batch, collate_fn_map=collate_fn_map)
        for collate_type, fn in collate_fn_map.items():
            if isinstance(elem, collate_type):
                return fn(batch, collate_fn_map=collate_fn_map)
    if isinstance(elem, Tensor):
        return _stack(batch)
    if _is_numpy(elem):
        if _NP_STR_OBJ.search(elem.dtype.str) is not None:
            raise TypeError(_ERR.format(elem.dtype))
        if isinstance(elem, np.ndarray):
            return _stack([tensor(np.asarray(b)) for b in batch])
        return tensor(np.array(batch))  # NumPy scalars: one tensor of their dtype
    if isinstance(elem, float):
        return _from_numbers(batch, np.float64)
    if isinstance(elem, bool) and all(isinstance(b, bool) for b in batch):
        return _from_numbers(batch, np.bool_)
    if isinstance(elem, int):
        array = np.array(batch)
        # torch.tensor([1, 2.5]): a float among the ints makes a tensor of the default dtype.
        return tensor(array.astype(get_default_dtype() if array.dtype.kind == "f" else np.int64))
    if isinstance(elem, (str, bytes)):
        return batch

    def recurse(samples: Sequence[Any]) -> Any:
        return collate(samples, collate_fn_map=collate_fn_map)

    if isinstance(elem, collections.abc.Mapping):
        if isinstance(elem, collections.abc.MutableMapping):
            # A copy of the first sample keeps its type and any attributes (as PyTorch).
            clone = copy.copy(elem)
            clone.update({key: recurse([d[key] for d in batch]) for key in elem})
            return clone
        try:
            return elem_type({key: recurse([d[key] for d in batch]) for key in elem})
        except TypeError:
            return {key: recurse([d[key] for d in batch]) for key in elem}
    if isinstance(elem, tuple) and hasattr(elem, "_fields"):  # a namedtuple
        return elem_type(*(recurse(samples) for samples in zip(*batch)))
    if isinstance(elem, collections.abc.Sequence):
        it = iter(batch)
        elem_size = len(next(it))
        if not all(len(e) == elem_size for e in it):
            raise RuntimeError("each element in list of batch should be of equal size")
        transposed = list(zip(*batch))
        if isinstance(elem, tuple):
            return [recurse(samples) for samples in transposed]  # as PyTorch: a list
        try:
            if isinstance(elem, collections.abc.MutableSequence):
                clone = copy.copy(elem)
                for i, samples in enumerate(transposed):
                    clone[i] = recurse(samples)
                return clone
            return elem_type([recurse(samples) for samples in transposed])
        except TypeError:
            return [recurse(samples) for samples in transposed]
    raise TypeError(_ERR.format(elem_type))


def default_collate(batch: list[Any]) -> Any:
    """Samples into one batch: see the module's docstring for the rules."""
    return collate(batch)


def default_convert(data: Any) -> Any:
    """NumPy arrays and scalars (also inside mappings and sequences) to tensors, without
    batching: the collate of ``DataLoader(batch_size=None)``."""
    elem_type = type(data)
    if isinstance(data, Tensor):
        return data
    if _is_numpy(data):
        if _NP_STR_OBJ.search(data.dtype.str) is not None:
            return data
        return tensor(np.asarray(data))
    if isinstance(data, collections.abc.Mapping):
        if isinstance(data, collections.abc.MutableMapping):
            clone = copy.copy(data)
            clone.update({key: default_convert(data[key]) for key in data})
            return clone
        try:
            return elem_type({key: default_convert(data[key]) for key in data})
        except TypeError:
            return {key: default_convert(data[key]) for key in data}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return elem_type(*(default_convert(d) for d in data))
    if isinstance(data, tuple):
        return [default_convert(d) for d in data]
    if isinstance(data, collections.abc.Sequence) and not isinstance(data, (str, bytes)):
        try:
            if isinstance(data, collections.abc.MutableSequence):
                clone = copy.copy(data)
                for i, d in enumerate(data):
                    clone[i] = default_convert(d)
                return clone
            return elem_type([default_convert(d) for d in data])
        except TypeError:
            return [default_convert(d) for d in data]
    return data
