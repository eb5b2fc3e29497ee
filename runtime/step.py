"""Running a training step again and again with its state kept in the runtime.

State (parameters, momentum buffers, BatchNorm statistics) lives in buffers bound with
IOBinding, so no parameter is copied and nothing is allocated per step. State that nodes other
than its own update read (most parameters: their layer's input gradient reads them, and need not
run before the update) has two sets: step k reads set A and writes set B, step k+1 the reverse,
because a run cannot write a value that nodes still to run will read. State that only its own
update reads (optimizer state, BatchNorm statistics, a first layer's weight) has one buffer,
written over in place (``in_place_state``), where no run is ever undone.

On the CPU provider the buffers are NumPy arrays shared with ONNX Runtime (reading state is free);
on CUDA they are device OrtValues, copied to the host only when read.

Knows nothing of tensors: state is named arrays; the tracer maps them to tensors.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .session import get_providers, make_session


class StepRunner:
    """One compiled step: ``run(feeds)`` returns the per-call outputs; state advances in place.

    ``state`` maps each state input name to the output that holds its next value. ``carried``
    outputs (gradients) are preallocated too, single-buffered: they are not fed back. All other
    outputs are allocated per call: they are handed to the caller, who may keep them.
    """

    def __init__(self, model_bytes: bytes, state: Mapping[str, str],
                 initial: Mapping[str, np.ndarray], carried: Sequence[str] = (),
                 in_place: bool = False):
        # NOTE: the session is made at the first run, not here: a step is built while its trace
        # (every eager value of the traced call) is still alive, and the session's own memory
        # on top of it made the first call the step's memory peak (densenet121 8x96: 831 MB,
        # against 683 MB running).
        self._model_bytes: bytes | None = model_bytes
        self._session: ort.InferenceSession | None = None
        self.state = dict(state)
        self.carried = list(carried)
        graph = onnx.ModelProto.FromString(model_bytes).graph
        self._outputs = output_types(graph)
        # ``in_place``: no run is ever undone, so state that only its own update reads has one
        # buffer, written over (see in_place_state).
        self.allow_in_place = in_place
        self.in_place = in_place_state(graph, self.state) if in_place else set()
        self.device = "cuda" if get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        fed_back = set(self.state.values())
        self._free = [n for n in self._outputs if n not in fed_back and n not in self.carried]
        self.runs = 0
        self.restore(initial)

    def release(self) -> None:
        """Drop the state and carried buffers: another step of the same function runs now, and
        the tensors hold its buffers (a loop whose last batch is smaller would otherwise keep
        every parameter, gradient and momentum twice more per batch size). Arrays a tensor
        still views live on as that tensor's. ``restore`` makes the buffers again."""
        self._host, self._sets = [{}, {}], [{}, {}]
        self._pinned: dict[str, tuple[np.ndarray, ort.OrtValue]] = {}
        self.released = True
        self._bind()

    def restore(self, initial: Mapping[str, np.ndarray]) -> None:
        """(Re)make the buffers, state from ``initial``; read-only inputs are to be bound again."""
        self._make_buffers(initial, self._outputs)
        self._pinned = {}
        self.released = False
        self._bind()
        self.parity = 0

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            self._session = make_session(self._model_bytes)
            self._model_bytes = None
        return self._session

    def _bind(self) -> None:
        self._bindings: list[ort.IOBinding] | None = None  # made by the next run

    def _bound(self) -> list[ort.IOBinding]:
        """Both parities' bindings (making the session first when no run has yet)."""
        if self._bindings is None:
            self._bindings = [self._binding(p) for p in (0, 1)]
            for name, (_, ortvalue) in self._pinned.items():
                for binding in self._bindings:
                    binding.bind_ortvalue_input(name, ortvalue)
        return self._bindings

    def _make_buffers(self, initial: Mapping[str, np.ndarray],
                      outputs: Mapping[str, tuple[list[int], np.dtype]]) -> None:
        """Both sets of state and carried buffers; ``outputs``: each output's shape and dtype."""
        # sets[parity][name]: a run at parity p reads state set p and writes set 1 - p.
        self._host: list[dict[str, np.ndarray]] = [{}, {}]
        self._sets: list[dict[str, ort.OrtValue]] = [{}, {}]
        for name in self.state:
            # A copy: the runtime writes into these buffers, and the caller's array may be shared
            # (a state_dict taken earlier) or read-only. NOTE: not np.ascontiguousarray, which
            # turns a 0-d state (BatchNorm's num_batches_tracked) into shape [1].
            first = np.array(initial[name], order="C", copy=True)
            self._add(name, [first, first if name in self.in_place else np.empty_like(first)])
        for name in self.carried:
            # One buffer, written by every run: nothing reads it back (see carried_output).
            shape, dtype = outputs[name]
            array = np.empty(shape, dtype)
            self._add(name, [array, array])

    def _add(self, name: str, arrays: list[np.ndarray]) -> None:
        """``name``'s buffer for each parity; the same array twice is one buffer (on CUDA too:
        one device copy, not two)."""
        for parity, array in enumerate(arrays):
            if parity and array is arrays[0]:
                self._sets[1][name] = self._sets[0][name]
                if self.device == "cpu":
                    self._host[1][name] = array
            elif self.device == "cpu":
                self._host[parity][name] = array  # shared with the OrtValue: no copy
                self._sets[parity][name] = ort.OrtValue.ortvalue_from_numpy(array)
            else:
                self._sets[parity][name] = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)

    def _binding(self, parity: int) -> ort.IOBinding:
        binding = self.session.io_binding()
        src, dst = self._sets[parity], self._sets[1 - parity]
        for name, out in self.state.items():
            binding.bind_ortvalue_input(name, src[name])
            binding.bind_ortvalue_output(out, dst[name])
        for name in self.carried:
            binding.bind_ortvalue_output(name, dst[name])
        for name in self._free:
            binding.bind_output(name, "cpu")
        return binding

    # ----------------------------------------------------------------- state access
    def _read(self, parity: int, name: str) -> np.ndarray:
        if self.device == "cpu":
            return self._host[parity][name]
        return self._sets[parity][name].numpy()

    def current(self, name: str) -> np.ndarray:
        """State input ``name`` as the next run will read it (on the CPU, the live buffer)."""
        return self._read(self.parity, name)

    def carried_output(self, name: str) -> np.ndarray:
        """What the last run wrote to carried output ``name``: one buffer, which the next run
        writes (a caller keeping the value copies it first; an undone run overwrote it too)."""
        return self._read(self.parity, name)

    def write(self, name: str, value: np.ndarray) -> None:
        """An eager edit: the next run reads ``value`` for state ``name``."""
        if self.device == "cpu":
            target = self._host[self.parity][name]
            if value is not target:
                np.copyto(target, value, casting="same_kind")
        else:
            self._sets[self.parity][name].update_inplace(_c_order(value))

    def bind_input(self, name: str, value: np.ndarray) -> None:
        """Bind a read-only input (frozen state) for every later run, without copying on the CPU."""
        ortvalue = self._pin(name, value)
        for binding in self._bindings or ():
            binding.bind_ortvalue_input(name, ortvalue)

    def _pin(self, name: str, value: np.ndarray) -> ort.OrtValue:
        """``value`` as the OrtValue read-only input ``name`` is bound to, kept with its array
        (on the CPU the OrtValue borrows the array's memory)."""
        array = _c_order(value)
        ortvalue = (ort.OrtValue.ortvalue_from_numpy(array) if self.device == "cpu"
                    else ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        self._pinned[name] = (array, ortvalue)
        return ortvalue

    # ----------------------------------------------------------------- running
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self._bound()[self.parity]
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self._free:
            # Free outputs belong to the caller (a loss kept from step k must survive step k+2),
            # but ORT writes into the buffer a binding already holds: rebinding makes it
            # allocate a new one. NOTE: measured against copying the result: +2 us per output
            # for a scalar, and half the cost of a copy from 256 KiB up.
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        # Only the free outputs are read: wrapping every output (state and gradients included,
        # hundreds for a resnet) for Python costs about 1 ms a step.
        values = binding.get_outputs_as_ortvaluevector()
        first_free = len(self.state) + len(self.carried)  # outputs come in binding order
        results = {name: ort.OrtValue(values[first_free + i]).numpy()
                   for i, name in enumerate(self._free)}
        self.parity = 1 - self.parity
        self.runs += 1
        return results

    def undo(self) -> None:
        """Forget the last run's state updates (a failed check): the next run reads the state
        the last one read, which it only read."""
        if self.in_place:
            raise RuntimeError("a run that updated state in place cannot be undone (a step whose "
                               "checks read the run's results keeps two buffers per state)")
        self.parity = 1 - self.parity
        self.runs -= 1


def _c_order(array: np.ndarray) -> np.ndarray:
    """C-contiguous without copying when it already is, keeping 0-d arrays 0-d."""
    array = np.asarray(array)
    return array if array.flags.c_contiguous else np.array(array, order="C")


def output_types(graph: onnx.GraphProto) -> dict[str, tuple[list[int], np.dtype]]:
    """Each graph output's static shape and dtype, by name (read from the model, no session)."""
    return {o.name: ([d.dim_value for d in o.type.tensor_type.shape.dim],
                     onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type))
            for o in graph.output}


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)


