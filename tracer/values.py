"""The recording core: a :class:`Val` is a value, a :class:`Record` one ONNX node that made it.

A Val is either a leaf (data with no producer) or output ``index`` of a Record: one ONNX node with
its op type, attributes and input Vals. ``emit`` runs one node eagerly through ONNX Runtime (or
takes its result from a ``@fused`` group's run, ``tracer/fusion.py``) and records it when
gradients or a trace need it. Nothing here knows :class:`~.tensor.Tensor`, the mutable handle
users hold, so the op builders, the Tensor class and autograd all build on this module without
importing each other in a cycle.
"""
from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..runtime import run_node
from . import fusion, state

float16 = np.dtype("float16")
float32 = np.dtype("float32")
float64 = np.dtype("float64")
int32 = np.dtype("int32")
int64 = np.dtype("int64")
uint8 = np.dtype("uint8")
int8 = np.dtype("int8")
int16 = np.dtype("int16")
bool_ = np.dtype("bool")

_default_float = float32


def get_default_dtype() -> np.dtype:
    return _default_float


def set_default_dtype(dtype: Any) -> None:
    global _default_float
    dtype = np.dtype(dtype)
    if dtype not in (float32, float64):
        raise TypeError(f"default dtype must be float32 or float64, got {dtype}")
    _default_float = dtype


class TraceError(RuntimeError):
    """Python needed a tensor's value while ``og.compile`` was tracing."""


class Record:
    """One recorded ONNX node: ``op(inputs; attrs) -> outs``."""

    __slots__ = ("op", "attrs", "key", "inputs", "outs", "where", "module", "origin", "freed",
                 "extra", "grad", "meta", "traced")

    def __init__(self, op: str, attrs: dict[str, Any], key: Any, inputs: Sequence[Val],
                 outs: list[np.ndarray]):
        self.op = op
        self.attrs = attrs
        self.key = key
        self.inputs = tuple(inputs)
        for v in self.inputs:
            if v is not None:
                v.readers += 1
        self.outs = outs
        self.where = state.user_frame()
        self.module = state.module_path()
        self.origin = state.origin()
        self.traced = state.active_trace() is not None  # recorded by og.compile's trace
        self.freed = False
        self.extra: Any = None
        self.grad = True  # whether a gradient may flow through it (False: no_grad, detach)
        # In-memory node metadata for the passes (tracer/autograd.py: which forward op a replayed
        # gradient node differentiates, a custom Function's gradient), copied onto its node.
        self.meta: dict[str, Any] | None = None

    def source(self) -> str:
        return state.format_frame(self.where)


class Val:
    """An immutable value: eager data plus how it was made."""

    # NOTE: ``shared`` and ``saved`` are left unset (read with getattr) so making a Val costs
    # nothing more. ``shared``: True once its buffer is shared with NumPy (og.from_numpy,
    # .numpy()), "runner" for a runner's state buffer (tracer/views.py). ``saved``:
    # True once a record that gradients flow through reads it (in-place ops must not overwrite it).
    __slots__ = ("data", "rec", "index", "requires_grad", "leaf", "const", "owner", "readers",
                 "shared", "saved", "__weakref__")

    def __init__(self, data: np.ndarray, rec: Record | None = None, index: int = 0,
                 requires_grad: bool = False, const: bool = False):
        self.data = data
        self.rec = rec
        self.index = index
        self.requires_grad = requires_grad
        self.leaf: weakref.ref | None = None  # the leaf Tensor that accumulates .grad
        self.const = const  # an attribute-like constant (axes, shapes): baked into graphs
        # The tensor a user made this value as (og.tensor, factories): a compiled step that
        # reads it while that tensor lives feeds it as an input rather than baking it in.
        self.owner: weakref.ref | None = None
        self.readers = 0  # records that take it as an input (see release_traced)


def _contig(array: Any, dtype: Any = None) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    array = np.asarray(array, dtype=dtype)
    return array if array.flags.c_contiguous else np.array(array, order="C")


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    return value


def attrs_key(attrs: dict[str, Any]) -> tuple:
    return tuple(sorted((k, _freeze(v)) for k, v in attrs.items())) if attrs else ()


def const(value: Any, dtype: Any = None) -> Val:
    """An attribute-like constant input (axes, shapes, slice bounds)."""
    return Val(np.asarray(value, dtype=dtype), const=True)


