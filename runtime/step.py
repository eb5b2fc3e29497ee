"""Running a training step again and again with its state kept in the runtime.

State (parameters, momentum buffers, BatchNorm statistics) lives in buffers bound with
IOBinding, so no parameter is copied and nothing is allocated per step. Where no run is ever
undone, state has one buffer, written over in place, once every node that reads it has run
(``in_place_state``): a layer's input gradient, which reads the weight and need not run before
the update, is made to (``order_late_readers``), and the graph ONNX Runtime runs decides. Other
state has two sets: step k reads set A and writes set B, step k+1 the reverse, because a run
cannot write a value that nodes still to run will read.

On the CPU provider the buffers are NumPy arrays shared with ONNX Runtime (reading state is free);
on CUDA they are device OrtValues, copied to the host only when read.

Knows nothing of tensors: state is named arrays; the tracer maps them to tensors.
"""
from __future__ import annotations

import heapq
import os
import tempfile
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

from .lowering import lower_small_convs, static_shapes
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
        self._session: ort.InferenceSession | None = None
        self.state = dict(state)
        self.carried = list(carried)
        model = onnx.ModelProto.FromString(model_bytes)
        cpu = get_providers()[0] == "CPUExecutionProvider"
        shapes = _inferred_shapes(model) if self.carried or self.state or cpu else {}
        edited = cpu and lower_small_convs(model, shapes) > 0
        # Outputs the session writes before their Reshape: the runner binds them in the shape
        # written and views them in their own (see outputs_before_reshape).
        self._viewed = outputs_before_reshape(model, [*self.carried, *self.state.values()],
                                              shapes)
        edited |= bool(self._viewed)
        self._outputs = output_types(model.graph)
        # ``in_place``: no run is ever undone, so state that only its own update reads, or that
        # order_late_readers made so, has one buffer, written over (see in_place_state).
        self.allow_in_place = in_place
        self.in_place = set()
        if in_place:
            edited |= order_late_readers(model, self.state, shapes)
            self.in_place = in_place_state(model.graph, self.state)
        self._model_bytes: bytes | None = model.SerializeToString() if edited else model_bytes
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
            self._session = self._open() if self.in_place else make_session(self._model_bytes)
            self._model_bytes = None
        return self._session

    def _open(self) -> ort.InferenceSession:
        """The session, and which state it writes over in place: decided on the graph it runs.

        NOTE: the runtime's own optimizations may make a node read a state input where the
        model's node read a copy (a Transpose fused into the MatMul reading it): such state gets
        its second buffer here."""
        session, runs = None, None
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "optimized.onnx")
            try:
                session = make_session(self._model_bytes, optimized=path)
                runs = onnx.load(path, load_external_data=False).graph
            except Exception:  # noqa: BLE001 (a provider may refuse to save its graph)
                runs = None
        if session is None:  # two buffers each; a model that cannot run fails here again
            session = make_session(self._model_bytes)
        safe = in_place_state(runs, self.state) if runs is not None else set()
        for name in self.in_place - safe:
            self._put(1 - self.parity, name, np.empty_like(self._read(self.parity, name)))
        self.in_place &= safe
        return session

    def start(self) -> None:
        """Make the session if no run has yet: until then, ``in_place`` is what the model allows,
        and the session's graph may allow less."""
        self.session  # noqa: B018 (made by the property)

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
            else:
                self._put(parity, name, array)

    def _put(self, parity: int, name: str, array: np.ndarray) -> None:
        if self.device == "cpu":
            self._host[parity][name] = array  # shared with the OrtValue: no copy
            self._sets[parity][name] = ort.OrtValue.ortvalue_from_numpy(array)
        else:
            self._sets[parity][name] = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)

    def _binding(self, parity: int) -> ort.IOBinding:
        binding = self.session.io_binding()
        src, dst = self._sets[parity], self._sets[1 - parity]
        for name, out in self.state.items():
            binding.bind_ortvalue_input(name, src[name])
            if out in self._viewed:  # the next value, in the shape the session writes it
                shape, dtype = self._outputs[out]
                binding.bind_output(out, self.device, 0, dtype, shape, dst[name].data_ptr())
            else:
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
        value = self._read(self.parity, name)
        shape = self._viewed.get(name)
        return value if shape is None else value.reshape(shape)

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
#: Ops whose output the runtime may place in its input's memory (a view, no copy), or fold into
#: the node reading the output, which then reads the input itself (a Transpose into a MatMul).
PASSED_THROUGH = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity",
                            "Transpose", "Cast"})


