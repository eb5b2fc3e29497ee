"""The op registry: each op is defined once, and its public entry points are derived from that.

An op definition is its builder function (which emits the ONNX nodes and carries the signature)
decorated with :func:`op`, whose flags say where the op is public::

    @op(og=True, method=True)
    def exp(x): ...                          # og.exp(x) and x.exp()

    @op(method=("add", "__add__"), reflected="__radd__", inplace=("add_", "__iadd__"))
    def add(a, b, *, alpha=1): ...           # x.add(y), x + y, 1 + x, x.add_(y), x += y

Each flag is False (not there), True (under the function's name) or a name or names:

- ``og``: a function of the ``onnxgrad`` namespace;
- ``functional``: a function of ``onnxgrad.nn.functional``;
- ``method``: a ``Tensor`` method, dunders included (``__add__``); ``reflected`` names take the
  operands swapped (``__radd__``) and ``inplace`` names update the tensor in place with PyTorch's
  checks (``add_``, ``__iadd__``), as declared once by :func:`inplace_variant`.

``onnxgrad/__init__.py`` and ``onnxgrad/nn/functional.py`` take their entries and ``__all__`` from
:func:`namespace`; ``Tensor`` (``tracer/tensor.py``) finds its methods in :data:`METHODS`.
Registering a name twice in one place is an error at import, so two ops cannot silently shadow
each other.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
Names = bool | str | Sequence[str]

NAMESPACES = ("og", "functional")


@dataclasses.dataclass(frozen=True)
class OpDef:
    """One op as it was declared: its builder and where it is public."""

    name: str
    fn: Callable[..., Any]
    og: tuple[str, ...]
    functional: tuple[str, ...]
    methods: tuple[str, ...]
    reflected: tuple[str, ...]
    inplace: tuple[str, ...]


OPS: dict[str, OpDef] = {}
# Tensor attribute name -> function taking the tensor first (operators included).
METHODS: dict[str, Callable[..., Any]] = {}
_ENTRIES: dict[str, dict[str, Callable[..., Any]]] = {ns: {} for ns in NAMESPACES}
_inplace_variant: Callable[[Callable[..., Any], str], Callable[..., Any]] | None = None
_out_writer: Callable[[str, Any, Any], Any] | None = None


def _names(flag: Names, default: str) -> tuple[str, ...]:
    if flag is True:
        return (default,)
    if not flag:
        return ()
    return (flag,) if isinstance(flag, str) else tuple(flag)


def op(*, og: Names = False, functional: Names = False, method: Names = False,
       reflected: str | Sequence[str] = (), inplace: str | Sequence[str] = (),
       name: str | None = None) -> Callable[[F], F]:
    """Declare the decorated builder as an op and publish it where the flags say.

    ``name`` is the op's key in :data:`OPS` when the function's name is taken by another op
    (``nn.functional``'s ``flatten``); True flags still publish the function's name.
    """

    def register(fn: F) -> F:
        op_name = name or fn.__name__
        public = fn.__name__
        spec = OpDef(op_name, fn, _names(og, public), _names(functional, public),
                     _names(method, public), _names(reflected, public), _names(inplace, public))
        if spec.inplace and _inplace_variant is None:
            raise RuntimeError(f"op {op_name!r}: in-place names need inplace_variant first")
        # Everything is checked before anything is registered: a refused op leaves no trace.
        # og. functions take PyTorch's ``out=`` (one entry for all of the op's public names,
        # so og.clip is og.clamp and F.relu is og.relu).
        public_fn = _with_out(fn, spec.og[0]) if spec.og else fn
        claims = [(_ENTRIES[ns], ns, entry, public_fn) for ns in NAMESPACES
                  for entry in getattr(spec, ns)]
        claims += [(METHODS, "Tensor method", attr, fn) for attr in spec.methods]
        claims += [(METHODS, "Tensor method", attr, _reflect(fn, attr))
                   for attr in spec.reflected]
        claims += [(METHODS, "Tensor method", attr, _inplace_variant(fn, attr))
                   for attr in spec.inplace]
        if op_name in OPS:
            raise ValueError(f"op {op_name!r} is defined twice")
        for table, where, entry, _ in claims:
            if entry in table:
                raise ValueError(f"op {op_name!r}: {where} name {entry!r} is already taken by "
                                 f"{table[entry].__qualname__}")
        OPS[op_name] = spec
        for table, _, entry, value in claims:
            table[entry] = value
        return fn

    return register


def inplace_variant(make: Callable[[Callable[..., Any], str], Callable[..., Any]]
                    ) -> Callable[[Callable[..., Any], str], Callable[..., Any]]:
    """Declare how an op's ``inplace`` names update a tensor (PyTorch's checks, then a write).

    ``make(fn, name)`` returns the method; ``tracer/ops.py`` declares it once, before its ops.
    """
    global _inplace_variant
    _inplace_variant = make
    return make


def out_writer(write: Callable[[str, Any, Any], Any]) -> Callable[[str, Any, Any], Any]:
    """Declare how ``out=`` is written: ``write(name, result, out) -> out`` (PyTorch's checks,
    resizing, casting); ``tracer/conversions.py`` declares it once."""
    global _out_writer
    _out_writer = write
    return write


def _with_out(fn: Callable[..., Any], public: str) -> Callable[..., Any]:
    """``fn`` taking PyTorch's ``out=``: the op computes as usual, then its result is written
    into ``out`` (a tensor, or a tuple of them for ops returning several) and ``out`` returned.
    Ops with an ``out`` parameter of their own are left as they are."""
    try:
        if "out" in inspect.signature(fn).parameters:
            return fn
    except (TypeError, ValueError):
        return fn

    @functools.wraps(fn)
    def entry(*args: Any, out: Any = None, **kwargs: Any) -> Any:
        if out is None:
            return fn(*args, **kwargs)
        return _out_writer(public, fn(*args, **kwargs), out)

    return entry


def namespace(ns: str) -> dict[str, Callable[..., Any]]:
    """The entries of ``"og"`` or ``"functional"``, by public name."""
    return dict(_ENTRIES[ns])


def names(ns: str) -> list[str]:
    return sorted(_ENTRIES[ns])


def _reflect(fn: Callable[..., Any], attr: str) -> Callable[..., Any]:
    def reflected(self: Any, other: Any) -> Any:
        return fn(other, self)

    reflected.__name__ = reflected.__qualname__ = attr
    return reflected


class OpMethod:
    """An operator slot of ``Tensor`` (``__add__ = OpMethod()``) dispatching to the op whose
    definition declares that name.

    Python looks operators up on the type, never through ``__getattr__``, so the slots are written
    in the class body; named methods (``x.exp()``) need no slot.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        fn = METHODS.get(self.name)
        if fn is None:
            raise AttributeError(f"no op declares Tensor.{self.name}")
        return fn if obj is None else types.MethodType(fn, obj)


def bound_method(obj: Any, attr: str) -> Any:
    """``obj.attr`` for a named op method, or AttributeError as Python words it."""
    fn = METHODS.get(attr)
    if fn is None or attr.startswith("__"):
        raise AttributeError(f"'{type(obj).__name__}' object has no attribute '{attr}'")
    return types.MethodType(fn, obj)
