"""The op table of ``onnxgrad.nn.functional``'s layers and losses, and of ``tracer.ops``'s layer
builders (``linear``, ``gather``, ``dropout``), checked three ways by ``opcheck``.

The ops that already have rows elsewhere are not repeated: ``relu``, ``softmax``,
``log_softmax``, ``sigmoid``, ``tanh`` (tests/test_ops.py), convolutions and pools
(tests/test_nn_ops.py). ``dropout`` is random, so it cannot be a plain row (the forward has no
NumPy reference, and ONNX Runtime and the reference evaluator draw different masks): its checks
are written out below the table.

NumPy references follow PyTorch's semantics (batch statistics with the biased variance for
normalising, the unbiased one for the running variance; losses' reductions).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator
from onnxgrad.runtime import make_session
from onnxgrad.tracer import ops
from onnxgrad.tracer.autograd import backward, gradient_model
from onnxgrad.tracer.tensor import emit
from opcheck import (
    OpCase,
    arg,
    case,
    check_onnx_model,
    fixed,
    index,
    pos,
    table_tests,
)

import onnxgrad as og

F = og.nn.functional


# =========================================================================== NumPy references
def np_linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    y = x @ w.T
    return y if b is None else y + b


def np_gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None, transA: int = 0,
            transB: int = 0, alpha: float = 1.0, beta: float = 1.0) -> np.ndarray:
    y = alpha * ((a.T if transA else a) @ (b.T if transB else b))
    return (y if c is None else y + beta * c).astype(a.dtype)


def gemm(**attrs: Any) -> Callable[..., og.Tensor]:
    """A raw ONNX ``Gemm`` node: ``linear`` only makes transB=1, but graphs imported for
    training (``og.training_step``) carry any flags, alpha and beta, with the same rule."""
    def fn(*xs: og.Tensor) -> og.Tensor:
        return og.Tensor(emit("Gemm", [x._v for x in xs], attrs)[0])
    return fn


def np_gather(x: np.ndarray, dim: int, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, idx, axis=dim)


def _channel_shape(x: np.ndarray) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def np_batch_norm_train(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None,
                        running_mean: np.ndarray, running_var: np.ndarray, momentum: float = 0.1,
                        eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's training-mode batch norm: (output, new running_mean, new running_var)."""
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)  # biased: normalises the batch
    y = (x - mean) / np.sqrt(var + eps)
    if w is not None:
        y = y * w.reshape(_channel_shape(x))
    if b is not None:
        y = y + b.reshape(_channel_shape(x))
    n = x.size // x.shape[1]
    unbiased = var.reshape(-1) * n / (n - 1)  # the running variance is the unbiased one
    new_mean = (1 - momentum) * running_mean + momentum * mean.reshape(-1)
    new_var = (1 - momentum) * running_var + momentum * unbiased
    return y.astype(x.dtype), new_mean.astype(x.dtype), new_var.astype(x.dtype)


def np_batch_norm_eval(x: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray,
                       w: np.ndarray | None, b: np.ndarray | None, eps: float = 1e-5
                       ) -> np.ndarray:
    shape = _channel_shape(x)
    y = (x - running_mean.reshape(shape)) / np.sqrt(running_var.reshape(shape) + eps)
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y.astype(x.dtype)


