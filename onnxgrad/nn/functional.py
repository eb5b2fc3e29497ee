"""``onnxgrad.nn.functional``: layers and losses as compositions of the tracer's op builders.

Its entries are the ops declared ``@op(functional=True)``: single ops in ``tracer/ops.py``
(``relu``, ``softmax``, ``linear``, ``dropout``...) and ``tracer/nnops.py`` (``conv2d``, pooling),
and the compositions defined here (``batch_norm``) and in ``losses.py`` (the losses). Nothing
here has gradient code of its own (DESIGN decision 2): every function emits ONNX nodes and
autodiff differentiates those.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..tracer import factories, nnops, ops, registry
from ..tracer.activations import _check_input, _maybe_inplace
from ..tracer.fusion import fused
from ..tracer.registry import op
from ..tracer.state import no_grad, recording_as
from ..tracer.tensor import Tensor


@op(functional=True, name="functional.flatten")
def flatten(x: Tensor, start_dim: int = 1, end_dim: int = -1) -> Tensor:
    return ops.flatten(x, start_dim, end_dim)


@op(functional=True)
@fused
def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """PyTorch's ``batch_norm``: an inference-form ONNX ``BatchNormalization`` node, fed the
    batch statistics in training.

    NOTE: not ``BatchNormalization(training_mode=1)``, whose running variance is the biased one
    (PyTorch keeps the unbiased one) and which ONNX Runtime's inference build does not run. The
    batch mean and variance are reductions before the node, so autodiff carries the gradient
    through them. The running statistics are updated in place (under ``no_grad``, tagged
    ``bn-stats``), so a compiled step outputs their new values. Eagerly its 13 nodes run as one
    session once a signature repeats (``@fused``, ``tracer/fusion.py``).
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


