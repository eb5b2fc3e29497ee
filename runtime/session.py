"""ONNX Runtime sessions: providers, options, and the bounded session caches.

The caches hold what eager code runs again and again: single-node kernels (``run_node``) and
``backward``'s gradient plans. Compiled steps and the eager optimizer own their sessions through
their :class:`~onnxgrad.runtime.step.StepRunner` (its state buffers live as long as the step).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
from onnx import helper

from .lowering import conv_lowered, lower_small_convs, static_shapes
from .opset import IR_VERSION, OPSET

_providers: list[str] | None = None


def _default_providers() -> list[str]:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def get_providers() -> list[str]:
    """The execution providers every new session uses (CUDA when onnxruntime-gpu offers it)."""
    global _providers
    if _providers is None:
        _providers = _default_providers()
    return list(_providers)


def set_providers(providers: Sequence[str]) -> None:
    """Override the execution providers for sessions created from now on."""
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"execution provider(s) {missing} not available; available: {available}")
    if not providers:
        raise ValueError("set_providers needs at least one execution provider")
    global _providers
    _providers = list(providers)
    _kernels.clear()  # sessions made for other providers
    _plans.clear()
    _groups.clear()


def processes_on_this_machine() -> int:
    """How many processes an MPI launcher started on this machine (MPICH's Hydra and Open MPI
    say so in the environment); 1 outside a launcher."""
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


#: How long (microseconds) a session's idle worker spins for more work before it sleeps.
SPIN_US = "1000"


def session_options(*, level: str = "extended", spinning: bool = True, arena: bool = True
                    ) -> ort.SessionOptions:
    """``spinning=False``: the session's threads sleep as soon as a run ends. Right for
    single-node kernels: eager code runs a different kernel next, whose own threads are the
    ones that work, so spinning ones only take cores from it (measured: 2-core load average
    in the hundreds during the test suite); and a session whose threads spin takes ~30 ms to
    destroy (a cache eviction) against ~1.5 ms.

    ``arena=False``: outputs and scratch come from malloc, not from a memory arena the session
    keeps. Right for single-node kernels too: their outputs are the eager values, so an arena
    grew to every value a kernel made that was alive at once and kept it (mobilenet_v2 8x96:
    ~210 MB after one forward, all its activations); measured no slower, the eager resnet18
    and mobilenet_v2 SGD loops at batch 8: 162 / 201 ms against 162 / 206 ms."""
    opts = ort.SessionOptions()
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        # NOTE: a worker waits for more work spinning for at most 1 ms, then sleeps. ONNX
        # Runtime's default kept a core busy for ~40 ms after every run (measured: process CPU
        # time during a sleep after one MLP step), taken from whatever ran next: the eager
        # tutorial loop's backward session spun through the optimizer step and the next forward
        # (resnet18 8x64: 148-158 -> 131-141 ms a loop, batch 1: 54 -> 41 ms, in alternating
        # processes). 1 ms still spans the gaps inside a run and between back-to-back steps.
        opts.add_session_config_entry("session.intra_op.spin_duration_us", SPIN_US)
    opts.enable_cpu_mem_arena = arena
    local = processes_on_this_machine()
    if local > 1:
        # NOTE: each process gets its share of the cores, and threads that sleep when idle: by
        # default every process's ONNX Runtime takes all cores and spins after each run, so a rank
        # waiting in an all-reduce starves the one still computing (measured with
        # benchmarks/distributed.py on 2 cores: an MLP step of 156 ms instead of 8.5 ms).
        opts.intra_op_num_threads = max(1, (os.cpu_count() or 1) // local)
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # NOTE: EXTENDED rather than ALL: the NCHWc layout transform that ALL adds was measured slower
    # for training graphs (many layout conversions around the gradient convolutions).
    opts.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    # NOTE: no memory pattern: with one, the second run allocates one block for every
    # intermediate of the first on top of the arena's, measured on resnet18's step: peak memory
    # 883 MB against 1068 MB at 4x3x224x224 (492 against 543 at 8x3x64x64), for the same step
    # time within noise (366 against 370 ms; 119 against 115 ms).
    opts.enable_mem_pattern = False
    # NOTE: no planned buffer reuse: ONNX Runtime's planner gives a value the buffer of one that
    # died earlier with the same size, and the buffer stays taken from that death to the new
    # value's birth. The arena then hands freed memory out anyway. Measured on the compiled
    # steps: densenet121 8x96's arena requested 265 MiB at its peak with reuse, 184 without
    # (what is alive at once), peak RSS 665 -> 582 MB; resnet18 4x224 497 -> 441 MB; the others
    # equal within 10 MB; step times equal within noise (A/B in one process, alternating).
    opts.enable_mem_reuse = False
    # NOTE: no "session.set_denormal_as_zero": ONNX Runtime sets flush-to-zero on the calling
    # thread too, which changed the user's own NumPy and PyTorch arithmetic after the first op,
    # and PyTorch keeps subnormals by default (torch.set_flush_denormal(False)).
    # NOTE: FATAL only: a failing kernel would print ONNX Runtime's own red error line, and
    # onnxgrad raises its own error naming the op and the user's line instead.
    opts.log_severity_level = 4
    return opts


ModelCheck = Callable[[onnx.ModelProto], None]
_model_checks: list[ModelCheck] = []


def add_model_check(check: ModelCheck) -> Callable[[], None]:
    """Call ``check(model)`` on every model before a session is made from it; returns a remover.

    A debugging hook: tests use it to run ``onnx.checker`` on every graph that reaches ONNX
    Runtime (single-node kernels and gradient graphs alike). Costs nothing when none is added.
    """
    _model_checks.append(check)
    return lambda: _model_checks.remove(check)


def make_session(model: onnx.ModelProto | bytes, *, level: str = "extended",
                 spinning: bool = True, arena: bool = True, optimized: str | None = None
                 ) -> ort.InferenceSession:
    """``optimized``: a path where ONNX Runtime writes the graph it runs (after its own
    optimizations: fusions, eliminations)."""
    if _model_checks:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
        for check in _model_checks.copy():  # a check may remove itself
            check(proto)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    options = session_options(level=level, spinning=spinning, arena=arena)
    if optimized is not None:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(data, options, providers=get_providers())


_MISSING = object()


class _LRU(OrderedDict):
    """Least recently used entries go first once their total weight passes ``capacity`` or
    their number passes ``max_entries``."""

    def __init__(self, capacity: int, max_entries: int):
        super().__init__()
        self.capacity = capacity
        self.max_entries = max_entries
        self.weight = 0

    def get_or_make(self, key: Any, make: Callable[[], Any],
                    weight: Callable[[], int] = lambda: 1) -> Any:
        entry = self.get(key, _MISSING)
        if entry is not _MISSING:
            self.move_to_end(key)
            return entry[0]
        # make() runs outside any `except KeyError`, so its errors don't chain a KeyError context.
        value = make()
        w = weight()
        self[key] = (value, w)
        self.weight += w
        while (self.weight > self.capacity or len(self) > self.max_entries) and len(self) > 1:
            _, (_, w) = self.popitem(last=False)
            self.weight -= w
        return value

    def clear(self) -> None:
        super().clear()
        self.weight = 0


#: The native memory one cached session holds beyond its tensors (measured: ~290 KiB for a
#: single-node kernel with its thread pool, ~400 KiB for a small gradient plan).
SESSION_BYTES = 384 << 10

# NOTE: two bounds, in estimated bytes of native memory (a session's own cost plus the tensors its
# memory arena keeps) and in entries. Kernels are made per rank, not per size, so eager code needs
# a few hundred; gradient plans are made per shape (every batch size makes one), so they have
# their own smaller bound: eager code with varying shapes keeps its RSS flat once it is reached
# (it grew ~0.4-2.5 MiB per new shape without bound), and the few plans a training loop reuses
# stay. The latest entry is always kept, however large.
_kernels = _LRU(capacity=512 << 20, max_entries=4096)
_plans = _LRU(capacity=1 << 30, max_entries=32)
# NOTE: node groups are made per shape (a BatchNorm's statistics depend on the batch size), so
# their bound is small too: 64 groups are ~30 MB (measured: ~470 KiB of RSS each, made in ~1.3
# ms); a loop whose shapes change at every step stops fusing a group whose session was evicted.
_groups = _LRU(capacity=64 * SESSION_BYTES, max_entries=64)


def cached(key: Any, make: Callable[[], Any]) -> Any:
    """The cached single-node kernel for ``key``, made by ``make()`` when missing."""
    return _kernels.get_or_make(key, make, lambda: SESSION_BYTES)


def cached_group(key: Any, make: Callable[[], Any]) -> Any:
    """The cached session of an eager node group (``tracer/fusion.py``) for ``key``."""
    return _groups.get_or_make(key, make, lambda: SESSION_BYTES)


def find_group(key: Any) -> Any:
    """The cached node group for ``key``, or None where there is none (never made, evicted, or
    cleared by ``set_providers``)."""
    entry = _groups.get(key)
    if entry is None:
        return None
    _groups.move_to_end(key)
    return entry[0]


def cached_plan(key: Any, make: Callable[[], Any], data_bytes: Callable[[], int]) -> Any:
    """The cached gradient plan (a session and what runs it) for ``key``; ``data_bytes()``
    estimates the tensors its arena keeps (about its forward values' size)."""
    return _plans.get_or_make(key, make, lambda: SESSION_BYTES + data_bytes())


def cache_size() -> int:
    return len(_kernels) + len(_plans) + len(_groups)


def typed_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """``graph`` as a model of onnxgrad's opset, typed by ONNX's strict shape inference (which
    types the outputs, and rejects an ill-typed node with ONNX's message)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _single_node_model(
    op_type: str,
    attrs: dict[str, Any],
    inputs: Sequence[np.ndarray | None],
    consts: Sequence[bool],
    n_out: int,
    sized: bool = True,
) -> onnx.ModelProto | None:
    """One node whose constant inputs (axes, shapes, slice bounds) are initializers.

    Constants are baked in so that shape inference knows every output's rank and dims: graph
    outputs then carry full types, as ``onnx.checker.check_model(full_check=True)`` requires.
    ``sized=False``: the fed inputs have their rank but no sizes, so that one kernel serves every
    shape; None when ONNX's inference then cannot give every output a rank (a ``Conv`` needs its
    weight's sizes), and the kernel must be made for the sizes.
    """
    in_names = [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)]
    out_names = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op_type, in_names, out_names, **attrs)
    graph_inputs, initializers = [], []
    for name, x, is_const in zip(in_names, inputs, consts):
        if x is None:
            continue
        if is_const:
            initializers.append(onnx.numpy_helper.from_array(x, name))
        else:
            dtype = helper.np_dtype_to_tensor_dtype(x.dtype)
            shape = x.shape if sized else [None] * x.ndim
            graph_inputs.append(helper.make_tensor_value_info(name, dtype, shape))
    outputs = [helper.make_empty_tensor_value_info(name) for name in out_names]
    graph = helper.make_graph([node], op_type, graph_inputs, outputs, initializer=initializers)
    inferred = typed_model(graph)
    del inferred.graph.value_info[:]
    if not sized and not all(o.type.tensor_type.HasField("shape")
                             for o in inferred.graph.output):
        return None
    return inferred


_SIZED = object()  # a kernel cache entry: this node's kernels are made per input sizes

# Small float arithmetic runs in NumPy: IEEE-754 add, subtract, multiply and divide round as
# ONNX Runtime's kernels do (neither flushes subnormals: see session_options), so the bits are
# the same, in ~1 us instead of a ~30 us session run (a training BatchNorm's running statistics
# are six such ops on [C] vectors). tests/test_ops_math.py checks the bits against the kernels.
_NUMPY_ARITHMETIC = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
NUMPY_ARITHMETIC_MAX = 4096  # elements per operand (0 turns the shortcut off)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _small_arithmetic(op_type: str, inputs: Sequence[np.ndarray | None]) -> np.ndarray | None:
    if len(inputs) != 2:
        return None
    a, b = inputs
    if a is None or b is None or a.dtype != b.dtype or a.dtype not in _FLOATS \
            or a.size > NUMPY_ARITHMETIC_MAX or b.size > NUMPY_ARITHMETIC_MAX:
        return None
    try:
        shape = a.shape if a.shape == b.shape else np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        return None  # the kernel reports it
    out = np.empty(shape, a.dtype)
    with np.errstate(all="ignore"):  # x / 0 is inf or nan, silently, as in the kernel
        _NUMPY_ARITHMETIC[op_type](a, b, out=out)
    return out


def run_node(
    op_type: str,
    attrs: dict[str, Any],
    attrs_key: Any,
    inputs: Sequence[np.ndarray | None],
    n_out: int = 1,
    consts: Sequence[bool] | None = None,
) -> list[np.ndarray]:
    """Evaluate one ONNX node eagerly; sessions are cached by op, attributes, dtypes and ranks.

    ``consts[i]`` marks input ``i`` as an attribute-like constant: it is baked into the kernel
    (and its value is part of the cache key) instead of being fed.
    """
    if op_type in _NUMPY_ARITHMETIC and not attrs:
        out = _small_arithmetic(op_type, inputs)
        if out is not None:
            return [out]
    consts = list(consts) if consts is not None else [False] * len(inputs)
    node_key = ("node", op_type, attrs_key, n_out)
    # NOTE: a kernel is made for the inputs' ranks, not their sizes: a session costs ~290 KiB of
    # native memory, and eager code with varying batch sizes made new kernels at every step.
    key = node_key + tuple(None if x is None else (x.dtype.str, x.shape, x.tobytes()) if c
                           else (x.dtype.str, x.ndim) for x, c in zip(inputs, consts))

    # A Conv the CPU session runs as one matrix product at these sizes, as compiled steps run
    # it (runtime/lowering.py): a kernel per size.
    lowered = op_type == "Conv" and inputs[1] is not None and inputs[1].dtype == np.float32 \
        and get_providers()[0] == "CPUExecutionProvider" \
        and conv_lowered(attrs, *(None if x is None else x.shape for x in inputs[:2]))

    def make(sized: bool) -> Any:
        model = _single_node_model(op_type, attrs, inputs, consts, n_out, sized)
        if model is None:
            return _SIZED
        if lowered:
            lower_small_convs(model, static_shapes(model.graph))
        return make_session(model, spinning=False, arena=False)

    sess = _SIZED if lowered else cached(key, lambda: make(False))
    if sess is _SIZED:
        key = node_key + tuple(None if x is None else (x.dtype.str, x.shape, c and x.tobytes())
                               for x, c in zip(inputs, consts))
        sess = cached(key, lambda: make(True))
    feeds = {f"x{i}": x for i, (x, c) in enumerate(zip(inputs, consts)) if x is not None and not c}
    return sess.run(None, feeds)
