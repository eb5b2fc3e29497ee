"""``onnxgrad verify FILE``: loop an exported training step in every ONNX runtime installed.

An exported step (``CompiledFunction.export`` / ``TrainingStep.export`` / ``onnxgrad
train-graph``, the default or the portable format) is read as any runtime's user would read it:
the graph, its metadata (``onnxgrad.state``: which output feeds which input next step,
``onnxgrad.data_inputs``) and the first step's state (the state inputs' initializers in the
default format, the safetensors file that ``onnxgrad.state_file`` names in the portable one).
Each runtime installed loops the same N batches feeding every state output back, interleaved step
by step (so that the timings share the machine's state), and is compared with ONNX Runtime
looping the same file.

The runtime adapters (:data:`RUNTIMES`) and the loop are this module's library part;
``benchmarks/portable_runtimes.py`` uses them too. Each adapter uses only its runtime's own API:
nothing of onnxgrad's tracer or passes runs the file.

Data: ``--data file.npz`` (an array per data input: one batch for every step, or one more leading
axis with a batch per step), else random data with a fixed seed: floats standard normal, integers
in ``[0, classes)`` where ``classes`` is the size of the axis the integer input indexes (followed
through reshapes, casts and ``Where`` to a ``Gather``/``GatherElements``/``GatherND``/``OneHot``:
cross-entropy's class axis, an embedding's vocabulary), ``[0, 2)`` when it indexes nothing,
booleans fair coins. A symbolic (dynamic) dimension takes the ``--batch-size`` list's sizes,
cycled over the steps.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .runtime.metadata import DATA_INPUTS, STATE, STATE_FILE

__all__ = ["RUNTIMES", "Row", "StepFile", "VerifyError", "difference", "loop", "main",
           "random_batches", "read_step", "verify"]

Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
Batch = dict[str, np.ndarray]

#: The issue's tolerance where a runtime's float32 kernels differ from ONNX Runtime's.
TOLERANCE = 1e-4
#: The reference every other runtime is compared with.
REFERENCE = "ort"


class VerifyError(ValueError):
    """Bad input to ``verify``: not a step file, a missing state file, data of other shapes."""


# --------------------------------------------------------------------------- reading the file
@dataclass
class StepFile:
    """An exported step as its metadata describes it."""

    path: Path
    model: onnx.ModelProto
    data_inputs: list[str]
    feeds_for: dict[str, str]  # state output -> the input it feeds on the next step
    state: dict[str, np.ndarray]  # the first step's value of every input but the data
    portable: bool

    def input_type(self, name: str) -> tuple[np.dtype, list[int | str | None]]:
        """An input's dtype and dims (an int, a symbol's name, or None where unnamed)."""
        value = next(i for i in self.model.graph.input if i.name == name)
        tt = value.type.tensor_type
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tt.shape.dim]
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims


def read_step(path: str | os.PathLike[str]) -> StepFile:
    """The step file at ``path`` with its first state; :class:`VerifyError` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise VerifyError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's many ways to say "not a model"
        raise VerifyError(f"{path}: not an ONNX model ({type(exc).__name__})") from exc
    meta = {p.key: p.value for p in model.metadata_props}
    missing = [key for key in (STATE, DATA_INPUTS) if key not in meta]
    if missing:
        raise VerifyError(f"{path}: not an exported training step (no {' or '.join(missing)} "
                          f"metadata; export one with step.export(path) or onnxgrad train-graph)")
    try:
        feeds_for, data_inputs = json.loads(meta[STATE]), json.loads(meta[DATA_INPUTS])
    except json.JSONDecodeError as exc:
        raise VerifyError(f"{path}: metadata is not JSON ({exc.msg})") from exc
    inputs = [i.name for i in model.graph.input]
    outputs = {o.name for o in model.graph.output}
    wrong = [n for n in data_inputs if n not in inputs] + \
        [n for n, i in feeds_for.items() if n not in outputs or i not in inputs]
    if wrong:
        raise VerifyError(f"{path}: metadata names {wrong}, which are not the graph's "
                          f"inputs/outputs")
    portable = STATE_FILE in meta
    if portable:
        state_path = path.parent / meta[STATE_FILE]
        if not state_path.is_file():
            raise VerifyError(f"{path}: its state file {state_path} does not exist (the portable "
                              f"format keeps the first state beside the model)")
        from .runtime.portable import read_safetensors

        try:
            state = read_safetensors(state_path)
        except (ValueError, KeyError, OSError) as exc:
            raise VerifyError(f"{state_path}: not a safetensors file ({exc})") from exc
    else:
        state = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                 if t.name in inputs and t.name not in data_inputs}
    unfed = [n for n in inputs if n not in state and n not in data_inputs]
    if unfed:
        raise VerifyError(f"{path}: inputs {unfed} are neither data nor state with a first value")
    return StepFile(path, model, list(data_inputs), dict(feeds_for), state, portable)


