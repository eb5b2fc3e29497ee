"""Eager tensors whose every operation is an ONNX node, recorded as it runs.

A :class:`Tensor` is a mutable handle on an immutable :class:`~.values.Val` (``tracer/values.py``:
data plus the recorded ONNX node that made it). In-place updates (optimizer steps, running
statistics) swap the handle's Val, so records never change under the graph that reads them.

Recording is a light Python DAG; ``tracer.graph`` turns it into an onnx_ir graph on demand
(backward, compile), which keeps the eager hot path free of IR objects and lets Python's
garbage collector free what the user no longer references.

The ops are defined once each in ``tracer/ops.py`` (and ``nnops.py``, ``nn/functional.py``) with
the Tensor methods they provide (``@op(method=...)``, ``tracer/registry.py``); the class below
lists Python's operator slots, which dispatch to them, and finds named op methods (``x.exp()``)
in the same registry.
"""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from . import device as _device
from . import state
from .dtypes import BY_NUMPY, Size
from .printing import add_suffixes, tensor_body
from .registry import METHODS, OpMethod, bound_method

# Re-exported: the recording core was defined here before it had its own module.
from .values import (  # noqa: F401
    Record,
    TraceError,
    Val,
    _contig,
    attrs_key,
    bool_,
    const,
    emit,
    emit_macro,
    float16,
    float32,
    float64,
    get_default_dtype,
    int8,
    int16,
    int32,
    int64,
    release_traced,
    set_default_dtype,
    uint8,
)


def _check_traceable(what: str) -> None:
    if state.active_trace() is not None:
        where = state.format_frame(state.user_frame())
        raise TraceError(
            f"{what} needs a tensor's value while og.compile is tracing ({where}); "
            "data-dependent Python control flow cannot be compiled into one graph. "
            "Use og.where / tensor ops instead, or call it outside the compiled function."
        )


