"""``og.compile``: trace a step function once into one ONNX model, then run only that model.

Tracing runs the function eagerly with a :class:`Trace` active. Every op is recorded; a
``backward`` inside becomes a macro record that the autodiff pass expands, ``optimizer.step()``
one that expands into the optimizer's update nodes (``Optimizer.update``), and BatchNorm's
running-statistics updates are ordinary recorded nodes. The recording is then materialized as a single graph whose inputs are the call's tensors,
the state (parameters, buffers, optimizer state) and the optimizers' scalar hyperparameters, and
whose outputs are the function's results, the state's new values and the gradients.

Tracing leaves no trace: state is put back as it was and the first call runs the compiled graph
like every later one, so resuming from a checkpoint is bit-identical to not stopping.
"""
from __future__ import annotations

import functools
import inspect as pyinspect
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..passes import gradients
from ..passes.builder import name_outputs
from ..passes.cleanup import cleanup
from ..passes.portable import (
    DynamicBatchError,
    dynamic_batch,
    first_difference,
    lower_opset,
    portable_model,
    rewrite_portable,
)
from ..passes.rules.nn import BATCH_INDEPENDENT
from ..runtime import IR_VERSION, OPSET
from ..runtime.dump import report_graph
from ..runtime.export import save_model
from ..runtime.memory import release_free_memory
from ..runtime.metadata import DATA_INPUTS, STATE
from ..runtime.portable import save_portable
from ..runtime.session import make_session
from ..runtime.step import StepRunner, data_subgraph
from . import state
from .autograd import _classify, _follow, leaf_hooks_key
from .graph import CONST, DATA, Walk, ir_type
from .guards import SCALARS, CallRecorder, PythonValues, log_retrace
from .tensor import Tensor, TraceError, Val, _contig, emit, emit_macro
from .values import stand_in
from .views import RunnerViews


class Trace:
    """What a traced call touched: modules, optimizers, scalar inputs, and the state it read."""

    def __init__(self) -> None:
        self.modules: list[Any] = []
        self.optimizers: list[Any] = []
        self.scalars: dict[str, tuple[Val, Callable[[], Any]]] = {}
        self.initial: dict[int, tuple[Tensor, Val]] = {}  # id(tensor) -> (tensor, its Val then)
        self.grads_before: dict[int, tuple[Tensor, Tensor | None]] = {}
        self.grad_state: dict[int, Tensor] = {}  # id(accumulated .grad tensor) -> its parameter
        self.cleared: set[int] = set()  # tensors whose .grad the step cleared (zero_grad)
        self.names: dict[int, str] = {}  # id(state tensor) -> its input name (rng.offset)
        self.checks: list[tuple[list[Val], Callable[[list[np.ndarray]], str | None], type]] = []
        # Data parallelism (tracer/split.py): gradient buckets averaged across processes between
        # two models, and state taken from rank 0 before each run.
        self.cuts: list[Any] = []
        self.broadcasts: list[Any] = []

    def _remember(self, t: Tensor) -> None:
        if id(t) not in self.initial:
            self.initial[id(t)] = (t, t._v)
            # NOTE: ._grad, not .grad: state written in place while tracing (relu6(inplace=True))
            # is a non-leaf, whose .grad property warns the user about a read they never made.
            self.grads_before[id(t)] = (t, t._grad)

    def add_module(self, module: Any) -> None:
        if all(m is not module for m in self.modules):
            self.modules.append(module)
            for t in module._state_tensors().values():
                self._remember(t)

    def add_optimizer(self, optimizer: Any) -> None:
        """Its parameters and state tensors become state of the step (optimizer protocol)."""
        if all(o is not optimizer for o in self.optimizers):
            self.optimizers.append(optimizer)
        for group in optimizer.param_groups:
            for p in group["params"]:
                self._remember(p)
        for _, _, t in optimizer.state_tensors():
            self._remember(t)

    def remember(self, t: Tensor) -> None:
        """Make ``t`` (state created during the trace, e.g. a zero momentum buffer) an input."""
        self._remember(t)

    def created_state(self) -> list[tuple[Any, Tensor, str, Tensor]]:
        """Optimizer state that the traced step created from scratch (a first step's output)."""
        return [(opt, p, key, t) for opt in self.optimizers for p, key, t in opt.state_tensors()
                if id(t) not in self.initial]

    def scalar_input(self, name: str, getter: Callable[[], Any], dtype: np.dtype) -> Val:
        """A scalar graph input fed from ``getter()`` at every call (learning rate, momentum)."""
        if name not in self.scalars:
            self.scalars[name] = (Val(np.asarray(getter(), dtype=dtype)), getter)
        return self.scalars[name][0]

    def backward(self, tensors: Sequence[Tensor], seeds: Sequence[np.ndarray]) -> None:
        """A traced ``backward``: gradients become the autodiff pass's nodes in the step graph.

        NOTE: gradient values are not computed while tracing (zeros stand in): the traced values
        are discarded and the first call runs the compiled graph.
        """
        roots = [t._v for t in tensors]
        walk = Walk(roots, _follow, _classify)
        wrt = [v for v, kind in zip(walk.leaves, walk.kinds) if kind == "w"]
        seed_vals = [Val(_contig(s), const=True) for s in seeds]
        n = len(roots)

        def expand(b, values):
            found = gradients(b, values[:n], values[n:2 * n], values[2 * n:])
            return [g for g in found if g is not None]

        reach = _reachable(roots, wrt)
        outs = [stand_in(v.data.shape, v.data.dtype) for v, ok in zip(wrt, reach) if ok]
        vals = emit_macro("Gradients", roots + seed_vals + wrt, outs, expand,
                          key=(n, tuple(reach)), origin="grad")
        for v, g in zip([v for v, ok in zip(wrt, reach) if ok], vals):
            t = v.leaf() if v.leaf is not None else None
            if t is not None:
                self.accumulate(t, g)

    def accumulate(self, t: Tensor, g: Val) -> None:
        """Add a traced gradient to ``t.grad`` (tracer/autograd.py's replay path calls it too)."""
        self._remember(t)
        if t.grad is None:
            t.grad = Tensor(g)
            return
        if t.grad._v.rec is None and id(t.grad) not in self.initial \
                and id(t) not in self.cleared:
            # A gradient from before the step (no zero_grad): it accumulates, so it is
            # state the step reads and updates, as `grad.<name>`.
            self._remember(t.grad)
            self.grad_state[id(t.grad)] = t
        t.grad._v = emit("Add", [t.grad._v, g])[0]


