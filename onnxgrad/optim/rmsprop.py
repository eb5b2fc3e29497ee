"""``og.optim.RMSprop``: ``torch.optim.RMSprop``'s single-tensor algorithm as ONNX nodes.

As in ``adam.py``: the scalars are fed as float64 (PyTorch computes ``1 - alpha`` in Python) and
rounded to the parameter's dtype where PyTorch's kernels round them; the order of operations
follows PyTorch's CPU kernels (``addcmul``, ``lerp``, ``addcdiv``), so results agree to the
last bits. The step count is per-parameter float32 state that the update only counts, as PyTorch.
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
class RMSpropFlags:
    """Which terms of the update exist; part of a graph's structure."""

    weight_decay: bool
    momentum: bool
    centered: bool
    maximize: bool
    lerp_low: bool  # 1 - alpha < 0.5: PyTorch's lerp of grad_avg then starts from grad_avg


class RMSprop(Optimizer):
    """``torch.optim.RMSprop(params, lr, alpha, eps, weight_decay, momentum, centered, *,
    maximize)``."""

    scalar_dtype: ClassVar[np.dtype | None] = np.dtype(np.float64)

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0, momentum: float = 0,
                 centered: bool = False, *, maximize: bool = False) -> None:
        # NOTE: PyTorch's positional order continues with capturable and foreach, which have no
        # meaning here, so maximize is keyword-only.
        super().__init__(params, {"lr": lr, "momentum": momentum, "alpha": alpha, "eps": eps,
                                  "centered": centered, "weight_decay": weight_decay,
                                  "maximize": maximize})

    def validate(self, group: dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            raise TypeError("lr must be a Python number (it is fed to the graph at every step)")
        # PyTorch's checks, in its order and words.
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        if not 0.0 <= group["momentum"]:
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if not 0.0 <= group["alpha"]:
            raise ValueError(f"Invalid alpha value: {group['alpha']}")

    def structure(self, group: dict[str, Any]) -> RMSpropFlags:
        return RMSpropFlags(weight_decay=group["weight_decay"] != 0,
                            momentum=group["momentum"] > 0, centered=bool(group["centered"]),
                            maximize=bool(group["maximize"]),
                            lerp_low=abs(float(np.float32(1 - group["alpha"]))) < 0.5)

    def state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        keys: tuple[str, ...] = ("step", "square_avg")
        if group["momentum"] > 0:
            keys += ("momentum_buffer",)
        if group["centered"]:
            keys += ("grad_avg",)
        return keys

    def init_state(self, p: Tensor, group: dict[str, Any], key: str) -> np.ndarray:
        if key == "step":
            return np.zeros((), np.float32)  # PyTorch: torch.zeros((), dtype=float32)
        return np.zeros_like(p._v.data)

    def state_like(self, p: Tensor, key: str) -> tuple[tuple[int, ...], np.dtype]:
        return ((), np.dtype(np.float32)) if key == "step" else (p.shape, p.dtype)

    def hyperparameters(self, group: dict[str, Any]) -> dict[str, Getter]:
        getters: dict[str, Getter] = {"lr": lambda: group["lr"], "alpha": lambda: group["alpha"],
                                      "eps": lambda: group["eps"]}
        if group["weight_decay"] != 0:
            getters["weight_decay"] = lambda: group["weight_decay"]
        if group["momentum"] > 0:
            getters["momentum"] = lambda: group["momentum"]
        return getters

    def update(self, b: Builder, structure: RMSpropFlags, params: Sequence[ir.Value],
               grads: Sequence[ir.Value], states: Sequence[dict[str, ir.Value | None]],
               hyper: dict[str, ir.Value]) -> tuple[list[ir.Value], list[dict[str, ir.Value]]]:
        f = structure
        alpha = hyper["alpha"]
        one_minus_alpha = b.op("Sub", b.const(np.asarray(1.0)), alpha)  # in float64, as Python
        neg_lr = b.op("Neg", hyper["lr"])
        new_params, new_states = [], []
        for p, g, state in zip(params, grads, states):

            def rounded(scalar: ir.Value, like: ir.Value = p) -> ir.Value:
                return b.op("Cast", scalar, to=like.dtype)

            if f.maximize:
                g = b.op("Neg", g)
            new_state = {"step": b.op("Add", state["step"],
                                      b.const(np.asarray(1.0, np.float32)))}
            if f.weight_decay:  # grad.add(param, alpha=weight_decay)
                g = b.op("Add", g, b.op("Mul", rounded(hyper["weight_decay"]), p))
            # square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
            sq = b.op("Mul", state["square_avg"], rounded(alpha))
            sq = b.op("Add", sq, b.op("Mul", b.op("Mul", rounded(one_minus_alpha), g), g))
            new_state["square_avg"] = sq
            if f.centered:
                # grad_avg.lerp_(grad, 1 - alpha), in the form PyTorch's kernel picks.
                ga, w = state["grad_avg"], rounded(one_minus_alpha)
                if f.lerp_low:
                    ga = b.op("Add", ga, b.op("Mul", w, b.op("Sub", g, ga)))
                else:  # end - (end - start) * (1 - weight)
                    ga = b.op("Sub", g, b.op("Mul", b.op("Sub", g, ga),
                                             b.op("Sub", b.const_like(1.0, w), w)))
                new_state["grad_avg"] = ga
                # square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
                avg = b.op("Sqrt", b.op("Sub", sq, b.op("Mul", ga, ga)))
            else:
                avg = b.op("Sqrt", sq)
            avg = b.op("Add", avg, rounded(hyper["eps"]))
            if f.momentum:
                # buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
                buf = b.op("Mul", state["momentum_buffer"], rounded(hyper["momentum"]))
                buf = b.op("Add", buf, b.op("Div", g, avg))
                new_state["momentum_buffer"] = buf
                new_p = b.op("Add", p, b.op("Mul", rounded(neg_lr), buf))
            else:  # param.addcdiv_(grad, avg, value=-lr)
                new_p = b.op("Add", p, b.op("Div", b.op("Mul", rounded(neg_lr), g), avg))
            new_params.append(new_p)
            for key, value in new_state.items():
                like = state[key]
                value.shape, value.dtype = like.shape, like.dtype
            new_states.append(new_state)
        return new_params, new_states