def np_log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    s = x - x.max(axis=axis, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def np_reduce(loss: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "mean":
        return np.asarray(loss.mean(), dtype=loss.dtype)
    if reduction == "sum":
        return np.asarray(loss.sum(), dtype=loss.dtype)
    return loss


def np_nll_loss(logp: np.ndarray, target: np.ndarray, reduction: str = "mean") -> np.ndarray:
    return np_reduce(-logp[np.arange(len(target)), target], reduction)


def np_cross_entropy(x: np.ndarray, target: np.ndarray, reduction: str = "mean") -> np.ndarray:
    return np_nll_loss(np_log_softmax(x, 1), target, reduction)


def np_mse_loss(x: np.ndarray, t: np.ndarray, reduction: str = "mean") -> np.ndarray:
    return np_reduce((x - t) ** 2, reduction)


def np_l1_loss(x: np.ndarray, t: np.ndarray, reduction: str = "mean") -> np.ndarray:
    return np_reduce(np.abs(x - t), reduction)


# =========================================================================== rows
def batch_norm_train(x: og.Tensor, w: og.Tensor | None = None, b: og.Tensor | None = None
                     ) -> tuple[og.Tensor, og.Tensor, og.Tensor]:
    """Training-mode batch norm on fresh running statistics (the checks call it repeatedly);
    the updated statistics are outputs too, so the forward check compares them (no gradient
    flows into them: PyTorch updates them under no_grad)."""
    c = x.shape[1]
    running_mean = og.full((c,), 0.5, dtype=x.dtype)
    running_var = og.full((c,), 2.0, dtype=x.dtype)
    y = F.batch_norm(x, running_mean, running_var, w, b, training=True)
    return y, running_mean, running_var


def np_bn_train_ref(x: np.ndarray, w: np.ndarray | None = None, b: np.ndarray | None = None):
    c = x.shape[1]
    return np_batch_norm_train(x, w, b, np.full(c, 0.5, x.dtype), np.full(c, 2.0, x.dtype))


# Class-index targets, fixed: every class row below has 4 classes and 5 samples (class 2 twice,
# so the scatter-add of the gradient accumulates).
TARGET = [2, 0, 3, 2, 1]
# Regression targets sit at fixed points that the random inputs keep away from (l1's kink).
REG_TARGET = np.array([[0.0, 1.0, -1.0], [0.5, -0.5, 1.5]], dtype=np.float32)
KINKS = (0.0, 1.0, -1.0, 0.5, -0.5, 1.5)
GATHER_IDX = np.array([[0, 2, 2], [1, 0, 1]])  # repeated: the gradient scatter-adds

CASES: list[OpCase] = [
    # ------------------------------------------------------------------ linear
    case("linear/gemm-bias", F.linear, np_linear, (4, 3), (5, 3), (5,)),
    case("linear/gemm-no-bias", F.linear, np_linear, (4, 3), (5, 3)),
    case("linear/gemm-one-sample", F.linear, np_linear, (1, 3), (2, 3), (2,)),
    case("linear/3d-bias", F.linear, np_linear, (2, 4, 3), (5, 3), (5,)),
    case("linear/3d-no-bias", F.linear, np_linear, (2, 4, 3), (5, 3)),
    case("linear/1d-bias", F.linear, np_linear, (3,), (5, 3), (5,)),
    case("gemm/plain", gemm(), np_gemm, (4, 3), (3, 5), (5,)),
    case("gemm/transA", gemm(transA=1), lambda a, b, c: np_gemm(a, b, c, transA=1),
         (3, 4), (3, 5), (4, 5)),
    case("gemm/transB", gemm(transB=1), lambda a, b: np_gemm(a, b, transB=1), (4, 3), (5, 3)),
    case("gemm/transA-transB-alpha-beta", gemm(transA=1, transB=1, alpha=0.5, beta=-2.0),
         lambda a, b, c: np_gemm(a, b, c, 1, 1, 0.5, -2.0), (3, 4), (5, 3), (4, 1)),
    case("gemm/alpha-scalar-c", gemm(alpha=2.0, beta=0.5),
         lambda a, b, c: np_gemm(a, b, c, alpha=2.0, beta=0.5), (2, 3), (3, 2), ()),
    # ------------------------------------------------------------------ gather (GatherElements)
    case("gather/dim1", lambda x, i: ops.gather(x, 1, i), lambda x, i: np_gather(x, 1, i),
         (2, 4), index(GATHER_IDX)),
    case("gather/dim0", lambda x, i: ops.gather(x, 0, i), lambda x, i: np_gather(x, 0, i),
         (3, 3), index(GATHER_IDX)),
    case("gather/dim-negative", lambda x, i: ops.gather(x, -1, i),
         lambda x, i: np_gather(x, -1, i), (2, 4), index(GATHER_IDX)),
    case("gather/3d", lambda x, i: ops.gather(x, 1, i), lambda x, i: np_gather(x, 1, i),
         (2, 3, 4), index(np.random.default_rng(0).integers(0, 3, (2, 5, 4)))),
    # ------------------------------------------------------------------ batch_norm
    case("batch_norm/train-4d-affine", batch_norm_train, np_bn_train_ref,
         (3, 2, 4, 3), (2,), (2,), rtol=1e-4, atol=1e-5, grad_rtol=1e-5),
    case("batch_norm/train-4d-no-affine", batch_norm_train, np_bn_train_ref,
         (2, 3, 2, 2), rtol=1e-4, atol=1e-5, grad_rtol=1e-5),
    case("batch_norm/train-2d", batch_norm_train, np_bn_train_ref, (6, 3), (3,), (3,),
         rtol=1e-4, atol=1e-5, grad_rtol=1e-5),
    case("batch_norm/train-3d", batch_norm_train, np_bn_train_ref, (2, 3, 5), (3,), (3,),
         rtol=1e-4, atol=1e-5, grad_rtol=1e-5),
    case("batch_norm/eval-4d-affine",
         lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b, training=False),
         np_batch_norm_eval, (2, 3, 4, 3), (3,), pos(3), (3,), (3,)),
    case("batch_norm/eval-4d-no-affine",
         lambda x, m, v: F.batch_norm(x, m, v, training=False),
         lambda x, m, v: np_batch_norm_eval(x, m, v, None, None), (2, 3, 2, 2), (3,), pos(3)),
    case("batch_norm/eval-2d-eps",
         lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b, training=False, eps=0.1),
         lambda x, m, v, w, b: np_batch_norm_eval(x, m, v, w, b, eps=0.1),
         (5, 4), (4,), pos(4), (4,), (4,)),
    # ------------------------------------------------------------------ flatten
    case("flatten/functional-default", F.flatten, lambda x: x.reshape(2, -1), (2, 3, 4)),
    case("flatten/functional-middle", lambda x: F.flatten(x, 1, 2),
         lambda x: x.reshape(2, 12, 2), (2, 3, 4, 2)),
    case("flatten/functional-all", lambda x: F.flatten(x, 0), lambda x: x.reshape(-1), (2, 3)),
]

