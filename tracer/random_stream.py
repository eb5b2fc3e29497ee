"""A counter-based random stream made of standard integer ONNX ops: reproducible and portable.

ONNX's ``Dropout`` and ``Random*`` ops draw from each runtime's own generator: a compiled step
gives other masks in ONNX Runtime than in the reference evaluator, a resumed run other masks
than an uninterrupted one, and ``og.manual_seed`` cannot reach them. Instead, like PyTorch's
Philox generator, the stream is a pure function of a *seed* and a *counter*: draw ``i`` of the
stream is ``mix(seed, offset + i)``, and each draw of ``n`` values advances ``offset`` by ``n``.
Seed and offset are two int64 scalars, state like a BatchNorm's running mean: a compiled step
takes them as inputs and returns the advanced offset, so the masks follow from the state alone,
in every runtime, and a checkpoint that saves :func:`get_rng_state` resumes bit-identically.

``mix`` is Wellons' ``lowbias32`` integer hash applied twice to the counter's low word (a
draw's lanes: ``Range`` plus the offset's low word, wrapping), keyed by the seed and the
offset's high word (scalars, hashed once per draw): only ``BitwiseXor``, ``BitShift``, ``Mul``, ``Add``, ``BitwiseAnd`` and
``Cast`` on uint32/int64, which every runtime implements exactly (wrapping uint32 products), so
the eager path computes the same bits with NumPy.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from onnx import helper

from . import state
from .tensor import Tensor, Val, const, emit

#: PyTorch's default seed (``torch.initial_seed()`` in a fresh process): a fresh process is
#: reproducible, as PyTorch's is.
DEFAULT_SEED = 67280421310721
_U32 = np.uint32
_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)

_seed = Tensor(Val(np.asarray(DEFAULT_SEED, np.int64)))
_offset = Tensor(Val(np.asarray(0, np.int64)))


def manual_seed(seed: int) -> None:
    """Restart the stream at ``seed`` (``og.manual_seed`` calls this)."""
    _seed._set_leaf_data(np.asarray(int(seed) & 0x7FFF_FFFF_FFFF_FFFF, np.int64))
    _offset._set_leaf_data(np.asarray(0, np.int64))


def initial_seed() -> int:
    return int(_seed._v.data)


def get_rng_state() -> Tensor:
    """The stream's state as an int64 tensor ``[seed, offset]`` (save it with a checkpoint)."""
    return Tensor(Val(np.array([_seed._v.data, _offset._v.data], np.int64)))


def set_rng_state(new_state: Any) -> None:
    data = np.asarray(new_state._v.data if isinstance(new_state, Tensor) else new_state)
    if data.shape != (2,) or data.dtype.kind not in "iu":
        raise ValueError(f"set_rng_state expects the int64 tensor [seed, offset] that "
                         f"get_rng_state returns, got {data.dtype}{list(data.shape)}")
    _seed._set_leaf_data(np.asarray(data[0], np.int64))
    _offset._set_leaf_data(np.asarray(data[1], np.int64))