# --------------------------------------------------------------------------- the data
_PASS_THROUGH = {"Reshape": (0,), "Unsqueeze": (0,), "Squeeze": (0,), "Flatten": (0,),
                 "Identity": (0,), "Cast": (0,), "Where": (1, 2), "Expand": (0,)}


def label_classes(model: onnx.ModelProto, name: str) -> int | None:
    """How many values the integer input ``name`` may take: the size of the axis it indexes
    (followed through shape-only ops), the smallest if several; None if it indexes nothing."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a model the installed onnx cannot infer: no classes
        return None
    graph = inferred.graph
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None
                     for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.value_info, *graph.output]}
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    reached, found = {name}, []
    for node in graph.node:  # topological order: one pass follows every path
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if any(node.input[k] in reached for k in _PASS_THROUGH.get(node.op_type, ())
               if k < len(node.input)):
            reached.update(node.output)
        if node.op_type in ("Gather", "GatherElements") and node.input[1] in reached:
            shape = dims.get(node.input[0]) or []
            axis = int(attrs.get("axis", 0))
            if shape and -len(shape) <= axis < len(shape) and shape[axis]:
                found.append(shape[axis])
        elif node.op_type == "GatherND" and node.input[1] in reached:
            shape = dims.get(node.input[0]) or []
            if shape and shape[int(attrs.get("batch_dims", 0))]:
                found.append(shape[int(attrs.get("batch_dims", 0))])
        elif node.op_type == "OneHot" and node.input[0] in reached and node.input[1] in consts:
            found.append(int(np.asarray(consts[node.input[1]]).reshape(-1)[0]))
    return min(found) if found else None


def random_batches(step: StepFile, steps: int, seed: int = 0,
                   batch_sizes: Sequence[int] = (4,)) -> tuple[list[Batch], list[str]]:
    """``steps`` batches of random data of the file's shapes and dtypes (see the module's
    docstring for the rule), and one line per data input describing it."""
    rng = np.random.default_rng(seed)
    specs, lines = [], []
    for name in step.data_inputs:
        dtype, dims = step.input_type(name)
        low_high = None
        if dtype.kind in "iu":
            classes = label_classes(step.model, name)
            low_high = (0, classes if classes else 2)
        specs.append((name, dtype, dims, low_high))
        shape = ", ".join(str(d) if isinstance(d, int) else "|".join(map(str, batch_sizes))
                          for d in dims)
        what = (f"integers in [0, {low_high[1]})" if low_high else
                "True/False" if dtype.kind == "b" else "standard normal")
        lines.append(f"{name}: {dtype} [{shape}], {what}")
    batches = []
    for k in range(steps):
        size = batch_sizes[k % len(batch_sizes)]
        batch = {}
        for name, dtype, dims, low_high in specs:
            shape = tuple(d if isinstance(d, int) else size for d in dims)
            if low_high:
                batch[name] = rng.integers(*low_high, size=shape).astype(dtype)
            elif dtype.kind == "b":
                batch[name] = rng.random(shape) < 0.5
            else:
                batch[name] = rng.standard_normal(shape).astype(dtype)
        batches.append(batch)
    return batches, lines


def npz_batches(step: StepFile, path: str | os.PathLike[str], steps: int) -> list[Batch]:
    """The batches in ``path``: per data input an array of the input's rank (every step) or of
    one more (a batch per step, as many steps as the shortest has, at most ``steps``)."""
    try:
        with np.load(path) as arrays:
            given = {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError) as exc:
        raise VerifyError(f"--data {path}: not a NumPy .npz file ({exc})") from exc
    missing = [n for n in step.data_inputs if n not in given]
    if missing:
        raise VerifyError(f"--data {path}: no array for the data inputs {missing} (it has "
                          f"{sorted(given)})")
    per_step: dict[str, list[np.ndarray]] = {}
    for name in step.data_inputs:
        dtype, dims = step.input_type(name)
        array = given[name]
        if array.ndim == len(dims) + 1:
            items = list(array)
        elif array.ndim == len(dims):
            items = [array] * steps
        else:
            raise VerifyError(f"--data {path}: {name!r} has shape {list(array.shape)}; the input "
                              f"is {dims} (or one batch per step: one more leading axis)")
        for item in items:
            fixed = [(d, n) for d, n in zip(dims, item.shape) if isinstance(d, int) and d != n]
            if fixed:
                raise VerifyError(f"--data {path}: {name!r} batch of shape {list(item.shape)} "
                                  f"does not fit the input's {dims}")
        if array.dtype != dtype and not np.can_cast(array.dtype, dtype, "same_kind"):
            raise VerifyError(f"--data {path}: {name!r} is {array.dtype}; the input takes {dtype}")
        per_step[name] = [np.ascontiguousarray(item, dtype=dtype) for item in items]
    count = min(steps, *(len(v) for v in per_step.values()))
    return [{name: per_step[name][k] for name in step.data_inputs} for k in range(count)]


# --------------------------------------------------------------------------- the runtimes
def _ort(step: StepFile) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the default format's state initializers are meant
    session = ort.InferenceSession(str(step.path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds)))


def _reference(step: StepFile) -> Run:
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(step.model)
    names = [o.name for o in step.model.graph.output]
    return lambda feeds: dict(zip(names, evaluator.run(None, feeds)))


def _symbolic(step: StepFile) -> bool:
    return any(not isinstance(d, int) for i in step.model.graph.input
               for d in step.input_type(i.name)[1])


def _per_shape(step: StepFile, make: Callable[[dict[str, tuple[int, ...]] | None], Run]) -> Run:
    """``make(None)`` for a file of static shapes; for one with a symbolic batch, ``make`` of the
    fed shapes, once per distinct shape: a runtime that compiles for concrete shapes (the
    file is still one file for every batch size)."""
    if not _symbolic(step):
        return make(None)
    made: dict[tuple, Run] = {}

    def run(feeds: Batch) -> Batch:
        shapes = {name: tuple(np.shape(feeds[name])) for name in step.data_inputs}
        key = tuple(shapes.values())
        if key not in made:
            made[key] = make(shapes)
        return made[key](feeds)
    return run


def _openvino(step: StepFile) -> Run:
    import openvino as ov

    core = ov.Core()
    names = [o.name for o in step.model.graph.output]

    def make(shapes: dict[str, tuple[int, ...]] | None) -> Run:
        model = core.read_model(str(step.path))
        if shapes:
            # NOTE: OpenVINO's CPU convolution has no dynamic weight shape, and a weight
            # gradient convolves over the batch: the model is reshaped to each batch size.
            model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        # NOTE: f32 explicitly: on CPUs with bf16 support OpenVINO's default precision is bf16.
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        ports = [compiled.output(name) for name in names]
        request = compiled.create_infer_request()

        def run(feeds: Batch) -> Batch:
            results = request.infer(feeds)
            return {name: np.array(results[port]) for name, port in zip(names, ports)}
        return run
    return _per_shape(step, make)


def _tract(step: StepFile) -> Run:
    import tract

    inputs = [i.name for i in step.model.graph.input]
    names = [o.name for o in step.model.graph.output]

    def make(shapes: dict[str, tuple[int, ...]] | None) -> tract.Runnable:
        if not shapes:
            return tract.onnx().load(str(step.path)).into_model().into_runnable()
        # NOTE: tract's shape analysis fails on a symbolic batch (a Reshape of a length it
        # cannot simplify), and fed concrete input facts clash with the graph's symbolic shape
        # hints: each batch size gets the file with its symbols set, as tract's users do.
        with tempfile.TemporaryDirectory() as folder:
            concrete = Path(folder) / step.path.name
            onnx.save(_concretize(step, shapes), str(concrete))
            return tract.onnx().load(str(concrete)).into_model().into_runnable()

    kinds = {o.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type))
             for o in step.model.graph.output if o.type.tensor_type.elem_type}

    def numpy(name: str, out: tract.Tensor) -> np.ndarray:
        try:
            return out.to_numpy()
        except tract.TractError:
            # NOTE: tract computes some integer results as symbolic dims (TDim: a count that
            # its analysis ties to shapes), which its API cannot hand out as they are.
            wanted = getattr(tract.DatumType, _tract_type(kinds.get(name, np.dtype(np.int64)))
                             .upper(), tract.DatumType.I64)
            return out.convert_to(wanted).to_numpy()

    def make_run(shapes: dict[str, tuple[int, ...]] | None) -> Run:
        runnable = make(shapes)

        def run(feeds: Batch) -> Batch:
            # NOTE: not np.ascontiguousarray, which makes 0-d scalars (lr) 1-d.
            outs = runnable.run([np.array(feeds[name], order="C") for name in inputs])
            return {name: numpy(name, out) for name, out in zip(names, outs)}
        return run
    return _per_shape(step, make_run)


def _concretize(step: StepFile, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """The step's model with every symbolic dimension set to its size in ``shapes``."""
    sizes: dict[str, int] = {}
    for name, shape in shapes.items():
        for d, n in zip(step.input_type(name)[1], shape):
            if isinstance(d, str):
                sizes[d] = n
    model = onnx.ModelProto()
    model.CopyFrom(step.model)
    graph = model.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]
    return model


