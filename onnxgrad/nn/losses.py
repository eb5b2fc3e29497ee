"""Losses of ``onnxgrad.nn`` and their ``onnxgrad.nn.functional`` forms, with PyTorch's names,
signatures, defaults and reductions.

Every loss is a composition of existing ops (DESIGN decision 2): autodiff differentiates the
nodes, so nothing here has gradient code. Numerically delicate forms follow PyTorch's own:
``binary_cross_entropy_with_logits`` is the log-sum-exp form (finite for any logit, exact gradient
at 0), ``binary_cross_entropy`` clamps its logarithms at -100.

Class-index losses (``nll_loss``, ``cross_entropy``) check their labels: eagerly from the values,
and inside a compiled step (``og.compile``, ``og.training_step``) by a check output of the graph
that the step inspects after every run (:func:`onnxgrad.tracer.compile.add_check`), so a stale
trace cannot hide a bad label and the failed step changes no state.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..tracer import index_ops, ops, state
from ..tracer.compile import add_check
from ..tracer.ops import ShapeError, _fmt, _where
from ..tracer.registry import op
from ..tracer.tensor import Tensor, Val
from .modules import Module

__all__ = [
    "BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss", "HuberLoss", "KLDivLoss", "L1Loss",
    "MSELoss", "NLLLoss", "SmoothL1Loss",
]


# --------------------------------------------------------------------------- reductions
def _legacy_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """PyTorch's deprecated ``size_average`` / ``reduce`` arguments, mapped as it maps them."""
    if size_average is None and reduce is None:
        return reduction
    warnings.warn("size_average and reduce args will be deprecated, please use "
                  "reduction='mean' or 'sum' or 'none' instead.", UserWarning, stacklevel=3)
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


def _check_reduction(reduction: str, what: str, extra: tuple[str, ...] = ()) -> None:
    if reduction not in ("mean", "sum", "none") + extra:
        raise ValueError(f"{what}: {reduction!r} is not a valid value for reduction (expected "
                         f"{', '.join(repr(r) for r in ('mean', 'sum', 'none') + extra)})"
                         f"{_where()}")


def _reduce(loss: Tensor, reduction: str, what: str) -> Tensor:
    _check_reduction(reduction, what)
    if reduction == "mean":
        return ops.mean(loss)
    if reduction == "sum":
        return ops.sum(loss)
    return loss


def _elementwise_weight(loss: Tensor, weight: Tensor | None, reduction: str, what: str,
                        by_weight: bool = True) -> Tensor:
    """PyTorch 2.13's ``weight`` of mse/l1/huber losses: shaped as the input, and the mean
    divides by the weights' sum (huber's by the element count)."""
    if weight is None:
        return _reduce(loss, reduction, what)
    _check_reduction(reduction, what)
    _check_tensor(what, "weight", weight)
    if weight.shape != loss.shape:
        raise ValueError(f"{what}: Weights and input must have the same size.{_where()}")
    loss = loss * weight
    if reduction == "mean" and by_weight:
        return ops.sum(loss) / ops.sum(weight)
    return _reduce(loss, reduction, what)


def _check_tensor(what: str, name: str, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what}: {name} must be a Tensor, got {type(t).__name__}{_where()}")


def _check_pair(what: str, input: Tensor, target: Tensor) -> None:
    _check_tensor(what, "input", input)
    _check_tensor(what, "target", target)
    if input.shape != target.shape:
        raise ShapeError(f"{what}: input shape {list(input.shape)} and target shape "
                         f"{list(target.shape)} differ{_where()}")


def _check_float(what: str, name: str, t: Tensor) -> None:
    if t.dtype.kind != "f":
        raise TypeError(f"{what}: {name} must be a floating-point tensor, got {t.dtype}"
                        f"{_where()}")


