"""Transformer ops: ``layer_norm``, ``embedding``, ``gelu`` and ``scaled_dot_product_attention``.

``layer_norm`` and ``gelu`` are single standard-ONNX nodes (``LayerNormalization``, opset 17;
``Gelu``, opset 20) with their own gradient rules (passes/rules/transformer.py), because imported
transformer files contain those nodes; ``embedding`` and attention are compositions.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from . import ops
from .ops import ShapeError, _fmt, _where, _wrap
from .registry import op
from .tensor import Tensor
from .values import Val, const, emit


def _normalized(shape: Any) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)


@op(functional=True)
def layer_norm(input: Tensor, normalized_shape: Any, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """PyTorch's ``layer_norm``: one ONNX ``LayerNormalization`` over the trailing dims."""
    shape = _normalized(normalized_shape)
    if not shape or input.shape[input.ndim - len(shape):] != shape or input.ndim < len(shape):
        raise ShapeError(f"layer_norm: normalized_shape {_fmt(shape)} does not match the trailing "
                         f"dims of the input {_fmt(input.shape)}{_where()}")
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != shape:
            raise ShapeError(f"layer_norm: {what} has shape {_fmt(t.shape)}, expected "
                             f"{_fmt(shape)}{_where()}")
    x = input._v if input.dtype.kind == "f" else ops._float_input(input)
    dtype = x.data.dtype
    scale = weight._v if weight is not None else const(np.ones(shape, dtype))
    inputs = [x, scale] + ([bias._v] if bias is not None else [])
    # NOTE: the Mean and InvStdDev outputs are requested so the gradient reuses them.
    outs = emit("LayerNormalization", inputs, {"axis": -len(shape), "epsilon": float(eps)},
                n_out=3)
    return _wrap(outs[0])