def _tract_type(kind: np.dtype) -> str:
    return "bool" if kind.kind == "b" else f"{kind.kind}{8 * kind.itemsize}"


def _onnx2torch(step: StepFile) -> Run:
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception:  # noqa: BLE001 - absent, or built for another torch
            # NOTE: onnx2torch imports torchvision for its NMS and RoiAlign converters only;
            # a stand-in (for a torchvision that cannot be imported anyway) lets the others load.
            stub = types.ModuleType("torchvision")
            stub.ops = types.ModuleType("torchvision.ops")  # type: ignore[attr-defined]
            stub.ops.roi_align = None  # type: ignore[attr-defined]
            sys.modules["torchvision"] = stub
            sys.modules["torchvision.ops"] = stub.ops  # type: ignore[attr-defined]
    import torch
    from onnx2torch import convert

    module = convert(step.model)
    inputs = [i.name for i in step.model.graph.input]
    names = [o.name for o in step.model.graph.output]

    def run(feeds: Batch) -> Batch:
        with torch.no_grad():
            outs = module(*[torch.from_numpy(np.array(feeds[name])) for name in inputs])
        outs = outs if isinstance(outs, (tuple, list)) else [outs]
        return {name: out.numpy() for name, out in zip(names, outs)}
    return run


def _tinygrad(step: StepFile) -> Run:
    if "DEV" not in os.environ and "tinygrad" not in sys.modules and shutil.which("clang") is None:
        # NOTE: tinygrad's CPU device compiles with clang; without it, its Python emulator
        # (slow, the same ONNX semantics) runs the graph. Read when tinygrad is imported.
        os.environ["DEV"] = "PYTHON"
    from tinygrad.nn.onnx import OnnxRunner

    def make(shapes: dict[str, tuple[int, ...]] | None) -> Run:
        # NOTE: a runner binds a symbolic dimension at its first call: one per batch size.
        runner = OnnxRunner(str(step.path))
        fed = set(runner.graph_inputs)  # NOTE: inputs with an initializer are not feedable there

        def run(feeds: Batch) -> Batch:
            outs = runner({k: v for k, v in feeds.items() if k in fed})
            return {name: value.numpy() for name, value in outs.items()}
        return run
    return _per_shape(step, make)


