"""``og.optim.Optimizer``: PyTorch's optimizer base class plus the update protocol.

An optimizer is PyTorch's API (``param_groups``, ``defaults``, ``state``, ``add_param_group``,
``zero_grad``, ``state_dict`` / ``load_state_dict``, ``step``) and one graph method: ``update``
appends the nodes that update one parameter group, given its parameters, gradients, per-parameter
state tensors and scalar hyperparameter inputs, and returns the new parameters and new state.

Everything else is shared, so nothing outside this file knows a particular optimizer:

- ``step()`` while ``og.compile`` traces records one macro node that expands into ``update``'s
  nodes inside the training-step graph; the state tensors become state inputs of the step, the
  hyperparameters scalar inputs read from ``param_groups`` at every call (a schedule never
  retraces);
- ``step()`` run eagerly is the same thing compiled on its own: a small compiled program whose
  data inputs are the gradients, run by the same state runner (in place) as any compiled
  step, so eager and compiled updates share every node;
- exported files and imported models are compiled steps, so they get it for free.

A subclass declares ``state_keys(group)`` (the per-parameter state its update reads and writes,
by PyTorch's names), ``init_state`` (the value of a state tensor that does not exist yet, or None
when the first step creates it), ``hyperparameters(group)`` (the scalar inputs, by name),
``structure(group)`` (what changes the graph: which terms exist) and ``update``. CONTRIBUTING.md
has the recipe.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from ..passes.builder import Builder, static_shape
from ..tracer import state as tracer_state
from ..tracer.autograd import zero_grads
from ..tracer.compile import CompiledFunction
from ..tracer.state import enable_grad
from ..tracer.tensor import Tensor, Val, emit_macro
from ..tracer.values import stand_in

Getter = Callable[[], Any]


def _without_trailing_ones(p: ir.Value) -> list[int] | None:
    """``p``'s shape without its trailing 1s (a 1x1 convolution's weight [O, C, 1, 1] -> [O, C]),
    or None when it has none to drop.

    NOTE: ONNX Runtime's CPU Mul of a tensor ending in 1s by a scalar broadcasts one element at a
    time: 2.5 ms for a [1280, 320, 1, 1] momentum buffer against 30 us for [1280, 320]
    (mobilenet_v2's 1x1 convolutions: most of its SGD update's time). So each update runs on the
    parameter's values in that shape (a Reshape: no copy in, one out); the ops are unchanged."""
    dims = static_shape(p)
    if dims is None or len(dims) < 2 or dims[-1] != 1:
        return None
    dims = list(dims)
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return dims


def _reshaped(b: Builder, v: ir.Value, dims: Sequence[int], like: ir.Value) -> ir.Value:
    out = b.op("Reshape", v, b.ints(list(dims)))
    out.shape, out.dtype = ir.Shape(dims), like.dtype
    return out