#: Elementwise ops whose output may take the memory of an input of the output's shape: each
#: element is read before it is written.
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div"})


def in_place_state(graph: onnx.GraphProto, state: Mapping[str, str], reach: int = 32
                   ) -> set[str]:
    """The state inputs whose next value can be written over them: each node that reads the
    input either makes the next value (elementwise) or leads to the node that does within
    ``reach`` nodes, so it has run before the new value is written (the runtime runs one node at
    a time, in an order that respects the edges).

    NOTE: an optimizer's state (momentum, Adam's moments) and BatchNorm's running statistics are
    read only by their own update (resnet18's SGD momentum: 47 MB). Most parameters are read by
    their layer's input gradient too, which need not run before the update: two buffers.
    """
    if any(_has_subgraph(node) for node in graph.node):
        return set()  # a subgraph may read an outer value without naming it as an input
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(i)

    def leads_to(start: int, target: int) -> bool:
        seen, todo = {start}, [start]
        while todo and len(seen) <= reach:
            for out in nodes[todo.pop()].output:
                for user in readers.get(out, ()):
                    if user == target:
                        return True
                    if user not in seen:
                        seen.add(user)
                        todo.append(user)
        return False

    found = set()
    for name, out in state.items():
        made = producer.get(out)
        if made is not None and all(
                nodes[i].op_type in ELEMENTWISE if i == made else leads_to(i, made)
                for i in readers.get(name, ())):
            found.add(name)
    return found


