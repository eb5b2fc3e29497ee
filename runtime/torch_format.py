"""PyTorch's checkpoint format (``torch.save``), read and written without importing torch.

The format (PyTorch >= 1.6, ``_use_new_zipfile_serialization=True``, the default) is a zip
archive whose members sit in one folder (``archive/``):

- ``data.pkl``: a pickle (protocol 2) of the object. A tensor is the call
  ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
  OrderedDict())`` whose ``storage`` is a persistent id ``("storage", torch.FloatStorage,
  "<key>", "cpu", <numel>)``: the storage's bytes are the member ``data/<key>`` (little-endian).
  Several tensors may share one storage, with their own offsets and strides (views).
- ``byteorder`` (``little``), ``version`` (``3``), ``.format_version``, ``.storage_alignment``:
  small text members. Storage members start at multiples of 64 bytes (for ``mmap=True``).

Reading never runs code from the file: a pickle is a program, so :class:`_Unpickler` admits
only the globals a state dict needs (tensor and parameter rebuilders, storage types, dtypes,
``OrderedDict``, ``torch.Size``, ``set``, ``complex``, bytes through ``_codecs.encode``) and
refuses any other with :class:`UnsafeCheckpointError` naming it, before it is looked up.
``weights_only=False`` does not lift this: onnxgrad never loads code from a checkpoint.

Writing produces the same layout: ``torch.load(path, weights_only=True)`` reads what
:func:`write` wrote. Each tensor gets its own contiguous storage, except that one array object
saved several times (tied weights) is written once and shared, as PyTorch shares it.

:func:`read_legacy` reads PyTorch's legacy format (torch < 1.6, or
``_use_new_zipfile_serialization=False``) through the same restricted unpickler; it is never
written.

This module knows arrays, not tensors: the caller converts in both directions (``to_array``,
``make_tensor``).
"""
from __future__ import annotations

import _compat_pickle
import io
import pickle
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

__all__ = ["LEGACY_MAGIC", "UnsafeCheckpointError", "is_torch_zip", "read", "read_legacy",
           "write"]