# --------------------------------------------------------------------------- eager (NumPy)
def _hash_np(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # uint32 products wrap, as ONNX's Mul does
        x = x ^ (x >> _U32(16))
        x = x * _U32(_MULTIPLIERS[0])
        x = x ^ (x >> _U32(15))
        x = x * _U32(_MULTIPLIERS[1])
        return x ^ (x >> _U32(16))


def _bits_np(seed: int, offset: int, n: int) -> np.ndarray:
    seed64, offset64 = np.uint64(seed), np.uint64(offset)
    key = _hash_np(np.asarray(seed64 & np.uint64(0xFFFFFFFF), _U32) ^ _hash_np(
        np.asarray(seed64 >> np.uint64(32), _U32)))
    hi_key = _hash_np(np.asarray(offset64 >> np.uint64(32), _U32) ^ key)
    lo = np.arange(n, dtype=_U32) + np.asarray(offset64 & np.uint64(0xFFFFFFFF), _U32)
    return _hash_np(_hash_np(lo ^ hi_key) ^ key)


# --------------------------------------------------------------------------- traced (ONNX)
def _hash_nodes(x: Val) -> Val:
    def shift_xor(v: Val, k: int) -> Val:
        shifted = emit("BitShift", [v, const(np.asarray(k, _U32))], {"direction": "RIGHT"},
                       differentiable=False)[0]
        return emit("BitwiseXor", [v, shifted], differentiable=False)[0]

    def mul(v: Val, k: int) -> Val:
        return emit("Mul", [v, const(np.asarray(k, _U32))], differentiable=False)[0]

    return shift_xor(mul(shift_xor(mul(shift_xor(x, 16), _MULTIPLIERS[0]), 15),
                         _MULTIPLIERS[1]), 16)


def _cast(v: Val, dtype: Any) -> Val:
    to = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return emit("Cast", [v], {"to": to}, differentiable=False)[0]


def _split64(v: Val) -> tuple[Val, Val]:
    """An int64 scalar's low and high 32-bit words, as uint32."""
    v64 = _cast(v, np.uint64)
    lo = emit("BitwiseAnd", [v64, const(np.asarray(0xFFFFFFFF, np.uint64))],
              differentiable=False)[0]
    hi = emit("BitShift", [v64, const(np.asarray(32, np.uint64))], {"direction": "RIGHT"},
              differentiable=False)[0]
    return _cast(lo, _U32), _cast(hi, _U32)


def _xor(a: Val, b: Val) -> Val:
    return emit("BitwiseXor", [a, b], differentiable=False)[0]


def _bits_nodes(seed: Val, offset: Val, n: int) -> Val:
    # Scalars first (seed key, the offset's high word), then n elementwise lanes.
    s_lo, s_hi = _split64(seed)
    key = _hash_nodes(_xor(s_lo, _hash_nodes(s_hi)))
    o_lo, o_hi = _split64(offset)
    hi_key = _hash_nodes(_xor(o_hi, key))
    index = emit("Range", [const(np.asarray(0, np.int32)), const(np.asarray(n, np.int32)),
                           const(np.asarray(1, np.int32))], differentiable=False)[0]
    lo = emit("Add", [_cast(index, _U32), o_lo], differentiable=False)[0]  # wraps, as NumPy's
    return _hash_nodes(_xor(_hash_nodes(_xor(lo, hi_key)), key))


# --------------------------------------------------------------------------- draws
def draw_bits(n: int) -> Val:
    """``n`` uint32 draws (a Val: computed in the graph while tracing), advancing the stream."""
    if n >= 2**31:
        raise ValueError(f"a random draw of {n} values is too large (at most 2**31 - 1 at once)")
    trace = state.active_trace()
    if trace is None:
        bits = _bits_np(int(_seed._v.data), int(_offset._v.data), n)
        _offset._set_leaf_data(np.asarray(int(_offset._v.data) + n, np.int64))
        return Val(bits)
    trace.remember(_seed)
    trace.remember(_offset)
    trace.names.setdefault(id(_seed), "rng.seed")
    trace.names.setdefault(id(_offset), "rng.offset")
    bits = _bits_nodes(_seed._v, _offset._v, n)
    _offset._v = emit("Add", [_offset._v, const(np.asarray(n, np.int64))],
                      differentiable=False)[0]
    return bits


def keep_mask(shape: tuple[int, ...], p: float, dtype: Any) -> Val:
    """Dropout's scaled mask: ``1/(1-p)`` where a draw is kept (probability ``1-p``), else 0."""
    n = int(np.prod(shape, dtype=np.int64))
    threshold = min(round(p * 2.0**32), 2**32)
    scale = np.asarray(1.0 / (1.0 - p), dtype)
    bits = draw_bits(n)
    if state.active_trace() is None:
        keep = bits.data.astype(np.int64) >= threshold
        return Val((keep.astype(dtype) * scale).reshape(shape))
    keep = emit("GreaterOrEqual", [_cast(bits, np.int64), const(np.asarray(threshold, np.int64))],
                differentiable=False)[0]
    scaled = emit("Mul", [_cast(keep, dtype), const(scale)], differentiable=False)[0]
    return emit("Reshape", [scaled, const(np.asarray(shape, np.int64))],
                differentiable=False)[0]