# --------------------------------------------------------------------------- regression losses
@op(functional=True)
def mse_loss(input: Tensor, target: Tensor, size_average: bool | None = None,
             reduce: bool | None = None, reduction: str = "mean",
             weight: Tensor | None = None) -> Tensor:
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _check_pair("mse_loss", input, target)
    diff = input - target
    return _elementwise_weight(diff * diff, weight, reduction, "mse_loss")


@op(functional=True)
def l1_loss(input: Tensor, target: Tensor, size_average: bool | None = None,
            reduce: bool | None = None, reduction: str = "mean",
            weight: Tensor | None = None) -> Tensor:
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _check_pair("l1_loss", input, target)
    return _elementwise_weight(ops.abs(input - target), weight, reduction, "l1_loss")


@op(functional=True)
def smooth_l1_loss(input: Tensor, target: Tensor, size_average: bool | None = None,
                   reduce: bool | None = None, reduction: str = "mean",
                   beta: float = 1.0) -> Tensor:
    """``0.5 d^2 / beta`` where ``|d| < beta``, ``|d| - 0.5 beta`` elsewhere (L1 for beta 0)."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    what = "smooth_l1_loss"
    _check_pair(what, input, target)
    if beta < 0:
        raise ValueError(f"{what}: smooth_l1_loss does not support negative values for beta"
                         f"{_where()}")
    diff = input - target
    dist = ops.abs(diff)
    if beta == 0:
        return _reduce(dist, reduction, what)
    loss = ops.where(ops.lt(dist, float(beta)), diff * diff * (0.5 / beta), dist - 0.5 * beta)
    return _reduce(loss, reduction, what)


@op(functional=True)
def huber_loss(input: Tensor, target: Tensor, reduction: str = "mean", delta: float = 1.0,
               weight: Tensor | None = None) -> Tensor:
    """``0.5 d^2`` where ``|d| <= delta``, ``delta (|d| - 0.5 delta)`` elsewhere."""
    what = "huber_loss"
    _check_pair(what, input, target)
    if delta <= 0:
        raise ValueError(f"{what}: huber_loss does not support non-positive values for delta"
                         f"{_where()}")
    diff = input - target
    dist = ops.abs(diff)
    loss = ops.where(ops.le(dist, float(delta)), diff * diff * 0.5,
                     (dist - 0.5 * delta) * float(delta))
    return _elementwise_weight(loss, weight, reduction, what, by_weight=False)


# --------------------------------------------------------------------------- binary losses
def _log_clamped(x: Tensor) -> Tensor:
    """``max(log(x), -100)`` as PyTorch's BCE, with a finite gradient at ``x == 0``.

    NOTE: ``log`` of a select (1 where x <= 0) keeps the unused branch finite: a plain
    ``clamp(log(x), -100)`` would give 0 * inf = nan in the gradient at 0. The gradient there is
    0 (PyTorch's is (x - t) / 1e-12); elsewhere they agree.
    """
    positive = ops.gt(x, 0.0)
    return ops.maximum(ops.where(positive, ops.log(ops.where(positive, x, 1.0)), -100.0), -100.0)


@op(functional=True)
def binary_cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                         size_average: bool | None = None, reduce: bool | None = None,
                         reduction: str = "mean") -> Tensor:
    """``-w (t log(x) + (1 - t) log(1 - x))`` of probabilities ``x``, each log clamped at -100."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    what = "binary_cross_entropy"
    _check_tensor(what, "input", input)
    _check_tensor(what, "target", target)
    if input.shape != target.shape:
        raise ValueError(f"{what}: Using a target size ({list(target.shape)}) that is different "
                         f"to the input size ({list(input.shape)}) is deprecated. Please ensure "
                         f"they have the same size.{_where()}")
    _check_float(what, "input", input)
    if state.active_trace() is None:
        data = input._v.data
        if ((data < 0) | (data > 1)).any():
            raise RuntimeError(f"{what}: all elements of input should be between 0 and 1"
                               f"{_where()}")
    loss = -(target * _log_clamped(input) + (1.0 - target) * _log_clamped(1.0 - input))
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction, what)


