"""What a compiled function's trace depended on in Python, checked cheaply at every call.

A trace bakes in every Python value the function read: a flag tested in an ``if``, a scale, the
contents of a config dict or object, which helper function was called. :class:`PythonValues`
lists the globals and closure cells that the traced function *and every Python function it
called while tracing* read (found from their code's ``LOAD_GLOBAL`` instructions; the calls are
seen with a profile hook active only during the trace), and :func:`fingerprint` reduces each
value to something comparable: plain data (numbers, strings, and lists, tuples, dicts and sets
of them, small arrays, the plain attributes of a user's object) by value, anything else (a
model, a tensor, a function) by identity. A call whose fingerprints differ traces again. Functions that onnxgrad's runtime calls back (a
model check installed for debugging) are not part of the program and are not guarded.

The closure cells of the functions it calls are guarded where the function object can be found
from its caller (a local, a closure variable, an attribute of ``self``). Not seen (documented in
the README): values reached through a chain of non-plain objects, and state outside Python
(files, environment variables, random generators other than onnxgrad's). A trace that changes a
value it reads (a counter incremented inside the function) is refused: compiled calls run no
Python, so the change would happen once instead of at every call.
"""
from __future__ import annotations

import dis
import gc
import logging
import os
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

SCALARS = (bool, int, float, complex, str, bytes, type(None))
_MAX_ITEMS = 64  # larger containers are compared by identity: a guard must stay cheap
_MAX_DEPTH = 3
# Code from these packages is not the user's: its globals are constants of the library.
_LIBRARIES = frozenset({
    "onnxgrad", "numpy", "onnx", "onnxruntime", "onnx_ir", "ml_dtypes", "importlib", "typing",
    "functools", "contextlib", "copy", "abc", "collections", "weakref", "threading", "logging",
    "dis", "inspect", "enum", "re", "warnings", "math", "operator", "itertools", "dataclasses",
    "torch", "_weakrefset", "linecache", "traceback", "os", "posixpath", "genericpath",
})
_MISSING = "<unset>"
_CODE = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType)
# onnxgrad code that calls the user's code as part of the user's program (a module's forward, a
# forward hook, an optimizer's closure); callbacks from elsewhere in onnxgrad (a model check run
# on each graph) are not part of what the function computes.
_CALLERS = ("onnxgrad.nn", "onnxgrad.models", "onnxgrad.optim", "onnxgrad.tracer.compile")


def _function_of(code: types.CodeType, caller: types.FrameType) -> Any:
    """The function object running ``code``, found where its caller could have got it from (its
    locals and closure, an attribute of ``self``): frames do not point to their function."""
    places = list(caller.f_locals.values())
    owner = caller.f_locals.get("self")
    if owner is not None and hasattr(owner, "__dict__"):
        places += list(vars(owner).values())
    for value in places:
        fn = getattr(value, "__func__", value)
        if getattr(fn, "__code__", None) is code:
            return fn
    return None


def _asynchronous(frame: types.FrameType) -> bool:
    """A call the interpreter made on its own, not the program: a garbage-collector callback
    (hypothesis installs one) or a finalizer."""
    code = frame.f_code
    return code.co_name == "__del__" or any(
        getattr(cb, "__code__", None) is code for cb in gc.callbacks)


def _package(frame: types.FrameType) -> str:
    return frame.f_globals.get("__name__") or ""


def _is_user(frame: types.FrameType) -> bool:
    return _package(frame).split(".")[0] not in _LIBRARIES


