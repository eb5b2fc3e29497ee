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
draw's lanes: ``Range`` plus the offset's low word, wrapping), keyed by the seed (with the golden
ratio's bits folded in) and the offset's high word (scalars, hashed once per draw): only ``BitwiseXor``, ``BitShift``, ``Mul``, ``Add``, ``BitwiseAnd`` and
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
# NOTE: folded into the seed's key: the hash maps 0 to 0, so seed 0 (the seed users pick most)
# made draw 0 of the stream 0 (og.rand's first value 0.0, dropout's first element always kept).
_GOLDEN = 0x9E3779B9

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
        np.asarray(seed64 >> np.uint64(32), _U32)) ^ _U32(_GOLDEN))
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
    key = _hash_nodes(_xor(_xor(s_lo, _hash_nodes(s_hi)), const(np.asarray(_GOLDEN, _U32))))
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


# --------------------------------------------------------------------------- distributions
# og.rand/randn/randint/randperm draw from the stream too, eagerly and in compiled functions
# alike, so a compiled step draws exactly the numbers the same function draws eagerly. Integer
# steps and exact float steps (a cast of at most 24 bits, a power-of-two scale) run in NumPy when
# eager; the transcendental steps of the normal draw run as ONNX nodes in both, so that eager and
# compiled use the same kernels and agree to the bit.
def _node(op_name: str, inputs: list[Val], **attrs: Any) -> Val:
    return emit(op_name, inputs, attrs, differentiable=False)[0]


def _shift_right(bits: Val, k: int) -> Val:
    if state.active_trace() is None:
        return Val(bits.data >> _U32(k))
    return _node("BitShift", [bits, const(np.asarray(k, _U32))], direction="RIGHT")


def _to_float(bits: Val, dtype: np.dtype, scale: float) -> Val:
    """``bits * scale`` in ``dtype`` (exact: at most ``dtype``'s mantissa bits, scale 2**-k)."""
    if state.active_trace() is None:
        return Val(bits.data.astype(dtype) * np.asarray(scale, dtype))
    return _node("Mul", [_cast(bits, dtype), const(np.asarray(scale, dtype))])


def _shaped(v: Val, shape: tuple[int, ...]) -> Val:
    if state.active_trace() is None:
        return Val(np.ascontiguousarray(v.data.reshape(shape)))
    return _node("Reshape", [v, const(np.asarray(shape, np.int64))])


def _unit(n: int, dtype: np.dtype) -> Val:
    """``n`` draws uniform over [0, 1) in ``dtype``: PyTorch's construction, a random integer of
    the mantissa's width scaled by 2**-width (two stream values for float64's 53 bits)."""
    digits = np.finfo(dtype).nmant + 1
    if digits <= 24:  # float32, float16: computed in float32, which holds them exactly
        unit = _to_float(_shift_right(draw_bits(n), 32 - digits), np.dtype(np.float32),
                         2.0 ** -digits)
        return unit if dtype == np.float32 else _cast_any(unit, dtype)
    high = _to_float(_shift_right(draw_bits(n), 5), dtype, 2.0 ** -27)  # 27 bits
    low = _to_float(_shift_right(draw_bits(n), 6), dtype, 2.0 ** -53)   # 26 bits
    if state.active_trace() is None:
        return Val(high.data + low.data)
    return _node("Add", [high, low])  # exact: the bits do not overlap


def _cast_any(v: Val, dtype: np.dtype) -> Val:
    if state.active_trace() is None:
        return Val(v.data.astype(dtype))
    return _cast(v, dtype)


def uniform(shape: tuple[int, ...], dtype: Any) -> Val:
    """Values uniform over [0, 1) (``og.rand``)."""
    dtype = np.dtype(dtype)
    return _shaped(_unit(int(np.prod(shape, dtype=np.int64)), dtype), shape)