def _reachable(roots: Sequence[Val], wrt: Sequence[Val]) -> list[bool]:
    """Which ``wrt`` leaves lie under ``roots`` through requires_grad values (the pass agrees)."""
    seen: set[int] = set()
    stack = [v for v in roots]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.rec is not None and v.requires_grad:
            stack.extend(u for u in v.rec.inputs if u is not None and u.requires_grad)
    return [id(v) in seen for v in wrt]


# --------------------------------------------------------------------------- the compiled program
class Program:
    """One traced signature: its ONNX model and the runner that keeps its state."""

    def __init__(self, model: onnx.ModelProto, runner: StepRunner, data_names: list[str],
                 output_names: list[str], output_tree: Any, updated: dict[str, Tensor],
                 readonly: dict[str, Tensor], grads: dict[str, Tensor],
                 scalars: dict[str, tuple[Callable[[], Any], np.dtype]],
                 created: dict[str, tuple[Any, Tensor, str]],
                 owned: dict[str, tuple[Any, Tensor, str]] | None = None,
                 followed: dict[str, Tensor] | None = None, cleared: Sequence[Tensor] = (),
                 checks: Sequence[tuple[list[str], Callable[..., str | None], type]] = (),
                 checks_first: onnx.ModelProto | None = None):
        self.model = model
        self.runner = runner
        self.data_names = data_names
        # An argument the result does not depend on is no input of the model: not fed.
        graph_inputs = {i.name for i in model.graph.input}
        self.feeds = [(i, n) for i, n in enumerate(data_names) if n in graph_inputs]
        self.output_names = output_names
        self.output_tree = output_tree
        self.updated = updated      # state input name -> tensor, new value written each step
        self.readonly = readonly    # state input name -> tensor, read only
        self.grads = grads          # gradient output name -> parameter
        self.scalars = scalars      # scalar input name -> (getter, dtype)
        self.created = created      # output name -> (optimizer, parameter, key): new state
        self.owned = owned or {}    # state input name -> (optimizer, parameter, key)
        self.followed = followed or {}  # input name -> the tensor whose .grad it is
        self.cleared = list(cleared)  # tensors whose .grad the step sets to None (zero_grad)
        self.checks = list(checks)  # (output names, report, error type): see add_check
        # Checks of the data alone (a label out of range) run before the step (_check_first),
        # where the runner writes state over in place. NOTE: not for a data-parallel step: a
        # process that raised before its collectives would leave the others waiting in them.
        self._checks_first = checks_first if runner.allow_in_place else None
        self._check_session: Any = None  # (session, its input names), made at the first run
        self.synced: dict[str, Val] = {}  # read-only state: the Val last bound
        self.call_args: list[Any] = []  # the traced call's non-tensor arguments (None: a tensor)
        self.views = RunnerViews(shared=runner.device == "cpu")
        if self.views.shared:
            self._view_state()

    def run(self, args: Sequence[np.ndarray]) -> Any:
        runner, synced = self.runner, self.synced
        runner.start()  # settles which state is written over in place
        for name, (opt, p, key) in self.owned.items():
            # optimizer.load_state_dict puts new state tensors into opt.state: follow them.
            t = opt.state.get(p, {}).get(key)
            if t is None:
                t = opt.initial_state(p, key)  # cleared state: as before a first step
            if t is not self.updated[name]:
                self.updated[name] = t  # its value is written to the runner just below
        for name, p in self.followed.items():
            # A gradient made outside the step (a backward before the call): the current one.
            # (Whether it is None is part of the compiled function's key.)
            (self.updated if name in self.updated else self.readonly)[name] = p.grad
        if runner.released:  # another program of this function ran since: its buffers anew
            runner.restore({name: t._v.data for name, t in self.updated.items()})
            self._view_state()
            synced.clear()
        views = self.views
        for name, t in self.updated.items():
            edited = views.edited(name, t)  # an eager edit since the last call
            if name in runner.in_place:
                # The run writes the buffer the tensor views: the tensor takes a Val of its own
                # for it first, so the one handed out is copied only if someone kept it (a
                # state_dict() taken earlier stays the snapshot it was).
                if not edited and views.shared:
                    t._set_leaf_data(runner.current(name))
                views.before_write(name, None)
            else:
                views.before_write(name, None if edited else runner.current(name))
            if edited:
                runner.write(name, t._v.data)
        for name, p in self.grads.items():
            # The run writes the gradient's one buffer: the .grad it replaces is dropped first
            # (left None if the run fails, as the eager step's zero_grad leaves it), and a
            # tensor someone kept gets its own copy.
            p.grad = None
            views.before_write(name, None)
        for name, t in self.readonly.items():
            if synced.get(name) is not t._v:
                runner.bind_input(name, t._v.data)
                synced[name] = t._v
        feeds = {name: args[i] for i, name in self.feeds}
        for name, (getter, dtype) in self.scalars.items():
            feeds[name] = np.asarray(getter(), dtype=dtype)
        if self._checks_first is not None:
            self._check_first(feeds)
        results = runner.run(feeds)
        for names, report, error in self.checks if self._checks_first is None else ():
            message = report([results[n] for n in names])
            if message is not None:
                runner.undo()  # as an eager error: the failed step changes no state
                raise error(message)
        self._view_state()
        for name, p in self.grads.items():
            grad = Val(runner.carried_output(name))
            p.grad = Tensor(grad)
            views.hand_out(name, grad)
        for p in self.cleared:
            p.grad = None
        for name, (opt, p, key) in self.created.items():
            opt.state.setdefault(p, {})[key] = Tensor(Val(results[name]))
        outs = [Tensor(Val(results[n])) for n in self.output_names]
        return _unflatten(self.output_tree, outs)

    def _check_first(self, feeds: dict[str, np.ndarray]) -> None:
        """Run the checks of the data before the step: a failed one raises with nothing run."""
        if self._check_session is None:
            session = make_session(self._checks_first.SerializeToString(), spinning=False)
            self._check_session = (session, [i.name for i in session.get_inputs()])
        session, inputs = self._check_session
        names = [o.name for o in self._checks_first.graph.output]
        values = dict(zip(names, session.run(names, {n: feeds[n] for n in inputs})))
        for names, report, error in self.checks:
            message = report([values[n] for n in names])
            if message is not None:
                raise error(message)

    def _view_state(self) -> None:
        """The state tensors take the runner's buffers as their values (no copy). Also when the
        buffers are made: the arrays they held until then (the copied initial state, a resnet18's
        parameters and momentum: 94 MB) are freed before the first run touches the other set."""
        for name, t in self.updated.items():
            t._set_leaf_data(self.runner.current(name))
            self.views.hand_out(name, t._v)

    def use_model(self, model: onnx.ModelProto) -> None:
        """Run ``model`` (this step with a symbolic batch) from now on, from the state as it is."""
        old = self.runner
        self.runner = StepRunner(model.SerializeToString(), old.state,
                                 {name: old.current(name) for name in old.state},
                                 carried=old.carried, in_place=old.allow_in_place)
        self.model = model
        self._checks_first = (_checks_first(model, self.checks, self.data_names, self.scalars)
                              if self.runner.allow_in_place else None)
        self._check_session = None
        self.synced = {}  # read-only state is bound to the new runner at the next run
        if self.views.shared:
            self._view_state()

    def export(self, path: str | os.PathLike[str], *, portable: bool = False,
               opset: int | None = None, model: onnx.ModelProto | None = None) -> None:
        """Write the model with the state's current values as the inputs' defaults.

        ``portable``: the portable format (``runtime.portable``: no initializer for any input,
        their values in a safetensors file beside it; ops every tested runtime implements, at
        the lowest opset from 17 or ``opset``). ``opset`` alone lowers the single-file format.
        ``model``: this step's graph written otherwise (a symbolic batch dimension).
        """
        write_step(self.model if model is None else model, path, self.defaults(),
                   portable=portable, opset=opset)

    def defaults(self) -> dict[str, np.ndarray]:
        """Every input's value for an exported file: the state as it is now, and the
        hyperparameters' current values too, so that every input other than the data has a
        default: the file trains with the metadata alone (a caller may still feed a schedule)."""
        runner = self.runner
        defaults = {name: t._v.data if runner.released else runner.current(name)
                    for name, t in self.updated.items()}
        defaults.update({name: t._v.data for name, t in self.readonly.items()})
        defaults.update({name: np.asarray(getter(), dtype)
                         for name, (getter, dtype) in self.scalars.items()})
        return defaults