def in_place_state(graph: onnx.GraphProto, state: Mapping[str, str]) -> set[str]:
    """The state inputs whose next value can be written over them: each node that reads the
    input either makes the next value (elementwise) or is an ancestor of the node that does, so
    it has run before the new value is written (the runtime runs one node at a time, in an order
    that respects the edges).

    NOTE: an optimizer's state (momentum, Adam's moments) and BatchNorm's running statistics are
    read only by their own update (resnet18's SGD momentum: 47 MB). A parameter is read by its
    layer's input gradient too, which need not run before the update unless
    ``order_late_readers`` made it (resnet18's parameters: 47 MB more).
    """
    nodes = list(graph.node)
    dag = _dag(nodes)
    if dag is None:
        return set()
    producer, readers, ancestors = dag
    found = set()
    for name, out in state.items():
        made = producer.get(out)
        if made is not None and all(
                nodes[i].op_type in ELEMENTWISE if i == made else ancestors[made] >> i & 1
                for i in _memory_readers(nodes, readers, name)):
            found.add(name)
    return found


def _memory_readers(nodes: Sequence[onnx.NodeProto], readers: Mapping[str, list[int]],
                    name: str) -> list[int]:
    """The nodes that may read value ``name``'s memory: its readers, and the readers of what
    the runtime may pass it through without a copy of their own (``PASSED_THROUGH``)."""
    found, todo = [], [name]
    while todo:
        for i in readers.get(todo.pop(), ()):
            found.append(i)
            if nodes[i].op_type in PASSED_THROUGH:
                todo.append(nodes[i].output[0])
    return found


def order_late_readers(model: onnx.ModelProto, state: Mapping[str, str],
                       shapes: Mapping[str, list[int] | None] | None = None) -> bool:
    """Make each node that reads a state input but need not run before the node writing its
    next value (a layer's input gradient reads its weight) an ancestor of that node, so that
    ``in_place_state`` can give the state one buffer. Edits ``model``; True when it did.

    The edge is a scalar: one element of the late reader's output (or of a value made from it,
    see ``_tie_source``) decides between a scalar input of the update and that same input
    (``Where(Cast(r[0], bool), s, s)``, which is ``s`` whatever ``r`` holds, NaN included), fed
    to the update in place of ``s``: four nodes on one element each, where the second buffer
    would be the parameter's size. Only a scalar input that the late readers do not depend on
    is used (no cycle), and only for an update whose result nothing else reads; nothing changes
    where either is missing. ``shapes``: each value's static shape (inferred when not given).
    """
    graph = model.graph
    nodes = list(graph.node)
    dag = _dag(nodes)
    if dag is None:
        return False
    producer, readers, ancestors = dag
    if shapes is None:
        shapes = _inferred_shapes(model)
    names = {n for node in nodes for n in (*node.input, *node.output)} | set(shapes)
    flat, first = "order.flat", "order.first"
    if flat in names or first in names:
        return False
    added: list[onnx.NodeProto] = []
    edits: list[tuple[onnx.NodeProto, int, str]] = []
    for name, out in state.items():
        made = producer.get(out)
        if made is None or any(readers.get(o) for o in nodes[made].output):
            continue  # the update's result is read in the step: it is no place for an edge
        late = [i for i in _memory_readers(nodes, readers, name)
                if i != made and not ancestors[made] >> i & 1]
        if not late:
            continue
        target = _scalar_input(nodes, producer, ancestors, made, late, shapes)
        if target is None:
            continue
        n, slot = target
        node = nodes[n]
        sources = [_tie_source(nodes, readers, ancestors, i, n, shapes) for i in late]
        if None in sources:
            continue
        scalar = node.input[slot]
        for k, source in enumerate(sources):
            stem = f"order.{name}.{k}"
            if any(f"{stem}.{part}" in names for part in ("flat", "first", "flag", "out")):
                break
            added += [
                onnx.helper.make_node("Reshape", [source, flat], [f"{stem}.flat"], f"{stem}.flat"),
                onnx.helper.make_node("Gather", [f"{stem}.flat", first], [f"{stem}.first"],
                                      f"{stem}.first"),
                onnx.helper.make_node("Cast", [f"{stem}.first"], [f"{stem}.flag"], f"{stem}.flag",
                                      to=onnx.TensorProto.BOOL),
                onnx.helper.make_node("Where", [f"{stem}.flag", scalar, scalar], [f"{stem}.out"],
                                      f"{stem}.out"),
            ]
            scalar = f"{stem}.out"
        edits.append((node, slot, node.input[slot]))
        node.input[slot] = scalar
    if not added:
        return False
    order = _topological(nodes + added)
    if order is None:  # an edge closed a cycle through another update's: leave it as it was
        for node, slot, scalar in reversed(edits):  # a node two states tie into: its first input
            node.input[slot] = scalar
        return False
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array([-1], np.int64), flat),
                              onnx.numpy_helper.from_array(np.array(0, np.int64), first)])
    del graph.node[:]
    graph.node.extend(order)
    return True


