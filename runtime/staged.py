"""A step run as several models in turn (a data-parallel step: gradients, then the update), with
one double-buffered state shared by all of them.

It is :class:`~onnxgrad.runtime.step.StepRunner`'s mechanism, not a copy: the same two buffer sets
(a run at parity p reads set p and writes set 1 - p, whichever model writes a given state), the
same state access (``current``, ``write``, ``undo``) and free outputs. What a model passes to a later
one (the packed gradient buckets, any other value both need) lives in one preallocated host buffer
per name, bound as the output of the model that makes it and the input of those that read it, so
``between(i, links)`` can reduce the buckets in place between model i - 1 and model i without a copy.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .session import make_session
from .step import StepRunner, output_types


class StagedRunner(StepRunner):
    """``run(feeds)`` runs ``stages`` in order; ``between(i, links)`` runs before stage i.

    ``state``, ``initial`` and ``carried`` as for :class:`StepRunner`, across all stages (each
    state has its next value made by exactly one of them). ``links``: names that one stage
    outputs and later stages read; ``returned``: those of them ``run`` also returns (a copy: the
    link buffer is reused by the next run).
    """

    def __init__(self, stages: Sequence[bytes], state: Mapping[str, str],
                 initial: Mapping[str, np.ndarray], carried: Sequence[str] = (),
                 links: Sequence[str] = (), returned: Sequence[str] = (),
                 between: Callable[[int, dict[str, np.ndarray]], None] | None = None):
        # NOTE: the parent's constructor would make one session; the buffers are made as there.
        self.sessions = [make_session(s) for s in stages]
        self._session = self.sessions[-1]
        self.state = dict(state)
        self.carried = list(carried)
        self.allow_in_place, self.in_place = False, set()  # two buffers per state
        self._viewed = {}  # every output written in its own shape
        self.between = between
        self.returned = list(returned)
        self.device = "cpu" if all(s.get_providers()[0] == "CPUExecutionProvider"
                                   for s in self.sessions) else "cuda"
        outputs = self._outputs = {name: typed for s in stages for name, typed
                                   in output_types(onnx.ModelProto.FromString(s).graph).items()}
        # Links stay on the host: the collectives read and write them in place.
        self.links: dict[str, np.ndarray] = {}
        self._link_values: dict[str, ort.OrtValue] = {}
        for name in links:
            shape, dtype = outputs[name]
            array = np.empty(shape, dtype)
            self.links[name] = array
            self._link_values[name] = ort.OrtValue.ortvalue_from_numpy(array)
        fed_back = set(self.state.values())
        self._state_of = {out: name for name, out in self.state.items()}
        special = fed_back | set(self.carried) | set(self.links)
        self._frees = [[o.name for o in s.get_outputs() if o.name not in special]
                       for s in self.sessions]
        self._inputs = [{i.name for i in s.get_inputs()} for s in self.sessions]
        self.runs = 0
        self.stage_seconds = [0.0] * len(self.sessions)  # time in each model (benchmarks)
        self.restore(initial)

    def _bind(self) -> None:
        self._stage_bindings = [] if self.released else [
            [self._stage_binding(k, parity) for parity in (0, 1)] for k in range(len(self.sessions))]

    def _stage_binding(self, k: int, parity: int) -> ort.IOBinding:
        session = self.sessions[k]
        binding = session.io_binding()
        src, dst = self._sets[parity], self._sets[1 - parity]
        for meta in session.get_inputs():
            name = meta.name
            if name in self.state:
                binding.bind_ortvalue_input(name, src[name])
            elif name in self._state_of:  # the next value an earlier stage made this run
                binding.bind_ortvalue_input(name, dst[self._state_of[name]])
            elif name in self.carried:
                binding.bind_ortvalue_input(name, dst[name])
            elif name in self.links:
                binding.bind_ortvalue_input(name, self._link_values[name])
        for meta in session.get_outputs():
            name = meta.name
            if name in self._state_of:
                binding.bind_ortvalue_output(name, dst[self._state_of[name]])
            elif name in self.carried:
                binding.bind_ortvalue_output(name, dst[name])
            elif name in self.links:
                binding.bind_ortvalue_output(name, self._link_values[name])
        for name in self._frees[k]:  # last: run() finds them at the end of the outputs
            binding.bind_output(name, "cpu")
        return binding

    def bind_input(self, name: str, value: np.ndarray) -> None:
        ortvalue = self._pin(name, value)
        for k, bindings in enumerate(self._stage_bindings):
            if name in self._inputs[k]:
                for binding in bindings:
                    binding.bind_ortvalue_input(name, ortvalue)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results: dict[str, np.ndarray] = {}
        for k, session in enumerate(self.sessions):
            if self.between is not None:
                self.between(k, self.links)
            binding = self._stage_bindings[k][self.parity]
            inputs = self._inputs[k]
            for name, value in feeds.items():
                if name in inputs:
                    binding.bind_cpu_input(name, value)
            for name in self._frees[k]:
                binding.bind_output(name, "cpu")  # the caller's to keep (see StepRunner.run)
            start = time.perf_counter()
            session.run_with_iobinding(binding)
            self.stage_seconds[k] += time.perf_counter() - start
            if self._frees[k]:
                values = binding.get_outputs_as_ortvaluevector()
                first_free = len(values) - len(self._frees[k])  # free outputs are bound last
                for i, name in enumerate(self._frees[k]):
                    results[name] = ort.OrtValue(values[first_free + i]).numpy()
        for name in self.returned:
            results[name] = self.links[name].copy()
        self.parity = 1 - self.parity
        self.runs += 1
        return results