for _r in ("mean", "sum", "none"):
    CASES += [
        case(f"nll_loss/{_r}", lambda x, t, r=_r: F.nll_loss(x, t, reduction=r),
             lambda x, t, r=_r: np_nll_loss(x, t, r), (5, 4), index(TARGET)),
        case(f"cross_entropy/{_r}", lambda x, t, r=_r: F.cross_entropy(x, t, reduction=r),
             lambda x, t, r=_r: np_cross_entropy(x, t, r), (5, 4), index(TARGET)),
        case(f"mse_loss/{_r}", lambda x, t, r=_r: F.mse_loss(x, t, reduction=r),
             lambda x, t, r=_r: np_mse_loss(x, t, r), (2, 3), fixed(REG_TARGET)),
        case(f"l1_loss/{_r}", lambda x, t, r=_r: F.l1_loss(x, t, reduction=r),
             lambda x, t, r=_r: np_l1_loss(x, t, r), (2, 3), fixed(REG_TARGET),
             avoid=KINKS, margin=0.02),
    ]
CASES += [
    case("mse_loss/3d", F.mse_loss, np_mse_loss, (2, 2, 3), (2, 2, 3)),
    case("cross_entropy/one-sample", F.cross_entropy, np_cross_entropy, (1, 3), index([1])),
    case("nll_loss/int32-target", F.nll_loss, lambda x, t: np_nll_loss(x, t.astype(np.int64)),
         (3, 4), fixed(np.array([3, 0, 3]), "int32")),
]



# ------------------------------------------------------------------ issue 11: losses, activations
def np_softplus(x, beta=1.0, threshold=20.0):
    return np.where(beta * x > threshold, x, np.log1p(np.exp(beta * x)) / beta)


def np_xlogy(t):
    return np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0)


