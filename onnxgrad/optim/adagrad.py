"""``og.optim.Adagrad``: ``torch.optim.Adagrad``'s single-tensor algorithm as ONNX nodes.

The decayed learning rate ``lr / (1 + (step - 1) * lr_decay)`` is computed in the graph in
float64 from the float32 step count, as PyTorch computes it in Python from ``step_t.item()``,
then rounded once to the parameter's dtype where its ``addcdiv`` kernel rounds it. With
``lr_decay`` 0 it is ``lr`` exactly, so no structure flag is needed for it.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from ..passes.builder import Builder
from ..tracer.tensor import Tensor
from .optimizer import Getter, Optimizer


@dataclass(frozen=True)
class AdagradFlags:
    """Which terms of the update exist; part of a graph's structure."""

    weight_decay: bool
    maximize: bool


class Adagrad(Optimizer):
    """``torch.optim.Adagrad(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps,
    *, maximize)``."""

    scalar_dtype: ClassVar[np.dtype | None] = np.dtype(np.float64)

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, lr_decay: float = 0,
                 weight_decay: float = 0, initial_accumulator_value: float = 0,
                 eps: float = 1e-10, *, maximize: bool = False) -> None:
        # PyTorch checks the arguments before building groups, in this order.
        self._check(lr, lr_decay, weight_decay, initial_accumulator_value, eps)
        super().__init__(params, {"lr": lr, "lr_decay": lr_decay, "eps": eps,
                                  "weight_decay": weight_decay,
                                  "initial_accumulator_value": initial_accumulator_value,
                                  "maximize": maximize})
        # NOTE: PyTorch creates every parameter's state in the constructor (step 0 and `sum`
        # filled with initial_accumulator_value), so state_dict() has it before any step.
        for group in self.param_groups:
            for p in group["params"]:
                for key in self.state_keys(group):
                    self.initial_state(p, key, group)

    @staticmethod
    def _check(lr: Any, lr_decay: float, weight_decay: float, initial: float,
               eps: float) -> None:
        if isinstance(lr, Tensor):
            raise TypeError("lr must be a Python number (it is fed to the graph at every step)")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")

    def validate(self, group: dict[str, Any]) -> None:
        self._check(group["lr"], group["lr_decay"], group["weight_decay"],
                    group["initial_accumulator_value"], group["eps"])

    def structure(self, group: dict[str, Any]) -> AdagradFlags:
        return AdagradFlags(weight_decay=group["weight_decay"] != 0,
                            maximize=bool(group["maximize"]))

    def state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("step", "sum")

    def init_state(self, p: Tensor, group: dict[str, Any], key: str) -> np.ndarray:
        if key == "step":
            return np.zeros((), np.float32)  # PyTorch: torch.tensor(0.0, dtype=float32)
        # torch.full_like(p, initial_accumulator_value): the value rounded to p's dtype.
        return np.full_like(p._v.data, group["initial_accumulator_value"])

    def state_like(self, p: Tensor, key: str) -> tuple[tuple[int, ...], np.dtype]:
        return ((), np.dtype(np.float32)) if key == "step" else (p.shape, p.dtype)

    def hyperparameters(self, group: dict[str, Any]) -> dict[str, Getter]:
        getters: dict[str, Getter] = {"lr": lambda: group["lr"],
                                      "lr_decay": lambda: group["lr_decay"],
                                      "eps": lambda: group["eps"]}
        if group["weight_decay"] != 0:
            getters["weight_decay"] = lambda: group["weight_decay"]
        return getters

    def update(self, b: Builder, structure: AdagradFlags, params: Sequence[ir.Value],
               grads: Sequence[ir.Value], states: Sequence[dict[str, ir.Value | None]],
               hyper: dict[str, ir.Value]) -> tuple[list[ir.Value], list[dict[str, ir.Value]]]:
        f = structure
        one = b.const(np.asarray(1.0))
        new_params, new_states = [], []
        for p, g, state in zip(params, grads, states):

            def rounded(scalar: ir.Value, like: ir.Value = p) -> ir.Value:
                return b.op("Cast", scalar, to=like.dtype)

            step = b.op("Add", state["step"], b.const(np.asarray(1.0, np.float32)))
            if f.maximize:
                g = b.op("Neg", g)
            if f.weight_decay:  # grad.add(param, alpha=weight_decay)
                g = b.op("Add", g, b.op("Mul", rounded(hyper["weight_decay"]), p))
            # clr = lr / (1 + (step - 1) * lr_decay), in Python floats
            steps = b.op("Cast", step, to=ir.DataType.DOUBLE)
            clr = b.op("Div", hyper["lr"], b.op("Add", one, b.op("Mul", b.op("Sub", steps, one),
                                                                 hyper["lr_decay"])))
            # state_sum.addcmul_(grad, grad, value=1); std = state_sum.sqrt().add_(eps)
            total = b.op("Add", state["sum"], b.op("Mul", g, g))
            std = b.op("Add", b.op("Sqrt", total), rounded(hyper["eps"]))
            # param.addcdiv_(grad, std, value=-clr)
            new_p = b.op("Add", p, b.op("Div", b.op("Mul", rounded(b.op("Neg", clr)), g), std))
            new_params.append(new_p)
            new_state = {"step": step, "sum": total}
            for key, value in new_state.items():
                like = state[key]
                value.shape, value.dtype = like.shape, like.dtype
            new_states.append(new_state)
        return new_params, new_states
