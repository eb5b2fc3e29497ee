"""``onnxgrad.nn.functional``: layers and losses as compositions of the tracer's op builders.

Its entries are the ops declared ``@op(functional=True)``: single ops in ``tracer/ops.py``
(``relu``, ``softmax``, ``linear``, ``dropout``...) and ``tracer/nnops.py`` (``conv2d``, pooling),
and the compositions defined here (``batch_norm``, the losses). Nothing here has gradient code of
its own (DESIGN decision 2): every function emits ONNX nodes and autodiff differentiates those.
"""
from __future__ import annotations

import numpy as np

from ..tracer import nnops, ops, registry, state
from ..tracer.registry import op
from ..tracer.state import no_grad, recording_as
from ..tracer.tensor import Tensor


@op(functional=True, name="functional.flatten")
def flatten(x: Tensor, start_dim: int = 1, end_dim: int = -1) -> Tensor:
    return ops.flatten(x, start_dim, end_dim)


@op(functional=True)
def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """PyTorch's ``batch_norm``: an inference-form ONNX ``BatchNormalization`` node, fed the
    batch statistics in training.

    NOTE: not ``BatchNormalization(training_mode=1)``, whose running variance is the biased one
    (PyTorch keeps the unbiased one) and which ONNX Runtime's inference build does not run. The
    batch mean and variance are reductions before the node, so autodiff carries the gradient
    through them. The running statistics are updated in place (under ``no_grad``, tagged
    ``bn-stats``), so a compiled step outputs their new values.
    """
    if x.ndim < 2:
        raise ops.ShapeError(f"batch_norm: expected at least 2-D input, got {list(x.shape)}")
    channels = x.shape[1]
    axes = [0] + list(range(2, x.ndim))
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm in eval mode needs running_mean and running_var")
        return nnops.batch_normalization(x, weight, bias, running_mean, running_var, eps)
    count = int(np.prod([x.shape[a] for a in axes]))
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {list(x.shape)}{ops._where()}")
    mean = ops.mean(x, axes, keepdim=True)
    centered = x - mean
    var = ops.mean(centered * centered, axes)
    mean = ops.reshape(mean, [channels])
    if running_mean is not None and running_var is not None:
        with no_grad(), recording_as("bn-stats"):
            # PyTorch keeps the unbiased variance: its n/(n-1) folds into the momentum factor.
            running_mean._assign(running_mean * (1 - momentum) + mean * momentum)
            running_var._assign(running_var * (1 - momentum)
                                + var * (momentum * count / (count - 1)))
    return nnops.batch_normalization(x, weight, bias, mean, var, eps)


# --------------------------------------------------------------------------- losses
def _reduce(loss: Tensor, reduction: str, what: str) -> Tensor:
    if reduction == "mean":
        return ops.mean(loss)
    if reduction == "sum":
        return ops.sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"{what}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_pair(what: str, input: Tensor, target: Tensor) -> None:
    if input.shape != target.shape:
        raise ops.ShapeError(f"{what}: input shape {list(input.shape)} and target shape "
                             f"{list(target.shape)} differ{ops._where()}")


@op(functional=True)
def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    _check_pair("mse_loss", input, target)
    diff = input - target
    return _reduce(diff * diff, reduction, "mse_loss")


@op(functional=True)
def l1_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    _check_pair("l1_loss", input, target)
    return _reduce(ops.abs(input - target), reduction, "l1_loss")


@op(functional=True)
def nll_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of class indices ``target`` under log-probabilities ``input``."""
    if not isinstance(target, Tensor) or target.dtype.kind not in "iu":
        dtype = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"nll_loss: target must be a tensor of class indices (int64), got "
                        f"{dtype}; for probabilities use another loss{ops._where()}")
    if input.ndim != 2 or target.shape != input.shape[:1]:
        raise ops.ShapeError(f"nll_loss: expected input [N, C] and target [N], got "
                             f"{list(input.shape)} and {list(target.shape)}{ops._where()}")
    _check_class_range(target, input.shape[1])
    picked = ops.gather(input, 1, ops.unsqueeze(ops.to(target, np.int64), 1))
    return _reduce(-ops.reshape(picked, [input.shape[0]]), reduction, "nll_loss")


def _check_class_range(target: Tensor, classes: int) -> None:
    if state.active_trace() is not None:
        return  # values are per-call data then; ONNX Runtime's GatherElements bounds-checks
    data = target._v.data
    bad = (data < 0) | (data >= classes)
    if bad.any():
        raise IndexError(f"Target {int(data[bad].reshape(-1)[0])} is out of bounds: class indices "
                         f"must be in [0, {classes}){ops._where()}")


@op(functional=True)
def cross_entropy(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """``nll_loss(log_softmax(input, 1), target)`` for class-index targets."""
    if isinstance(target, Tensor) and target.dtype.kind == "f":
        raise TypeError(f"cross_entropy: target has float dtype {target.dtype}; onnxgrad's "
                        f"cross_entropy takes class indices (int64){ops._where()}")
    return nll_loss(ops.log_softmax(input, 1), target, reduction)


# Every entry declared @op(functional=True), here and in the tracer's op modules.
globals().update(registry.namespace("functional"))
__all__: list[str] = []
__all__.extend(registry.names("functional"))