def np_weighted_nll(logp, t, w, ignore, reduction):
    """PyTorch's nll_loss over [N, C, d...] with class weights and an ignored label."""
    rows = np.moveaxis(logp, 1, -1).reshape(-1, logp.shape[1])
    flat = t.reshape(-1)
    keep = flat != ignore
    safe = np.where(keep, flat, 0)
    wt = w[safe] * keep
    loss = -rows[np.arange(len(flat)), safe] * wt
    if reduction == "none":
        return loss.reshape(t.shape)
    return loss.sum() / wt.sum() if reduction == "mean" else loss.sum()


def np_smoothed_ce(x, t, w, ignore, eps, reduction):
    logp = np_log_softmax(x, 1)
    nll = np_weighted_nll(logp, t, w, ignore, reduction)
    smooth = -(logp * w.reshape(1, -1, *([1] * (x.ndim - 2)))).sum(1) * (t != ignore)
    if reduction == "mean":
        smooth = smooth.sum() / (w[np.where(t != ignore, t, 0)] * (t != ignore)).sum()
    elif reduction == "sum":
        smooth = smooth.sum()
    return (1 - eps) * nll + smooth * eps / x.shape[1]


LOSS_W = np.array([0.5, 2.0, 1.0, 1.5], dtype=np.float32)


def _w(x: og.Tensor, n: int = 4) -> og.Tensor:
    return og.tensor(LOSS_W[:n].astype(x.dtype))  # the VJP check runs in float64


ND_TARGET = np.array([[2, 0, 3], [1, 1, 0]])
PROBS = np.array([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]], dtype=np.float32)
for _r in ("mean", "sum", "none"):
    CASES += [
        case(f"cross_entropy/weight-ignore-nd-{_r}",
             lambda x, t, r=_r: F.cross_entropy(x, t, _w(x), ignore_index=1,
                                                reduction=r),
             lambda x, t, r=_r: np_weighted_nll(np_log_softmax(x, 1), t, LOSS_W, 1, r),
             (2, 4, 3), index(ND_TARGET)),
        case(f"cross_entropy/smoothing-{_r}",
             lambda x, t, r=_r: F.cross_entropy(x, t, _w(x), ignore_index=0,
                                                reduction=r, label_smoothing=0.2),
             lambda x, t, r=_r: np_smoothed_ce(x, t, LOSS_W, 0, 0.2, r), (5, 4), index(TARGET)),
        case(f"cross_entropy/probabilities-{_r}",
             lambda x, t, r=_r: F.cross_entropy(x, t, reduction=r),
             lambda x, t, r=_r: np_reduce(-(np_log_softmax(x, 1) * t).sum(1), r),
             (2, 3), fixed(PROBS)),
        case(f"smooth_l1_loss/{_r}", lambda x, t, r=_r: F.smooth_l1_loss(x, t, reduction=r,
                                                                         beta=0.5),
             lambda x, t, r=_r: np_reduce(np.where(np.abs(x - t) < 0.5, (x - t) ** 2,
                                                   np.abs(x - t) - 0.25), r),
             (2, 3), fixed(REG_TARGET), avoid=KINKS + tuple(REG_TARGET.reshape(-1) + 0.5)
             + tuple(REG_TARGET.reshape(-1) - 0.5)),
        case(f"huber_loss/{_r}", lambda x, t, r=_r: F.huber_loss(x, t, reduction=r, delta=0.5),
             lambda x, t, r=_r: np_reduce(np.where(np.abs(x - t) <= 0.5, 0.5 * (x - t) ** 2,
                                                   0.5 * (np.abs(x - t) - 0.25)), r),
             (2, 3), fixed(REG_TARGET), avoid=tuple(REG_TARGET.reshape(-1) + 0.5)
             + tuple(REG_TARGET.reshape(-1) - 0.5)),
        case(f"binary_cross_entropy/{_r}",
             lambda x, t, r=_r: F.binary_cross_entropy(x, t, reduction=r),
             lambda x, t, r=_r: np_reduce(-(t * np.log(x) + (1 - t) * np.log(1 - x)), r),
             arg(2, 3, low=0.1, high=0.9), arg(2, 3, low=0.0, high=1.0)),
        case(f"bce_with_logits/{_r}",
             lambda x, t, r=_r: F.binary_cross_entropy_with_logits(
                 x, t, pos_weight=og.tensor(np.array([1.0, 2.0, 0.5], x.dtype)), reduction=r),
             lambda x, t, r=_r: np_reduce(
                 -(np.array([1.0, 2.0, 0.5], x.dtype) * t * np.log(1 / (1 + np.exp(-x)))
                   + (1 - t) * np.log(1 - 1 / (1 + np.exp(-x)))), r),
             arg(2, 3, low=-4, high=4), arg(2, 3, low=0.0, high=1.0)),
        case(f"kl_div/{_r}", lambda x, t, r=_r: F.kl_div(x, t, reduction=r),
             lambda x, t, r=_r: np_reduce(np_xlogy(t) - t * x, r),
             arg(2, 3, low=-3, high=0), pos(2, 3, low=0.1, high=1.0)),
    ]
