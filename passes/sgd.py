"""SGD with momentum as ONNX nodes, with ``torch.optim.SGD``'s exact semantics.

``og.optim.SGD.update`` calls it for every parameter: the eager ``optimizer.step()`` and the
update nodes of a compiled training step are the same nodes. Hyperparameters are graph inputs
(scalars), so a learning-rate schedule never changes the graph; only the *structure* (momentum on
or off, weight decay on or off, nesterov, dampening) does.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from .builder import Builder


@dataclass(frozen=True)
class SGDFlags:
    """Which terms of the update exist; part of a graph's structure."""

    momentum: bool = False
    dampening: bool = False
    weight_decay: bool = False
    nesterov: bool = False
    maximize: bool = False


@dataclass
class SGDHyper:
    """Scalar graph values for one parameter group (None where the term is off)."""

    lr: ir.Value
    momentum: ir.Value | None = None
    dampening: ir.Value | None = None  # holds 1 - dampening
    weight_decay: ir.Value | None = None


def _as(b: Builder, scalar: ir.Value, like: ir.Value) -> ir.Value:
    return scalar if scalar.dtype == like.dtype else b.op("Cast", scalar, to=like.dtype)


def sgd_update(b: Builder, param: ir.Value, grad: ir.Value, buf: ir.Value | None,
               hyper: SGDHyper, flags: SGDFlags) -> tuple[ir.Value, ir.Value | None]:
    """Nodes for one parameter's step; returns (new parameter, new momentum buffer or None).

    ``buf`` None with momentum on is PyTorch's first step: the buffer starts as the gradient.
    """
    d_p = b.op("Neg", grad) if flags.maximize else grad
    if flags.weight_decay:
        d_p = b.op("Add", d_p, b.op("Mul", param, _as(b, hyper.weight_decay, param)))
    new_buf = None
    if flags.momentum:
        if buf is None:
            # NOTE: torch.clone(d_p): the buffer must be a value of its own, not the gradient.
            new_buf = b.op("Identity", d_p)
        else:
            scaled = d_p
            if flags.dampening:
                scaled = b.op("Mul", d_p, _as(b, hyper.dampening, param))
            new_buf = b.op("Add", b.op("Mul", buf, _as(b, hyper.momentum, param)), scaled)
        if flags.nesterov:
            d_p = b.op("Add", d_p, b.op("Mul", new_buf, _as(b, hyper.momentum, param)))
        else:
            d_p = new_buf
    new_param = b.op("Sub", param, b.op("Mul", d_p, _as(b, hyper.lr, param)))
    for value in (new_param, new_buf):
        if value is not None:
            value.shape = param.shape
            value.dtype = param.dtype
    return new_param, new_buf