# Storage type name (pickled as the global ``torch.<name>``) <-> NumPy dtype. bfloat16 is read
# into float32 (NumPy has no bfloat16); the marker dtype below stands for its raw bits.
_BFLOAT16 = np.dtype([("bfloat16", "<u2")])
_STORAGES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"), "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": _BFLOAT16,
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}
_STORAGE_OF = {dtype: name for name, dtype in _STORAGES.items() if dtype is not _BFLOAT16}
# torch.<dtype> globals (a dtype pickled inside optimizer or AMP state).
_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype("float64"), "double": np.dtype("float64"),
    "float32": np.dtype("float32"), "float": np.dtype("float32"),
    "float16": np.dtype("float16"), "half": np.dtype("float16"),
    "bfloat16": np.dtype("float32"), "int64": np.dtype("int64"), "long": np.dtype("int64"),
    "int32": np.dtype("int32"), "int": np.dtype("int32"), "int16": np.dtype("int16"),
    "short": np.dtype("int16"), "int8": np.dtype("int8"), "uint8": np.dtype("uint8"),
    "bool": np.dtype("bool"),
}
_ALIGNMENT = 64


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle asks for a global that is not tensor data (it could run code)."""


class _CorruptError(Exception):
    """Inconsistent content (caught and reported as a corrupt checkpoint by the caller)."""


# --------------------------------------------------------------------------- reading
class _StorageType:
    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name, self.dtype = name, dtype


class _Storage:
    """A storage's elements as a 1-d array (raw uint16 bits for bfloat16). In the legacy
    format the data follows the pickle: ``array`` is None until it has been read."""

    def __init__(self, array: np.ndarray | None, bfloat16: bool, dtype: np.dtype | None = None,
                 numel: int = 0) -> None:
        self.array, self.bfloat16, self.dtype, self.numel = array, bfloat16, dtype, numel


class _Deferred:
    """A tensor of the legacy format whose storage has not been read yet."""

    def __init__(self, storage: _Storage, offset: int, size: Any, stride: Any,
                 requires_grad: bool) -> None:
        self.args = (storage, offset, size, stride)
        self.requires_grad = requires_grad

    def requires_grad_(self, flag: bool) -> None:
        self.requires_grad = flag


def is_torch_zip(f: BinaryIO) -> bool:
    """Whether the open file is a zip archive with a ``data.pkl`` member (PyTorch's layout)."""
    pos = f.tell()
    try:
        if f.read(4) != b"PK\x03\x04":
            return False
        f.seek(pos)
        with zipfile.ZipFile(f) as z:
            return _pickle_member(z) is not None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False
    finally:
        f.seek(pos)


def _pickle_member(z: zipfile.ZipFile) -> str | None:
    for name in z.namelist():
        if name == "data.pkl" or (name.endswith("/data.pkl") and name.count("/") == 1):
            return name
    return None


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def read_legacy(f: BinaryIO, make_tensor: Callable[[np.ndarray, bool], Any]) -> Any:
    """The object in a checkpoint of PyTorch's legacy format (torch < 1.6, or
    ``_use_new_zipfile_serialization=False``): three header pickles, the object's pickle, the
    pickled list of storage keys, then each storage as an int64 element count and its bytes."""
    storages: dict[str, _Storage] = {}

    def load_storage(kind: Any, key: str, numel: int) -> _Storage:
        if key not in storages:
            if not isinstance(kind, _StorageType) or kind.name == "UntypedStorage":
                raise _CorruptError(f"storage type {kind!r}")
            bfloat16 = kind.dtype is _BFLOAT16
            storages[key] = _Storage(None, bfloat16, np.dtype("<u2") if bfloat16 else kind.dtype,
                                     numel)
        return storages[key]

    def no_storage(kind: Any, key: str, numel: int) -> _Storage:
        raise _CorruptError("a storage in a header")

    def plain() -> Any:
        return _Unpickler(f, no_storage, make_tensor).load()

    magic, protocol, info = plain(), plain(), plain()
    if magic != LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not isinstance(info, dict):
        raise _CorruptError("not a legacy checkpoint")
    if not info.get("little_endian", False):
        raise _CorruptError("big-endian checkpoints are not supported")
    unpickler = _Unpickler(f, load_storage, make_tensor)
    obj = unpickler.load()
    keys = plain()
    if not isinstance(keys, list) or set(storages) - {str(k) for k in keys}:
        raise _CorruptError("storage keys")
    start = f.tell()
    left = f.seek(0, io.SEEK_END) - start  # a damaged count must not size an allocation
    f.seek(start)
    for key in keys:
        head = f.read(8)
        if len(head) != 8:
            raise _CorruptError("truncated")
        numel = struct.unpack("<q", head)[0]
        storage = storages.get(str(key))
        dtype = storage.dtype if storage is not None else np.dtype("u1")
        if not 0 <= numel * dtype.itemsize <= left:
            raise _CorruptError("truncated")
        raw = f.read(numel * dtype.itemsize)
        left -= 8 + len(raw)
        if len(raw) != numel * dtype.itemsize:
            raise _CorruptError("truncated")
        if storage is not None:
            storage.array = np.frombuffer(raw, dtype)
    return unpickler.resolve(obj)


def read(f: BinaryIO, make_tensor: Callable[[np.ndarray, bool], Any]) -> Any:
    """The object in a PyTorch zip checkpoint, every tensor made by ``make_tensor(array,
    requires_grad)``. Raises :class:`UnsafeCheckpointError` for a disallowed global; anything
    else that goes wrong means a truncated or corrupt file (the caller words it)."""
    with zipfile.ZipFile(f) as z:
        member = _pickle_member(z)
        if member is None:
            raise _CorruptError("no data.pkl")
        prefix = member[: -len("data.pkl")]
        version = z.read(prefix + "version").strip() if prefix + "version" in z.namelist() \
            else b"3"
        if int(version or b"0") > 3:
            raise _CorruptError(f"unknown format version {version!r}")
        if prefix + "byteorder" in z.namelist() and z.read(prefix + "byteorder") != b"little":
            raise _CorruptError("big-endian checkpoints are not supported")
        storages: dict[str, _Storage] = {}

        def load_storage(kind: Any, key: str, numel: int) -> _Storage:
            if key not in storages:
                if not isinstance(kind, _StorageType):
                    raise _CorruptError(f"storage type {kind!r}")
                raw = z.read(f"{prefix}data/{key}")
                bfloat16 = kind.dtype is _BFLOAT16
                dtype = np.dtype("<u2") if bfloat16 else kind.dtype
                if kind.name == "UntypedStorage":
                    numel = len(raw)
                if len(raw) < numel * dtype.itemsize:
                    raise _CorruptError(f"storage {key} is short")
                storages[key] = _Storage(np.frombuffer(raw, dtype, count=numel), bfloat16)
            return storages[key]

        unpickler = _Unpickler(io.BytesIO(z.read(member)), load_storage, make_tensor)
        return unpickler.load()


class _Unpickler(pickle.Unpickler):
    def __init__(self, f: BinaryIO, load_storage: Callable[[Any, str, int], _Storage],
                 make_tensor: Callable[[np.ndarray, bool], Any]) -> None:
        super().__init__(f, encoding="utf-8")
        self._load_storage = load_storage
        self._make_tensor = make_tensor
        self._warned_bfloat16 = False

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise _CorruptError(f"persistent id {pid!r}")
        _, kind, key, _location, numel = pid[:5]
        return self._load_storage(kind, str(key), int(numel))

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 pickles name Python 2's modules (``__builtin__.set``): map them as
        # pickle.Unpickler.find_class itself would.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        found = self._allowed(module, name)
        if found is None:
            raise UnsafeCheckpointError(
                f"the checkpoint asks for the global '{full}', which is not tensor data: a "
                f"PyTorch checkpoint is a pickle, and loading this one would run code from the "
                f"file. og.load only admits tensors, numbers, strings, bytes and containers "
                f"(state dicts, optimizer states)")
        return found

    def _allowed(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "builtins" and name in ("set", "frozenset", "complex", "bytearray"):
            return {"set": set, "frozenset": frozenset, "complex": complex,
                    "bytearray": bytearray}[name]
        if module == "_codecs" and name == "encode":
            return _encode
        if module == "torch":
            if name in _STORAGES:
                return _StorageType(name, _STORAGES[name])
            if name == "UntypedStorage":
                return _StorageType(name, np.dtype("u1"))
            if name in _DTYPES:
                return _DTYPES[name]
            if name == "Size":
                return tuple
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(name, np.dtype("u1"))
        if module == "torch._utils":
            if name == "_rebuild_tensor_v2":
                return self._rebuild_tensor_v2
            if name == "_rebuild_tensor":
                return self._rebuild_tensor
            if name == "_rebuild_parameter":
                return self._rebuild_parameter
            if name == "_rebuild_parameter_with_state":
                return self._rebuild_parameter_with_state
        if module == "torch.nn.parameter" and name == "Parameter":
            return self._parameter
        return None

    # Rebuilders: what the admitted torch functions do, on NumPy arrays.
    def _rebuild_tensor_v2(self, storage: Any, storage_offset: int, size: Any, stride: Any,
                           requires_grad: bool = False, backward_hooks: Any = None,
                           metadata: Any = None) -> Any:
        if isinstance(storage, _Storage) and storage.array is None:
            return _Deferred(storage, storage_offset, size, stride, bool(requires_grad))
        return self._make_tensor(self._view(storage, storage_offset, size, stride),
                                 bool(requires_grad))

    def resolve(self, obj: Any) -> Any:
        """``obj`` with every deferred tensor made (legacy format, once storages are read)."""
        if isinstance(obj, _Deferred):
            return self._make_tensor(self._view(*obj.args), obj.requires_grad)
        if isinstance(obj, dict):
            for key, value in obj.items():  # in place: keeps an OrderedDict's _metadata
                obj[key] = self.resolve(value)
        elif isinstance(obj, list):
            obj[:] = [self.resolve(v) for v in obj]
        elif isinstance(obj, (tuple, set, frozenset)) and not hasattr(obj, "_fields"):
            return type(obj)(self.resolve(v) for v in obj)
        return obj

    def _rebuild_tensor(self, storage: Any, storage_offset: int, size: Any,
                        stride: Any) -> Any:
        return self._rebuild_tensor_v2(storage, storage_offset, size, stride)

    def _rebuild_parameter(self, data: Any, requires_grad: bool, backward_hooks: Any) -> Any:
        return self._parameter(data, requires_grad)

    def _rebuild_parameter_with_state(self, data: Any, requires_grad: bool, backward_hooks: Any,
                                      state: Any) -> Any:
        return self._parameter(data, requires_grad)

    def _parameter(self, data: Any, requires_grad: bool = True) -> Any:
        if hasattr(data, "requires_grad_"):
            data.requires_grad_(bool(requires_grad))
        return data

    def _view(self, storage: Any, offset: int, size: Any, stride: Any) -> np.ndarray:
        if not isinstance(storage, _Storage):
            raise _CorruptError("a tensor without a storage")
        shape = tuple(int(s) for s in size)
        strides = tuple(int(s) for s in stride)
        base, offset = storage.array, int(offset)
        if len(shape) != len(strides) or min(shape + strides + (offset,), default=0) < 0:
            raise _CorruptError("bad tensor geometry")
        if 0 in shape:
            array = np.zeros(shape, base.dtype)
        else:
            # NOTE: checked before as_strided, which would otherwise read outside the storage.
            last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
            if last >= len(base):
                raise _CorruptError("a tensor reaches past its storage")
            array = np.lib.stride_tricks.as_strided(
                base[offset:], shape, tuple(s * base.itemsize for s in strides), writeable=False)
            # A copy: the tensor owns its data, and views saved of one storage come apart.
            array = np.array(array, order="C")
        if storage.bfloat16:
            if not self._warned_bfloat16:
                warnings.warn("og.load: bfloat16 tensors are loaded as float32 (onnxgrad has "
                              "no bfloat16 dtype); values are exact", UserWarning, stacklevel=2)
                self._warned_bfloat16 = True
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def _encode(obj: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode``, as protocol 2 pickles bytes: only the text-to-bytes codecs."""
    if not isinstance(obj, str) or encoding.replace("-", "").lower() not in ("latin1", "utf8"):
        raise _CorruptError("unexpected _codecs.encode call")
    return obj.encode(encoding)


# --------------------------------------------------------------------------- writing
class _Writer:
    """A protocol-2 pickle of plain data and tensors, opcode by opcode (torch is not imported,
    so its globals cannot go through pickle.Pickler, which imports what it names)."""

    def __init__(self, to_array: Callable[[Any], tuple[np.ndarray, bool] | None],
                 unsupported: Callable[[list[str], str], Exception],
                 what: Callable[[Any], str]) -> None:
        self.out = io.BytesIO()
        self.storages: list[np.ndarray] = []
        self._storage_of: dict[int, int] = {}
        self._keep: list[Any] = []  # the objects whose id() keys _storage_of stay alive
        self._to_array = to_array
        self._unsupported = unsupported
        self._what = what

    def dump(self, obj: Any) -> bytes:
        self.out.write(b"\x80\x02")
        self._save(obj, [])
        self.out.write(b".")
        return self.out.getvalue()

    def _global(self, module: str, name: str) -> None:
        self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def _int(self, value: int) -> None:
        w = self.out.write
        if 0 <= value < 256:
            w(b"K" + bytes([value]))
        elif 0 <= value < 65536:
            w(b"M" + struct.pack("<H", value))
        elif -(2**31) <= value < 2**31:
            w(b"J" + struct.pack("<i", value))
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            w(b"\x8a" + bytes([len(data)]) + data)

    def _str(self, value: str) -> None:
        data = value.encode("utf-8", "surrogatepass")
        self.out.write(b"X" + struct.pack("<I", len(data)) + data)

    def _save(self, obj: Any, where: list[str]) -> None:
        w = self.out.write
        found = self._to_array(obj)
        if found is not None:
            self._tensor(obj, *found, where)
        elif obj is None:
            w(b"N")
        elif obj is True or obj is False:
            w(b"\x88" if obj else b"\x89")
        elif isinstance(obj, (int, np.integer)) and not isinstance(obj, (bool, np.bool_)):
            self._int(int(obj))
        elif isinstance(obj, (float, np.floating)):
            w(b"G" + struct.pack(">d", float(obj)))
        elif isinstance(obj, np.bool_):
            w(b"\x88" if obj else b"\x89")
        elif isinstance(obj, str):
            self._str(obj)
        elif isinstance(obj, bytes):
            # Protocol 2 has no bytes opcode: _codecs.encode(latin-1 text), as pickle writes it.
            self._global("_codecs", "encode")
            w(b"(")
            self._str(obj.decode("latin-1"))
            self._str("latin1")
            w(b"tR")
        elif isinstance(obj, dict):
            if isinstance(obj, OrderedDict):
                self._global("collections", "OrderedDict")
                w(b")R")
            else:
                w(b"}")
            if obj:
                w(b"(")
                for key, value in obj.items():
                    if not (key is None or isinstance(key, (bool, int, float, str, tuple))):
                        raise self._unsupported(where, f"a dict key of type "
                                                       f"{type(key).__name__}")
                    self._save(key, where)
                    self._save(value, where + [str(key)])
                w(b"u")
        elif isinstance(obj, list):
            w(b"]")
            if obj:
                w(b"(")
                for i, value in enumerate(obj):
                    self._save(value, where + [str(i)])
                w(b"e")
        elif isinstance(obj, tuple):
            w(b"(")
            for i, value in enumerate(obj):
                self._save(value, where + [str(i)])
            w(b"t")
        else:
            raise self._unsupported(where, self._what(obj))

    def _tensor(self, obj: Any, array: np.ndarray, requires_grad: bool,
                where: list[str]) -> None:
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        name = _STORAGE_OF.get(np.dtype(dtype.str.replace(">", "<").replace("=", "<")))
        if name is None:
            raise self._unsupported(where, f"arrays of dtype {array.dtype}")
        key = self._storage_of.get(id(obj))
        if key is None:
            key = len(self.storages)
            self.storages.append(np.ascontiguousarray(array, dtype=dtype.newbyteorder("<"))
                                 .reshape(-1))
            self._storage_of[id(obj)] = key
            self._keep.append(obj)
        w = self.out.write
        self._global("torch._utils", "_rebuild_tensor_v2")
        w(b"((")
        self._str("storage")
        self._global("torch", name)
        self._str(str(key))
        self._str("cpu")
        self._int(int(array.size))
        w(b"tQ")  # the persistent id tuple, then BINPERSID
        self._int(0)
        w(b"(")
        for n in array.shape:
            self._int(int(n))
        w(b"t(")
        stride = 1
        strides = []
        for n in reversed(array.shape):
            strides.append(stride)
            stride *= max(int(n), 1)
        for s in reversed(strides):
            self._int(s)
        w(b"t")
        w(b"\x88" if requires_grad else b"\x89")
        self._global("collections", "OrderedDict")
        w(b")R")  # backward_hooks: an empty OrderedDict
        w(b"tR")


def write(f: BinaryIO, obj: Any, to_array: Callable[[Any], tuple[np.ndarray, bool] | None],
          unsupported: Callable[[list[str], str], Exception],
          what: Callable[[Any], str] = lambda obj: f"values of type {type(obj).__name__}",
          ) -> None:
    """Write ``obj`` to the open binary file in PyTorch's zip format. ``to_array(value)`` gives
    ``(array, requires_grad)`` for a tensor and None for anything else; ``unsupported(where,
    what)`` makes the error for a value that cannot be saved, ``what(value)`` describes it."""
    writer = _Writer(to_array, unsupported, what)
    pickled = writer.dump(obj)  # before anything is written: an unsupported value fails first
    prefix = "archive/"
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        _member(z, prefix + "data.pkl", pickled)
        _member(z, prefix + ".format_version", b"1")
        _member(z, prefix + ".storage_alignment", str(_ALIGNMENT).encode())
        _member(z, prefix + "byteorder", b"little")
        for key, storage in enumerate(writer.storages):
            _member(z, f"{prefix}data/{key}", storage.tobytes(), align=True)
        _member(z, prefix + "version", b"3\n")


def _member(z: zipfile.ZipFile, name: str, data: bytes, align: bool = False) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    if align:
        # Pad the local header's extra field so the data starts at a multiple of 64 (PyTorch
        # pads with an extra field of id "FB" the same way).
        start = z.fp.tell() + 30 + len(name.encode()) + 4
        if len(data) * 1.05 > zipfile.ZIP64_LIMIT:  # zipfile's own test for zip64
            start += 20  # the zip64 extra field zipfile adds for large members
        pad = -start % _ALIGNMENT
        info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    z.writestr(info, data)