def write_step(model: onnx.ModelProto, path: str | os.PathLike[str],
               defaults: dict[str, np.ndarray], *, portable: bool, opset: int | None) -> None:
    """Write a step's model in the format asked for (see :meth:`Program.export`)."""
    if portable:
        save_portable(portable_model(model, opset), path, defaults)
    elif opset is not None:
        save_model(lower_opset(model, opset), path, defaults)
    else:
        save_model(model, path, defaults)


class CompiledFunction:
    """The callable ``og.compile`` returns; one program per input signature and module mode."""

    def __init__(self, fn: Callable[..., Any], module: Any = None,
                 arg_names: Sequence[str] | None = None, dynamic: bool | None = None):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.dynamic = dynamic
        self._per_size: set[Any] = set()  # keys whose step depends on the batch size
        self._module = module
        self._programs: dict[Any, Program] = {}  # in order of use, the latest last
        self._last_key: Any = None
        self._modules: list[Any] = [module] if module is not None else []
        self._optimizers: list[Any] = []
        self.last: Program | None = None
        self.traces = 0
        self._identity: tuple = ()
        self._identity_version = -1
        self._settings: tuple = ()
        self._settings_version = -1
        self._identity_tensors: list[Tensor] = []
        self._identity_modules: list[Any] = []
        self._grad_owners: list[Tensor] = []  # tensors whose .grad a traced step wrote
        try:
            params = list(pyinspect.signature(fn).parameters)
        except (TypeError, ValueError):
            params = []
        self._arg_names = (list(arg_names) if arg_names is not None
                           else [p for p in params if p not in ("self",)])
        self._python_values = PythonValues(fn)
        self._value_traces: dict[Any, int] = {}  # key without Python values -> traces

    #: Traces for one signature that differ only in the Python values read; then it is an error.
    MAX_VALUE_TRACES = 8
    #: Programs kept (input shapes, modes, ...); beyond, the least recently used is dropped.
    MAX_PROGRAMS = 16

    def _key(self, arrays: Sequence[np.ndarray], static: tuple) -> tuple:
        # The optimizers' structure, parameters and which state exists (not their values, which
        # are inputs): see Optimizer.graph_key.
        optim = tuple(o.graph_key() for o in self._optimizers)
        # A gradient left from before the call accumulates (state of the step); none: it is new.
        fresh = tuple(t._grad is None for t in self._grad_owners)
        # Hooks on the modules' tensors run while tracing, so they are part of the step too.
        hooks = leaf_hooks_key(self._identity_tensors)
        key = (self._shapes(arrays, batch=False), static, optim,
               self._modules_identity() + hooks, fresh, self._python_values.current())
        if self.dynamic and arrays:
            batched = (self._shapes(arrays, batch=True),) + key[1:]
            if batched not in self._per_size and batched[0] is not None:
                return batched
        return key

    @staticmethod
    def _shapes(arrays: Sequence[np.ndarray], batch: bool) -> Any:
        """The arguments' dtypes and shapes; ``batch=True``: with their common leading dimension
        left out (None when they have none)."""
        if not batch:
            return tuple((a.dtype.str, a.shape) for a in arrays)
        if any(a.ndim == 0 or a.shape[0] != arrays[0].shape[0] for a in arrays):
            return None
        return ("batch",) + tuple((a.dtype.str, a.shape[1:]) for a in arrays)

    def _count_value_trace(self, key: tuple) -> None:
        """Refuse to trace once more for Python values alone (a counter read in the function)."""
        rest = key[:-1]
        if not any(k[:-1] == rest for k in self._programs):
            return
        n = self._value_traces[rest] = self._value_traces.get(rest, 1) + 1
        if n > self.MAX_VALUE_TRACES:
            changed = self._python_values.changed(k[-1] for k in self._programs
                                                  if k[:-1] == rest)
            raise TraceError(
                f"og.compile: {self.__name__} has been traced {n - 1} times for the same inputs "
                f"because the Python value(s) {changed} it reads changed; each value makes a new "
                f"graph. Keep the Python logic outside the compiled function (call the compiled "
                f"step, or a second compiled function, depending on the counter), or make the "
                f"value a tensor argument and use og.where")

    def _modules_identity(self) -> tuple:
        """The modules' ``train()``/``eval()`` modes and which tensors their state is (a layer
        replaced by assignment, ``model.fc = nn.Linear(...)``, must retrace, not train the tensors
        traced before), recomputed only when some module changed (``tracer.state``'s version);
        and, at every call, which tensors require grad (``requires_grad_(False)`` freezes) and
        the modules' plain Python attributes (``self.scale``, ``Dropout.p``, a BatchNorm's
        ``momentum``), which a trace bakes in."""
        version = state.structure_version()
        if version != self._identity_version:
            modes = tuple(m.training for root in self._modules for m in root.modules())
            tensors = [t for root in self._modules for t in root._state_tensors().values()]
            # Forward hooks run while tracing: registering or removing one retraces.
            hooks = tuple((tuple(vars(m).get("_forward_pre_hooks", ())),
                           tuple(vars(m).get("_forward_hooks", ())))
                          for root in self._modules for m in root.modules())
            self._identity = (modes, tuple(id(t) for t in tensors), hooks)
            self._identity_tensors = tensors
            self._identity_modules = [m for root in self._modules for m in root.modules()]
            self._identity_version = version
            self._settings_version = -1
        grads_on = tuple(t._v.requires_grad for t in self._identity_tensors)
        settings_version = state.settings_version()
        if settings_version != self._settings_version:
            self._settings = tuple(tuple(v for v in vars(m).values() if type(v) in SCALARS)
                                   for m in self._identity_modules)
            self._settings_version = settings_version
        return self._identity + (grads_on, self._settings)

    def __call__(self, *args: Any) -> Any:
        if state.active_trace() is not None:
            # Called while another compiled function traces: its ops join that one graph.
            return self.fn(*args)
        program, arrays = self._program(args)
        if program.runner.runs:
            return program.run(arrays)
        release_free_memory()  # what tracing freed (runtime/memory.py), before the first run
        result = program.run(arrays)
        release_free_memory()  # and the state arrays its runner's buffers replaced
        return result

    def trace(self, *args: Any) -> Program:
        """The program a call with ``args`` would run, traced if new, without running it
        (nothing is updated: exporting a step before its first call must not train)."""
        return self._program(args)[0]

    def _program(self, args: Sequence[Any]) -> tuple[Program, list[np.ndarray]]:
        arrays, static = _split_args(args)
        key = self._key(arrays, static)
        program = self._programs.pop(key, None)
        if program is None:
            self._count_value_trace(key)
            if self._last_key is not None:
                log_retrace(self.__name__, self.traces + 1, self._last_key, key,
                            self._python_values)
            program = self._trace(args)
            program.call_args = [None if _is_tensor_arg(a) else a for a in args]
            key = self._key(arrays, static)  # modules and optimizers are known now
            if key[0] is not None and key[0][:1] == ("batch",):
                key = self._symbolic_batch(program, key, arrays)
            while len(self._programs) >= self.MAX_PROGRAMS:
                # The least recently used: tensors keep their values, a later call retraces.
                del self._programs[next(iter(self._programs))]
        if self.last is not None and self.last is not program:
            # The tensors' values move to this program's buffers: the last one's go (remade
            # from the tensors if it runs again).
            self.last.runner.release()
        self._programs[key] = program  # last: the most recently used
        self._last_key = key
        self.last = program
        return program, arrays

    def _symbolic_batch(self, program: Program, key: tuple, arrays: Sequence[np.ndarray]
                        ) -> tuple:
        """``dynamic=True``: make ``program`` run every batch size (export's symbolic batch);
        where the step depends on the batch size, say so once and keep one program per size."""
        try:
            if type(program) is not Program:  # a distributed step's two models: not yet
                raise DynamicBatchError("a data-parallel step runs static shapes")
            program.use_model(self._dynamic_batch_model(program, portable=False))
            return key
        except DynamicBatchError as exc:
            warnings.warn(f"og.compile(dynamic=True): {self.__name__} is traced for each batch "
                          f"size: {str(exc).removeprefix('export: dynamic_batch: ')}",
                          stacklevel=4)
            self._per_size.add(key)
            return (self._shapes(arrays, batch=False),) + key[1:]

    # ----------------------------------------------------------------- tracing
    def _trace(self, args: Sequence[Any]) -> Program:
        if state.active_trace() is not None:
            raise TraceError("og.compile: a compiled function cannot be called while tracing")
        trace = Trace()
        for m in self._modules:
            trace.add_module(m)
        for o in self._optimizers:
            trace.add_optimizer(o)
        inputs = [_fresh_inputs(a) for a in args]
        state.set_trace(trace)
        values = self._python_values
        values.begin_trace()
        try:
            with CallRecorder(values):
                result = self.fn(*inputs)
            if mutated := values.mutated():
                raise TraceError(
                    f"og.compile: {self.__name__} changed the Python value(s) {mutated} while "
                    f"tracing; a compiled call runs only the graph, so later calls would not "
                    f"change them. Keep that Python logic outside the compiled function (or "
                    f"make the value a tensor updated in place)")
        finally:
            state.set_trace(None)
            final = {tid: t._v for tid, (t, _) in trace.initial.items()}
            grads_after = {tid: t._grad for tid, (t, _) in trace.grads_before.items()}
            for t, val in trace.initial.values():
                t._v = val  # tracing leaves state as it was
            for t, grad in trace.grads_before.values():
                t.grad = grad
            created = trace.created_state()
            for opt, p, key, _ in created:
                del opt.state[p][key]  # the compiled step creates it
        self.traces += 1
        for m in trace.modules:
            if all(m is not k for k in self._modules):
                self._modules.append(m)
                self._identity_version = -1  # more state to identify
        for o in trace.optimizers:
            if all(o is not k for k in self._optimizers):
                self._optimizers.append(o)
        program = self._build(trace, inputs, result, final, grads_after, created)
        # Whether these .grad are set changes the step: a gradient left from before the call
        # accumulates, one the step reads comes from outside. NOTE: leaves (and retain_grad
        # tensors) only: an activation the step wrote in place (ReLU6(inplace=True)) was
        # remembered too, and keeping it kept the trace's whole recorded forward alive
        # (mobilenet_v2 8x96: 408 records, 185 MiB of activations, for the function's life).
        for t in [t for t, _ in trace.grads_before.values()
                  if t.requires_grad and (t.is_leaf or t.retains_grad)
                  and id(t) not in trace.cleared] + list(program.followed.values()):
            if all(t is not k for k in self._grad_owners):
                self._grad_owners.append(t)
        return program

    def _build(self, trace: Trace, inputs: list[Any], result: Any, final: dict[int, Val],
               grads_after: dict[int, Tensor | None],
               created_state: list[tuple[Any, Tensor, str, Tensor]]) -> Program:
        names = _state_names(trace)
        out_tree, out_tensors = _flatten(result)
        data_inputs = [t for t, _ in _tensor_leaves(inputs, "")]
        data_names = _data_names(self._arg_names, inputs)
        # An argument named like an output, a hyperparameter or a state input gets a prefix.
        reserved = {*names.values(), *trace.scalars, "output",
                    *(f"output.{i}" for i in range(len(out_tensors)))}
        data_names = [f"input.{n}" if n in reserved else n for n in data_names]
        data_ids = {id(t._v): n for t, n in zip(data_inputs, data_names)}
        scalar_ids = {id(v): name for name, (v, _) in trace.scalars.items()}
        state_ids = {id(val): tid for tid, (_, val) in trace.initial.items()}

        # Roots: results, state that changed, and gradients the step left in .grad.
        # NOTE: a returned tensor updated in place while tracing (`h[:, 1] = 0`, `h.add_(1)`) was
        # put back as it was with the state: its value at return is the one in `final`.
        roots: list[Val] = [final.get(id(t), t._v) for t in out_tensors]
        root_names = (["output"] if len(out_tensors) == 1
                      else [f"output.{i}" for i in range(len(out_tensors))])
        state_pairs: dict[str, str] = {}
        for tid, (t, val) in trace.initial.items():
            # NOTE: a tensor the call itself made and then wrote in place (an activation of
            # ReLU(inplace=True)) is no state: no input holds its value before the call, and
            # its new value was an output nothing read, alive to the end of each run and held
            # by the runner's bindings until the next run but one (efficientnet_b0 8x96: 51
            # outputs, 68 MB).
            if final[tid] is not val and val.rec is None:
                roots.append(final[tid])
                root_names.append(f"{names[tid]}.new")
                state_pairs[names[tid]] = f"{names[tid]}.new"
        created: dict[str, tuple[Any, Tensor, str]] = {}
        for opt, p, key, t in created_state:
            name = _optimizer_state_name(trace, opt, p, key, names)
            roots.append(t._v)
            root_names.append(name)
            created[name] = (opt, p, key)
        grads: dict[str, Tensor] = {}
        grad_roots: dict[int, int] = {}  # tid -> index of its gradient among the roots
        for tid, (t, _) in trace.grads_before.items():
            g = grads_after.get(tid)
            if g is not None and g._v.rec is not None and id(g) not in trace.grad_state:
                grad_roots[tid] = len(roots)
                roots.append(g._v)
                root_names.append(f"grad.{names[tid]}")
                grads[f"grad.{names[tid]}"] = t
        checks: list[tuple[list[str], Callable[..., str | None], type]] = []
        for i, (values, report, error) in enumerate(trace.checks):
            check_names = [f"check.{i}.{j}" for j in range(len(values))]
            roots.extend(values)
            root_names.extend(check_names)
            checks.append((check_names, report, error))
        # Data parallelism (tracer/split.py): each packed gradient bucket is an output of the
        # one traced graph, its average an input (`bucket.<k>.averaged`) where it is cut in two.
        averaged = {id(c.averaged): f"{c.name}.averaged" for c in trace.cuts}
        for c in trace.cuts:
            roots.append(c.packed)
            root_names.append(c.name)
        # Gradients made before the call (an eager backward) that the step reads (an optimizer
        # step, clipping): inputs fed from the tensor's .grad at every call, not constants; one
        # the step also writes is state, ``grad.<name>`` -> ``grad.<name>.new``, as PyTorch's
        # in-place updates of .grad.
        outside = {id(g._v): tid for tid, (t, g) in trace.grads_before.items()
                   if g is not None and g._v.rec is None and id(g._v) not in state_ids}

        # Tensors captured from outside the function (og.tensor or a factory, still alive) are
        # read-only inputs fed their current value each call, not constants of the trace.
        captured: dict[int, Tensor] = {}

        def classify(v: Val) -> str:
            if id(v) in data_ids or id(v) in scalar_ids or id(v) in state_ids or id(v) in outside \
                    or id(v) in averaged:
                return DATA
            owner = v.owner() if v.owner is not None and not v.const else None
            if owner is not None and owner._v is v:
                captured[id(v)] = owner
                return DATA
            return CONST

        walk = Walk(roots, lambda v: v.rec is not None, classify)
        used_state: dict[str, Tensor] = {}
        followed: dict[str, Tensor] = {}
        for leaf in walk.leaves:
            tid = outside.get(id(leaf))
            if tid is not None and tid in grad_roots:
                name = f"grad.{names[tid]}"
                root_names[grad_roots[tid]] = state_pairs[name] = f"{name}.new"
                del grads[name]
        for gid, t in trace.grad_state.items():
            followed[names[gid]] = t  # accumulated in the step: follow the tensor's .grad too

        def leaf_value(k: int, v: Val, kind: str) -> ir.Value:
            if id(v) in data_ids:
                name = data_ids[id(v)]
            elif id(v) in scalar_ids:
                name = scalar_ids[id(v)]
            elif id(v) in state_ids:
                tid = state_ids[id(v)]
                name = names[tid]
                used_state[name] = trace.initial[tid][0]
            elif id(v) in outside:
                tid = outside[id(v)]
                name = f"grad.{names[tid]}"
                used_state[name] = trace.grads_before[tid][1]
                followed[name] = trace.grads_before[tid][0]
            elif id(v) in averaged:
                name = averaged[id(v)]
            elif id(v) in captured:
                owner = captured[id(v)]
                name = owner._name or f"captured.{k}"
                used_state[name] = owner
            else:
                name = f"const{k}"
            value = ir.Value(name=name, shape=ir.Shape(v.data.shape), type=ir_type(v.data))
            if kind == CONST:
                value.const_value = ir.tensor(v.data, name=name)
            return value

        leaves, nodes, root_values = walk.materialize(leaf_value, readable=True)
        graph_inputs = [v for v, kind in zip(leaves, walk.kinds) if kind == DATA]
        for tid, (t, val) in trace.initial.items():
            # State the step overwrites without reading it (`buffer.copy_(y)`) is an input all
            # the same: the runner writes its next value where the tensor reads it.
            if names[tid] in state_pairs and names[tid] not in used_state:
                graph_inputs.append(ir.Value(name=names[tid], shape=ir.Shape(val.data.shape),
                                             type=ir_type(val.data)))
                used_state[names[tid]] = t
        initializers = [v for v, kind in zip(leaves, walk.kinds) if kind == CONST]
        # State that is read but never updated (e.g. frozen BatchNorm statistics) is still an input.
        outputs = name_outputs(root_values, root_names, nodes, graph_inputs + initializers)
        order = {n: i for i, n in enumerate(data_names)}
        graph_inputs.sort(key=lambda v: (0, order[v.name]) if v.name in order
                          else (1, 0) if v.name in trace.scalars else (2, 0))
        graph = ir.Graph(graph_inputs, outputs, nodes=nodes, initializers=initializers,
                         opset_imports={"": OPSET}, name="train_step")
        model = ir.Model(graph, ir_version=IR_VERSION, producer_name="onnxgrad")
        # ONNXGRAD_DUMP: the step as traced (forward, then what autodiff and the optimizer appended,
        # each node tagged with its origin), then after cleanup.
        report_graph("traced", model)
        cleanup(model)
        input_names = {v.name for v in model.graph.inputs}
        state_pairs = {k: v for k, v in state_pairs.items() if k in input_names}
        model.metadata_props[STATE] = json.dumps({v: k for k, v in state_pairs.items()})
        model.metadata_props[DATA_INPUTS] = json.dumps(data_names)
        proto = ir.serde.serialize_model(model)
        report_graph("cleanup", proto)

        updated = {name: t for name, t in used_state.items() if name in state_pairs}
        readonly = {name: t for name, t in used_state.items() if name not in state_pairs}
        initial = {name: t._v.data for name, t in updated.items()}
        program_type: Any = Program
        if trace.cuts or trace.broadcasts:
            # A data-parallel step: cut at the all-reduce into two models (tracer/split.py).
            from .split import SplitProgram, split_step

            parts = split_step(proto, trace, names, state_pairs, initial, list(grads), data_names)
            runner = parts.runner
            program_type = functools.partial(SplitProgram, parts=parts)
            first = None
        else:
            # NOTE: state is written over in place only where no run is undone: where every
            # check runs before the step (a check of the run's results undoes a failed run).
            first = _checks_first(proto, checks, data_names, trace.scalars)
            runner = StepRunner(proto.SerializeToString(), state_pairs, initial,
                                carried=list(grads), in_place=not checks or first is not None)
        scalars = {n: (getter, v.data.dtype) for n, (v, getter) in trace.scalars.items()}
        owners = {id(t): (opt, p, key) for opt in trace.optimizers
                  for p, key, t in opt.state_tensors()}
        owned = {name: owners[id(t)] for name, t in updated.items() if id(t) in owners}
        followed = {name: t for name, t in followed.items() if name in used_state}
        # A gradient set before the call and None after it: the step cleared it (zero_grad).
        cleared = [t for tid, (t, g) in trace.grads_before.items()
                   if g is not None and grads_after.get(tid) is None]
        return program_type(proto, runner, data_names, root_names[:len(out_tensors)], out_tree,
                            updated, readonly, grads, scalars, created, owned, followed, cleared,
                            checks, checks_first=first)

    def keep_last(self) -> None:
        """Drop every program but the last one run (and the runtime buffers it holds)."""
        self._programs = {k: p for k, p in self._programs.items() if p is self.last}

    def runners(self) -> dict[Any, StepRunner]:
        return {key: program.runner for key, program in self._programs.items()}

    # ----------------------------------------------------------------- export
    def export(self, path: str | os.PathLike[str], *, portable: bool = False,
               opset: int | None = None, dynamic_batch: bool = False) -> None:
        """Write the last-run step as a standard ONNX model that other runtimes can loop.

        ``portable=True`` writes the portable format (state in ``<name>.safetensors`` beside the
        file, ops and opset every tested runtime implements); ``opset`` picks the opset.
        ``dynamic_batch=True``: the data inputs' leading dimension is symbolic (``batch``), so the
        file trains on any batch size; raises naming the node where the step's graph depends on
        the batch size otherwise.
        """
        if self.last is None:
            raise RuntimeError("export: call the compiled function once first (it traces then)")
        program = self.last
        model = self._dynamic_batch_model(program, portable) if dynamic_batch else None
        program.export(path, portable=portable, opset=opset, model=model)

    def _dynamic_batch_model(self, program: Program, portable: bool) -> onnx.ModelProto:
        """The program's model with a symbolic batch: traced once more at batch + 1 (without
        running it), the two graphs' differences computed from the batch size."""
        dims = {i.name: [d.dim_value if d.HasField("dim_value") else None
                         for d in i.type.tensor_type.shape.dim] for i in program.model.graph.input}
        types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                 for i in program.model.graph.input}
        names = program.data_names
        if not names:
            raise DynamicBatchError("export: dynamic_batch: the step has no tensor arguments")
        n = dims[names[0]][0] if dims[names[0]] else None
        for name in names:
            if not dims[name] or dims[name][0] != n:
                raise DynamicBatchError(
                    f"export: dynamic_batch: argument {name!r} of shape {dims[name]} has no "
                    f"leading batch dimension of size {n} (that of {names[0]!r})")

        def traced(size: int) -> onnx.ModelProto:
            more = iter(np.zeros([size] + dims[name][1:], types[name]) for name in names)
            args = [next(more) if a is None else a for a in program.call_args]
            traces = self.traces
            try:
                model = self._trace(args).model  # not cached: export leaves no program
            finally:
                self.traces = traces
            return rewrite_portable(model) if portable else model

        # NOTE: two more sizes, so that a value equal at two of them (n // 2 at 4 and 5) is not
        # taken for a constant: both differences must give the same graph.
        sizes = (n + 1, 2 * n + 3)
        a = rewrite_portable(program.model) if portable else program.model
        others = [traced(size) for size in sizes]
        if any(first_difference(a, b) is not None for b in others):
            # Some gradient formulations are chosen by, or sized by, the batch: trace again
            # with those that are not (as exact; other summation orders).
            BATCH_INDEPENDENT["on"] = True
            try:
                a, others = traced(n), [traced(size) for size in sizes]
            finally:
                BATCH_INDEPENDENT["on"] = False
        model, check = (dynamic_batch(a, b, n, size, names) for b, size in zip(others, sizes))
        for node, twin in zip(model.graph.node, check.graph.node):
            if node != twin:
                raise DynamicBatchError(
                    f"export: dynamic_batch: {node.op_type} node {node.name or node.output[0]!r} "
                    f"computes another function of the batch size from batches {n}, {sizes[0]} "
                    f"than from {n}, {sizes[1]}: the step's graph depends on the batch size")
        return model

    def __onnxgrad_model__(self) -> onnx.ModelProto:
        if self.last is None:
            raise RuntimeError("the compiled function has not been traced yet; call it once")
        return self.last.model