@op(functional=True)
def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Tensor | None = None,
                                     size_average: bool | None = None, reduce: bool | None = None,
                                     reduction: str = "mean",
                                     pos_weight: Tensor | None = None) -> Tensor:
    """``sigmoid`` + BCE in PyTorch's log-sum-exp form: with ``m = max(-x, 0)``,
    ``(1 - t) x + (1 + (pw - 1) t) (m + log(exp(-m) + exp(-x - m)))``.

    NOTE: the gradient of ``m`` cancels out of the formula, so the kink of ``max`` adds nothing
    and the gradient at x = 0 is exact (a softplus written with ``abs`` would give 0 there).
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    what = "binary_cross_entropy_with_logits"
    _check_tensor(what, "input", input)
    _check_tensor(what, "target", target)
    if input.shape != target.shape:
        raise ValueError(f"{what}: Target size ({list(target.shape)}) must be the same as input "
                         f"size ({list(input.shape)}){_where()}")
    _check_float(what, "input", input)
    m = ops.relu(-input)
    softplus_neg = m + ops.log(ops.exp(-m) + ops.exp(-input - m))  # log(1 + exp(-x))
    if pos_weight is not None:
        log_weight = (pos_weight - 1.0) * target + 1.0
        loss = (1.0 - target) * input + log_weight * softplus_neg
    else:
        loss = (1.0 - target) * input + softplus_neg
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction, what)


# --------------------------------------------------------------------------- KL divergence
@op(functional=True)
def kl_div(input: Tensor, target: Tensor, size_average: bool | None = None,
           reduce: bool | None = None, reduction: str = "mean", log_target: bool = False) -> Tensor:
    """Pointwise ``t (log t - x)`` (``exp(t) (t - x)`` for ``log_target``), 0 where ``t == 0``."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    what = "kl_div"
    _check_tensor(what, "input", input)
    _check_tensor(what, "target", target)
    _check_reduction(reduction, what, ("batchmean",))
    if log_target:
        loss = ops.exp(target) * (target - input)
    else:
        # NOTE: xlogy(t, t) as PyTorch: 0 where t == 0, and a log of a select so that the
        # unused branch stays finite for the gradient.
        positive = ops.gt(target, 0.0)
        xlogy = ops.where(positive, target * ops.log(ops.where(positive, target, 1.0)), 0.0)
        loss = xlogy - target * input
    if reduction == "batchmean":
        total = ops.sum(loss)
        return total / float(input.shape[0]) if input.ndim else total
    if reduction == "mean":
        warnings.warn("reduction: 'mean' divides the total loss by both the batch size and the "
                      "support size.'batchmean' divides only by the batch size, and aligns with "
                      "the KL div math definition.'mean' will be changed to behave the same as "
                      "'batchmean' in the next major release.", UserWarning, stacklevel=3)
    return _reduce(loss, reduction, what)


