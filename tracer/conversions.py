"""Tensor methods about type and place: ``to``, ``cpu``, ``cuda``, ``type``, ``half``, ``new_*``
and PyTorch's small queries (``element_size``, ``nelement``, ``ndimension``, ``contiguous``).

Devices follow ``tracer/device.py``'s rule: one compute device per process, so a device request is
checked and moves nothing.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from . import device as _device
from . import ops, state
from .dtypes import as_dtype, from_type_name, type_name
from .ops import _shape_args, _where
from .registry import op, out_writer
from .tensor import Tensor, Val


def parse_to(args: tuple, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(device, dtype) from ``to``'s three forms: (dtype), (device, dtype), (tensor)."""
    dev, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    if kwargs:
        raise TypeError(f"to() got an unexpected keyword argument '{next(iter(kwargs))}'")
    if len(args) > 1 and isinstance(args[-1], bool):
        args = args[:-1]  # to(dtype, non_blocking) and to(other, non_blocking)
    if len(args) > 2:
        raise TypeError(f"to() takes at most 2 positional arguments ({len(args)} given)")
    if args and isinstance(args[0], Tensor):
        if len(args) > 1 or dev is not None or dtype is not None:
            raise TypeError("to(other) takes no device or dtype: they are other's")
        return args[0].device, args[0].dtype
    if len(args) == 2:
        if dev is not None or dtype is not None:
            raise TypeError("to() got multiple values for device or dtype")
        return args[0], args[1]
    if len(args) == 1:
        if _device.is_device_like(args[0]):
            if dev is not None:
                raise TypeError("to() got multiple values for argument 'device'")
            return args[0], dtype
        if dtype is not None:
            raise TypeError("to() got multiple values for argument 'dtype'")
        return dev, args[0]
    return dev, dtype


@op(method="to", name="tensor_to")
def to(self: Tensor, *args: Any, non_blocking: bool = False, copy: bool = False,
       **kwargs: Any) -> Tensor:
    """``t.to(dtype)``, ``t.to(device, dtype)``, ``t.to(other)``, as PyTorch's: ``self`` when
    nothing changes (unless ``copy=True``); a cast is recorded, so gradients flow through it."""
    dev, dtype = parse_to(args, dict(kwargs))
    if dev is not None:
        _device.check(dev)  # nothing to move: every tensor lives where ops run
    if dtype is not None:
        try:
            dtype = as_dtype(dtype)
        except TypeError:
            raise TypeError(f"to() received an invalid combination of arguments: "
                            f"{dtype!r} is neither a device nor a dtype{_where()}") from None
        if dtype != self.dtype:
            return ops.to(self, dtype.dtype)
    return ops.identity(self) if copy else self


@op(method=True)
def cpu(self: Tensor, memory_format: Any = None) -> Tensor:
    return self


@op(method=True)
def cuda(self: Tensor, device: Any = None, non_blocking: bool = False,
         memory_format: Any = None) -> Tensor:
    if device is None:
        _device.require_cuda()
    else:
        d = _device.as_device(device)
        if d.type != "cuda":
            raise ValueError(f"Invalid device, must be cuda device: {d}")
        _device.require_cuda(d.index)
    return self