CASES += [
    case("kl_div/batchmean-log-target",
         lambda x, t: F.kl_div(x, t, reduction="batchmean", log_target=True),
         lambda x, t: (np.exp(t) * (t - x)).sum() / 2, arg(2, 3, low=-3, high=0),
         arg(2, 3, low=-3, high=0)),
    case("nll_loss/weight-4d", lambda x, t: F.nll_loss(x, t, _w(x, 3)),
         lambda x, t: np_weighted_nll(x, t, LOSS_W[:3], -100, "mean"), (2, 3, 2, 2),
         index(np.array([[[0, 1], [2, 2]], [[1, 0], [0, 2]]]))),
    case("leaky_relu", lambda x: F.leaky_relu(x, 0.2), lambda x: np.where(x > 0, x, 0.2 * x),
         (2, 3), avoid=(0.0,)),
    case("elu", lambda x: F.elu(x, 0.7), lambda x: np.where(x > 0, x, 0.7 * np.expm1(x)),
         (2, 3), avoid=(0.0,)),
    case("softplus", F.softplus, np_softplus, arg(2, 3, low=-4, high=4)),
    case("softplus/beta-threshold", lambda x: F.softplus(x, 2.0, 3.0),
         lambda x: np_softplus(x, 2.0, 3.0), arg(2, 3, low=-4, high=4), avoid=(1.5,)),
    case("softsign", F.softsign, lambda x: x / (1 + np.abs(x)), (2, 3), avoid=(0.0,)),
    case("tanhshrink", F.tanhshrink, lambda x: x - np.tanh(x), (2, 3)),
    case("prelu", F.prelu, lambda x, w: np.where(x > 0, x, w.reshape(1, 3, 1) * x),
         (2, 3, 2), (3,), avoid=(0.0,)),
]


test_forward, test_vjp, test_runtimes, test_ids_are_unique = table_tests(CASES)


# =========================================================================== structure
def _op(t: og.Tensor) -> str:
    return t._v.rec.op


def test_linear_is_one_gemm_for_2d_input_and_matmul_add_otherwise() -> None:
    x2, x3 = og.randn(4, 3), og.randn(2, 4, 3)
    w, b = og.randn(5, 3, requires_grad=True), og.randn(5, requires_grad=True)
    assert _op(F.linear(x2, w, b)) == "Gemm"
    assert _op(F.linear(x2, w)) == "Gemm"
    y = F.linear(x3, w, b)
    assert _op(y) == "Add" and _op(og.Tensor(y._v.rec.inputs[0])) == "MatMul"
    assert _op(F.linear(x3, w)) == "MatMul"


def test_gather_index_smaller_than_input_in_other_dims() -> None:
    # torch.gather allows index.size(d) <= input.size(d) for d != dim, and so does ONNX
    # GatherElements on ONNX Runtime; onnx's reference evaluator does not, hence no row.
    x = og.randn(2, 3, 4, requires_grad=True)
    idx = np.array([[[0, 2], [2, 2]], [[1, 0], [0, 0]]])
    y = ops.gather(x, 1, og.tensor(idx))
    data = x.detach().numpy()
    np.testing.assert_array_equal(y.detach().numpy(), np_gather(data[:, :, :2], 1, idx))
    u = np.random.default_rng(0).standard_normal(idx.shape).astype(np.float32)
    y.backward(og.tensor(u))
    want = np.zeros_like(data)
    for n, k, j in np.ndindex(*idx.shape):
        want[n, idx[n, k, j], j] += u[n, k, j]
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-6)