@dataclass(frozen=True)
class Runtime:
    module: str  # what must be importable for the runtime to count as installed
    install: str  # the pip package that installs it
    make: Callable[[StepFile], Run]


RUNTIMES: dict[str, Runtime] = {
    "ort": Runtime("onnxruntime", "onnxruntime", _ort),
    "reference": Runtime("onnx", "onnx", _reference),
    "openvino": Runtime("openvino", "openvino", _openvino),
    "tract": Runtime("tract", "tract", _tract),
    "tinygrad": Runtime("tinygrad", "tinygrad", _tinygrad),
    "onnx2torch": Runtime("onnx2torch", "onnx2torch", _onnx2torch),
}


def not_installed(name: str) -> str | None:
    """Why runtime ``name`` cannot be tried here, or None when it is installed."""
    runtime = RUNTIMES[name]
    if importlib.util.find_spec(runtime.module) is None:
        return f"not installed (pip install {runtime.install})"
    return None


# --------------------------------------------------------------------------- the loop
def loop(run: Run, step: StepFile, batches: Sequence[Batch]
         ) -> tuple[list[Batch], list[float]]:
    """The README's loop: feed the data and the state, feed each state output back."""
    state, results, times = dict(step.state), [], []
    for batch in batches:
        start = time.perf_counter()
        out = run({**state, **batch})
        times.append(time.perf_counter() - start)
        state.update({step.feeds_for[name]: out[name] for name in step.feeds_for})
        results.append(out)
    return results, times


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max |want|`` (absolute where ``want`` is all zeros); inf for
    another shape or a non-finite difference."""
    x, y = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if x.shape != y.shape:
        return float("inf")
    if not y.size:
        return 0.0
    # NaN where both are NaN is the same result (a batch of 0's loss).
    delta = np.where(np.isnan(x) & np.isnan(y), 0.0, np.abs(x - y))
    d = float(np.max(delta)) / (float(np.max(np.abs(np.nan_to_num(y)))) or 1.0)
    return d if np.isfinite(d) else float("inf")


def difference(got: Batch, want: Batch) -> tuple[float, str]:
    """The largest :func:`relative_difference` over one step's outputs, and which output."""
    worst, where = 0.0, ""
    for name, ref in want.items():
        d = relative_difference(got[name], ref) if name in got else float("inf")
        if d > worst or (d == worst and not where and d):
            worst, where = d, name
    return worst, where


