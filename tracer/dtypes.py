"""PyTorch's type objects: ``og.dtype`` (``onnxgrad.float32``) and ``og.Size``.

Tensor data are NumPy arrays and the tracer works with NumPy dtypes inside; the public face is
PyTorch's. An :class:`dtype` is one canonical object per element type that prints as
``onnxgrad.float32`` and stands in for the NumPy dtype everywhere NumPy or onnxgrad's own code
takes one:

- it compares equal to (and hashes as) the matching NumPy dtype, so ``t.dtype == np.float32``,
  ``dtype in (og.float32, og.float64)`` and dicts keyed by NumPy dtypes keep working;
- it has a ``.dtype`` attribute (the NumPy dtype), which NumPy accepts as dtype-like:
  ``np.zeros(3, og.float32)``, ``a.astype(t.dtype)`` and ``np.dtype(og.int64)`` work;
- the NumPy attributes code reads (``kind``, ``name``, ``itemsize``, ``char``, ``str``, ``type``)
  are plain slots, plus PyTorch's ``is_floating_point``, ``is_signed``, ``is_complex``.

:class:`Size` is a tuple subclass, so code comparing shapes to tuples keeps working.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class dtype:
    """An element type, printing as ``onnxgrad.float32`` (``torch.float32`` in PyTorch)."""

    __slots__ = ("_torch", "char", "dtype", "itemsize", "kind", "name", "str", "type")

    def __init__(self, np_dtype: np.dtype, torch_name: str):
        self.dtype = np_dtype
        self.kind = np_dtype.kind
        self.name = np_dtype.name
        self.itemsize = np_dtype.itemsize
        self.char = np_dtype.char
        self.str = np_dtype.str
        self.type = np_dtype.type
        self._torch = torch_name  # the name after ``torch.``: float32, bool, ...

    def __repr__(self) -> str:
        return f"onnxgrad.{self._torch}"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        # NOTE: NumPy's comparison, so a dtype equals its NumPy dtype, scalar type and name
        # ("float32") as it did when og.float32 was a NumPy dtype; another og.dtype is compared
        # through its ``.dtype`` attribute.
        return self.dtype == other

    def __ne__(self, other: object) -> bool:
        return not self.dtype == other

    def __hash__(self) -> int:
        return hash(self.dtype)

    def __reduce__(self) -> tuple:
        return (_by_name, (self._torch,))

    @property
    def is_floating_point(self) -> bool:
        return self.kind == "f"

    @property
    def is_complex(self) -> bool:
        return self.kind == "c"

    @property
    def is_signed(self) -> bool:
        return self.kind in "fic"

    def to_real(self) -> dtype:
        return self

    def to_complex(self) -> dtype:
        raise TypeError(f"onnxgrad has no complex dtypes ({self})")


_TORCH_NAMES = {"float16": "float16", "float32": "float32", "float64": "float64",
                "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
                "uint8": "uint8", "bool": "bool"}

# NumPy dtype -> og.dtype; the key a tensor's ``.dtype`` looks up.
BY_NUMPY: dict[np.dtype, dtype] = {
    np.dtype(name): dtype(np.dtype(name), torch) for name, torch in _TORCH_NAMES.items()
}
_BY_TORCH = {d._torch: d for d in BY_NUMPY.values()}

float16 = BY_NUMPY[np.dtype("float16")]
float32 = BY_NUMPY[np.dtype("float32")]
float64 = BY_NUMPY[np.dtype("float64")]
int8 = BY_NUMPY[np.dtype("int8")]
int16 = BY_NUMPY[np.dtype("int16")]
int32 = BY_NUMPY[np.dtype("int32")]
int64 = BY_NUMPY[np.dtype("int64")]
uint8 = BY_NUMPY[np.dtype("uint8")]
bool_ = BY_NUMPY[np.dtype("bool")]

# PyTorch's aliases (torch.half, torch.float, ...) and legacy tensor type names.
ALIASES = {"half": float16, "float": float32, "double": float64, "short": int16, "int": int32,
           "long": int64, "bool": bool_}
TENSOR_TYPES = {"HalfTensor": float16, "FloatTensor": float32, "DoubleTensor": float64,
                "CharTensor": int8, "ShortTensor": int16, "IntTensor": int32,
                "LongTensor": int64, "ByteTensor": uint8, "BoolTensor": bool_}
_TYPE_NAMES = {d: name for name, d in TENSOR_TYPES.items()}


def _by_name(name: str) -> dtype:
    return _BY_TORCH[name]


def as_dtype(value: Any) -> dtype:
    """The og.dtype for anything dtype-like (og.dtype, NumPy dtype or type, name)."""
    if value.__class__ is dtype:
        return value
    if isinstance(value, str):
        if value in ALIASES:
            return ALIASES[value]
        name = value.removeprefix("torch.")
        name = name.removeprefix("onnxgrad.")
        if name in _BY_TORCH:
            return _BY_TORCH[name]
        if name in ALIASES:
            return ALIASES[name]
    try:
        np_dtype = np.dtype(value)
    except TypeError:
        raise TypeError(f"{value!r} is not a dtype") from None
    found = BY_NUMPY.get(np_dtype)
    if found is None:
        raise TypeError(f"onnxgrad has no dtype for {np_dtype} (its dtypes: "
                        f"{', '.join(map(str, BY_NUMPY.values()))})")
    return found


def type_name(d: Any) -> str:
    """PyTorch's legacy tensor type string (``onnxgrad.FloatTensor``)."""
    return f"onnxgrad.{_TYPE_NAMES[as_dtype(d)]}"


def from_type_name(name: str) -> dtype | None:
    """The dtype a legacy type string names ('torch.FloatTensor', 'onnxgrad.LongTensor'), or
    None when ``name`` is not one."""
    for prefix in ("torch.cuda.", "onnxgrad.cuda.", "torch.", "onnxgrad.", ""):
        if name.startswith(prefix) and name[len(prefix):] in TENSOR_TYPES:
            return TENSOR_TYPES[name[len(prefix):]]
    return None


class Size(tuple):
    """A tensor's shape: a tuple of ints printing as ``onnxgrad.Size([3, 4])``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"onnxgrad.Size([{', '.join(str(d) for d in self)}])"

    __str__ = __repr__

    def __getitem__(self, index: Any) -> Any:
        item = tuple.__getitem__(self, index)
        return Size(item) if isinstance(index, slice) else item

    def __add__(self, other: Any) -> Any:
        if not isinstance(other, tuple):
            return NotImplemented
        return Size(tuple.__add__(self, other))

    def __radd__(self, other: Any) -> Any:
        if not isinstance(other, tuple):
            return NotImplemented
        return Size(tuple.__add__(other, self))

    def __mul__(self, n: Any) -> Any:
        return Size(tuple.__mul__(self, n))

    __rmul__ = __mul__

    def numel(self) -> int:
        """The number of elements of a tensor of this shape (1 for ``Size([])``)."""
        n = 1
        for d in self:
            n *= d
        return n

    def __reduce__(self) -> tuple:
        return (Size, (tuple(self),))