def normal(shape: tuple[int, ...], dtype: Any) -> Val:
    """Standard normal values (``og.randn``): Box-Muller, ``sqrt(-2 log(1 - u1)) cos(2 pi u2)``,
    computed in ``dtype`` (float16 in float32)."""
    dtype = np.dtype(dtype)
    work = np.dtype(np.float32) if dtype.itemsize < 4 else dtype
    n = int(np.prod(shape, dtype=np.int64))
    u1, u2 = _unit(n, work), _unit(n, work)
    one = const(np.asarray(1.0, work))
    # The float steps run as nodes eagerly too (emit), so both paths use the same kernels.
    radius = _node("Sqrt", [_node("Mul", [const(np.asarray(-2.0, work)), _node(
        "Log", [_node("Sub", [one, u1])])])])
    angle = _node("Cos", [_node("Mul", [const(np.asarray(2 * np.pi, work)), u2])])
    z = _node("Mul", [radius, angle])
    return _shaped(z if work == dtype else _cast_any(z, dtype), shape)


def integers(low: int, high: int, shape: tuple[int, ...], dtype: Any) -> Val:
    """Integers uniform over ``[low, high)`` (``og.randint``): ``low + draw % (high - low)``, as
    PyTorch's CPU generator for ranges below 2**32; two draws make 64 bits for larger ranges."""
    span = high - low
    if span <= 0:
        raise ValueError(f"random_ expects 'from' to be less than 'to', but got from={low} >= "
                         f"to={high}")
    if span > 2**63:
        raise ValueError(f"randint: the range [{low}, {high}) is wider than int64 can draw")
    n = int(np.prod(shape, dtype=np.int64))
    draws = [draw_bits(n)] if span <= 2**32 else [draw_bits(n), draw_bits(n)]
    dtype = np.dtype(dtype)
    if state.active_trace() is None:
        wide = draws[0].data.astype(np.uint64)
        if len(draws) == 2:
            wide = (wide << np.uint64(32)) | draws[1].data.astype(np.uint64)
        values = (wide % np.uint64(span)).astype(np.int64) + np.int64(low)
        return Val(np.ascontiguousarray(values.astype(dtype).reshape(shape)))
    wide = _cast(draws[0], np.uint64)
    if len(draws) == 2:
        wide = _node("BitwiseOr", [_node("BitShift", [wide, const(np.asarray(32, np.uint64))],
                                         direction="LEFT"), _cast(draws[1], np.uint64)])
    offset = _node("Mod", [wide, const(np.asarray(span, np.uint64))])
    values = _node("Add", [_cast(offset, np.int64), const(np.asarray(low, np.int64))])
    return _shaped(values if dtype == np.int64 else _cast(values, dtype), shape)


def permutation(n: int, dtype: Any) -> Val:
    """A random permutation of ``0..n-1`` (``og.randperm``): the positions sorted by a random
    key. The key is ``(draw >> 1) << 32 | position``: unique, so no runtime's tie order
    matters."""
    dtype = np.dtype(dtype)
    if n == 0:
        return Val(np.zeros(0, dtype))
    bits = draw_bits(n)
    if state.active_trace() is None:
        keys = ((bits.data >> _U32(1)).astype(np.int64) << np.int64(32)) | np.arange(n)
        return Val(np.argsort(keys).astype(dtype))
    high = _node("BitShift", [_cast(_shift_right(bits, 1), np.uint64),
                              const(np.asarray(32, np.uint64))], direction="LEFT")
    index = _node("Range", [const(np.asarray(0, np.int64)), const(np.asarray(n, np.int64)),
                            const(np.asarray(1, np.int64))])
    keys = _node("BitwiseOr", [_cast(high, np.int64), index])
    order = emit("TopK", [keys, const(np.asarray([n], np.int64))], {"largest": 0, "sorted": 1},
                 n_out=2, differentiable=False)[1]
    return order if dtype == np.int64 else _cast(order, dtype)
