"""``onnxgrad.optim``: SGD with PyTorch's semantics, its update nodes built by ``passes.sgd``.

``step()`` runs the update of every parameter as one ONNX Runtime session (cached by structure).
While ``og.compile`` traces, the same nodes become part of the training-step graph, with the
hyperparameters as scalar graph inputs read from ``param_groups`` at every call.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from .passes.builder import Builder
from .passes.sgd import SGDFlags, sgd_updates
from .runtime import IR_VERSION, OPSET
from .runtime.step import StepRunner
from .tracer import state as tracer_state
from .tracer.autograd import zero_grads
from .tracer.graph import ir_type
from .tracer.tensor import Tensor, Val, emit_macro
from .tracer.views import RunnerViews

_HYPER = ("lr", "momentum", "dampening", "weight_decay")


class SGD:
    """``torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov)``."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float = 0, nesterov: bool = False, *,
                 maximize: bool = False) -> None:
        self.defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                             weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        _check_hyper(self.defaults)
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
        self._runners: dict[Any, StepRunner] = {}  # the eager update, by structure
        # Per state input name of the eager runner: the Val last given to the tensor (to notice
        # eager edits), and the Vals given out that may still wrap one of its buffers.
        self._views = RunnerViews()  # the eager runner's buffers that tensors view
        for group in groups:
            self.add_param_group(group)

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
        _check_hyper(group)
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grads((p for group in self.param_groups for p in group["params"]), set_to_none)

    # ----------------------------------------------------------------- the update
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        entries: list[tuple[int, Tensor]] = [
            (gi, p) for gi, group in enumerate(self.param_groups) for p in group["params"]
            if p.grad is not None
        ]
        if not entries:
            return loss
        for gi, group in enumerate(self.param_groups):
            _check_hyper(group)
        flags = [sgd_flags(g) for g in self.param_groups]
        trace = tracer_state.active_trace()
        if trace is not None:
            trace.add_optimizer(self)
        bufs = [self.momentum_buffer(p, flags[gi], trace) for gi, p in entries]
        used = sorted({gi for gi, _ in entries})
        hypers = {gi: self._hyper_vals(gi, flags[gi], entries, trace) for gi in used}

        inputs: list[Val] = []
        for (gi, p), buf in zip(entries, bufs):
            inputs += [p._v, p.grad._v] + ([buf._v] if buf is not None else [])
        for gi in used:
            inputs += [v for v in hypers[gi] if v is not None]
        layout = tuple((gi, buf is not None) for (gi, _), buf in zip(entries, bufs))
        structure = (layout, tuple(flags[gi] for gi in used), tuple(used))

        def expand(b: Builder, values: list[ir.Value]) -> list[ir.Value]:
            return sgd_updates(b, values, layout, flags, used)

        if trace is not None:
            # NOTE: traced values are discarded (the first call runs the compiled graph), so the
            # update is not computed here: placeholders of the right shapes stand in.
            outs = [np.zeros_like(p._v.data) for (gi, p), buf in zip(entries, bufs)
                    for _ in range(2 if flags[gi].momentum else 1)]
            vals = emit_macro("SGD", inputs, outs, expand, key=structure, origin="opt")
        else:
            key = (structure, tuple((v.data.dtype.str, v.data.shape) for v in inputs))
            vals, eager_state = self._run_eager(key, expand, inputs, entries, bufs)
        k = 0
        for (gi, p), buf in zip(entries, bufs):
            if trace is not None:
                p._v = vals[k]  # the traced update: the compiled step outputs it
            else:
                p._set_leaf_data(vals[k].data)
            k += 1
            if flags[gi].momentum:
                holder = self.state.setdefault(p, {}).get("momentum_buffer")
                if holder is None:
                    holder = self.state[p]["momentum_buffer"] = Tensor(vals[k])
                else:
                    holder._v = vals[k]
                k += 1
        if trace is None:
            self._handed_out(eager_state)
        return loss

    def _run_eager(self, key: Any, expand: Any, inputs: list[Val], entries, bufs
                   ) -> tuple[list[Val], dict[str, Tensor]]:
        """Run the update with parameters and momentum buffers kept in a :class:`StepRunner`.

        As in a compiled step, they live in two buffer sets that the runs read and write in turn:
        no parameter is copied or allocated per step. Tensors view the live buffers; a value
        edited since the last step (``load_state_dict``, ``p.data = ...``) is copied in first.

        Values handed out that outlive their use are protected as ``tracer.views`` explains.
        """
        state: dict[str, str] = {}  # input name -> output name
        tensors: dict[str, Tensor] = {}
        i = o = 0
        for (gi, p), buf in zip(entries, bufs):
            state[f"in{i}"], tensors[f"in{i}"] = f"out{o}", p
            i, o = i + 2, o + 1
            if buf is not None:
                state[f"in{i}"], tensors[f"in{i}"] = f"out{o}", buf
                i += 1
            if self.param_groups[gi]["momentum"] != 0:
                o += 1
        runner = self._runners.get(key)
        if runner is None:
            model = _model_bytes(expand, inputs)
            runner = StepRunner(model, state, {n: tensors[n]._v.data for n in state})
            self._runners.clear()  # one structure at a time: the old buffers are dropped
            self._runners[key] = runner
            # The old runner's buffers: nothing writes those again.
            self._views = RunnerViews(shared=runner.device == "cpu")
            for n in state:
                self._views.start(n, tensors[n]._v)
        for name, t in tensors.items():
            edited = self._views.edited(name, t)
            # Both buffer sets are about to be written when edited (this one now, the other by
            # the run); otherwise only the set the current Val does not wrap.
            self._views.before_write(name, None if edited else runner.current(name))
            if edited:
                runner.write(name, t._v.data)
        feeds = {f"in{j}": v.data for j, v in enumerate(inputs) if f"in{j}" not in state}
        results = runner.run(feeds)
        by_output = {out: runner.current(name) for name, out in state.items()}
        outs = [Val(by_output[n] if n in by_output else results[n]) for n in
                (f"out{j}" for j in range(o))]
        return outs, tensors

    def _handed_out(self, tensors: dict[str, Tensor]) -> None:
        for name, t in tensors.items():
            self._views.hand_out(name, t._v)

    def momentum_buffer(self, p: Tensor, flags: SGDFlags, trace: Any = None) -> Tensor | None:
        """``p``'s buffer for the next step: None before a dampened first step."""
        if not flags.momentum:
            return None
        buf = self.state.get(p, {}).get("momentum_buffer")
        if buf is None and not flags.dampening:
            # NOTE: with no dampening a zero buffer gives PyTorch's first step exactly
            # (momentum * 0 + d_p == d_p), so the first step has the graph of every later one.
            buf = Tensor(Val(np.zeros_like(p._v.data)))
            self.state.setdefault(p, {})["momentum_buffer"] = buf
            if trace is not None:
                trace.remember(buf)
        return buf

    def _hyper_vals(self, gi: int, flags: SGDFlags, entries, trace) -> list[Val | None]:
        group = self.param_groups[gi]
        dtype = next(p.dtype for g, p in entries if g == gi)
        suffix = "" if gi == 0 else f".group{gi}"
        getters = hyper_inputs(group, flags)
        out: list[Val | None] = []
        for name in _HYPER:
            if name not in getters:
                out.append(None)
            elif trace is not None:
                out.append(trace.scalar_input(f"{name}{suffix}", getters[name], dtype))
            else:
                out.append(Val(np.asarray(getters[name](), dtype=dtype)))
        return out

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """PyTorch's layout: ``state`` by parameter index, ``param_groups`` with indices."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state = {index[id(p)]: {k: np.array(v._v.data) for k, v in s.items()}
                 for p, s in self.state.items() if id(p) in index}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [index[id(p)] for p in g["params"]]} for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(own["params"]) for g, own in zip(groups, self.param_groups)):
            raise ValueError("loaded state dict has a different number of parameter groups or "
                             "parameters than this optimizer")
        params = [p for g in self.param_groups for p in g["params"]]
        for own, group in zip(self.param_groups, groups):
            own.update({k: v for k, v in group.items() if k != "params"})
        self.state = {}
        for i, entry in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {}
            for k, v in entry.items():
                if v is None:
                    continue  # PyTorch 2.0-2.3 save momentum_buffer None when momentum is 0
                array = np.asarray(v._v.data if isinstance(v, Tensor) else v, dtype=p.dtype)
                if array.shape != p.shape:
                    raise ValueError(f"optimizer state {k} of parameter {i}: expected shape "
                                     f"{list(p.shape)}, got {list(array.shape)}")
                self.state[p][k] = Tensor(Val(np.array(array)))

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {g[k]}" for k in sorted(g) if k != "params"]  # as PyTorch
        return "\n".join(lines) + "\n)"


def _check_hyper(group: dict[str, Any]) -> None:
    lr, momentum = group["lr"], group["momentum"]
    if isinstance(lr, Tensor):
        raise TypeError("lr must be a Python number (it is fed to the graph at every step)")
    if lr < 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if group["weight_decay"] < 0:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    if group["nesterov"] and (momentum <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def hyper_inputs(group: dict[str, Any], flags: SGDFlags) -> dict[str, Any]:
    """The group's scalar graph inputs that ``flags`` switch on, by name, with their getters.

    The names (``lr``, ``momentum``, ``dampening`` holding 1 - dampening, ``weight_decay``) are
    those of a compiled step's inputs; getters read the group at every call, so changing a value
    in ``param_groups`` never changes the graph.
    """
    getters = {"lr": lambda: group["lr"]}
    if flags.momentum:
        getters["momentum"] = lambda: group["momentum"]
        if flags.dampening:
            getters["dampening"] = lambda: 1 - group["dampening"]
    if flags.weight_decay:
        getters["weight_decay"] = lambda: group["weight_decay"]
    return getters


def sgd_flags(group: dict[str, Any]) -> SGDFlags:
    """Which update terms a parameter group has: the structure of its update nodes."""
    return SGDFlags(momentum=group["momentum"] != 0, dampening=group["dampening"] != 0,
                    weight_decay=group["weight_decay"] != 0, nesterov=bool(group["nesterov"]),
                    maximize=bool(group["maximize"]))


def _model_bytes(expand, inputs: list[Val]) -> bytes:
    """A standalone model running ``expand`` on inputs ``in0..inN`` (outputs ``out0..``)."""
    graph_inputs = [ir.Value(name=f"in{i}", shape=ir.Shape(v.data.shape), type=ir_type(v.data))
                    for i, v in enumerate(inputs)]
    b = Builder(origin="opt", prefix="sgd")
    outputs = expand(b, graph_inputs)
    for i, o in enumerate(outputs):
        o.name = f"out{i}"
    graph = ir.Graph(graph_inputs, outputs, nodes=b.nodes, opset_imports={"": OPSET},
                     name="sgd_step")
    model = ir.Model(graph, ir_version=IR_VERSION, producer_name="onnxgrad")
    return ir.serde.serialize_model(model).SerializeToString()