def _checks_first(model: onnx.ModelProto, checks: Sequence[tuple[list[str], Any, Any]],
                  data_names: Sequence[str], scalars: dict[str, Any]) -> onnx.ModelProto | None:
    """The model computing every check's values from the call's data and scalars alone, or
    None (no checks, or one that reads state or the step's results)."""
    if not checks:
        return None
    return data_subgraph(model, [n for names, _, _ in checks for n in names],
                         set(data_names) | set(scalars))


def add_check(values: Sequence[Tensor], report: Callable[[list[np.ndarray]], str | None],
              error: type[Exception]) -> None:
    """Inside a compiled step, a check of the data that the graph itself computes (a label out of
    range): ``values`` become outputs of the step, handed to ``report`` after every run; a message
    raises ``error`` and the run's state updates are discarded. Data-dependent checks cannot be
    guards: the trace is reused for new values. Outside a trace, nothing (eager callers check
    the values themselves)."""
    trace = state.active_trace()
    if isinstance(trace, Trace):
        trace.checks.append(([t._v for t in values], report, error))


def compile(fn: Any = None, *, dynamic: bool | None = None) -> Any:
    """Compile a step function (or a module's forward) into one ONNX model run by ONNX Runtime.

    ``dynamic=True``: one program serves every batch size (the tensor arguments' common leading
    dimension is symbolic in the graph, as ``export(dynamic_batch=True)`` writes it); a step
    whose graph depends on the batch size warns once, naming the node, and is traced per size.
    ``None`` (the default) and ``False``: one program per input shape, each with static shapes
    (NOTE: not PyTorch's automatic mode for ``None``: onnxgrad keeps static shapes unless asked,
    as ONNX Runtime plans memory and picks kernels per static shape). As ``torch.compile``,
    ``og.compile(dynamic=True)`` without a function returns a decorator.
    """
    if fn is None:
        return functools.partial(compile, dynamic=dynamic)
    if dynamic not in (None, True, False):
        raise TypeError(f"og.compile: dynamic must be True, False or None, got {dynamic!r}")
    if hasattr(fn, "_state_tensors") and callable(fn):
        module = fn
        return CompiledFunction(lambda *xs: module(*xs), module=module, dynamic=dynamic)
    if not callable(fn):
        raise TypeError(f"og.compile expects a function or a Module, got {type(fn).__name__}")
    return CompiledFunction(fn, dynamic=dynamic)


