"""``og.optim.Adam`` and ``AdamW``: ``torch.optim.Adam``'s single-tensor algorithm as ONNX nodes.

The step count is per-parameter state (a float32 scalar, as PyTorch keeps it) and the bias
corrections are computed in the graph from it, in float64 as PyTorch computes them in Python,
then rounded to the parameter's dtype where PyTorch's kernels round them: the scalars fed to the
graph are float64 for that reason. The order of operations follows PyTorch's CPU kernels
(``lerp``, ``addcmul``, ``addcdiv``), so results agree to the last bits.
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
class AdamFlags:
    """Which terms of the update exist; part of a graph's structure."""

    weight_decay: bool
    decoupled: bool
    amsgrad: bool
    maximize: bool
    lerp_low: bool  # 1 - beta1 < 0.5: PyTorch's lerp then computes exp_avg + w * (g - exp_avg)


class Adam(Optimizer):
    """``torch.optim.Adam(params, lr, betas, eps, weight_decay, amsgrad, *, maximize,
    decoupled_weight_decay)``; ``weight_decay`` is L2 (added to the gradient) unless decoupled."""

    scalar_dtype: ClassVar[np.dtype | None] = np.dtype(np.float64)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, maximize: bool = False,
                 decoupled_weight_decay: bool = False) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay, "amsgrad": amsgrad,
                                  "maximize": maximize,
                                  "decoupled_weight_decay": decoupled_weight_decay})

    def validate(self, group: dict[str, Any]) -> None:
        lr, eps, betas, wd = group["lr"], group["eps"], group["betas"], group["weight_decay"]
        if isinstance(lr, Tensor):
            raise TypeError("lr must be a Python number (it is fed to the graph at every step)")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= wd:
            raise ValueError(f"Invalid weight_decay value: {wd}")

    def structure(self, group: dict[str, Any]) -> AdamFlags:
        return AdamFlags(weight_decay=group["weight_decay"] != 0,
                         decoupled=bool(group["decoupled_weight_decay"]),
                         amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]),
                         lerp_low=1 - group["betas"][0] < 0.5)

    def state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        keys = ("step", "exp_avg", "exp_avg_sq")
        return keys + ("max_exp_avg_sq",) if group["amsgrad"] else keys

    def init_state(self, p: Tensor, group: dict[str, Any], key: str) -> np.ndarray:
        if key == "step":
            return np.zeros((), np.float32)  # PyTorch: torch.tensor(0.0, dtype=float32)
        return np.zeros_like(p._v.data)

    def state_like(self, p: Tensor, key: str) -> tuple[tuple[int, ...], np.dtype]:
        return ((), np.dtype(np.float32)) if key == "step" else (p.shape, p.dtype)

    def hyperparameters(self, group: dict[str, Any]) -> dict[str, Getter]:
        getters: dict[str, Getter] = {
            "lr": lambda: group["lr"], "beta1": lambda: group["betas"][0],
            "beta2": lambda: group["betas"][1], "eps": lambda: group["eps"]}
        if group["weight_decay"] != 0:
            getters["weight_decay"] = lambda: group["weight_decay"]
        return getters

    def update(self, b: Builder, structure: AdamFlags, params: Sequence[ir.Value],
               grads: Sequence[ir.Value], states: Sequence[dict[str, ir.Value | None]],
               hyper: dict[str, ir.Value]) -> tuple[list[ir.Value], list[dict[str, ir.Value]]]:
        f = structure
        lr, beta1, beta2 = hyper["lr"], hyper["beta1"], hyper["beta2"]
        one = b.const(np.asarray(1.0))
        # Scalars PyTorch computes in Python (float64), rounded once to the parameter's dtype.
        one_minus_b1, one_minus_b2 = b.op("Sub", one, beta1), b.op("Sub", one, beta2)
        new_params, new_states = [], []
        for p, g, state in zip(params, grads, states):

            def rounded(scalar: ir.Value, like: ir.Value = p) -> ir.Value:
                return b.op("Cast", scalar, to=like.dtype)

            if f.maximize:
                g = b.op("Neg", g)
            step = b.op("Add", state["step"], b.const(np.asarray(1.0, np.float32)))
            if f.weight_decay:
                wd = hyper["weight_decay"]
                if f.decoupled:  # param.mul_(1 - lr * weight_decay)
                    p = b.op("Mul", p, rounded(b.op("Sub", one, b.op("Mul", lr, wd))))
                else:  # grad.add(param, alpha=weight_decay)
                    g = b.op("Add", g, b.op("Mul", rounded(wd), p))
            m, v = state["exp_avg"], state["exp_avg_sq"]
            # exp_avg.lerp_(grad, 1 - beta1), in the form PyTorch's kernel picks for the weight.
            # NOTE: PyTorch's vectorized kernel fuses the multiply-add (one rounding, two here).
            w = rounded(one_minus_b1)
            if f.lerp_low:
                m = b.op("Add", b.op("Mul", w, b.op("Sub", g, m)), m)
            else:  # end + (weight - 1) * (end - start)
                coeff = b.op("Sub", w, b.const_like(1.0, w))
                m = b.op("Add", b.op("Mul", coeff, b.op("Sub", g, m)), g)
            # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            v = b.op("Mul", v, rounded(beta2))
            v = b.op("Add", v, b.op("Mul", b.op("Mul", rounded(one_minus_b2), g), g))
            steps = b.op("Cast", step, to=ir.DataType.DOUBLE)
            correction1 = b.op("Sub", one, b.op("Pow", beta1, steps))
            correction2 = b.op("Sub", one, b.op("Pow", beta2, steps))
            step_size = b.op("Div", lr, correction1)
            new_state = {"step": step, "exp_avg": m, "exp_avg_sq": v}
            second = v
            if f.amsgrad:
                second = new_state["max_exp_avg_sq"] = b.op("Max", state["max_exp_avg_sq"], v)
            # denom = (v.sqrt() / bias_correction2 ** 0.5).add_(eps)
            denom = b.op("Add", b.op("Div", b.op("Sqrt", second), rounded(b.op("Sqrt", correction2))),
                         rounded(hyper["eps"]))
            # param.addcdiv_(exp_avg, denom, value=-step_size)
            update = b.op("Div", b.op("Mul", rounded(b.op("Neg", step_size)), m), denom)
            new_params.append(b.op("Add", p, update))
            for key, value in new_state.items():
                like = state[key]
                value.shape, value.dtype = like.shape, like.dtype
            new_states.append(new_state)
        return new_params, new_states


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay (default 1e-2)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True)