# --------------------------------------------------------------------------- channel dropout
def _channel_dropout(what: str, x: Tensor, p: float, training: bool, batched: bool) -> Tensor:
    """Zero whole channels: one mask value per (sample, channel), scaled by 1 / (1 - p).

    NOTE: the mask is ``rand >= p`` from onnxgrad's factories, so a compiled step draws it with an
    ONNX ``RandomUniform`` node each run, and eager code from ``og.manual_seed``'s generator.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}"
                         f"{ops._where()}")
    if not training or p == 0:
        return x
    if p == 1:
        return ops.mul(x, 0.0)
    channel_dims = 2 if batched else 1
    shape = list(x.shape[:channel_dims]) + [1] * (x.ndim - channel_dims)
    keep = ops.ge(factories.rand(*shape, dtype=x.dtype), float(p))
    return ops.mul(x, ops.mul(ops.to(keep, x.dtype), 1.0 / (1.0 - p)))


@op(functional=True)
def dropout1d(input: Tensor, p: float = 0.5, training: bool = True,
              inplace: bool = False) -> Tensor:
    """``torch.nn.functional.dropout1d``: [N, C, L] or unbatched [C, L]."""
    _check_input("dropout1d", input)
    if input.ndim not in (2, 3):
        raise ops.ShapeError(f"dropout1d: Expected 2D or 3D input, but received a {input.ndim}D "
                             f"input. Note that dropout1d exists to provide channel-wise dropout "
                             f"on inputs with 1 spatial dimension, a channel dimension, and an "
                             f"optional batch dimension (i.e. 2D or 3D inputs).{ops._where()}")
    out = _channel_dropout("dropout1d", input, p, training, batched=input.ndim == 3)
    return _maybe_inplace("dropout1d", input, out, inplace) if out is not input else out


@op(functional=True)
def dropout2d(input: Tensor, p: float = 0.5, training: bool = True,
              inplace: bool = False) -> Tensor:
    """``torch.nn.functional.dropout2d``: [N, C, H, W]; a 3-D input is taken as [N, C, L] with a
    warning, as PyTorch does."""
    _check_input("dropout2d", input)
    if input.ndim not in (3, 4):
        warnings.warn(f"dropout2d: Received a {input.ndim}-D input to dropout2d, which is "
                      f"deprecated and will result in an error in a future release. To retain "
                      f"the behavior and silence this warning, please use dropout instead. Note "
                      f"that dropout2d exists to provide channel-wise dropout on inputs with 2 "
                      f"spatial dimensions, a channel dimension, and an optional batch dimension "
                      f"(i.e. 3D or 4D inputs).", UserWarning, stacklevel=3)
    if input.ndim == 3:
        warnings.warn("dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
                      "1D dropout behavior is desired - input is interpreted as shape (N, C, L), "
                      "where C is the channel dim. This behavior will change in a future release "
                      "to interpret the input as one without a batch dimension, i.e. shape "
                      "(C, H, W). To maintain the 1D channel-wise dropout behavior, please "
                      "switch to using dropout1d instead.", UserWarning, stacklevel=3)
    out = _channel_dropout("dropout2d", input, p, training, batched=input.ndim >= 2)
    return _maybe_inplace("dropout2d", input, out, inplace) if out is not input else out


# --------------------------------------------------------------------------- activations
# Compositions of existing ops (no gradient code); each picks the select that gives PyTorch's
# gradient at the kink (x = 0).
@op(functional=True)
def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """``x`` where ``x > 0``, else ``negative_slope * x`` (gradient ``negative_slope`` at 0)."""
    _check_input("leaky_relu", input)
    out = ops.where(ops.gt(input, 0.0), input, ops.mul(input, float(negative_slope)))
    return _maybe_inplace("leaky_relu", input, out, inplace)


@op(functional=True)
def elu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """``x`` where ``x > 0``, else ``alpha * (exp(x) - 1)``.

    NOTE: the exponential of a select (0 where x > 0), so the unused branch cannot overflow into
    a 0 * inf gradient; a select, not ``min(x, 0)``, whose gradient at the tie x = 0 is halved.
    """
    _check_input("elu", input)
    positive = ops.gt(input, 0.0)
    negative = ops.mul(ops.sub(ops.exp(ops.where(positive, 0.0, input)), 1.0), float(alpha))
    out = ops.where(positive, input, negative)
    return _maybe_inplace("elu", input, out, inplace)


@op(functional=True)
def softplus(input: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """``log(1 + exp(beta x)) / beta``, linear where ``beta x > threshold``.

    NOTE: written ``m + log(exp(-m) + exp(z - m))`` with ``m = max(z, 0)``: it cannot overflow and
    the gradient of ``m`` cancels, so the gradient is sigmoid(z) everywhere, 1/2 at 0 included.
    """
    _check_input("softplus", input)
    z = ops.mul(input, float(beta)) if beta != 1 else input
    m = ops.relu(z)
    soft = ops.add(m, ops.log(ops.add(ops.exp(ops.neg(m)), ops.exp(ops.sub(z, m)))))
    if beta != 1:
        soft = ops.div(soft, float(beta))
    return ops.where(ops.gt(z, float(threshold)), input, soft)


@op(functional=True)
def softsign(input: Tensor) -> Tensor:
    """``x / (1 + |x|)``."""
    _check_input("softsign", input)
    return ops.div(input, ops.add(ops.abs(input), 1.0))


@op(functional=True)
def tanhshrink(input: Tensor) -> Tensor:
    """``x - tanh(x)``."""
    _check_input("tanhshrink", input)
    return ops.sub(input, ops.tanh(input))


@op(functional=True)
def prelu(input: Tensor, weight: Tensor) -> Tensor:
    """``x`` where ``x > 0``, else ``weight * x``, one weight per channel (dim 1) or one for all."""
    _check_input("prelu", input)
    _check_input("prelu", weight)
    count = int(np.prod(weight.shape))
    if count == 1:
        w = ops.reshape(weight, [])
    else:
        if input.ndim < 2 or input.shape[1] != count:
            raise ops.ShapeError(f"prelu: mismatch of parameter numbers and input channel size: "
                                 f"{count} weights for input of shape {list(input.shape)}"
                                 f"{ops._where()}")
        w = ops.reshape(weight, [1, count] + [1] * (input.ndim - 2))
    return ops.where(ops.gt(input, 0.0), input, ops.mul(input, w))


# The losses (their modules too) live in losses.py; importing it registers them.
from . import losses as _losses  # noqa: F401

# Every entry declared @op(functional=True), here and in the tracer's op modules.
globals().update(registry.namespace("functional"))
__all__: list[str] = []
__all__.extend(registry.names("functional"))