class Tensor:
    """A torch-like eager tensor backed by NumPy data and recorded as ONNX nodes."""

    __slots__ = ("__weakref__", "_alias_of", "_grad", "_name", "_v", "_version")
    __array_priority__ = 1000  # so ndarray <op> Tensor defers to Tensor's reflected operators

    def __init__(self, val: Val):
        self._v = val
        self._grad: Tensor | None = None
        self._name: str | None = None
        self._version = 0
        self._alias_of: Tensor | None = None  # set on ``x.data``: in-place ops write through

    def __del__(self) -> None:
        v = getattr(self, "_v", None)
        if v is not None and v.rec is not None:
            release_traced(v)

    # ----------------------------------------------------------------- construction helpers
    @classmethod
    def _wrap(cls, val: Val) -> Tensor:
        return cls(val)

    # ----------------------------------------------------------------- properties
    @property
    def data(self) -> Tensor:
        """The value without autograd; in-place ops on it change this tensor too, as PyTorch's
        ``x.data.mul_(2)`` does."""
        alias = self.detach()
        alias._alias_of = self
        return alias

    @data.setter
    def data(self, value: Any) -> None:
        array = value._v.data if isinstance(value, Tensor) else np.asarray(value)
        self._set_leaf_data(np.array(array, dtype=array.dtype, copy=True))

    def _set_leaf_data(self, array: np.ndarray) -> None:
        """Replace the data of a leaf in place (optimizer steps, load_state_dict, ``.data =``)."""
        val = Val(array, requires_grad=self._v.requires_grad)
        val.leaf = self._v.leaf
        self._v = val
        self._version += 1

    def _write(self, val: Val) -> None:
        """Take ``val`` as this handle's value in place (in-place ops, ``copy_``, ``fill_``).

        Records that read the old value keep it, which is what autograd's saved tensors need.
        """
        trace = state.active_trace()
        if self._alias_of is not None:
            self._alias_of._write(val)  # ``x.data.op_()`` changes x
            self._v = Val(val.data) if trace is None else val
        elif trace is not None:
            # Compiled: the update is part of the step; the tensor becomes state it updates.
            old = self._v.rec
            if old is not None and not old.traced and id(self) not in trace.initial:
                raise TraceError(
                    f"og.compile: {state.format_frame(state.user_frame())}: writes in place to a "
                    f"tensor with autograd history from before the call (made by {old.op}); a "
                    f"compiled step cannot update it as eager code does. Detach it first "
                    f"(t = t.detach()) or compute it inside the compiled function")
            trace.remember(self)
            self._v = val
        elif self.requires_grad and self.is_leaf:
            # Under no_grad (an optimizer step): a leaf stays a leaf, .grad and all.
            self._set_leaf_data(val.data)
            return
        else:
            self._v = self._through(val)
        self._version += 1

    def _through(self, val: Val) -> Val:
        """``val`` as this handle's next value, written into the current buffer when that is
        shared with NumPy (og.from_numpy, .numpy()), so the array sees the update as PyTorch's
        does; unless a recorded graph saved the current value for a gradient (then the tensor
        gets new memory, and backward the values it saved). The handle still gets a new Val:
        compiled steps rebind their inputs by Val."""
        old = self._v
        if getattr(old, "shared", None) is True and val.rec is None and old.rec is None \
                and not getattr(old, "saved", False) and old.data.shape == val.data.shape \
                and old.data.dtype == val.data.dtype and old.data.flags.writeable:
            np.copyto(old.data, val.data)
            val = Val(old.data)
            val.shared, val.owner = True, _own_owner(self, old)
        return val

    def _assign(self, value: Tensor) -> None:
        """In-place update of a buffer (running statistics) by a computed value.

        The handle takes the new Val, record included, so a compiled step sees the buffer's new
        value as a graph output.
        """
        if self._v.requires_grad:
            raise RuntimeError("in-place assignment to a tensor that requires grad")
        self._v = self._through(value._v)
        self._version += 1

    @property
    def shape(self) -> Size:
        return Size(self._v.data.shape)

    def size(self, dim: int | None = None):
        return Size(self._v.data.shape) if dim is None else self._v.data.shape[dim]

    @property
    def dtype(self):
        """The element type, an ``og.dtype`` (``onnxgrad.float32``) equal to the NumPy dtype."""
        return BY_NUMPY[self._v.data.dtype]

    @property
    def device(self) -> _device.device:
        """Where this tensor's ops run: the process's compute device (``tracer/device.py``)."""
        return _device.current()

    @property
    def is_cuda(self) -> bool:
        return _device.current().type == "cuda"

    @property
    def ndim(self) -> int:
        return self._v.data.ndim

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return int(self._v.data.size)

    @property
    def requires_grad(self) -> bool:
        return self._v.requires_grad

    @requires_grad.setter
    def requires_grad(self, flag: bool) -> None:
        self.requires_grad_(flag)

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if not self.is_leaf:
            raise RuntimeError(
                "you can only change requires_grad flags of leaf variables; use .detach() first"
            )
        if flag and self.dtype.kind != "f":
            raise RuntimeError(f"only floating point tensors can require gradients, got {self.dtype}")
        if getattr(self._v, "shared", None) is True:
            # Handles made by detach() share a NumPy-shared Val; the flag is this handle's only.
            own = Val(self._v.data)
            own.shared, own.owner = True, _own_owner(self, self._v)
            self._v = own
        self._v.requires_grad = bool(flag)
        self._v.leaf = weakref.ref(self) if flag else None
        return self

    @property
    def is_leaf(self) -> bool:
        return self._v.rec is None or not self._v.requires_grad

    @property
    def grad(self) -> Tensor | None:
        """The accumulated gradient; a non-leaf has one only after ``retain_grad()``."""
        if self._grad is None and not self.is_leaf:
            from . import autograd

            if not autograd.retains_grad(self):
                autograd.non_leaf_grad_warning()
        return self._grad

    @grad.setter
    def grad(self, value: Tensor | None) -> None:
        self._grad = value

    @property
    def grad_fn(self) -> Any:
        """The autograd node that made this tensor (``tracer/autograd.py``); None for leaves."""
        from . import autograd

        return autograd.grad_fn_of(self)

    def retain_grad(self) -> None:
        from . import autograd

        autograd.retain_grad(self)

    @property
    def retains_grad(self) -> bool:
        from . import autograd

        return autograd.retains_grad(self)

    def register_hook(self, hook: Any) -> Any:
        from . import autograd

        return autograd.register_hook(self, hook)

    @property
    def T(self) -> Tensor:
        return self.permute(list(reversed(range(self.ndim))))

    # ----------------------------------------------------------------- values
    def numpy(self, *, force: bool = False) -> np.ndarray:
        """The tensor's buffer itself, shared as PyTorch's: writes through either side are seen
        by the other (see ``og.from_numpy`` for where they cannot be).

        ``force=True`` returns a copy, and is allowed on a tensor that requires grad.
        """
        _check_traceable(".numpy()")
        if force:
            return np.array(self._v.data, copy=True)
        if self.requires_grad:
            raise RuntimeError("Can't call numpy() on Tensor that requires grad. "
                               "Use tensor.detach().numpy() instead.")
        val = self._v
        if getattr(val, "shared", None) == "runner":
            # NOTE: an optimizer's or compiled step's state: the runner rewrites this
            # buffer (the next step in place, or two steps on), so the caller gets a snapshot.
            return np.array(val.data, copy=True)
        val.shared = True
        return val.data

    def item(self) -> Any:
        _check_traceable(".item()")
        if self._v.data.size != 1:
            raise ValueError(
                f"a Tensor with {self._v.data.size} elements cannot be converted to a Scalar"
            )
        return self._v.data.reshape(()).item()

    def tolist(self) -> Any:
        _check_traceable(".tolist()")
        return self._v.data.tolist()

    def __bool__(self) -> bool:
        _check_traceable("bool(tensor) (an `if` or `while` on a tensor)")
        if self._v.data.size != 1:
            raise RuntimeError(
                f"Boolean value of Tensor with {self._v.data.size} elements is ambiguous"
            )
        return bool(self._v.data.reshape(()))

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __index__(self) -> int:
        if self.dtype.kind not in "iub":
            raise TypeError("only integer tensors of a single element can be used as an index")
        return int(self.item())

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype=None, copy=None):
        _check_traceable("np.asarray(tensor)")
        data = self._v.data
        return data if dtype is None else data.astype(dtype)

    def detach(self) -> Tensor:
        if state.active_trace() is not None:
            # Traced, the value must stay connected to where it comes from (a parameter is an
            # input of the compiled step, not a constant baked in at trace time).
            return Tensor(emit("Identity", [self._v], differentiable=False)[0])
        old = self._v
        shared = getattr(old, "shared", None)
        if shared is True and old.rec is None and not old.requires_grad:
            # A buffer shared with NumPy: one Val, so a graph saving it protects both handles.
            return Tensor(old)
        val = Val(old.data)
        if shared == "runner":  # the runner's buffer too: .numpy() must still copy
            val.shared = shared
            from .views import alias  # noqa: PLC0415  (views imports this module)

            alias(old, val)
        return Tensor(val)

    def detach_(self) -> Tensor:
        """Detach in place: the tensor becomes a leaf that does not require grad."""
        owner = self._v.owner
        self._v = self.detach()._v
        if owner is not None and owner() is self and self._v.rec is None:
            self._v.owner = owner  # still the user's tensor (og.compile feeds it as an input)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Tensor:
        """A new leaf with a copy of the data, as PyTorch's: its gradients are its own.

        NOTE: the default deepcopy would share the Val's weak reference to this tensor, so the
        copy's gradients would accumulate into this tensor's ``.grad``.
        """
        if not self.is_leaf:
            raise RuntimeError("Only Tensors created explicitly by the user (graph leaves) "
                               "support the deepcopy protocol at the moment")
        new = type(self).__new__(type(self))
        Tensor.__init__(new, Val(np.array(self._v.data, copy=True)))
        memo[id(self)] = new
        new._name = self._name
        if self._v.owner is not None:  # made by the user: captured by compiled functions as input
            new._v.owner = weakref.ref(new)
        if self.requires_grad:
            new.requires_grad_(True)
        if self.grad is not None:
            new.grad = Tensor(Val(np.array(self.grad._v.data, copy=True)))
        return new

    # ----------------------------------------------------------------- repr
    def __repr__(self) -> str:
        data = self._v.data
        prefix = "tensor("
        body = tensor_body(data, len(prefix))
        extras = []
        if data.size == 0 and data.shape != (0,):
            extras.append(f"size={tuple(data.shape)}")
        # An empty tensor shows any dtype but the default float: nothing to infer it from.
        implied = (get_default_dtype(),) if data.size == 0 else (get_default_dtype(), int64, bool_)
        if data.dtype not in implied:
            extras.append(f"dtype=onnxgrad.{data.dtype}")
        if self._v.rec is not None and self._v.requires_grad:
            extras.append(f"grad_fn=<{self.grad_fn.name()}>")
        elif self._v.requires_grad:
            extras.append("requires_grad=True")
        return add_suffixes(prefix + body, extras, len(prefix))

    __str__ = __repr__

    # ----------------------------------------------------------------- operators and op methods
    # Python finds operators on the type, so their slots are listed here; each dispatches to the
    # op whose definition declares it (``@op(method=("add", "__add__"), reflected="__radd__",
    # inplace=("add_", "__iadd__"))`` in ops.py).
    __add__ = OpMethod()
    __radd__ = OpMethod()
    __iadd__ = OpMethod()
    __sub__ = OpMethod()
    __rsub__ = OpMethod()
    __isub__ = OpMethod()
    __mul__ = OpMethod()
    __rmul__ = OpMethod()
    __imul__ = OpMethod()
    __truediv__ = OpMethod()
    __rtruediv__ = OpMethod()
    __itruediv__ = OpMethod()
    __pow__ = OpMethod()
    __rpow__ = OpMethod()
    __ipow__ = OpMethod()
    __matmul__ = OpMethod()
    __rmatmul__ = OpMethod()
    __neg__ = OpMethod()
    __abs__ = OpMethod()
    __invert__ = OpMethod()
    __eq__ = OpMethod()
    __ne__ = OpMethod()
    __lt__ = OpMethod()
    __le__ = OpMethod()
    __gt__ = OpMethod()
    __ge__ = OpMethod()
    __getitem__ = OpMethod()
    __and__ = OpMethod()
    __rand__ = OpMethod()
    __iand__ = OpMethod()
    __or__ = OpMethod()
    __ror__ = OpMethod()
    __ior__ = OpMethod()
    __xor__ = OpMethod()
    __rxor__ = OpMethod()
    __ixor__ = OpMethod()
    __mod__ = OpMethod()
    __rmod__ = OpMethod()
    __imod__ = OpMethod()
    __floordiv__ = OpMethod()
    __rfloordiv__ = OpMethod()
    __ifloordiv__ = OpMethod()
    __setitem__ = OpMethod()
    __hash__ = object.__hash__  # by identity, as torch.Tensor (__eq__ is elementwise)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: the named op methods (x.exp(), x.sum(1),
        # x.add_(y), x.backward()), declared with their ops.
        return bound_method(self, name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | {m for m in METHODS if not m.startswith("__")})


