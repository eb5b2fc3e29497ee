"""``og.optim.SGD``: ``torch.optim.SGD``'s exact semantics as ONNX nodes.

Hyperparameters are graph inputs (scalars), so a learning-rate schedule never changes the graph;
only the *structure* (momentum on or off, weight decay on or off, nesterov, dampening) does.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import onnx_ir as ir

from ..passes.builder import Builder
from ..tracer.tensor import Tensor
from .optimizer import Getter, Optimizer, as_dtype_of


@dataclass(frozen=True)
class SGDFlags:
    """Which terms of the update exist; part of a graph's structure."""

    momentum: bool = False
    dampening: bool = False
    weight_decay: bool = False
    nesterov: bool = False
    maximize: bool = False


class SGD(Optimizer):
    """``torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov, maximize)``."""

    state_names: ClassVar[dict[str, str]] = {"momentum_buffer": "momentum"}

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float = 0, nesterov: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov,
                                  "maximize": maximize})

    def validate(self, group: dict[str, Any]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        if isinstance(lr, Tensor):
            raise TypeError("lr must be a Python number (it is fed to the graph at every step)")
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if group["weight_decay"] < 0:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if group["nesterov"] and (momentum <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def structure(self, group: dict[str, Any]) -> SGDFlags:
        return SGDFlags(momentum=group["momentum"] != 0, dampening=group["dampening"] != 0,
                        weight_decay=group["weight_decay"] != 0, nesterov=bool(group["nesterov"]),
                        maximize=bool(group["maximize"]))

    def state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def first_step_creates(self, group: dict[str, Any], key: str) -> bool:
        # PyTorch's first step is buf = clone(d_p), with no dampening. NOTE: without dampening
        # a zero buffer gives that exactly (momentum * 0 + d_p == d_p), so the first step has
        # the graph of every later one.
        return group["dampening"] != 0

    def hyperparameters(self, group: dict[str, Any]) -> dict[str, Getter]:
        # Only the terms the structure has; dampening is fed as 1 - dampening.
        getters: dict[str, Getter] = {"lr": lambda: group["lr"]}
        if group["momentum"] != 0:
            getters["momentum"] = lambda: group["momentum"]
            if group["dampening"] != 0:
                getters["dampening"] = lambda: 1 - group["dampening"]
        if group["weight_decay"] != 0:
            getters["weight_decay"] = lambda: group["weight_decay"]
        return getters

    def update(self, b: Builder, structure: SGDFlags, params: Sequence[ir.Value],
               grads: Sequence[ir.Value], states: Sequence[dict[str, ir.Value | None]],
               hyper: dict[str, ir.Value]) -> tuple[list[ir.Value], list[dict[str, ir.Value]]]:
        new_params, new_states = [], []
        for p, g, state in zip(params, grads, states):
            new_p, new_buf = _update(b, p, g, state.get("momentum_buffer"), hyper, structure)
            new_params.append(new_p)
            new_states.append({} if new_buf is None else {"momentum_buffer": new_buf})
        return new_params, new_states


def _update(b: Builder, param: ir.Value, grad: ir.Value, buf: ir.Value | None,
            hyper: dict[str, ir.Value], flags: SGDFlags) -> tuple[ir.Value, ir.Value | None]:
    """One parameter's step; returns (new parameter, new momentum buffer or None).

    ``buf`` None with momentum on is PyTorch's first step: the buffer starts as the gradient.
    """

    def h(name: str) -> ir.Value:
        return as_dtype_of(b, hyper[name], param)

    d_p = b.op("Neg", grad) if flags.maximize else grad
    if flags.weight_decay:
        d_p = b.op("Add", d_p, b.op("Mul", param, h("weight_decay")))
    new_buf = None
    if flags.momentum:
        if buf is None:
            # NOTE: torch.clone(d_p): the buffer must be a value of its own, not the gradient.
            new_buf = b.op("Identity", d_p)
        else:
            scaled = d_p
            if flags.dampening:  # the input holds 1 - dampening
                scaled = b.op("Mul", d_p, h("dampening"))
            new_buf = b.op("Add", b.op("Mul", buf, h("momentum")), scaled)
        if flags.nesterov:
            d_p = b.op("Add", d_p, b.op("Mul", new_buf, h("momentum")))
        else:
            d_p = new_buf
    new_param = b.op("Sub", param, b.op("Mul", d_p, h("lr")))
    for value in (new_param, new_buf):
        if value is not None:
            value.shape, value.dtype = param.shape, param.dtype
    return new_param, new_buf
