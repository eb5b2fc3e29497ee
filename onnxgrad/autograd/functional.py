"""``og.autograd.functional``: ``vjp``, ``jvp``, ``hvp`` and ``vhp`` built on ``grad`` (the
double-backward trick for the forward-mode ones), as ``torch.autograd.functional``."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..tracer.autograd import grad
from ..tracer.factories import zeros_like
from ..tracer.tensor import Tensor


def _tuple(x: Any) -> tuple[Tensor, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x)


def _prepare(inputs: Any) -> tuple[tuple[Tensor, ...], bool]:
    single = isinstance(inputs, Tensor)
    xs = tuple(x.detach().requires_grad_(True) for x in _tuple(inputs))
    return xs, single


def _out(values: tuple[Tensor, ...], single: bool, create_graph: bool) -> Any:
    values = tuple(v if create_graph else v.detach() for v in values)
    return values[0] if single else values


def _grads(outputs: tuple[Tensor, ...], xs: tuple[Tensor, ...], v: tuple[Tensor, ...] | None,
           create_graph: bool) -> tuple[Tensor, ...]:
    found = grad(outputs, xs, grad_outputs=v, create_graph=create_graph, allow_unused=True)
    return tuple(zeros_like(x) if g is None else g for g, x in zip(found, xs))


def vjp(func: Callable[..., Any], inputs: Any, v: Any = None, create_graph: bool = False,
        strict: bool = False) -> tuple[Any, Any]:
    """``(func(inputs), v^T J)``."""
    xs, single = _prepare(inputs)
    out = func(*xs)
    outs = _tuple(out)
    vs = None if v is None else _tuple(v)
    g = _grads(outs, xs, vs, create_graph)
    return (out if create_graph else _out(outs, isinstance(out, Tensor), False),
            _out(g, single, create_graph))


def jvp(func: Callable[..., Any], inputs: Any, v: Any = None, create_graph: bool = False,
        strict: bool = False) -> tuple[Any, Any]:
    """``(func(inputs), J v)`` by differentiating a vector-Jacobian product again."""
    xs, _ = _prepare(inputs)
    out = func(*xs)
    outs = _tuple(out)
    us = tuple(zeros_like(o).requires_grad_(True) for o in outs)
    g = grad(outs, xs, grad_outputs=us, create_graph=True, allow_unused=True)
    pairs = [(gi, vi) for gi, vi in zip(g, _tuple(v)) if gi is not None]
    jv = _grads(tuple(p[0] for p in pairs), us, tuple(p[1] for p in pairs), create_graph)
    return _out(outs, isinstance(out, Tensor), create_graph), _out(jv, isinstance(out, Tensor),
                                                                     create_graph)


def vhp(func: Callable[..., Any], inputs: Any, v: Any = None, create_graph: bool = False,
        strict: bool = False) -> tuple[Any, Any]:
    """``(func(inputs), v^T H)`` of a scalar function."""
    xs, single = _prepare(inputs)
    out = func(*xs)
    if out.numel() != 1:
        raise RuntimeError("The Tensor returned by the function given to hvp should contain a "
                           "single element")
    g = grad(out, xs, create_graph=True)
    hv = _grads(g, xs, _tuple(v), create_graph)
    return _out((out,), True, create_graph), _out(hv, single, create_graph)


def hvp(func: Callable[..., Any], inputs: Any, v: Any = None, create_graph: bool = False,
        strict: bool = False) -> tuple[Any, Any]:
    """``(func(inputs), H v)`` of a scalar function (H is symmetric, so it is ``vhp``)."""
    return vhp(func, inputs, v, create_graph, strict)


__all__ = ["hvp", "jvp", "vhp", "vjp"]