def _own_owner(t: Tensor, val: Val) -> weakref.ref | None:
    """``val.owner`` when ``t`` is that owner (a tensor made by og.from_numpy), else None: a
    handle made by detach() on the same buffer is not what the user made."""
    owner = val.owner
    return owner if owner is not None and owner() is t else None



def _numpy_typed(data: Any) -> bool:
    """Whether ``data`` carries its dtype (NumPy arrays and scalars, tensors, lists of them),
    as opposed to Python numbers, which take the default dtype."""
    while isinstance(data, (list, tuple)) and data:
        data = data[0]
    return isinstance(data, (np.ndarray, np.generic, Tensor))


def tensor(data: Any, dtype: Any = None, device: Any = None, requires_grad: bool = False,
           pin_memory: bool = False) -> Tensor:
    """A new leaf tensor from Python data, NumPy arrays or tensors (data is copied)."""
    if device is not None:
        _device.check(device)
    if isinstance(data, Tensor):
        array = np.array(data._v.data, copy=True)
    else:
        try:
            array = np.array(data, copy=True)
        except ValueError:
            raise ValueError(_ragged(data) or "og.tensor: data of unequal lengths") from None
    if dtype is not None:
        array = array.astype(np.dtype(dtype), copy=False)
    elif array.dtype.kind == "f":
        # NumPy data keeps its dtype, scalars included (torch.tensor(np.float64(0.5)) is float64)
        array = array.astype(array.dtype if _numpy_typed(data) else get_default_dtype(),
                             copy=False)
    elif array.dtype.kind in "iu" and not _numpy_typed(data):
        array = array.astype(int64, copy=False)
    if array.dtype.kind not in "fiub":
        kind = type(np.ravel(array)[0]).__name__ if array.size else array.dtype.name
        raise TypeError(f"new(): invalid data type '{'str' if array.dtype.kind == 'U' else kind}'")
    t = Tensor(Val(_contig(array)))
    t._v.owner = weakref.ref(t)
    if requires_grad:
        t.requires_grad_(True)
    return t


