"""``og.nn.utils``: gradient clipping, ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``.

Both are ONNX nodes on the gradients, so the same code runs eagerly (node by node) and inside a
step traced by ``og.compile``, where the total norm is computed in the graph and never read back
into Python: the scaled gradients feed the optimizer's update nodes directly.

Gradients are modified in place, as PyTorch's are: eagerly each ``.grad`` tensor takes the
clipped value (a reference to it sees the change); while tracing, the gradient's traced value is
replaced the way a traced ``backward`` accumulates into ``.grad``, so ``optimizer.step()`` reads
the clipped gradients and the compiled step hands them out as ``.grad`` after each call.
"""
from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable

import numpy as np
from onnx.helper import np_dtype_to_tensor_dtype

from ..tracer import state as tracer_state
from ..tracer.state import no_grad
from ..tracer.tensor import Tensor, TraceError, Val, const, emit

__all__ = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm"]


def _parameters(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        return [parameters]
    is_generator = isinstance(parameters, types.GeneratorType)
    params = list(parameters)
    if is_generator and not params:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                      stacklevel=3)
    return params


def _scalar(value: float, like: Val) -> Val:
    return const(np.asarray(value, dtype=like.data.dtype))


def _vector_norm(v: Val, norm_type: float) -> Val:
    """``torch.linalg.vector_norm(v, norm_type)`` over all elements, as a 0-d value."""
    if norm_type == 2.0:
        return emit("ReduceL2", [v], {"keepdims": 0})[0]
    if norm_type == 1.0:
        return emit("ReduceL1", [v], {"keepdims": 0})[0]
    magnitude = emit("Abs", [v])[0]
    if norm_type in (math.inf, -math.inf):
        extreme = emit("ReduceMax" if norm_type > 0 else "ReduceMin", [magnitude],
                       {"keepdims": 0})[0]
        # NOTE: ONNX Runtime's ReduceMax/ReduceMin skip NaN; PyTorch's propagate it (and
        # error_if_nonfinite must see it): add the sum of the NaN elements, which is 0 or NaN.
        nans = emit("Where", [emit("IsNaN", [v])[0], v, _scalar(0.0, v)])[0]
        return emit("Add", [extreme, emit("ReduceSum", [nans], {"keepdims": 0})[0]])[0]
    if norm_type == 0.0:  # the number of nonzero elements
        nonzero = emit("Not", [emit("Equal", [v, _scalar(0.0, v)])[0]])[0]
        counted = emit("Cast", [nonzero], {"to": _onnx_dtype(v.data.dtype)})[0]
        return emit("ReduceSum", [counted], {"keepdims": 0})[0]
    powered = emit("Pow", [magnitude, _scalar(norm_type, v)])[0]
    total = emit("ReduceSum", [powered], {"keepdims": 0})[0]
    return emit("Pow", [total, _scalar(1.0 / norm_type, total)])[0]


def _onnx_dtype(dtype: np.dtype) -> int:
    return int(np_dtype_to_tensor_dtype(np.dtype(dtype)))


def _check_finite_readable(what: str) -> None:
    trace = tracer_state.active_trace()
    if trace is not None:
        where = tracer_state.format_frame(tracer_state.user_frame())
        raise TraceError(
            f"{what}(error_if_nonfinite=True) needs the total norm's value in Python, which a "
            f"step traced by og.compile does not have ({where}): the norm is a node of the "
            "graph. Pass error_if_nonfinite=False inside the compiled step and check the norm "
            "it returns after the call, e.g. `loss, norm = step(x, y)` then "
            "`if not math.isfinite(float(norm)): ...`.")