class Optimizer:
    """``torch.optim.Optimizer``: parameter groups, per-parameter state, and the update protocol."""

    #: Short names of state tensors in compiled graphs (``momentum.<param>``); default: the key.
    state_names: ClassVar[dict[str, str]] = {}
    #: The dtype hyperparameters are fed in; None: the dtype of the group's parameters.
    scalar_dtype: ClassVar[np.dtype | None] = None

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        if isinstance(params, Tensor):
            # Iterating a tensor would give its rows: PyTorch refuses it the same way.
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            f"Tensors or dicts, but got a Tensor of shape {list(params.shape)}")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        self._eager: CompiledFunction | None = None  # the eager update, for one set of params
        self._eager_params: tuple[int, ...] = ()
        for group in groups:
            self.add_param_group(group)

    # ----------------------------------------------------------------- the protocol
    def validate(self, group: dict[str, Any]) -> None:
        """Raise PyTorch's error for a bad hyperparameter (checked at every step too)."""

    def structure(self, group: dict[str, Any]) -> Hashable:
        """What shapes the update graph (which terms exist); values that are inputs stay out."""
        return ()

    def state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The per-parameter state the update of ``group`` reads and writes, by PyTorch's names."""
        return ()

    def init_state(self, p: Tensor, group: dict[str, Any], key: str) -> np.ndarray:
        """The value of state ``key`` before the first step (unless the first step creates it)."""
        return np.zeros_like(p._v.data)

    def first_step_creates(self, group: dict[str, Any], key: str) -> bool:
        """Whether the first step makes state ``key`` itself (``update`` then gets None for it
        and returns a value of the parameter's shape): a first step with its own graph."""
        return False

    def state_like(self, p: Tensor, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype of state ``key`` of ``p`` (checked by ``load_state_dict``)."""
        return p.shape, p.dtype

    def hyperparameters(self, group: dict[str, Any]) -> dict[str, Getter]:
        """The group's scalar graph inputs by name, each with a getter read at every call."""
        return {"lr": lambda: group["lr"]}

    def update(self, b: Builder, structure: Any, params: Sequence[ir.Value],
               grads: Sequence[ir.Value], states: Sequence[dict[str, ir.Value | None]],
               hyper: dict[str, ir.Value]) -> tuple[list[ir.Value], list[dict[str, ir.Value]]]:
        """Append the update of one parameter group; returns new parameters and new state."""
        raise NotImplementedError(f"{type(self).__name__} does not define update()")

    # ----------------------------------------------------------------- PyTorch's API
    def add_param_group(self, group: dict[str, Any]) -> None:
        group = dict(group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        if not group["params"]:
            raise ValueError("optimizer got an empty parameter list")
        for i, p in enumerate(group["params"]):
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is "
                                f"{type(p).__name__}")
            # NOTE: a frozen leaf (requires_grad False) is accepted, as in PyTorch: fine-tuning
            # passes model.parameters() with some layers frozen; their grad stays None.
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
            if any(p is q for g in self.param_groups for q in g["params"]):
                raise ValueError("some parameters appear in more than one parameter group")
            if any(p is q for q in group["params"][:i]):
                # PyTorch warns and updates such a parameter once per occurrence; one update
                # per step is what the graph does, so refuse rather than differ silently.
                raise ValueError("a parameter appears more than once in a parameter group")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self.validate(group)
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grads((p for group in self.param_groups for p in group["params"]), set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient (PyTorch skips the others)."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        for group in self.param_groups:
            self.validate(group)
        trace = tracer_state.active_trace()
        if trace is not None:
            self._record(trace, params, [p.grad for p in params])
        else:
            self._eager_step(params)
        return loss

    # ----------------------------------------------------------------- recording the update
    def _record(self, trace: Any, params: list[Tensor], grads: Sequence[Tensor]) -> None:
        """Record the update of ``params`` (with gradients ``grads``) as one macro node."""
        trace.add_optimizer(self)
        index = next(j for j, o in enumerate(trace.optimizers) if o is self)
        grad_of = {id(p): g for p, g in zip(params, grads)}
        inputs: list[Val] = []
        outs: list[np.ndarray] = []
        layout: list[tuple[Any, int, tuple[tuple[str, bool], ...], tuple[str, ...]]] = []
        written: list[tuple[Tensor, str | None]] = []  # per output: its parameter, state key
        for gi, group in enumerate(self.param_groups):
            members = [p for p in group["params"] if id(p) in grad_of]
            if not members:
                continue
            keys = self.state_keys(group)
            present = []
            for p in members:
                state = self.state.setdefault(p, {})
                for key in keys:
                    if key not in state and not self.first_step_creates(group, key):
                        trace.remember(self.initial_state(p, key, group))
                present.append(tuple((key, key in state) for key in keys))
            for p, has in zip(members, present):
                inputs += [p._v, grad_of[id(p)]._v]
                inputs += [self.state[p][key]._v for key, there in has if there]
            getters = self.hyperparameters(group)
            dtype = self.scalar_dtype or members[0].dtype
            suffix = "" if gi == 0 else f".group{gi}"
            prefix = "" if index == 0 else f"optimizer{index}."
            inputs += [trace.scalar_input(f"{prefix}{name}{suffix}", getter, dtype)
                       for name, getter in getters.items()]
            layout.append((self.structure(group), len(members), tuple(present), tuple(getters)))
            # NOTE: traced values are discarded (the first call runs the compiled graph), so the
            # update is not computed here: placeholders of the right shapes stand in.
            for p in members:
                outs.append(stand_in(p.shape, p._v.data.dtype))
                written.append((p, None))
            for p in members:
                for key in keys:
                    like = self.state[p][key]._v.data if key in self.state[p] else p._v.data
                    outs.append(stand_in(like.shape, like.dtype))
                    written.append((p, key))
        layout_key = tuple(layout)

        def expand(b: Builder, values: list[ir.Value]) -> list[ir.Value]:
            return self._expand(b, values, layout_key)

        vals = emit_macro(type(self).__name__, inputs, outs, expand, key=layout_key,
                          origin="opt")
        for (p, key), val in zip(written, vals):
            if key is None:
                p._v = val  # the traced update: the compiled step outputs it
            elif key in self.state[p]:
                self.state[p][key]._v = val
            else:
                self.state[p][key] = Tensor(val)  # created by this step (PyTorch's first step)

    def _expand(self, b: Builder, values: list[ir.Value], layout: tuple) -> list[ir.Value]:
        """The update nodes of every group, from the macro's flat inputs (``_record``'s order)."""
        it = iter(values)
        outputs: list[ir.Value] = []
        for structure, n, present, hyper_names in layout:
            params, grads, states = [], [], []
            for has in present:
                params.append(next(it))
                grads.append(next(it))
                states.append({key: next(it) if there else None for key, there in has})
            hyper = {name: next(it) for name in hyper_names}
            # Parameter-shaped values without trailing 1s (see _without_trailing_ones).
            flat = [_without_trailing_ones(p) for p in params]
            ins_p, ins_g, ins_s = [], [], []
            for p, g, state, dims in zip(params, grads, states, flat):
                if dims is None:
                    ins_p.append(p)
                    ins_g.append(g)
                    ins_s.append(state)
                    continue
                ins_p.append(_reshaped(b, p, dims, p))
                ins_g.append(_reshaped(b, g, dims, p))
                ins_s.append({key: v if v is None or v.shape != p.shape  # Adam's scalar step
                              else _reshaped(b, v, dims, p) for key, v in state.items()})
            new_params, new_states = self.update(b, structure, ins_p, ins_g, ins_s, hyper)
            for p, new, dims in zip(params, new_params, flat):
                if dims is not None:
                    new = _reshaped(b, new, list(p.shape), p)
                new.shape, new.dtype = p.shape, p.dtype
                outputs.append(new)
            for p, has, state, new, dims in zip(params, present, states, new_states, flat):
                for key, _ in has:
                    value = new[key]
                    # State that a first step creates has the parameter's shape too.
                    if dims is not None and (state[key] is None or state[key].shape == p.shape):
                        value = _reshaped(b, value, list(p.shape), p)
                    outputs.append(value)
        return outputs

    def _eager_step(self, params: list[Tensor]) -> None:
        """The eager update: the same nodes, compiled on their own (gradients are the inputs).

        Parameters and state stay in the runner's two buffer sets between steps, as in any
        compiled step: nothing is copied or allocated per step, and tensors view the live buffers.
        """
        key = tuple(id(p) for p in params)
        if self._eager is None or key != self._eager_params:

            def update(*grads: Tensor) -> None:
                self._record(tracer_state.active_trace(), params, grads)

            # One set of parameters at a time: the old runner's buffers are dropped.
            self._eager = CompiledFunction(update, arg_names=[f"grad{i}" for i in
                                                              range(len(params))])
            self._eager_params = key
        self._eager(*[p.grad for p in params])
        self._eager.keep_last()

    def initial_state(self, p: Tensor, key: str, group: dict[str, Any] | None = None) -> Tensor:
        """A new state tensor ``key`` of ``p`` at its value before the first step."""
        if group is None:
            group = next(g for g in self.param_groups if any(p is q for q in g["params"]))
        t = self.state.setdefault(p, {})[key] = Tensor(Val(np.array(self.init_state(p, group,
                                                                                    key))))
        return t

    @property
    def _runners(self) -> dict[Any, Any]:
        """The eager update's runners (tests check that schedules and edits never rebuild)."""
        return {} if self._eager is None else self._eager.runners()

    # ----------------------------------------------------------------- compiled-step guards
    def graph_key(self) -> tuple:
        """What a compiled step that calls ``step()`` depends on besides values fed as inputs:
        each group's structure, its parameters, and which state that a first step creates
        exists (other missing state, cleared by ``load_state_dict``, is made as before a first
        step when the step runs)."""
        return tuple(
            (self.structure(g), tuple(id(p) for p in g["params"]),
             tuple(key in self.state.get(p, {}) for key in self.state_keys(g)
                   if self.first_step_creates(g, key) for p in g["params"]))
            for g in self.param_groups)

    def state_tensors(self) -> Iterable[tuple[Tensor, str, Tensor]]:
        """(parameter, key, tensor) for every state tensor, in parameter order."""
        for group in self.param_groups:
            for p in group["params"]:
                for key, t in self.state.get(p, {}).items():
                    if isinstance(t, Tensor):
                        yield p, key, t

    def state_name(self, key: str) -> str:
        return self.state_names.get(key, key)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """PyTorch's layout: ``state`` by parameter index, ``param_groups`` with indices."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state = {index[id(p)]: {k: np.array(v._v.data) for k, v in s.items()}
                 for p, s in self.state.items() if id(p) in index and s}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [index[id(p)] for p in g["params"]]} for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(own["params"]) for g, own in zip(groups, self.param_groups)):
            raise ValueError("loaded state dict has a different number of parameter groups or "
                             "parameters than this optimizer")
        name = type(self).__name__
        for i, group in enumerate(groups):
            # Options PyTorch added in later releases are filled in from the defaults, as its
            # __setstate__ does; any other missing one means another optimizer's state.
            missing = sorted(set(self.defaults) - set(group) - _LATER_OPTIONS)
            if missing:
                raise ValueError(f"loaded state dict is not {name}'s: its parameter group {i} "
                                 f"has no {missing} (found {sorted(set(group) - {'params'})})")
        params = [p for g in self.param_groups for p in g["params"]]
        group_of = {id(p): gi for gi, g in enumerate(groups) for p in self.param_groups[gi]["params"]}
        for i, entry in state_dict["state"].items():
            p = params[int(i)]
            expected = self.state_keys({**self.param_groups[group_of[id(p)]],
                                        **groups[group_of[id(p)]]})
            found = sorted(k for k, v in entry.items() if v is not None)
            if not set(found) <= set(expected):
                raise ValueError(f"loaded state dict is not {name}'s: the state of parameter {i} "
                                 f"has {found}, {name} with these options keeps "
                                 f"{sorted(expected)}")
        for own, group in zip(self.param_groups, groups):
            own.update({k: v for k, v in group.items() if k != "params"})
            for key in _LATER_OPTIONS & set(self.defaults) - set(group):
                own[key] = self.defaults[key]
        self.state = {}
        for i, entry in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {}
            for k, v in entry.items():
                if v is None:
                    continue  # PyTorch 2.0-2.3 save momentum_buffer None when momentum is 0
                shape, dtype = self.state_like(p, k)
                array = np.asarray(v._v.data if isinstance(v, Tensor) else v, dtype=dtype)
                if array.shape != tuple(shape):
                    raise ValueError(f"optimizer state {k} of parameter {i}: expected shape "
                                     f"{list(shape)}, got {list(array.shape)}")
                self.state[p][k] = Tensor(Val(np.array(array)))

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {g[k]}" for k in sorted(g) if k != "params"]  # as PyTorch
        return "\n".join(lines) + "\n)"


# Options that state dicts of older PyTorch releases lack.
_LATER_OPTIONS = frozenset({"maximize", "foreach", "capturable", "differentiable", "fused",
                            "decoupled_weight_decay"})


def as_dtype_of(b: Builder, scalar: ir.Value, like: ir.Value) -> ir.Value:
    """A hyperparameter input cast to a parameter's dtype (groups may mix float32 and float64)."""
    return scalar if scalar.dtype == like.dtype else b.op("Cast", scalar, to=like.dtype)