def fingerprint(value: Any, depth: int = 0) -> Any:
    """``value`` as a comparable key: plain data by value, anything else by identity."""
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, _CODE):
        return ("code", id(value))  # a function in a registry dict: replacing it is a change
    kind = type(value)
    if depth < _MAX_DEPTH:
        if kind in (list, tuple) and len(value) <= _MAX_ITEMS:
            items = tuple(fingerprint(v, depth + 1) for v in value)
            if all(_is_plain(i) for i in items):
                return (kind.__name__, items)
        elif kind is dict and len(value) <= _MAX_ITEMS:
            items = tuple((fingerprint(k, depth + 1), fingerprint(v, depth + 1))
                          for k, v in value.items())
            if all(_is_plain(k) and _is_plain(v) for k, v in items):
                return ("dict", items)
        elif kind in (set, frozenset) and len(value) <= _MAX_ITEMS and all(
                isinstance(v, SCALARS) for v in value):
            return (kind.__name__, frozenset(value))
        elif kind is np.ndarray and value.size <= _MAX_ITEMS:
            return ("array", value.dtype.str, value.shape, value.tobytes())
        elif _is_user_object(value):
            # A config object: its plain attributes by value (``cfg.scale``), the rest by identity.
            attrs = tuple((k, fingerprint(v, depth + 1)) for k, v in vars(value).items()
                          if not k.startswith("__"))
            return ("object", id(value), attrs)
    return ("id", id(value))


def _is_plain(key: Any) -> bool:
    """Whether a fingerprint is of plain data (not an identity): containers of tensors, models
    or functions are compared by identity as a whole, so that a list the step appends its
    results to does not retrace every call."""
    if isinstance(key, tuple) and key:
        if key[0] == "id" or key[0] == "object":
            return False
        if key[0] in ("list", "tuple"):
            return all(_is_plain(i) for i in key[1])
        if key[0] == "dict":
            return all(_is_plain(k) and _is_plain(v) for k, v in key[1])
    return True


def _is_user_object(value: Any) -> bool:
    kind = type(value)
    module = getattr(kind, "__module__", "") or ""
    if module.split(".")[0] in _LIBRARIES or module == "builtins":
        return False
    # onnxgrad's own objects (modules, optimizers, tensors) have their own guards.
    return hasattr(value, "__dict__") and not hasattr(value, "_state_tensors") and not hasattr(
        value, "param_groups")


def global_names(code: types.CodeType) -> set[str]:
    """The globals a code object (and the functions and comprehensions it defines) loads."""
    names: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        names.update(i.argval for i in dis.get_instructions(c) if i.opname == "LOAD_GLOBAL")
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return names


class PythonValues:
    """The Python values a traced function depends on, and their fingerprints at a call."""

    def __init__(self, fn: Callable[..., Any]):
        fn = getattr(fn, "__func__", fn)  # a bound method
        self._entries: list[tuple[str, dict[str, Any] | None, str | types.CellType]] = []
        self._before: dict[int, Any] = {}  # entry -> its value when the trace first read it
        self._seen: set[tuple[int, str]] = set()
        self._codes: set[types.CodeType] = set()
        code = getattr(fn, "__code__", None)
        if code is None:
            return
        self.add_code(code, getattr(fn, "__globals__", {}), where="")
        for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
            self._entries.append((name, None, cell))

    def add_code(self, code: types.CodeType, scope: dict[str, Any], where: str) -> bool:
        """Guard the globals ``code`` reads; whether anything new is guarded."""
        if code in self._codes:
            return False
        self._codes.add(code)
        new = False
        for name in sorted(global_names(code)):
            if name in scope and (id(scope), name) not in self._seen:  # not a builtin
                self._seen.add((id(scope), name))
                label = f"{name} (read in {where})" if where else name
                self._before[len(self._entries)] = fingerprint(scope[name])
                self._entries.append((label, scope, name))
                new = True
        return new

    @property
    def names(self) -> list[str]:
        return [label for label, _, _ in self._entries]

    def current(self) -> tuple:
        values = []
        for _, scope, ref in self._entries:
            if scope is not None:
                values.append(fingerprint(scope.get(ref, _MISSING)))
            else:
                try:
                    values.append(fingerprint(ref.cell_contents))
                except ValueError:  # a cell not assigned yet
                    values.append(_MISSING)
        return tuple(values)

    def add_cells(self, fn: Any, where: str) -> None:
        """Guard the closure cells of ``fn``, a function the trace called."""
        if fn is None:
            return
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            if (id(cell), name) not in self._seen:
                self._seen.add((id(cell), name))
                try:
                    self._before[len(self._entries)] = fingerprint(cell.cell_contents)
                except ValueError:
                    self._before[len(self._entries)] = _MISSING
                self._entries.append((f"{name} (read in {where})", None, cell))

    def begin_trace(self) -> None:
        self._before = dict(enumerate(self.current()))

    def mutated(self) -> list[str]:
        """What the function changed of the values it reads, during the trace just run (a
        counter it increments): a compiled call runs no Python, so it would not change again."""
        now = self.current()
        # A container that now holds tensors or objects (results the step appends to a list)
        # is compared by identity from now on: not plain data the trace branched on.
        return [self.names[i] for i, v in self._before.items()
                if now[i] != v and _is_plain(now[i])]

    def changed(self, seen: Iterable[tuple]) -> list[str]:
        """The names whose value differs among the ``current()`` tuples ``seen`` (of possibly
        different lengths: a later trace may have found more to guard)."""
        columns: dict[int, set[str]] = {}
        for values in seen:
            for i, v in enumerate(values):
                columns.setdefault(i, set()).add(repr(v))
        labels = self.names
        return [labels[i] for i, column in sorted(columns.items())
                if len(column) > 1 and i < len(labels)]