@op(functional=True)
def embedding(input: Tensor, weight: Tensor, padding_idx: int | None = None,
              max_norm: float | None = None, norm_type: float = 2.0,
              scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """``weight[input]`` (ONNX ``Gather``); the ``padding_idx`` row gets no gradient."""
    if input.dtype.kind not in "iu":
        raise TypeError(f"embedding: indices must be an integer tensor, got {input.dtype}"
                        f"{_where()}")
    if weight.ndim != 2:
        raise ShapeError(f"embedding: weight must be 2-D, got {_fmt(weight.shape)}{_where()}")
    if max_norm is not None or scale_grad_by_freq or sparse:
        raise NotImplementedError(f"embedding: max_norm, scale_grad_by_freq and sparse are not "
                                  f"supported{_where()}")
    n = weight.shape[0]
    data = input._v.data
    bad = (data >= n) | (data < -n)
    if bad.any():
        raise IndexError(f"embedding: index {int(data[bad].reshape(-1)[0])} is out of range for "
                         f"{n} embeddings{_where()}")
    w = weight
    if padding_idx is not None:
        if not -n <= padding_idx < n:
            raise ValueError(f"embedding: padding_idx {padding_idx} must be within num_embeddings "
                             f"{n}{_where()}")
        # NOTE: the padding row is read from a detached copy: its values are the weight's, exact
        # (a Where picks them), and no gradient reaches that row, as PyTorch's embedding_backward.
        mask = np.zeros((n, 1), dtype=bool)
        mask[padding_idx % n] = True
        w = ops.where(Tensor(Val(mask)), weight.detach(), weight)
    idx = input if input.dtype == np.int64 else ops.to(input, np.int64)
    return _wrap(emit("Gather", [w._v, idx._v], {"axis": 0})[0])


@op(functional=True)
def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """PyTorch's ``gelu``: one ONNX ``Gelu`` (opset 20), exact (erf) or ``"tanh"``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}"
                         f"{_where()}")
    v = ops._float_input(input)
    attrs = {"approximate": approximate}
    if v.data.dtype != np.float64:
        return _wrap(emit("Gelu", [v], attrs)[0])
    # NOTE: ONNX Runtime's CPU provider has no float64 Gelu kernel: float64 computes in float32
    # between two Casts (float32 accuracy), as erf does.
    f32 = emit("Cast", [v], {"to": int(ir.DataType.FLOAT)})[0]
    return _wrap(emit("Cast", [emit("Gelu", [f32], attrs)[0]], {"to": int(ir.DataType.DOUBLE)})[0])


def _causal_bias(lq: int, lk: int, dtype: np.dtype) -> np.ndarray:
    # PyTorch's is_causal: a lower-triangular mask aligned at the top-left (tril(ones(L, S))).
    keep = np.tril(np.ones((lq, lk), dtype=bool))
    return np.where(keep, 0.0, -np.inf).astype(dtype)


@op(functional=True)
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """PyTorch's reference attention, ``softmax(q k^T * scale + bias) v``, as ONNX nodes.

    ``attn_mask``: bool (True takes part in attention) or float (added to the scores), broadcast
    to ``[..., L, S]``; ``is_causal`` masks the upper triangle; ``dropout_p`` drops attention
    weights (always applied, as PyTorch's functional form).
    """
    if query.ndim < 2 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ShapeError(f"scaled_dot_product_attention: query, key and value must have the same "
                         f"rank >= 2, got {_fmt(query.shape)}, {_fmt(key.shape)}, "
                         f"{_fmt(value.shape)}{_where()}")
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ShapeError(f"scaled_dot_product_attention: query {_fmt(query.shape)}, key "
                         f"{_fmt(key.shape)} and value {_fmt(value.shape)} do not fit{_where()}")
    if enable_gqa:
        raise NotImplementedError(f"scaled_dot_product_attention: enable_gqa is not supported"
                                  f"{_where()}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"scaled_dot_product_attention: explicit attn_mask should not be set "
                         f"when is_causal=True{_where()}")
    lq, lk = query.shape[-2], key.shape[-2]
    factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    scores = ops.matmul(query, ops.transpose(key, -2, -1))
    scores = ops.mul(scores, factor)
    if is_causal:
        scores = ops.add(scores, Tensor(Val(_causal_bias(lq, lk, scores.dtype))))
    elif attn_mask is not None:
        if attn_mask.dtype == np.bool_:
            ninf = Tensor(Val(np.asarray(-np.inf, dtype=scores.dtype)))
            zero = Tensor(Val(np.asarray(0.0, dtype=scores.dtype)))
            attn_mask = ops.where(attn_mask, zero, ninf)
        scores = ops.add(scores, attn_mask)
    weights = ops.softmax(scores, -1)
    if dropout_p > 0.0:
        weights = ops.dropout(weights, dropout_p, True)
    return ops.matmul(weights, value)


# --------------------------------------------------------------------------- ops exports emit
@op(og=True, method=True)
def tril(input: Tensor, diagonal: int = 0) -> Tensor:
    """ONNX ``Trilu(upper=0)``: elements on and below the ``diagonal``-th diagonal."""
    return _trilu(input, diagonal, 0, "tril")


@op(og=True, method=True)
def triu(input: Tensor, diagonal: int = 0) -> Tensor:
    """ONNX ``Trilu(upper=1)``: elements on and above the ``diagonal``-th diagonal."""
    return _trilu(input, diagonal, 1, "triu")


def _trilu(x: Tensor, k: int, upper: int, name: str) -> Tensor:
    if x.ndim < 2:
        raise ShapeError(f"{name}: input tensor must have at least 2 dimensions, got "
                         f"{_fmt(x.shape)}{_where()}")
    return _wrap(emit("Trilu", [x._v, const(np.asarray(int(k), dtype=np.int64))],
                      {"upper": upper})[0])


@op(og=True)
def einsum(equation: str, *operands: Any) -> Tensor:
    """``torch.einsum``: one ONNX ``Einsum`` node (operands of one dtype)."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    terms = equation.replace(" ", "").split("->")[0].split(",")
    if len(terms) != len(operands):
        raise ValueError(f"einsum: the equation {equation!r} has {len(terms)} operand(s), got "
                         f"{len(operands)} tensor(s){_where()}")
    dtype = ops.result_type(*operands)
    return _wrap(emit("Einsum", [ops._val(t, dtype) for t in operands],
                      {"equation": equation.replace(" ", "")})[0])


@op(og=True, method=True)
def logsumexp(input: Tensor, dim: Any, keepdim: bool = False) -> Tensor:
    """``torch.logsumexp``: ONNX ``ReduceLogSumExp`` over ``dim``."""
    axes = ops._norm_dims(input, dim)
    return _wrap(emit("ReduceLogSumExp", [ops._float_input(input), const(axes, np.int64)],
                      {"keepdims": int(keepdim)})[0])


@op(og=True, method=True)
def norm(input: Tensor, p: Any = "fro", dim: Any = None, keepdim: bool = False) -> Tensor:
    """``torch.norm`` for the 2-norm (``p=2`` or ``"fro"``): ONNX ``ReduceL2``."""
    if p not in (2, 2.0, "fro"):
        raise NotImplementedError(f"norm: only p=2 / 'fro' is supported, got {p!r}{_where()}")
    axes = list(range(input.ndim)) if dim is None else ops._norm_dims(input, dim)
    return _wrap(emit("ReduceL2", [ops._float_input(input), const(axes, np.int64)],
                      {"keepdims": int(keepdim)})[0])


@op(method=True)
def repeat(input: Tensor, *sizes: Any) -> Tensor:
    """``Tensor.repeat``: ONNX ``Tile`` (leading new dims first, as PyTorch)."""
    reps = ops._shape_args(sizes)
    if len(reps) < input.ndim:
        raise ValueError(f"repeat: number of repeat dims {len(reps)} can not be smaller than the "
                         f"number of tensor dims {input.ndim}{_where()}")
    x = input
    if len(reps) > x.ndim:
        x = ops.reshape(x, (1,) * (len(reps) - x.ndim) + x.shape)
    return _wrap(emit("Tile", [x._v, const(list(reps), np.int64)])[0])
