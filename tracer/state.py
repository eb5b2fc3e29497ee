"""Process-wide tracer state: grad mode, the active trace, the module being called."""
from __future__ import annotations

import os
import sys
import threading
from typing import Any

_local = threading.local()


def _get(name: str, default: Any) -> Any:
    return getattr(_local, name, default)


def grad_enabled() -> bool:
    return _get("grad_enabled", True)


def set_grad_enabled(mode: bool) -> None:
    _local.grad_enabled = bool(mode)


def active_trace() -> Any:
    return _get("trace", None)


def set_trace(trace: Any) -> None:
    _local.trace = trace


def origin() -> str:
    """What recorded nodes are for: ``fwd`` unless inside :class:`recording_as`."""
    return _get("origin", "fwd")


class recording_as:
    """Tag nodes recorded inside the block with an origin (``bn-stats``, ``opt``)."""

    def __init__(self, origin: str):
        self.origin = origin

    def __enter__(self) -> None:
        self._prev = origin()
        _local.origin = self.origin

    def __exit__(self, *exc: object) -> None:
        _local.origin = self._prev


_structure = [0]


def structure_version() -> int:
    """Bumped whenever a module's parameters, buffers or children are reassigned: compiled steps
    then check which tensors their state inputs are."""
    return _structure[0]


def structure_changed() -> None:
    _structure[0] += 1


_settings = [0]


def settings_version() -> int:
    """Bumped whenever any attribute of a module is assigned (``self.scale = 2.0``, ``bn.momentum``,
    ``dropout.p``): compiled steps then read the modules' plain attributes again."""
    return _settings[0]


def settings_changed() -> None:
    _settings[0] += 1


def module_path() -> str | None:
    stack = _get("modules", None)
    return stack[-1] if stack else None


def push_module(path: str) -> None:
    stack = _get("modules", None)
    if stack is None:
        stack = _local.modules = []
    stack.append(path)


def pop_module() -> None:
    _local.modules.pop()


class no_grad:
    """Context manager and decorator disabling gradient recording, like ``torch.no_grad``."""

    def __enter__(self) -> None:
        self._prev = grad_enabled()
        set_grad_enabled(False)

    def __exit__(self, *exc: object) -> None:
        set_grad_enabled(self._prev)

    def __call__(self, fn):
        import functools

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with no_grad():
                return fn(*args, **kwargs)

        return wrapper


class enable_grad(no_grad):
    def __enter__(self) -> None:
        self._prev = grad_enabled()
        set_grad_enabled(True)




def _package_roots() -> tuple[str, ...]:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    names = ("tracer", "passes", "runtime", "models", "onnxgrad")
    return tuple(os.path.join(root, n) + os.sep for n in names)


_ROOTS = _package_roots()


# The demo is user code that ships inside the package: its lines are what a reader wants to see.
_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "onnxgrad",
                     "demo.py")


def user_frame() -> tuple[str, int] | None:
    """(filename, line) of the innermost caller outside onnxgrad (and outside Python's own
    frozen start-up code, which is all there is above ``python -m``)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if (not filename.startswith(_ROOTS) or filename == _DEMO) and \
                not filename.startswith("<frozen"):
            return filename, frame.f_lineno
        frame = frame.f_back
    return None


def format_frame(where: tuple[str, int] | None) -> str:
    if where is None:
        return ""
    import linecache

    filename, line = where
    code = linecache.getline(filename, line).strip()
    short = os.path.basename(filename)
    return f"{short}:{line}: {code}" if code else f"{short}:{line}"
