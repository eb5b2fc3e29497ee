"""Tensors that view a :class:`~onnxgrad.runtime.step.StepRunner`'s state buffers.

After a run, parameters (and momentum buffers, gradients) hold Vals wrapping the runner's own
buffers: nothing is copied. A Val never changes, yet a later run writes the buffer that this
run's state Vals wrap (the next run, for state written in place and a gradient's single buffer;
the run after next, for double-buffered state; an eager edit, the current one). A Val still
alive then is read elsewhere (a graph recorded before the steps and not yet backwarded, a
gradient kept in a list): it gets its own copy first. In the usual loop nothing holds it any
more, so nothing is copied.
"""
from __future__ import annotations

import weakref

import numpy as np

from .tensor import Tensor, Val

# Which runner buffer (its views and name) each handed-out Val wraps, so that a Val made from it
# later (``detach()``, ``state_dict()``) is protected too (:func:`alias`).
_SOURCES: weakref.WeakKeyDictionary[Val, tuple[RunnerViews, str]] = weakref.WeakKeyDictionary()


def alias(source: Val, val: Val) -> None:
    """``val`` wraps the same runner buffer as ``source``: it gets its private copy before the
    runner rewrites the buffer, as ``source`` does (a kept ``state_dict()`` stays the snapshot
    it was, never the live values of a later step nor a mix)."""
    owner = _SOURCES.get(source)
    if owner is not None:
        views, name = owner
        views._handed.setdefault(name, []).append(weakref.ref(val))
        _SOURCES[val] = owner


class RunnerViews:
    """Which Vals were handed out for each runner buffer name, and whether a tensor was edited."""

    def __init__(self, shared: bool = True):
        self.shared = shared  # False where tensors hold host copies (CUDA): nothing to protect
        self._given: dict[str, weakref.ref[Val]] = {}
        self._handed: dict[str, list[weakref.ref[Val]]] = {}

    def edited(self, name: str, t: Tensor) -> bool:
        """Whether ``t`` holds another Val than the one last handed to it (an eager edit)."""
        ref = self._given.get(name)
        return ref is None or ref() is not t._v

    def before_write(self, name: str, keep: np.ndarray | None) -> None:
        """The runner is about to write ``name``'s buffers, all but ``keep``: each live Val
        wrapping one of them gets a private copy of its data."""
        if not self.shared:
            return
        live = []
        for ref in self._handed.get(name, ()):
            val = ref()
            if val is None:
                continue
            if keep is not None and val.data is keep:
                live.append(ref)
            else:
                val.data = np.array(val.data)  # same values, no longer the runner's buffer
        self._handed[name] = live

    def start(self, name: str, val: Val) -> None:
        """A runner was just filled from ``val`` (a copy): not an edit, and not a view."""
        self._given[name] = weakref.ref(val)

    def hand_out(self, name: str, val: Val) -> None:
        """``val`` (a view of the runner's buffer for ``name``) is now a tensor's value."""
        ref = weakref.ref(val)
        self._given[name] = ref
        if self.shared:
            self._handed.setdefault(name, []).append(ref)
            val.shared = "runner"  # .numpy() gives a snapshot: this buffer is rewritten
            _SOURCES[val] = (self, name)