@op(method="type", name="tensor_type")
def type_(self: Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    """No argument: PyTorch's type string (``onnxgrad.FloatTensor``); a dtype or a type string
    (``'torch.DoubleTensor'``): the tensor cast to it."""
    if dtype is None:
        return type_name(self.dtype)
    if isinstance(dtype, str):
        named = from_type_name(dtype)
        if named is None:
            raise ValueError(f"invalid type: '{dtype}'")
        if ".cuda." in dtype:
            _device.require_cuda()
        dtype = named
    return to(self, as_dtype(dtype))


@op(method="half")
def to_half(x: Tensor) -> Tensor:
    return to(x, as_dtype("float16"))


@op(method=True)
def element_size(self: Tensor) -> int:
    return self._v.data.itemsize


@op(method=True)
def nelement(self: Tensor) -> int:
    return int(self._v.data.size)


@op(method=True)
def ndimension(self: Tensor) -> int:
    return self._v.data.ndim


@op(method=True)
def contiguous(self: Tensor, memory_format: Any = None) -> Tensor:
    # NOTE: tensor data are always C-contiguous NumPy arrays (values.py's _contig).
    return self


@op(method=True)
def is_contiguous(self: Tensor, memory_format: Any = None) -> bool:
    return True


@op(method=True)
def is_floating_point(self: Tensor) -> bool:
    return self._v.data.dtype.kind == "f"


@op(method=True)
def get_device(self: Tensor) -> int:
    """-1 for a CPU tensor, else the CUDA device index (PyTorch's)."""
    d = self.device
    return -1 if d.type == "cpu" else d.index


# --------------------------------------------------------------------------- new_* factories
def _new_kwargs(self: Tensor, dtype: Any, device: Any) -> dict[str, Any]:
    return {"dtype": self.dtype if dtype is None else dtype, "device": device}


@op(method=True)
def new_zeros(self: Tensor, *size: Any, dtype: Any = None, device: Any = None,
              requires_grad: bool = False) -> Tensor:
    from .factories import zeros

    return zeros(_shape_args(size), requires_grad=requires_grad, **_new_kwargs(self, dtype, device))


@op(method=True)
def new_ones(self: Tensor, *size: Any, dtype: Any = None, device: Any = None,
             requires_grad: bool = False) -> Tensor:
    from .factories import ones

    return ones(_shape_args(size), requires_grad=requires_grad, **_new_kwargs(self, dtype, device))


@op(method=True)
def new_empty(self: Tensor, *size: Any, dtype: Any = None, device: Any = None,
              requires_grad: bool = False) -> Tensor:
    from .factories import empty

    return empty(_shape_args(size), requires_grad=requires_grad, **_new_kwargs(self, dtype, device))


@op(method=True)
def new_full(self: Tensor, size: Any, fill_value: Any, *, dtype: Any = None, device: Any = None,
             requires_grad: bool = False) -> Tensor:
    from .factories import full

    return full(size, fill_value, requires_grad=requires_grad, **_new_kwargs(self, dtype, device))


@op(method=True)
def new_tensor(self: Tensor, data: Any, *, dtype: Any = None, device: Any = None,
               requires_grad: bool = False) -> Tensor:
    """A new leaf holding a copy of ``data``, of this tensor's dtype unless ``dtype`` is given."""
    from .tensor import tensor

    array = data._v.data if isinstance(data, Tensor) else np.asarray(data)
    return tensor(array, requires_grad=requires_grad, **_new_kwargs(self, dtype, device))


# --------------------------------------------------------------------------- out=
def _resize_warning(name: str, old: tuple[int, ...], new: tuple[int, ...]) -> None:
    warnings.warn(
        f"An output with one or more elements was resized since it had shape {list(old)}, "
        f"which does not match the required output shape {list(new)} ({name}). This behavior "
        "is deprecated, and in a future PyTorch release outputs will not be resized unless "
        "they have zero elements.", UserWarning, stacklevel=5)


def _write_one(name: str, result: Any, out: Any) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{name}(): argument 'out' must be Tensor, not {type(out).__name__}")
    if not isinstance(result, Tensor):
        raise TypeError(f"{name}() returns {type(result).__name__}, which out= cannot hold")
    if (result.requires_grad or out.requires_grad) and state.grad_enabled():
        raise RuntimeError(f"{name}(): functions with out=... arguments don't support "
                           "automatic differentiation, but one of the arguments requires grad.")
    if not ops._can_cast(result.dtype, out.dtype):
        raise RuntimeError(f"result type {ops._TORCH_NAMES[result.dtype.name]} can't be cast to "
                           f"the desired output type {ops._TORCH_NAMES[out.dtype.name]}")
    value = ops.to(result, out.dtype)
    if value is result and state.active_trace() is None:
        value = Tensor(Val(np.array(value._v.data, copy=True)))  # not the result's buffer
    if out.shape != value.shape:
        if out.numel():
            _resize_warning(name, out.shape, value.shape)
        # NOTE: a resize gives out new memory (a NumPy array shared with it keeps its shape).
        out._v = Val(value._v.data, requires_grad=out._v.requires_grad)
        out._version += 1
        return out
    if out.requires_grad and out.is_leaf:
        out._set_leaf_data(np.array(value._v.data, copy=True))  # under no_grad, as PyTorch
        return out
    out._write(value._v)
    return out


@out_writer
def write_out(name: str, result: Any, out: Any) -> Any:
    """Write an op's ``result`` into ``out`` as PyTorch's ``out=``: checked (no autograd, a dtype
    the result can be cast to), cast, resized when the shape differs; returns ``out``."""
    if isinstance(out, (tuple, list)):
        if not isinstance(result, tuple) or len(result) != len(out):
            raise TypeError(f"{name}(): out= expects {_count(result)}, got a tuple of {len(out)}")
        written = [_write_one(name, r, o) for r, o in zip(result, out)]
        return type(result)(*written) if hasattr(result, "_fields") else tuple(written)
    return _write_one(name, result, out)


def _count(result: Any) -> str:
    return f"a tuple of {len(result)} tensors" if isinstance(result, tuple) else "one tensor"