def outputs_before_reshape(model: onnx.ModelProto, names: Collection[str],
                           shapes: dict[str, list[int] | None] | None = None
                           ) -> dict[str, list[int]]:
    """Each output among ``names`` made by a Reshape of a value the graph computes (a weight
    gradient's matrix product, a 1x1 convolution's weight or momentum updated as a matrix)
    becomes that value, which the runtime then writes where the output is bound (or hands out,
    for ``backward``'s session), and the nodes reading it read it there: the Reshape copied it
    (resnet18's layer4 weight gradients: 9 MB, 1.5 ms each). Edits ``model`` (and ``shapes``,
    each value's static shape, inferred when not given); returns each such output's shape, to
    view its buffer in.
    """
    graph = model.graph
    nodes = list(graph.node)
    producer, readers = _edges(nodes)
    outputs = {o.name: o for o in graph.output}
    found = [(name, producer[name]) for name in names
             if name in producer and nodes[producer[name]].op_type == "Reshape"]
    found = [(name, i) for name, i in found
             if nodes[i].input[0] in producer and nodes[i].input[0] not in outputs
             and f"{name}.view" not in producer]
    if not found:
        return {}
    if shapes is None:
        shapes = _inferred_shapes(model)
    viewed: dict[str, list[int]] = {}
    gone = set()
    unread = []
    for name, i in found:
        reshape, source = nodes[i], nodes[i].input[0]
        shape, own = shapes.get(source), shapes.get(name)
        if shape is None or not own or source in gone:
            continue  # (a value reshaped into two outputs goes to the first)
        viewed[name] = own
        shapes[name] = shape
        declared = outputs[name].type.tensor_type.shape
        gone |= {name, source}
        made = nodes[producer[source]]
        made.output[list(made.output).index(source)] = name
        for j in readers.get(name, ()):
            nodes[j].input[:] = [f"{name}.view" if v == name else v for v in nodes[j].input]
        for j in readers[source]:
            nodes[j].input[:] = [name if v == source else v for v in nodes[j].input]
        reshape.output[0] = f"{name}.view"
        if not readers.get(name):
            unread.append(reshape)  # nothing reads the view: the Reshape goes
        del declared.dim[:]
        for d in shape:
            declared.dim.add().dim_value = d
    kept = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for reshape in unread:
        graph.node.remove(reshape)
    return viewed


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int] | None]:
    """Every value's static shape, gradients' too (shape inference: ~7 ms for resnet18's
    step)."""
    try:
        return static_shapes(onnx.shape_inference.infer_shapes(model).graph)
    except onnx.shape_inference.InferenceError:
        return static_shapes(model.graph)


