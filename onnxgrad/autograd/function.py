"""``og.autograd.Function``: an op with a forward and a user-written backward.

NOTE (design): how a custom gradient travels through a standard ONNX graph.

- ``Function.apply`` runs ``forward`` under ``no_grad``. Inside ``og.compile`` its ops are still
  recorded (as every op while tracing), marked as carrying no gradient.
- Each differentiable output is then recorded as a **boundary**: an ``Identity`` of the forward's
  output (a plain standard node, so the forward graph stays valid ONNX anywhere), whose record
  also lists, after that real input, the function's tensor inputs and saved tensors. When the
  recording becomes an onnx_ir graph (``tracer/graph.py``) those extra values ride along as
  in-memory node metadata (``CUSTOM_INPUTS``) beside an :class:`_Application` (``CUSTOM_VJP``),
  which the autodiff pass (``passes/autodiff.py``) calls instead of the ``Identity`` rule: the
  gradient flows from the outputs to the function's inputs, never through the forward's nodes.
- ``_Application.vjp`` runs the user's ``backward`` once per gradient graph built, with the
  recording on (stand-in gradient values; the saved tensors' values), and copies the nodes it
  recorded into the pass's builder, wired to the graph's own values. The backward is therefore
  ONNX nodes like any rule's: it runs in the eager backward session, is part of a compiled step,
  and is in its exported file; on the replay path (``create_graph=True``) its nodes are emitted
  eagerly and can be differentiated again.

Only the metadata lives outside ONNX: an exported or imported graph holds the backward already
expanded, never the Python function. A backward that reads a tensor's value (``.item()``, ``if``
on a tensor) cannot be traced and is refused with a clear error.
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx_ir as ir

from ..passes.autodiff import CUSTOM_VJP, CustomVJP
from ..passes.builder import Builder
from ..tracer import state
from ..tracer.tensor import Record, Tensor, TraceError, Val, _contig

_tokens = itertools.count()
_GUARDED = (bool, int, float, complex, str, bytes, type(None))


class FunctionCtx:
    """The ``ctx`` of ``forward``/``backward``: saved tensors, ``needs_input_grad`` and any plain
    attributes the forward stores for the backward (``ctx.scale = 2``)."""

    def __init__(self) -> None:
        self.needs_input_grad: tuple[bool, ...] = ()
        self.materialize_grads = True
        self._saved: tuple[Tensor | None, ...] = ()
        self._unpacked: tuple[Tensor | None, ...] | None = None
        self._non_differentiable: set[int] = set()

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        for i, t in enumerate(tensors):
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"save_for_backward can only save variables, but argument {i} is "
                                f"not a Tensor or None (got {type(t).__name__})")
        self._saved = tuple(tensors)

    @property
    def saved_tensors(self) -> tuple[Tensor | None, ...]:
        if self._unpacked is not None:
            return self._unpacked
        return self._saved

    def mark_non_differentiable(self, *tensors: Tensor) -> None:
        self._non_differentiable.update(id(t) for t in tensors)

    def set_materialize_grads(self, value: bool) -> None:
        self.materialize_grads = bool(value)

    def mark_dirty(self, *tensors: Tensor) -> None:
        raise NotImplementedError("mark_dirty: in-place custom Functions are not supported; "
                                  "return a new tensor from forward")

    def _key(self) -> tuple:
        """The plain attributes the backward may read: part of the gradient graph's identity."""
        items = []
        for name, value in sorted(vars(self).items()):
            if name in ("_saved", "_unpacked", "_non_differentiable"):
                continue
            if isinstance(value, _GUARDED) or (isinstance(value, tuple)
                                               and all(isinstance(v, _GUARDED) for v in value)):
                items.append((name, value))
            else:
                items.append((name, "object", id(value)))
        return tuple(items)


class _Recording:
    """The active 'trace' while a backward is recorded: every op is recorded, nothing else."""

    def remember(self, t: Tensor) -> None:
        pass

    def add_module(self, module: Any) -> None:
        pass

    def accumulate(self, t: Tensor, g: Val) -> None:
        raise RuntimeError("backward() cannot be called inside a custom Function's backward")

    def backward(self, tensors: Any, seeds: Any) -> None:
        raise RuntimeError("backward() cannot be called inside a custom Function's backward")