def get_total_norm(tensors: Tensor | Iterable[Tensor], norm_type: float = 2.0,
                   error_if_nonfinite: bool = False, foreach: bool | None = None) -> Tensor:
    """``torch.nn.utils.get_total_norm``: the norm of the tensors' norms (one 0-d tensor).

    ``foreach`` is accepted for PyTorch's signature; the norm is the same nodes either way.
    """
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    norm_type = float(norm_type)
    if not tensors:
        return Tensor(Val(np.asarray(0.0, np.float32)))  # torch.tensor(0.0)
    if error_if_nonfinite:
        _check_finite_readable("get_total_norm")
    with no_grad():
        norms = [_vector_norm(t._v, norm_type) for t in tensors]
        # torch.stack promotes mixed dtypes (a float64 group with float32 ones).
        dtype = np.result_type(*[n.data.dtype for n in norms])
        axes = const(np.asarray([0], np.int64))
        stacked = emit("Concat", [
            emit("Unsqueeze", [n if n.data.dtype == dtype else
                               emit("Cast", [n], {"to": _onnx_dtype(dtype)})[0], axes])[0]
            for n in norms], {"axis": 0})[0]
        total = _vector_norm(stacked, norm_type)
    if error_if_nonfinite and not np.isfinite(total.data):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`")
    return Tensor(total)


def _set_grad(p: Tensor, val: Val) -> None:
    """Give ``p.grad`` the value ``val`` in place (see the module docstring)."""
    grad = p.grad
    assert grad is not None
    trace = tracer_state.active_trace()
    if trace is None:
        grad._write(val)
    elif grad._v.rec is None and id(grad) not in trace.initial:
        # A gradient from before the traced step that the step did not touch: its value is a
        # read-only input of the graph, so the clipped value is a new .grad tensor, which the
        # compiled step hands out after each call (the trace puts the old one back).
        trace.remember(p)
        p.grad = Tensor(val)
    else:
        grad._v = val  # a traced gradient (or accumulated-gradient state): as backward does


def clip_grads_with_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float,
                          total_norm: Tensor, foreach: bool | None = None) -> None:
    """``torch.nn.utils.clip_grads_with_norm_``: scale every gradient by
    ``min(max_norm / (total_norm + 1e-6), 1)``."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    params = [p for p in params if p.grad is not None]
    max_norm = float(max_norm)
    if not params:
        return
    with no_grad():
        norm = total_norm._v
        # clip_coef = max_norm / (total_norm + 1e-6); torch.clamp(clip_coef, max=1.0)
        shifted = emit("Add", [norm, _scalar(1e-6, norm)])[0]
        coef = emit("Div", [_scalar(max_norm, norm), shifted])[0]
        coef = emit("Min", [coef, _scalar(1.0, norm)])[0]
        by_dtype: dict[np.dtype, Val] = {norm.data.dtype: coef}
        for p in params:
            g = p.grad._v
            if g.data.dtype not in by_dtype:
                by_dtype[g.data.dtype] = emit("Cast", [coef],
                                              {"to": _onnx_dtype(g.data.dtype)})[0]
            _set_grad(p, emit("Mul", [g, by_dtype[g.data.dtype]])[0])


def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``: scale the gradients in place so that their total
    norm (the norm of the per-gradient norms) is at most ``max_norm``; returns the total norm
    before clipping as a 0-d tensor.

    Inside ``og.compile`` the norm and the scaling are graph nodes; ``error_if_nonfinite=True``
    cannot read the norm there and raises a ``TraceError`` saying so (check the returned norm
    after the call instead). ``foreach`` is accepted for PyTorch's signature.
    """
    params = _parameters(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    total_norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    clip_grads_with_norm_(params, max_norm, total_norm, foreach)
    return total_norm


def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float,
                     foreach: bool | None = None) -> None:
    """``torch.nn.utils.clip_grad_value_``: clamp every gradient to
    ``[-clip_value, clip_value]`` in place."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    clip_value = float(clip_value)
    with no_grad():
        for p in params:
            if p.grad is None:
                continue
            g = p.grad._v
            # NOTE: clamp_min then clamp_max, as PyTorch's foreach path: a negative clip_value
            # gives clip_value everywhere, and NaN stays NaN (Max/Min propagate it).
            low = emit("Max", [g, _scalar(-clip_value, g)])[0]
            _set_grad(p, emit("Min", [low, _scalar(clip_value, g)])[0])