def _ragged(data: Any, dim: int = 0) -> str | None:
    """PyTorch's message for nested sequences of unequal lengths, or None."""
    if not isinstance(data, (list, tuple)) or not data:
        return None
    lengths = [len(x) if isinstance(x, (list, tuple)) else None for x in data]
    first = lengths[0]
    for n in lengths[1:]:
        if n != first:
            return f"expected sequence of length {first} at dim {dim + 1} (got {n})"
    for x in data:
        if (found := _ragged(x, dim + 1)) is not None:
            return found
    return None


def as_tensor(data: Any, dtype: Any = None, device: Any = None) -> Tensor:
    if device is not None:
        _device.check(device)
    if isinstance(data, Tensor) and (dtype is None or data.dtype == np.dtype(dtype)):
        return data
    if isinstance(data, np.ndarray) and (dtype is None or data.dtype == np.dtype(dtype)) \
            and data.dtype in _SHAREABLE \
            and data.flags.c_contiguous and data.dtype.isnative:
        # As PyTorch's: an array of a tensor dtype is shared, as og.from_numpy shares it.
        val = Val(data)
        val.shared = True
        t = Tensor(val)
        val.owner = weakref.ref(t)
        return t
    return tensor(data, dtype=dtype)


_SHAREABLE = frozenset(np.dtype(n) for n in ("float16", "float32", "float64", "int8", "int16",
                                              "int32", "int64", "uint8", "bool"))