class _Application(CustomVJP):
    """One call of ``Function.apply``: what the autodiff pass needs to run its backward."""

    def __init__(self, cls: type, ctx: FunctionCtx, arg_index: list[int], n_args: int,
                 inputs: list[Val], saved: list[Val], outputs: list[Val]):
        self.cls = cls
        self.ctx = ctx
        self.name = cls.__name__
        self.arg_index = arg_index  # position of each tensor input among forward's arguments
        self.n_args = n_args
        self.n_inputs = len(inputs)
        self.n_outputs = len(outputs)
        self.in_meta = [(v.data.shape, v.data.dtype) for v in inputs]
        self.out_meta = [(v.data.shape, v.data.dtype) for v in outputs]
        self.saved = saved  # the saved values (kept, as PyTorch's saved tensors)
        self.saved_output: list[int | None] = [None] * len(saved)  # which are outputs

    def vjp(self, b: Builder, grads: list[ir.Value | None], inputs: list[ir.Value | None],
            saved: list[ir.Value | None], needs: list[bool],
            outputs: list[ir.Value | None]) -> list[ir.Value | None]:
        live = getattr(b.target, "vals", None)  # the replay path: real values of the graph
        values: dict[int, ir.Value] = {}  # id(placeholder Val) -> graph value
        grad_tensors: list[Tensor | None] = []
        for g, (shape, dtype) in zip(grads, self.out_meta):
            if g is None:
                if not self.ctx.materialize_grads:
                    grad_tensors.append(None)
                    continue
                g = b.op("ConstantOfShape", b.ints(shape), value=ir.tensor(np.zeros(1, dtype)))
                g.shape = ir.Shape(shape)
                if live is not None:
                    live[id(g)] = Val(np.zeros(shape, dtype))
            data = live[id(g)].data if live is not None else np.zeros(shape, dtype)
            placeholder = Val(data)
            values[id(placeholder)] = g
            grad_tensors.append(Tensor(placeholder))
        unpacked: list[Tensor | None] = []
        present = iter(saved)  # the boundary lists only the saved tensors that are not None
        for val, k in zip(self.saved, self.saved_output):
            if val is None:
                unpacked.append(None)
                continue
            value = next(present)
            if k is not None and outputs[k] is not None:
                # A saved output is read as the function's output, so that differentiating the
                # backward again (create_graph) flows through this function too, as PyTorch's.
                value = outputs[k]
            data = live[id(value)].data if live is not None else val.data
            placeholder = Val(data)
            values[id(placeholder)] = value
            unpacked.append(Tensor(placeholder))
        results = self._run_backward(grad_tensors, tuple(unpacked))
        return self._copy(b, results, values, needs)

    def _run_backward(self, grads: list[Tensor | None], unpacked: tuple) -> list[Any]:
        token = f"custom-backward{next(_tokens)}"
        previous_trace, previous_grad = state.active_trace(), state.grad_enabled()
        self.ctx._unpacked = unpacked
        state.set_trace(_Recording())
        state.set_grad_enabled(True)
        try:
            with state.recording_as(token):
                result = self.cls.backward(self.ctx, *grads)
        except TraceError as exc:
            raise TraceError(f"{self.name}.backward is traced into ONNX nodes, so it cannot read "
                             f"a tensor's value: {exc}") from None
        finally:
            state.set_trace(previous_trace)
            state.set_grad_enabled(previous_grad)
            self.ctx._unpacked = None
        result = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(result) != self.n_args:
            if len(result) > self.n_args and all(r is None for r in result[self.n_args:]):
                result = result[:self.n_args]
            else:
                raise RuntimeError(f"function {self.name}Backward returned an incorrect number "
                                   f"of gradients (expected {self.n_args}, got {len(result)})")
        self._token = token
        return result

    def _copy(self, b: Builder, results: list[Any], values: dict[int, ir.Value],
              needs: list[bool]) -> list[ir.Value | None]:
        """The nodes the backward recorded, appended to ``b`` and wired to the graph's values."""
        token = self._token
        grads: list[Tensor | None] = []
        for k, i in enumerate(self.arg_index):
            r = results[i]
            if r is not None and not isinstance(r, Tensor):
                raise TypeError(f"function {self.name}Backward returned a gradient of type "
                                f"{type(r).__name__} at index {i}; expected a Tensor or None")
            grads.append(r if needs[k] else None)
        order: list[Record] = []
        seen: set[int] = set()
        for r in grads:
            if r is None:
                continue
            stack: list[tuple[Record, bool]] = []
            if r._v.rec is not None and r._v.rec.origin == token:
                stack.append((r._v.rec, False))
            while stack:
                rec, expanded = stack.pop()
                if expanded:
                    if id(rec) not in seen:
                        seen.add(id(rec))
                        order.append(rec)
                    continue
                if id(rec) in seen:
                    continue
                stack.append((rec, True))
                for v in rec.inputs:
                    if v is not None and v.rec is not None and v.rec.origin == token \
                            and id(v.rec) not in seen and id(v) not in values:
                        stack.append((v.rec, False))
        produced: dict[tuple[int, int], ir.Value] = {}

        def value_of(v: Val | None) -> ir.Value | None:
            if v is None:
                return None
            if id(v) in values:
                return values[id(v)]
            if v.rec is not None and v.rec.origin == token:
                return produced[(id(v.rec), v.index)]
            if v.rec is not None or (v.leaf is not None and v.leaf() is not None):
                raise RuntimeError(
                    f"{self.name}.backward uses a tensor that it neither received nor made "
                    f"(shape {list(v.data.shape)}); pass tensors from forward to backward with "
                    f"ctx.save_for_backward(...)")
            c = b.const(_contig(v.data))
            values[id(v)] = c
            return c

        for rec in order:
            if rec.extra is not None:
                raise RuntimeError(f"{self.name}.backward: a step made of several nodes "
                                   f"({rec.op}) cannot be part of a custom backward")
            attrs = {k: (ir.tensor(a) if isinstance(a, np.ndarray) else a)
                     for k, a in rec.attrs.items()}
            ins = [value_of(v) for v in rec.inputs]
            outs = b.op(rec.op, *ins, _outputs=len(rec.outs), **attrs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            for j, (value, data) in enumerate(zip(outs, rec.outs)):
                value.shape = ir.Shape(data.shape)
                value.dtype = ir.DataType.from_numpy(data.dtype)
                produced[(id(rec), j)] = value
        out: list[ir.Value | None] = []
        for k, r in enumerate(grads):
            if r is None:
                out.append(None)
                continue
            g = value_of(r._v)
            shape, dtype = self.in_meta[k]
            if r.shape != tuple(shape):
                try:
                    np.broadcast_shapes(shape, r.shape)
                    ok = np.broadcast_shapes(shape, r.shape) == r.shape
                except ValueError:
                    ok = False
                if not ok:
                    raise RuntimeError(
                        f"Function {self.name}Backward returned an invalid gradient at index "
                        f"{self.arg_index[k]} - got {list(r.shape)} but expected shape "
                        f"compatible with {list(shape)}")
                g = b.sum_to(g, list(r.shape), list(shape))
            if r.dtype != dtype:
                g = b.op("Cast", g, to=ir.DataType.from_numpy(dtype))
            out.append(g)
        return out


class FunctionMeta(type):
    pass


class Function(metaclass=FunctionMeta):
    """``torch.autograd.Function``: subclass it with ``@staticmethod forward(ctx, *args)`` and
    ``@staticmethod backward(ctx, *grads)``, then call ``MyFn.apply(*args)``.

    ``forward`` may also take no ``ctx`` when the class defines ``setup_context(ctx, inputs,
    output)``, as in PyTorch 2.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Legacy autograd function with non-static forward method is "
                           "deprecated. Please use new-style autograd function with static "
                           "forward method. (Example: https://pytorch.org/docs/stable/"
                           "autograd.html#torch.autograd.Function)")

    @staticmethod
    def forward(ctx: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("You must implement the forward function for custom "
                                  "autograd.Function.")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> Any:
        raise NotImplementedError("setup_context is not implemented.")

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        raise NotImplementedError("You must implement either the backward or vjp method for "
                                  "your custom autograd.Function to use it with backward mode "
                                  "AD.")

    vjp = backward

    @classmethod
    def apply(cls, *args: Any) -> Any:
        ctx = FunctionCtx()
        ctx.needs_input_grad = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
        separate = cls.setup_context is not Function.setup_context
        with _no_grad():
            output = cls.forward(*args) if separate else cls.forward(ctx, *args)
        if separate:
            cls.setup_context(ctx, args, output)
        single = not isinstance(output, (tuple, list))
        outputs = [output] if single else list(output)
        arg_index = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        if not (state.grad_enabled() and any(ctx.needs_input_grad)):
            return output
        inputs = [args[i]._v for i in arg_index]
        saved = [None if t is None else t._v for t in ctx._saved]
        outs = [o for o in outputs if isinstance(o, Tensor)]
        app = _Application(cls, ctx, arg_index, len(args), inputs, saved, [o._v for o in outs])
        key = ("function", id(cls), cls.__qualname__, ctx._key(),
               tuple(t is None for t in ctx._saved))
        position = {id(o): k for k, o in enumerate(outs)}
        app.saved_output = [None if t is None else position.get(id(t)) for t in ctx._saved]
        k = 0
        for n, o in enumerate(outputs):
            if not isinstance(o, Tensor):
                continue
            if id(o) in ctx._non_differentiable or o.dtype.kind != "f":
                k += 1
                continue
            rec = Record("Identity", {}, key + (k,), [o._v, *inputs,
                                                      *[s for s in saved if s is not None]],
                         [o._v.data])
            rec.meta = {CUSTOM_VJP: (app, k)}
            rec.origin = state.origin()
            outputs[n] = Tensor(Val(o._v.data, rec, 0, True))
            k += 1
        return outputs[0] if single else tuple(outputs) if isinstance(output, tuple) \
            else outputs


class _no_grad:
    def __enter__(self) -> None:
        self._prev = state.grad_enabled()
        state.set_grad_enabled(False)

    def __exit__(self, *exc: object) -> None:
        state.set_grad_enabled(self._prev)


def once_differentiable(fn: Any) -> Any:
    """Accepted for compatibility: the backward is traced either way."""
    return fn


__all__ = ["Function", "FunctionCtx", "once_differentiable"]