@dataclass
class Row:
    """One runtime's result: what the table prints."""

    runtime: str
    installed: bool = True
    loads: bool = False
    runs: bool = False
    error: str = ""
    diffs: list[float] = field(default_factory=list)  # per step, vs ONNX Runtime
    worst: list[str] = field(default_factory=list)  # per step, the output that differs most
    times: list[float] = field(default_factory=list)  # seconds per step
    results: list[Batch] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """Time per step: the mean of the steps after the first (warm-up) where there are."""
        times = self.times[1:] if len(self.times) > 1 else self.times
        return float(np.mean(times)) if times else float("nan")

    def ok(self, tolerance: float) -> bool:
        """Ran every step, each compared with ONNX Runtime (which ran too) within tolerance."""
        return (self.runs and len(self.diffs) == len(self.results)
                and all(d <= tolerance for d in self.diffs))


_NOISE = re.compile(r"(Exception from |Check '|Details:|Not Implemented:|Caused by:|\d+: )")


def _reason(exc: BaseException) -> str:
    """One line: the first two lines of the message that say something (OpenVINO and tract
    wrap theirs in source locations and backtraces)."""
    lines = []
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("Stack backtrace"):
            break
        if line and not _NOISE.match(line):
            lines.append(line.rstrip(":."))
    text = "; ".join(lines[:2])
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def verify(step: StepFile, runtimes: Sequence[str], batches: Sequence[Batch],
           adapters: dict[str, Callable[[StepFile], Run]] | None = None) -> list[Row]:
    """Loop ``batches`` in ONNX Runtime and each of ``runtimes``, interleaved step by step; the
    rows compare every runtime's outputs (state included) with ONNX Runtime's at each step.

    ``adapters`` replaces runtimes' adapters by name (tests: a runtime made to differ).
    """
    makers = {name: rt.make for name, rt in RUNTIMES.items()} | dict(adapters or {})
    names = [REFERENCE] + [n for n in runtimes if n != REFERENCE]
    rows = {name: Row(name) for name in names}
    runs: dict[str, Run] = {}
    for name in names:
        row = rows[name]
        missing = None if name in (adapters or {}) else not_installed(name)
        if missing:
            row.installed, row.error = False, missing
            continue
        try:
            runs[name] = makers[name](step)
            row.loads = True
        except Exception as exc:  # noqa: BLE001 - every runtime fails its own way: report it
            row.error = _reason(exc)
    state = {name: dict(step.state) for name in runs}
    for batch in batches:
        for name in list(runs):
            row = rows[name]
            try:
                start = time.perf_counter()
                out = runs[name]({**state[name], **batch})
                row.times.append(time.perf_counter() - start)
                state[name].update({step.feeds_for[o]: np.asarray(out[o])
                                    for o in step.feeds_for})
            except Exception as exc:  # noqa: BLE001
                row.error = f"step {len(row.times) + 1}: {_reason(exc)}"
                del runs[name]
                continue
            row.results.append(out)
    for row in rows.values():
        row.runs = row.loads and not row.error and len(row.results) == len(batches)
    want = rows[REFERENCE].results if rows[REFERENCE].runs else []
    for row in rows.values():
        if row.runs and row.runtime != REFERENCE and want:
            for got, ref in zip(row.results, want):
                d, where = difference(got, ref)
                row.diffs.append(d)
                row.worst.append(where)
        elif row.runs and row.runtime == REFERENCE:
            row.diffs = [0.0] * len(batches)
    return [rows[n] for n in names]