def test_batch_norm_updates_running_statistics_without_gradient() -> None:
    x = og.randn(4, 3, 2, 2, requires_grad=True)
    rm, rv = og.zeros(3), og.ones(3)
    y = F.batch_norm(x, rm, rv, training=True, momentum=0.3)
    assert y.requires_grad and not rm.requires_grad and not rv.requires_grad
    _, want_mean, want_var = np_batch_norm_train(x.detach().numpy(), None, None,
                                                 np.zeros(3, np.float32), np.ones(3, np.float32),
                                                 momentum=0.3)
    np.testing.assert_allclose(rm.numpy(), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv.numpy(), want_var, rtol=1e-5, atol=1e-6)
    # Eval mode reads the statistics and leaves them alone.
    before = rm.numpy().copy(), rv.numpy().copy()
    F.batch_norm(x, rm, rv, training=False)
    np.testing.assert_array_equal(rm.numpy(), before[0])
    np.testing.assert_array_equal(rv.numpy(), before[1])


def test_batch_norm_without_running_statistics_uses_the_batch() -> None:
    x = og.randn(4, 3, 2, 2)
    got = F.batch_norm(x, None, None, training=True).numpy()
    want, _, _ = np_bn_train_ref(x.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)



def test_batch_norm_training_gradient_includes_the_statistics() -> None:
    """In training, BatchNormalization's rule gives dX with the batch statistics' part (PyTorch's
    batch_norm_backward), so no gradient flows back through the mean and variance nodes: none of
    their rules' nodes (ReduceMean's Expand, the Mul's products) and no Sum of partial dX. The
    gradient rows above check the values."""
    x = og.randn(4, 3, 5, 5, requires_grad=True)
    w = og.ones(3, requires_grad=True)
    y = F.batch_norm(x, None, None, w, None, training=True)
    graph = gradient_model(y, [og.randn(4, 3, 5, 5)]).model.graph
    ops_used = {n.op_type for n in graph.node}
    assert not ops_used & {"Expand", "Sum"}, sorted(ops_used)

# =========================================================================== dropout
# Dropout draws a fresh mask per run, so it cannot be a row: there is no NumPy reference for the
# forward, and ONNX Runtime and onnx's reference evaluator draw different masks, so their
# forwards cannot be compared. What is checked instead: the identity cases exactly, the training
# output against its own mask (0 or x / (1 - p)), the gradient analytically from that mask, and
# the exported gradient graph (which takes the mask as an input, so ORT and the reference
# evaluator *can* be compared on it).
def _away_from_zero(*shape: int) -> np.ndarray:
    x = np.random.default_rng(0).uniform(0.5, 2.0, shape) * np.where(
        np.random.default_rng(1).random(shape) < 0.5, -1, 1)
    return x.astype(np.float32)


@pytest.mark.parametrize(("p", "training"), [(0.5, False), (0.0, True), (0.0, False)])
def test_dropout_identity_in_eval_and_for_p0(p: float, training: bool) -> None:
    x = og.tensor(_away_from_zero(3, 4), requires_grad=True)
    y = F.dropout(x, p, training)
    np.testing.assert_array_equal(y.detach().numpy(), x.detach().numpy())
    (y * og.tensor(np.arange(12.0, dtype=np.float32).reshape(3, 4))).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize("dtype", [og.float32, og.float64])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_dropout_training_output_and_gradient_follow_the_mask(p: float, dtype: Any) -> None:
    data = _away_from_zero(16, 32).astype(dtype)
    x = og.tensor(data, requires_grad=True)
    y = F.dropout(x, p, True)
    out = y.detach().numpy()
    assert out.dtype == dtype
    kept = out != 0
    # Every element is dropped (0) or kept and scaled by 1 / (1 - p).
    np.testing.assert_allclose(out[kept], data[kept] / (1 - p), rtol=1e-6)
    assert 0 < kept.sum() < kept.size  # 512 draws: neither all dropped nor all kept
    assert abs(kept.mean() - (1 - p)) < 0.1
    u = np.random.default_rng(2).standard_normal(data.shape).astype(dtype)
    y.backward(og.tensor(u))
    # The gradient is u * mask / (1 - p), i.e. u * y / x with the mask of this forward.
    np.testing.assert_allclose(x.grad.numpy(), u * out / data, rtol=1e-6, atol=1e-12)