def _edges(nodes: Sequence[onnx.NodeProto]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Which node makes each value, and which nodes read it (once each)."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in dict.fromkeys(node.input):
            if name:
                readers.setdefault(name, []).append(i)
    return producer, readers


def _dag(nodes: Sequence[onnx.NodeProto]
         ) -> tuple[dict[str, int], dict[str, list[int]], list[int]] | None:
    """(producer, readers, ancestors) of a graph's nodes (see ``_edges``, ``_ancestors``); None
    when a node holds a subgraph (it may read an outer value without naming it as an input) or
    the nodes are not in topological order."""
    if any(_has_subgraph(node) for node in nodes):
        return None
    producer, readers = _edges(nodes)
    ancestors = _ancestors(nodes, producer)
    return None if ancestors is None else (producer, readers, ancestors)


def _ancestors(nodes: Sequence[onnx.NodeProto], producer: Mapping[str, int]) -> list[int] | None:
    """Each node's ancestors as a bit mask over node indices; None when the nodes are not in
    topological order (as ONNX requires)."""
    masks: list[int] = []
    for i, node in enumerate(nodes):
        mask = 0
        for name in node.input:
            j = producer.get(name)
            if j is not None:
                if j >= i:
                    return None
                mask |= masks[j] | 1 << j
        masks.append(mask)
    return masks


def _tie_source(nodes: Sequence[onnx.NodeProto], readers: Mapping[str, list[int]],
                ancestors: Sequence[int], late: int, target: int,
                shapes: Mapping[str, list[int] | None], reach: int = 32) -> str | None:
    """The value a tie reads to know that node ``late`` has run: its own output where that is
    known to hold an element, else the nearest such value made from it (a symbolic batch: the
    gradient's channel sums), never one that ``target`` (where the tie goes) leads to.

    NOTE: measured against reading the nearest small value made from it in every case, which
    the tie would keep alive for less: no lower (resnet18 8x64 330 / 330 MB, mobilenet_v2 374 /
    360, efficientnet_b0 477 / 471, densenet121 661 / 665)."""
    seen, todo = {late}, [late]
    while todo and len(seen) <= reach:
        i = todo.pop(0)
        if i == target or ancestors[i] >> target & 1:
            continue
        for out in nodes[i].output:
            shape = shapes.get(out)
            if out and shape is not None and all(d > 0 for d in shape):
                return out
        for out in nodes[i].output:
            for user in readers.get(out, ()):
                if user not in seen:
                    seen.add(user)
                    todo.append(user)
    return None


def _scalar_input(nodes: Sequence[onnx.NodeProto], producer: Mapping[str, int],
                  ancestors: Sequence[int], made: int, late: Sequence[int],
                  shapes: Mapping[str, list[int] | None], reach: int = 16
                  ) -> tuple[int, int] | None:
    """(node index, input slot) of a scalar that the update ``made`` depends on through a node
    none of the ``late`` readers depends on: the nearest, searching back from the update."""
    seen, todo = {made}, [made]
    while todo and len(seen) <= reach:
        i = todo.pop(0)
        if not any(ancestors[r] >> i & 1 for r in late):
            for slot, name in enumerate(nodes[i].input):
                if name and shapes.get(name) == []:
                    return i, slot
        for name in nodes[i].input:
            j = producer.get(name)
            if j is not None and j not in seen:
                seen.add(j)
                todo.append(j)
    return None


def _topological(nodes: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto] | None:
    """``nodes`` in an order where each comes after the nodes making its inputs, as close to the
    given order as that allows; None when they form a cycle."""
    producer, readers = _edges(nodes)
    waiting = [len({producer[n] for n in node.input if n in producer}) for node in nodes]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for user in {u for out in nodes[i].output for u in readers.get(out, ())}:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, user)
    return order if len(order) == len(nodes) else None


def data_subgraph(model: onnx.ModelProto, outputs: Sequence[str], fed: Collection[str]
                  ) -> onnx.ModelProto | None:
    """The part of ``model`` that computes ``outputs`` from the inputs named in ``fed`` (and
    constants) alone, as a model of its own; None when they depend on any other input (state).

    A step's checks of its data (a label out of range) run this before the step, so a failed
    one changes nothing and no run needs undoing."""
    graph = model.graph
    nodes = list(graph.node)
    producer, _ = _edges(nodes)
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