# --------------------------------------------------------------------------- helpers
def _is_tensor_arg(a: Any) -> bool:
    return isinstance(a, (Tensor, np.ndarray))


def _split_args(args: Sequence[Any]) -> tuple[list[np.ndarray], tuple]:
    """The tensors among the arguments (also inside lists, tuples and dicts), which the program
    takes as inputs, and the rest with the containers' structure, which the trace bakes in."""
    arrays: list[np.ndarray] = []

    def walk(a: Any) -> Any:
        if isinstance(a, Tensor):
            arrays.append(a._v.data)
            return "<tensor>"
        if isinstance(a, np.ndarray):
            arrays.append(_contig(a))
            return "<array>"
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(walk(x) for x in a))
        if type(a) is dict:
            return ("dict", tuple((repr(k), walk(v)) for k, v in a.items()))
        return repr(a)  # Python values are baked into the trace

    static = tuple(walk(a) for a in args)
    return arrays, static


def _fresh_inputs(a: Any) -> Any:
    """``a`` with each tensor replaced by a new leaf holding its value (the trace's input)."""
    if _is_tensor_arg(a):
        return Tensor(Val(_contig(a._v.data if isinstance(a, Tensor) else a)))
    if isinstance(a, (list, tuple)):
        items = [_fresh_inputs(x) for x in a]
        return type(a)(*items) if hasattr(a, "_fields") else type(a)(items)  # a namedtuple
    if type(a) is dict:
        return {k: _fresh_inputs(v) for k, v in a.items()}
    return a