_ORT_TYPE_ERROR = re.compile(r"Type '(?:tensor\()?(\w+)\)?' of input parameter")
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def _runtime_reason(exc: Exception) -> str:
    """ONNX Runtime's failure of one eager node, said in onnxgrad's words.

    Ops check their operands before emitting, so this is the fallback for what only the runtime
    knows (a dtype it has no kernel for, a value-dependent failure)."""
    text = str(exc)
    if m := _ORT_TYPE_ERROR.search(text):
        return f"ONNX Runtime has no kernel for {m.group(1)} inputs of this op"
    if "Could not find an implementation" in text:
        return "ONNX Runtime has no kernel for these input dtypes"
    detail = text.split("Status Message:")[-1] if "Status Message:" in text else text
    detail = _ORT_PREFIX.sub("", detail).strip()
    return f"the runtime failed ({detail})" if detail else "the runtime failed on these inputs"


def emit(op: str, inputs: Sequence[Val | None], attrs: dict[str, Any] | None = None,
         n_out: int = 1, differentiable: bool = True) -> list[Val]:
    """Run one ONNX node eagerly and record it when gradients or a trace need it. Inside a
    ``@fused`` builder's replay the result comes from the run of its whole group instead."""
    attrs = attrs or {}
    key = attrs_key(attrs)
    group = fusion.active()  # a @fused builder's capture or replay (tracer/fusion.py)
    outs = group.take(op, key, inputs, n_out) if group is not None else None
    if outs is None:
        datas = [None if v is None else v.data for v in inputs]
        consts = [v is not None and v.const for v in inputs]
        try:
            outs = run_node(op, attrs, key, datas, n_out, consts)
        except Exception as exc:
            where = state.format_frame(state.user_frame())
            shapes = ", ".join("_" if d is None else f"{d.dtype}{list(d.shape)}" for d in datas)
            raise RuntimeError(f"{op}({shapes}) at {where}: {_runtime_reason(exc)}") from None
    requires_grad = (
        differentiable and state.grad_enabled()
        and any(v is not None and v.requires_grad for v in inputs)
    )
    if requires_grad or state.active_trace() is not None:
        rec = Record(op, attrs, key, inputs, outs)
        rec.grad = requires_grad
        if requires_grad:
            for v in inputs:
                if v is not None:
                    v.saved = True
        vals = [Val(o, rec, i, requires_grad and o.dtype.kind == "f") for i, o in enumerate(outs)]
    else:
        vals = [Val(o) for o in outs]
    if group is not None:
        group.made_vals(op, attrs, key, inputs, vals)
    return vals



def release_traced(v: Val) -> None:
    """Free the data of a value a trace made once nothing but the trace's records refers to it
    (its last tensor is gone): no op can read it again, and the records keep only its shape
    and dtype (the first call runs the compiled graph, not the traced values).

    NOTE: without this a trace held every eager value of the traced call at once (densenet121
    8x96: 530 MB), the first call's memory peak. Referrers are counted: this function's
    argument, the caller's local, getrefcount's argument and the dying tensor's slot (4), one
    per reading record; any other referrer (a hook's list, the trace's state) keeps the data.
    """
    if state.active_trace() is None or v.rec is None or v.const or v.data.size <= 1:
        return
    if sys.getrefcount(v) == 4 + v.readers:
        v.data = v.rec.outs[v.index] = stand_in(v.data.shape, v.data.dtype)


def stand_in(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """Zeros of ``shape`` that take no memory (one element, read-only, broadcast): a traced
    macro's result, which tracing discards unread (the first call runs the compiled graph).

    NOTE: not np.zeros: a resnet18 step's gradients and updated state are ~180 MB of stand-ins,
    which were resident (and, with glibc's heap, stayed so) while the step's runner was made.
    """
    return np.broadcast_to(np.zeros((), dtype), tuple(shape))


def emit_macro(op: str, inputs: Sequence[Val], outs: Sequence[np.ndarray], expand: Any, *,
               key: Any, origin: str) -> list[Val]:
    """Record a step that a pass expands into nodes when the graph is built.

    ``expand(builder, input_values) -> output_values`` appends the nodes (gradients of a traced
    ``backward``, an optimizer's updates); ``outs`` are the eagerly computed results and ``key``
    the step's structure, so equal structures give equal graphs.
    """
    rec = Record(op, {}, ("macro", key), inputs, list(outs))
    rec.extra = expand
    rec.origin = origin
    return [Val(o, rec, i) for i, o in enumerate(outs)]