def data_subgraph(model: onnx.ModelProto, outputs: Sequence[str], fed: Collection[str]
                  ) -> onnx.ModelProto | None:
    """The part of ``model`` that computes ``outputs`` from the inputs named in ``fed`` (and
    constants) alone, as a model of its own; None when they depend on any other input (state).

    A step's checks of its data (a label out of range) run this before the step, so a failed
    one changes nothing and no run needs undoing."""
    graph = model.graph
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    inputs = {i.name: i for i in graph.input}
    constants = {t.name for t in graph.initializer}
    keep: set[int] = set()
    seen: set[str] = set()
    todo = list(outputs)
    while todo:
        name = todo.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in producer:
            i = producer[name]
            if i not in keep:
                if _has_subgraph(nodes[i]):
                    return None
                keep.add(i)
                todo.extend(nodes[i].input)
        elif name in inputs:
            if name not in fed:
                return None
        elif name not in constants:
            return None
    typed = {o.name: o for o in graph.output}
    sub = onnx.helper.make_graph(
        [nodes[i] for i in sorted(keep)], f"{graph.name}_checks",
        [i for i in graph.input if i.name in seen], [typed[name] for name in outputs],
        initializer=[t for t in graph.initializer if t.name in seen])
    return onnx.helper.make_model(sub, opset_imports=model.opset_import,
                                  ir_version=model.ir_version)