def test_dropout_gradient_graph_is_standard_onnx_and_runtimes_agree() -> None:
    x = og.tensor(_away_from_zero(4, 6), requires_grad=True)
    y = F.dropout(x, 0.3, True)
    u = og.tensor(np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32))
    gm = gradient_model([y], [u])
    check_onnx_model(gm.model)
    ort_out = make_session(gm.model).run(list(gm.outputs), gm.feeds)
    ref_out = ReferenceEvaluator(gm.model).run(list(gm.outputs), gm.feeds)
    np.testing.assert_allclose(ort_out[0], ref_out[0], rtol=1e-6)
    backward([y], [u])
    np.testing.assert_array_equal(x.grad.numpy(), ort_out[0])
    np.testing.assert_allclose(ort_out[0], u.numpy() * y.detach().numpy() / x.detach().numpy(),
                               rtol=1e-5)


def test_dropout_p1_drops_everything() -> None:
    # PyTorch: dropout with p=1 in training returns input * 0 (ONNX Dropout refuses ratio 1).
    x = og.tensor(_away_from_zero(3, 4), requires_grad=True)
    y = F.dropout(x, 1.0, True)
    np.testing.assert_array_equal(y.detach().numpy(), np.zeros((3, 4), np.float32))
    y.backward(og.ones(3, 4))
    np.testing.assert_array_equal(x.grad.numpy(), np.zeros((3, 4), np.float32))


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_dropout_probability_out_of_range(p: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout(og.ones(2), p, True)


# =========================================================================== errors
def _t(*shape: int) -> og.Tensor:
    return og.zeros(*shape)


@pytest.mark.parametrize(("call", "error", "pattern"), [
    (lambda: F.linear(_t(2, 3), _t(4, 5)), og.ShapeError, r"3 features.*expects 5"),
    (lambda: F.linear(_t(2, 3), _t(4, 3, dtype=og.float64)), TypeError, "dtype"),
    (lambda: ops.gather(_t(2, 3), 1, og.tensor([0, 1])), IndexError, "rank 2"),
    (lambda: ops.gather(_t(2, 3), 1, og.zeros(2, 1)), IndexError, "integer"),
    (lambda: F.mse_loss(_t(2, 3), _t(3, 2)), og.ShapeError, r"\[2, 3\].*\[3, 2\]"),
    (lambda: F.l1_loss(_t(2), _t(2), reduction="avg"), ValueError, "reduction"),
    (lambda: F.nll_loss(_t(2, 3), og.tensor([0, 3])), IndexError, "out of bounds"),
    (lambda: F.nll_loss(_t(2, 3), og.tensor([0, -1])), IndexError, "out of bounds"),
    (lambda: F.nll_loss(_t(2, 3), _t(2)), TypeError, "class indices"),
    (lambda: F.nll_loss(_t(2, 3), og.tensor([0, 1, 2])), og.ShapeError, r"\[N, C\]"),
    # A float target shaped as the input is class probabilities (PyTorch's); others are errors.
    (lambda: F.cross_entropy(_t(2, 3), _t(2)), og.ShapeError, "class indices must be integers"),
    (lambda: F.batch_norm(_t(1, 3), None, None, training=True), ValueError, "more than 1"),
    (lambda: F.batch_norm(_t(2, 3), None, None, training=False), ValueError, "running_mean"),
    (lambda: F.batch_norm(_t(3), None, None, training=True), og.ShapeError, "2-D"),
], ids=["linear-features", "linear-dtype", "gather-rank", "gather-float-index", "mse-shapes",
        "reduction", "nll-above", "nll-negative", "nll-float-target", "nll-shapes",
        "cross-entropy-float", "bn-one-value", "bn-eval-no-stats", "bn-1d"])
def test_errors(call: Callable[[], Any], error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        call()