# --------------------------------------------------------------------------- class-index losses
def _class_layout(what: str, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``input`` [N, C, d1...] (or [C]) and ``target`` [N, d1...] (or []) as [M, C] and [M]."""
    if input.ndim == 0:
        raise ShapeError(f"{what}: input tensor should be 1D or more, got a 0-D input{_where()}")
    if input.ndim == 1:
        if target.ndim != 0:
            raise ShapeError(f"{what}: an unbatched input [C] takes a 0-D target, got target "
                             f"of shape {_fmt(target.shape)}{_where()}")
        return ops.unsqueeze(input, 0), ops.reshape(target, [1])
    if target.ndim == 0 or target.shape[0] != input.shape[0]:
        got = target.shape[0] if target.ndim else "none (0-D target)"
        raise ShapeError(f"{what}: Expected input batch_size ({input.shape[0]}) to match target "
                         f"batch_size ({got}): input [N, C] or [N, C, d1...] takes target [N] "
                         f"or [N, d1...], got {_fmt(input.shape)} and {_fmt(target.shape)}"
                         f"{_where()}")
    expected = (input.shape[0],) + input.shape[2:]
    if target.shape != expected:
        raise ShapeError(f"{what}: expected target of shape {_fmt(expected)} for input of shape "
                         f"{_fmt(input.shape)}, got {_fmt(target.shape)}{_where()}")
    classes = input.shape[1]
    if input.ndim > 2:  # classes last, then one row per element
        input = ops.permute(input, [0, *range(2, input.ndim), 1])
    return ops.reshape(input, [-1, classes]), ops.reshape(target, [-1])


def _check_class_range(target: Tensor, classes: int, ignore_index: int) -> None:
    """PyTorch's ``IndexError: Target 5 is out of bounds.``: eagerly from the values; in a trace,
    as a check output of the step's graph (values are per-call data then)."""
    if state.active_trace() is None:
        data = target._v.data
        bad = ((data < 0) | (data >= classes)) & (data != ignore_index)
        if bad.any():
            raise IndexError(_range_message(int(data[bad].reshape(-1)[0]), classes) + _where())
        return
    with state.no_grad():
        in_range = ops.mul(ops.ge(target, 0), ops.lt(target, classes))  # bool * bool: and
        bad = ops.mul(ops.ne(target, ignore_index), ops.logical_not(in_range))
        # The first bad label, when there is one. NOTE: selects and reductions, not ArgMax and a
        # GatherElements over the batch, which onnx's ReferenceEvaluator runs with np.choose
        # (at most 64 choices).
        # Positions computed from the labels, not a constant arange: the graph then holds no
        # batch-sized constant (an export with dynamic_batch=True stays valid at any size).
        ones = ops.add(ops.mul(ops.to(target, np.int64), 0), 1)
        positions = ops.sub(index_ops.cumsum(ones, 0), 1)
        never = Tensor(Val(np.asarray([2**62], np.int64), const=True))  # a batch of 0 too
        first = ops.amin(ops.cat([ops.where(bad, positions, 2**62), never]))
        value = ops.sum(ops.where(ops.eq(positions, first), target, 0))
        flags = ops.to(bad, np.int64)
        where = _where()

        def report(outputs: list[np.ndarray]) -> str | None:
            count, label = outputs
            if int(count) == 0:
                return None
            return _range_message(int(label.reshape(-1)[0]), classes) + where
    add_check([ops.sum(flags), value], report, IndexError)


def _range_message(label: int, classes: int) -> str:
    return f"Target {label} is out of bounds: class indices must be in [0, {classes})"


def _class_weight(what: str, weight: Tensor | None, classes: int, dtype: np.dtype) -> None:
    if weight is None:
        return
    _check_tensor(what, "weight", weight)
    if weight.shape != (classes,):
        raise ShapeError(f"{what}: weight tensor should be defined either for all {classes} "
                         f"classes or no classes but got weight tensor of shape: "
                         f"{_fmt(weight.shape)}{_where()}")
    if weight.dtype != dtype:
        raise TypeError(f"{what}: weight dtype {weight.dtype} does not match input dtype {dtype}"
                        f"{_where()}")


def _nll(what: str, logp: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
         reduction: str) -> Tensor:
    """The shared core of ``nll_loss`` and ``cross_entropy`` for class indices."""
    _check_reduction(reduction, what)
    classes = logp.shape[1] if logp.ndim > 1 else logp.shape[0]
    _class_weight(what, weight, classes, logp.dtype)
    out_shape = target.shape
    rows, labels = _class_layout(what, logp, target)
    labels = ops.to(labels, np.int64)
    _check_class_range(labels, classes, ignore_index)
    if state.active_trace() is None and not (labels._v.data == ignore_index).any():
        # Eager, every label kept (checked in range above): no masks, fewer single-op runs.
        picked = ops.reshape(ops.gather(rows, 1, ops.unsqueeze(labels, 1)), [-1])
        w = None if weight is None else ops.gather(weight, 0, labels)
        loss = -picked if w is None else -(picked * w)
        if reduction == "none":
            return ops.reshape(loss, list(out_shape))
        if reduction == "sum":
            return ops.sum(loss)
        return ops.mean(loss) if w is None else ops.sum(loss) / ops.sum(w)
    keep = ops.ne(labels, ignore_index)
    # An ignored label picks class 0, multiplied by 0 below. So does a label out of range in a
    # compiled step, where the check output reports it after the run (an out-of-range index
    # would stop ONNX Runtime's GatherElements with its own error first).
    in_range = ops.mul(ops.ge(labels, 0), ops.lt(labels, classes))  # bool * bool: and
    safe = ops.where(ops.mul(keep, in_range), labels, 0)
    picked = ops.reshape(ops.gather(rows, 1, ops.unsqueeze(safe, 1)), [-1])
    if weight is not None:
        per_class = ops.expand(ops.unsqueeze(weight, 0), [rows.shape[0], classes])
        w = ops.reshape(ops.gather(per_class, 1, ops.unsqueeze(safe, 1)), [-1])
        w = ops.where(keep, w, 0.0)
        loss = ops.where(keep, -(picked * w), 0.0)
    else:
        w = ops.to(keep, logp.dtype)
        loss = ops.where(keep, -picked, 0.0)
    if reduction == "none":
        return ops.reshape(loss, list(out_shape))
    total = ops.sum(loss)
    # NOTE: PyTorch's mean divides by the summed weights of the kept labels (their count without
    # weights): all labels ignored gives 0 / 0 = nan, as it does.
    return total / ops.sum(w) if reduction == "mean" else total


def _check_labels(what: str, target: Any) -> None:
    if not isinstance(target, Tensor) or target.dtype.kind not in "iu":
        dtype = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"{what}: target must be a tensor of class indices (int64), got "
                        f"{dtype}{_where()}")