def _tensor_leaves(a: Any, name: str) -> Iterator[tuple[Tensor, str]]:
    """The tensors in ``a`` in ``_split_args``'s order, each with its input name (``xs.0``,
    ``batch.image``)."""
    if isinstance(a, Tensor):
        yield a, name
    elif isinstance(a, (list, tuple)):
        for i, x in enumerate(a):
            yield from _tensor_leaves(x, f"{name}.{i}")
    elif type(a) is dict:
        for k, v in a.items():
            yield from _tensor_leaves(v, f"{name}.{k}")


def _data_names(arg_names: list[str], inputs: list[Any]) -> list[str]:
    names = []
    for i, a in enumerate(inputs):
        base = arg_names[i] if i < len(arg_names) else f"input.{i}"
        names += [n for _, n in _tensor_leaves(a, base)]
    return names


def _state_names(trace: Trace) -> dict[int, str]:
    """Torch-style qualified names for every state tensor the trace remembered."""
    names: dict[int, str] = {}
    for j, module in enumerate(trace.modules):
        prefix = "" if j == 0 else f"module{j}."
        # A module may name its state in graphs otherwise (og.nn.OnnxModule: as in its file).
        named = getattr(module, "_graph_state_names", module._state_tensors)()
        for name, t in named.items():
            names.setdefault(id(t), prefix + name)
    for opt in trace.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                names.setdefault(id(p), f"param{len(names)}")
        for p, key, t in opt.state_tensors():
            names.setdefault(id(t), _optimizer_state_name(trace, opt, p, key, names))
    for gid, t in trace.grad_state.items():
        names[gid] = f"grad.{names.setdefault(id(t), f'param{len(names)}')}"
    for tid, name in trace.names.items():
        names.setdefault(tid, name)
    for tid in trace.initial:
        names.setdefault(tid, f"state{len(names)}")
    return names