class CallRecorder:
    """A profile hook, active while tracing, that hands each user Python function the trace
    calls (its code and globals) to :meth:`PythonValues.add_code`; a profiler already installed
    (pyinstrument, cProfile) keeps receiving its events."""

    def __init__(self, values: PythonValues):
        self._values = values
        self._previous: Any = None
        self.added = False
        # Frames running the user's program: the traced function, the user's functions it calls
        # and onnxgrad's code that calls back into the user's (Module.__call__ -> forward).
        self._program: set[types.FrameType] = set()

    def __enter__(self) -> None:
        self._previous = sys.getprofile()
        sys.setprofile(self._hook)

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(self._previous)
        self._program.clear()

    def _hook(self, frame: types.FrameType, event: str, arg: Any) -> None:
        if event == "call":
            parent = frame.f_back
            if not self._program:  # the traced function itself
                self._program.add(frame)
            elif parent in self._program and (_is_user(frame) or _package(frame).startswith(
                    _CALLERS)) and not _asynchronous(frame):
                self._program.add(frame)
                code = frame.f_code
                if _is_user(frame) and code not in self._values._codes:
                    where = getattr(code, "co_qualname", code.co_name)
                    self.added |= self._values.add_code(code, frame.f_globals, where)
                    if code.co_freevars and parent is not None:
                        self._values.add_cells(_function_of(code, parent), where)
        elif event == "return":
            self._program.discard(frame)
        if self._previous is not None:
            self._previous(frame, event, arg)


#: ``ONNXGRAD_LOG=recompiles`` (comma-separated with other topics) says why each retrace happened,
#: as ``TORCH_LOGS=recompiles`` does for torch.compile; or configure this logger yourself.
LOG = logging.getLogger("onnxgrad.recompiles")
if "recompiles" in os.environ.get("ONNXGRAD_LOG", "").split(","):
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.addHandler(_handler)
    LOG.setLevel(logging.INFO)

_KEY_PARTS = ("the tensor arguments' shapes or dtypes", "the other arguments",
              "the optimizers (parameters, settings or state)",
              "the modules (train/eval, layers, requires_grad or attributes)",
              "which gradients exist before the call (accumulation)", "Python values")


def log_retrace(name: str, n: int, old: tuple, new: tuple, values: PythonValues) -> None:
    """Say what differs between the last call's key and this one's (CompiledFunction._key)."""
    if not LOG.isEnabledFor(logging.INFO):
        return
    parts = [label for label, a, b in zip(_KEY_PARTS, old, new) if a != b]
    if old[-1] != new[-1]:
        changed = values.changed([old[-1], new[-1]]) or ["(newly read)"]
        parts[-1] = f"Python values {', '.join(changed)}"
    LOG.info("og.compile: tracing %s again (trace %d): %s changed", name, n,
             "; ".join(parts) or "nothing recorded")