@op(functional=True)
def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None,
             size_average: bool | None = None, ignore_index: int = -100,
             reduce: bool | None = None, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of class indices ``target`` under log-probabilities ``input``
    ([N, C] or [N, C, d1, ...] with target [N, d1, ...], or [C] with a 0-D target)."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _check_tensor("nll_loss", "input", input)
    _check_labels("nll_loss", target)
    return _nll("nll_loss", input, target, weight, ignore_index, reduction)


@op(functional=True)
def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                  size_average: bool | None = None, ignore_index: int = -100,
                  reduce: bool | None = None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """``nll_loss(log_softmax(input, 1), target)`` for class indices; for class probabilities
    (a float ``target`` shaped as ``input``), ``-sum(target * log_softmax(input, 1), 1)``."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    what = "cross_entropy"
    _check_tensor(what, "input", input)
    _check_tensor(what, "target", target)
    _check_reduction(reduction, what)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{what}: label_smoothing must be between 0.0 and 1.0. Got: "
                         f"{label_smoothing}{_where()}")
    class_dim = 0 if input.ndim == 1 else 1
    classes = input.shape[class_dim] if input.ndim else 0
    logp = ops.log_softmax(input, class_dim)
    if target.dtype.kind == "f":
        return _cross_entropy_probs(logp, target, weight, ignore_index, reduction,
                                    label_smoothing, class_dim)
    _check_labels(what, target)
    loss = _nll(what, logp, target, weight, ignore_index, reduction)
    if label_smoothing == 0:
        return loss
    # PyTorch's label smoothing: (1 - e) nll + e / C * (the loss against uniform targets).
    shape = [1] * logp.ndim
    shape[class_dim] = classes
    weighted = logp * ops.reshape(weight, shape) if weight is not None else logp
    smooth = -ops.sum(weighted, class_dim)
    keep = ops.ne(target, ignore_index)
    smooth = ops.where(keep, smooth, 0.0)
    if reduction == "mean":
        if weight is not None:
            valid = ops.mul(keep, ops.mul(ops.ge(target, 0), ops.lt(target, classes)))
            safe = ops.reshape(ops.where(valid, target, 0), [-1])
            picked = ops.gather(weight, 0, ops.to(safe, np.int64))
            denominator = ops.sum(ops.where(ops.reshape(keep, [-1]), picked, 0.0))
        else:
            denominator = ops.sum(ops.to(keep, logp.dtype))
        smooth = ops.sum(smooth) / denominator
    elif reduction == "sum":
        smooth = ops.sum(smooth)
    return loss * (1.0 - label_smoothing) + smooth * (label_smoothing / classes)


def _cross_entropy_probs(logp: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                         reduction: str, label_smoothing: float, class_dim: int) -> Tensor:
    what = "cross_entropy"
    if target.shape != logp.shape:
        raise ShapeError(f"{what}: class-probability targets must have the input's shape "
                         f"{_fmt(logp.shape)}, got {_fmt(target.shape)} (class indices must be "
                         f"integers){_where()}")
    if ignore_index >= 0:
        raise ValueError(f"{what}: ignore_index is not supported for floating point target"
                         f"{_where()}")
    classes = logp.shape[class_dim]
    if label_smoothing > 0:
        target = target * (1.0 - label_smoothing) + label_smoothing / classes
    product = logp * target
    if weight is not None:
        _class_weight(what, weight, classes, logp.dtype)
        shape = [1] * logp.ndim
        shape[class_dim] = classes
        product = product * ops.reshape(weight, shape)
    if reduction == "mean":
        rows = max(int(np.prod(logp.shape)) // classes, 0) if classes else 0
        return -ops.sum(product) / float(rows)
    if reduction == "sum":
        return -ops.sum(product)
    return -ops.sum(product, class_dim)


# --------------------------------------------------------------------------- modules
class _Loss(Module):
    def __init__(self, size_average: bool | None = None, reduce: bool | None = None,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _legacy_reduction(size_average, reduce, reduction)


class _WeightedLoss(_Loss):
    def __init__(self, weight: Tensor | None = None, size_average: bool | None = None,
                 reduce: bool | None = None, reduction: str = "mean") -> None:
        super().__init__(size_average, reduce, reduction)
        # As PyTorch: a buffer (in the state dict) when given.
        self.register_buffer("weight", weight)


class L1Loss(_Loss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return l1_loss(input, target, reduction=self.reduction)


class MSELoss(_Loss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return mse_loss(input, target, reduction=self.reduction)


class SmoothL1Loss(_Loss):
    def __init__(self, size_average: bool | None = None, reduce: bool | None = None,
                 reduction: str = "mean", beta: float = 1.0) -> None:
        super().__init__(size_average, reduce, reduction)
        self.beta = beta

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class HuberLoss(_Loss):
    def __init__(self, reduction: str = "mean", delta: float = 1.0) -> None:
        super().__init__(reduction=reduction)
        self.delta = delta

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class KLDivLoss(_Loss):
    def __init__(self, size_average: bool | None = None, reduce: bool | None = None,
                 reduction: str = "mean", log_target: bool = False) -> None:
        super().__init__(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


class BCELoss(_WeightedLoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_Loss):
    def __init__(self, weight: Tensor | None = None, size_average: bool | None = None,
                 reduce: bool | None = None, reduction: str = "mean",
                 pos_weight: Tensor | None = None) -> None:
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(input, target, self.weight,
                                                pos_weight=self.pos_weight,
                                                reduction=self.reduction)


class NLLLoss(_WeightedLoss):
    def __init__(self, weight: Tensor | None = None, size_average: bool | None = None,
                 ignore_index: int = -100, reduce: bool | None = None,
                 reduction: str = "mean") -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                        reduction=self.reduction)


class CrossEntropyLoss(_WeightedLoss):
    def __init__(self, weight: Tensor | None = None, size_average: bool | None = None,
                 ignore_index: int = -100, reduce: bool | None = None, reduction: str = "mean",
                 label_smoothing: float = 0.0) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing)