def format_table(rows: Sequence[Row], tolerance: float) -> str:
    """The table ``onnxgrad verify`` prints."""
    base = next((r.seconds for r in rows if r.runtime == REFERENCE and r.runs), float("nan"))
    head = ("runtime", "loads", "runs", "max rel diff per step", "ms/step", "x ort", "result")
    lines = []
    for row in rows:
        diffs = " ".join(f"{d:.1e}" for d in row.diffs)
        if not row.installed:
            result = row.error
        elif not row.runs:
            result = f"fails: {row.error}"
        elif row.ok(tolerance):
            result = "reference" if row.runtime == REFERENCE else "matches"
        elif len(row.diffs) < len(row.results):
            result = "not compared: ONNX Runtime did not run the file"
        else:
            k = next(i for i, d in enumerate(row.diffs) if d > tolerance)
            result = f"differs from step {k + 1} ({row.worst[k]})"
        ms = f"{1e3 * row.seconds:.1f}" if row.runs else ""
        ratio = f"{row.seconds / base:.2f}" if row.runs and base > 0 else ""
        yes = ("yes" if row.loads else "no") if row.installed else "-"
        ran = ("yes" if row.runs else "no") if row.installed else "-"
        lines.append((row.runtime, yes, ran, diffs, ms, ratio, result))
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    widths[-1] = 0
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
           for line in [head, *lines]]
    return "\n".join(out)


# --------------------------------------------------------------------------- the command
def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, "
                                         f"got {text!r}")
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: list[str]) -> int:
    """``onnxgrad verify FILE``; exit 0 when every installed runtime asked for matches ONNX
    Runtime within the tolerance, 1 when one differs or fails, 2 for bad input."""
    parser = argparse.ArgumentParser(
        prog="onnxgrad verify",
        description="Loop an exported training step (default or portable format) for N steps in "
        "each ONNX runtime installed, from the file and its metadata alone, and compare every "
        "step's outputs and state with ONNX Runtime's. Exit status: 0 all match, 1 one differs "
        "or fails, 2 bad input.",
    )
    parser.add_argument("file", metavar="FILE.onnx", help="the exported training step")
    parser.add_argument("--runtime", default=",".join(RUNTIMES),
                        help=f"comma-separated, from {', '.join(RUNTIMES)} (default: all; "
                        f"ort is always run as the reference)")
    parser.add_argument("--steps", type=_positive, default=3, help="steps to loop (default 3)")
    parser.add_argument("--data", metavar="FILE.npz",
                        help="the batches: an array per data input, of the input's shape (every "
                        "step) or with a leading axis of steps (default: random, seeded)")
    parser.add_argument("--seed", type=int, default=0, help="the random data's seed (default 0)")
    parser.add_argument("--batch-size", type=_sizes, default=[4], metavar="N[,N...]",
                        help="sizes of a dynamic batch dimension, cycled over the steps "
                        "(default 4; e.g. 4,3 to try a smaller last batch)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"the largest relative difference that matches (default "
                        f"{TOLERANCE:g})")
    args = parser.parse_args(argv)
    runtimes = [r.strip() for r in args.runtime.split(",") if r.strip()]
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        print(f"onnxgrad verify: error: unknown runtime {', '.join(unknown) or repr(args.runtime)}"
              f": choose from {', '.join(RUNTIMES)}", file=sys.stderr)
        return 2
    try:
        step = read_step(args.file)
        if args.data:
            batches = npz_batches(step, args.data, args.steps)
            described = [f"{n}: from {args.data}" for n in step.data_inputs]
        else:
            batches, described = random_batches(step, args.steps, args.seed, args.batch_size)
    except VerifyError as exc:
        print(f"onnxgrad verify: error: {exc}", file=sys.stderr)
        return 2
    rows = verify(step, runtimes, batches)
    if not rows[0].runs:
        # ONNX Runtime itself cannot run it: the file (or the data) is at fault, not a runtime.
        print(f"onnxgrad verify: error: {args.file}: ONNX Runtime cannot "
              f"{'run' if rows[0].loads else 'load'} it: {rows[0].error}", file=sys.stderr)
        return 2
    meta = {p.key: p.value for p in step.model.metadata_props}
    fmt = (f"portable format (state in {meta[STATE_FILE]})" if step.portable
           else "default format (state in the graph's initializers)")
    print(f"{args.file}: {fmt}, {len(batches)} steps of data:")
    for line in described:
        print(f"  {line}")
    print(format_table(rows, args.tolerance))
    asked = [r for r in rows if r.installed and (r.runtime in runtimes or r.runtime == REFERENCE)]
    return 0 if all(r.ok(args.tolerance) for r in asked) else 1