def _optimizer_state_name(trace: Trace, opt: Any, p: Tensor, key: str,
                          names: dict[int, str]) -> str:
    """``momentum.<param>`` (the optimizer's short name of the state, then the parameter's)."""
    j = next(i for i, o in enumerate(trace.optimizers) if o is opt)
    name = f"{opt.state_name(key)}.{names[id(p)]}"
    return name if j == 0 else f"optimizer{j}.{name}"


def _flatten(result: Any) -> tuple[Any, list[Tensor]]:
    if isinstance(result, Tensor):
        return "t", [result]
    if result is None:
        return None, []
    if isinstance(result, (tuple, list)):
        tree, tensors = [], []
        for item in result:
            sub, ts = _flatten(item)
            tree.append((sub, len(ts)))
            tensors += ts
        return (type(result), tree), tensors
    raise TypeError(f"og.compile: a compiled function must return tensors (or tuples/lists of "
                    f"them), got {type(result).__name__}")


def _unflatten(tree: Any, tensors: list[Tensor]) -> Any:
    if tree == "t":
        return tensors[0]
    if tree is None:
        return None
    kind, items = tree
    out, i = [], 0
    for sub, n in items:
        out.append(_unflatten(sub, tensors[i:i + n]))
        i += n
    return kind(out)



