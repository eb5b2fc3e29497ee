"""``og.training_step``: an existing inference ``.onnx`` model as a compiled SGD training step.

The graph work is :mod:`passes.trainable` (which knows nothing of tensors); this front loads and
normalizes the file (external data, opset conversion, dynamic dimensions bound at the first call),
makes the loss graph by tracing a Python loss with ``og.compile`` (built-in names are
``og.nn.functional`` losses, so the step has the very nodes a hand-written compiled step has),
keeps the state in onnxgrad tensors and runs and exports each step with ``og.compile``'s
:class:`~onnxgrad.tracer.compile.Program`: same runner, same double-buffered state, same file.

Also the ``onnxgrad train-graph`` command (:func:`train_graph_main`).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper, version_converter

from . import optim as og_optim
from .nn import functional as F
from .nn.modules import Parameter
from .passes.autodiff import NoGradientRule
from .passes.trainable import (
    TrainGraphError,
    batchnorm_state,
    batchnorm_statistics,
    check_differentiable,
    default_parameters,
    float_initializers,
    prepare,
    training_graph,
)
from .runtime import IR_VERSION, OPSET
from .runtime.step import StepRunner
from .tracer import ops
from .tracer.compile import Program
from .tracer.compile import compile as og_compile
from .tracer.tensor import Tensor, Val

__all__ = ["LOSSES", "TrainGraphError", "TrainingStep", "train_graph_main", "training_step"]

LABELS = "labels"


# --------------------------------------------------------------------------- losses
# Built-in losses by name. Each is an ordinary function of onnxgrad tensors, traced like a custom
# one; the parameter names become the loss graph's input names.
def _cross_entropy(prediction: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(prediction, labels)


def _mse(prediction: Tensor, labels: Tensor) -> Tensor:
    return F.mse_loss(prediction, labels)


def _l1(prediction: Tensor, labels: Tensor) -> Tensor:
    return F.l1_loss(prediction, labels)


def _sum(prediction: Tensor) -> Tensor:
    return ops.sum(prediction)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "cross_entropy": _cross_entropy, "mse": _mse, "l1": _l1, "sum": _sum,
}


# --------------------------------------------------------------------------- loading
def load_inference_model(model: Any) -> tuple[onnx.ModelProto, str]:
    """The model as a ModelProto at onnxgrad's opset, with a short description for messages.

    ``model``: a path (external data is read from beside it), a ModelProto, or serialized bytes.
    Models of another opset are converted with ``onnx.version_converter``, with a warning.
    """
    if isinstance(model, onnx.ModelProto):
        proto, where = model, "the model"
    elif isinstance(model, (bytes, bytearray)):
        where = "the model bytes"
        proto = _parse(lambda: onnx.load_model_from_string(bytes(model)), where)
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such ONNX file: {path}")
        proto = _parse(lambda: onnx.load(path), where)
    else:
        raise TypeError(f"training_step expects a path, an onnx.ModelProto or bytes, got "
                        f"{type(model).__name__}")
    if not proto.graph.node or not proto.graph.output:
        raise TrainGraphError(f"{where} is not an ONNX model (it has no graph)")
    if any(external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        raise TrainGraphError(f"{where} keeps initializers in external data that is not loaded; "
                              f"pass the file's path so the data beside it is read")
    if proto.functions:  # model-local functions are not plain ai.onnx: inline them
        proto = onnx.inliner.inline_local_functions(proto)
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node
                      if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise TrainGraphError(f"{where} uses operators outside standard ONNX (ai.onnx): "
                              f"{foreign}; onnxgrad's training steps are standard ONNX only")
    versions = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    version = versions.get("ai.onnx")
    if version is None:
        raise TrainGraphError(f"{where} imports no ai.onnx opset")
    if version != OPSET:
        warnings.warn(f"{where}: converting from ONNX opset {version} to onnxgrad's opset {OPSET} "
                      f"with onnx.version_converter", stacklevel=3)
        try:
            proto = version_converter.convert_version(proto, OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors of its C++ core
            raise TrainGraphError(f"{where}: onnx.version_converter could not convert it from "
                                  f"opset {version} to {OPSET}: {exc}") from exc
    return proto, where


def _parse(load: Callable[[], onnx.ModelProto], where: str) -> onnx.ModelProto:
    try:
        return load()
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise TrainGraphError(f"{where} is not an ONNX model: {exc}") from exc


def _infer(proto: onnx.ModelProto, where: str, strict: bool) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=strict, strict_mode=strict,
                                                 data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise TrainGraphError(f"{where}: ONNX shape inference failed: {exc}") from exc


def _deserialize(proto: onnx.ModelProto) -> ir.Model:
    model = ir.serde.deserialize_model(proto)
    model.ir_version = IR_VERSION
    return model


def _declared(proto: onnx.ModelProto) -> dict[str, tuple[list[int | str | None], np.dtype]]:
    """Per data input: its dims (ints, symbolic names or None) and NumPy dtype."""
    inits = {t.name for t in proto.graph.initializer}
    out = {}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        tensor = inp.type.tensor_type
        dims: list[int | str | None] = []
        if tensor.HasField("shape"):
            for d in tensor.shape.dim:
                dims.append(d.dim_value if d.HasField("dim_value")
                            else d.dim_param if d.HasField("dim_param") else None)
        out[inp.name] = (dims, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    return out


def _bind(proto: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]],
          where: str) -> onnx.ModelProto:
    """A copy with every data input's dims fixed to ``shapes`` and shapes inferred from there.

    Dynamic dimensions (a batch ``N``) take the size of the data; fixed ones must match it.
    """
    bound = onnx.ModelProto()
    bound.CopyFrom(proto)
    inits = {t.name for t in bound.graph.initializer}
    for inp in bound.graph.input:
        if inp.name in inits:
            continue
        shape = shapes[inp.name]
        tensor = inp.type.tensor_type
        if tensor.HasField("shape"):
            dims = tensor.shape.dim
            declared = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                        for d in dims]
            if len(dims) != len(shape) or any(
                    d.HasField("dim_value") and d.dim_value != n for d, n in zip(dims, shape)):
                raise TrainGraphError(f"{where}: input {inp.name!r} has shape {declared}, the data "
                                      f"has shape {list(shape)}")
        tensor.ClearField("shape")
        for n in shape:
            tensor.shape.dim.add().dim_value = n
    # Inference starts over from the bound inputs: the exporter's own value_info and output
    # shapes may name the symbolic dimensions this binding replaces.
    del bound.graph.value_info[:]
    for out in bound.graph.output:
        out.type.tensor_type.ClearField("shape")
    return _infer(bound, where, strict=True)


# --------------------------------------------------------------------------- the step
class TrainingStep:
    """A training step made from an inference model; see :func:`training_step`.

    ``step(data, labels)`` runs one SGD step and returns the loss. Parameters and BatchNorm
    statistics are onnxgrad tensors (``named_parameters()``, ``named_buffers()``,
    ``state_dict()``), the optimizer is ``step.optimizer`` (change ``param_groups[0]["lr"]`` at
    will: hyperparameters are graph inputs). One graph is built per data signature, at the first
    call with it, like ``og.compile``'s traces.
    """

    def __init__(self, model: Any, loss: str | Callable[..., Tensor] = "cross_entropy",
                 optimizer: Any = None, *, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 trainable: None | Sequence[str] | Callable[[str], bool] = None,
                 freeze_bn: bool = False, output: str | None = None) -> None:
        self._proto, self.source = load_inference_model(model)
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"unknown loss {loss!r}: use one of {sorted(LOSSES)} or a "
                                 f"function (prediction, labels) -> scalar onnxgrad Tensor")
            self._loss_fn, self.loss_name = LOSSES[loss], loss
        elif callable(loss):
            self._loss_fn, self.loss_name = loss, getattr(loss, "__name__", "custom")
        else:
            raise TypeError(f"loss must be a name or a function, got {type(loss).__name__}")
        self.freeze_bn = freeze_bn

        # Types (and, where static, shapes) are enough to choose and check what trains.
        graph = _deserialize(_infer(self._proto, self.source, strict=False)).graph
        self._inputs = _declared(self._proto)
        overridable = prepare(ir.Model(graph, ir_version=IR_VERSION))
        outputs = [v.name for v in graph.outputs]
        self.output = output if output is not None else outputs[0]
        if self.output not in outputs:
            raise TrainGraphError(f"{self.source} has no output {self.output!r}; its outputs "
                                  f"are {outputs}")
        self._out_dtype = next(v for v in graph.outputs if v.name == self.output).dtype.numpy()
        names = self._choose(graph, trainable, overridable)
        unreached = check_differentiable(graph, names, self.output)
        if unreached and trainable is not None and not callable(trainable):
            warnings.warn(f"{self.source}: no gradient of output {self.output!r} reaches "
                          f"{unreached}; they stay constant", stacklevel=3)
        names = [n for n in names if n not in unreached]
        if not names:
            raise TrainGraphError(f"{self.source}: output {self.output!r} depends on none of the "
                                  f"float initializers chosen to train")
        self._params: dict[str, Parameter] = {
            n: Parameter(graph.initializers[n].const_value.numpy()) for n in names}
        self._stats: dict[str, Tensor] = (
            {} if freeze_bn else {n: Tensor(Val(a)) for n, a in batchnorm_state(graph).items()})
        optimizer = og_optim.SGD if optimizer is None else optimizer
        if not (isinstance(optimizer, type) and issubclass(optimizer, og_optim.SGD)):
            raise TypeError(f"training_step builds SGD steps: optimizer must be og.optim.SGD, "
                            f"got {optimizer!r}")
        self.optimizer = optimizer(list(self._params.values()), lr=lr, momentum=momentum,
                                   dampening=dampening, weight_decay=weight_decay,
                                   nesterov=nesterov)
        self._programs: dict[Any, Program] = {}
        self._loss_graphs: dict[Any, ir.Graph] = {}
        self.last: Program | None = None

    def _choose(self, graph: ir.Graph, trainable: Any, overridable: set[str]) -> list[str]:
        floats = float_initializers(graph)
        if not floats:
            raise TrainGraphError(f"{self.source} has no float initializers: nothing to train")
        defaults = default_parameters(graph, overridable)
        if trainable is None:
            return defaults
        if callable(trainable):
            return [n for n in defaults if trainable(n)]
        if isinstance(trainable, str):
            trainable = [trainable]
        wanted = set(trainable)
        stats = wanted & batchnorm_statistics(graph)
        if stats:
            raise TrainGraphError(f"{self.source}: {sorted(stats)} are BatchNorm running "
                                  f"statistics: state the step updates (or freeze_bn keeps), "
                                  f"not parameters")
        unknown = sorted(wanted - set(floats))
        if unknown:
            raise TrainGraphError(f"{self.source}: {unknown} are not float initializers; "
                                  f"they are {floats}")
        return [n for n in floats if n in wanted]

    # ----------------------------------------------------------------- running
    def __call__(self, data: Any, labels: Any = None) -> Tensor:
        arrays = self._data(data)
        labels_array = self._labels(labels)
        program = self._program(arrays, labels_array)
        return program.run(arrays + ([labels_array] if labels_array is not None else []))

    def _data(self, data: Any) -> list[np.ndarray]:
        names = list(self._inputs)
        if isinstance(data, Mapping):
            missing = [n for n in names if n not in data]
            if missing:
                raise ValueError(f"data is missing the model's inputs {missing}")
            items = [data[n] for n in names]
        elif isinstance(data, (list, tuple)) and len(names) > 1:
            items = list(data)
        else:
            items = [data]
        if len(items) != len(names):
            raise ValueError(f"the model has {len(names)} inputs {names}, got {len(items)} arrays")
        out = []
        for name, item in zip(names, items):
            array = np.asarray(item._v.data if isinstance(item, Tensor) else item)
            want = self._inputs[name][1]
            if array.dtype != want:
                if array.dtype.kind != want.kind and not (array.dtype.kind in "iu"
                                                          and want.kind in "iu"):
                    raise TypeError(f"input {name!r} takes {want}, got {array.dtype}")
                array = array.astype(want)
            out.append(np.ascontiguousarray(array))
        return out

    def _labels(self, labels: Any) -> np.ndarray | None:
        takes = self._loss_fn is not _sum
        if labels is None:
            if takes:
                raise ValueError(f"loss {self.loss_name!r} needs labels: step(data, labels)")
            return None
        if not takes:
            raise ValueError("loss 'sum' takes no labels: call step(data)")
        array = np.asarray(labels._v.data if isinstance(labels, Tensor) else labels)
        # Built-in losses take int64 class indices or labels of the prediction's float type;
        # other integer or float widths are cast here (their shapes are checked at the build).
        if self.loss_name == "cross_entropy" and self._loss_fn is _cross_entropy:
            if array.dtype.kind in "iu":
                array = array.astype(np.int64, copy=False)
        elif self._loss_fn in (_mse, _l1) and array.dtype.kind == "f":
            array = array.astype(self._out_dtype, copy=False)
        return np.ascontiguousarray(array)

    def _program(self, arrays: list[np.ndarray], labels: np.ndarray | None) -> Program:
        group = self.optimizer.param_groups[0]
        flags = self.optimizer.structure(group)
        params = list(self._params.values())
        for p in params:  # zero buffers, unless a dampened first step
            if flags.momentum and not flags.dampening and \
                    "momentum_buffer" not in self.optimizer.state.get(p, {}):
                self.optimizer.initial_state(p, "momentum_buffer", group)
        # A dampened first step has no buffers yet and creates them (PyTorch's first step).
        ready = flags.momentum and all(
            self.optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in params)
        key = (tuple((a.dtype.str, a.shape) for a in arrays),
               None if labels is None else (labels.dtype.str, labels.shape), flags, ready)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = self._build(arrays, labels, flags)
        self.last = program
        return program

    def _build(self, arrays: list[np.ndarray], labels: np.ndarray | None, flags,
               zero_buffers: bool = False) -> Program:
        shapes = {name: a.shape for name, a in zip(self._inputs, arrays)}
        model = _deserialize(_bind(self._proto, shapes, self.source))
        prediction = next(v for v in model.graph.outputs if v.name == self.output)
        pred_shape = prediction.shape
        if pred_shape is None or not all(isinstance(d, int) for d in pred_shape):
            raise TrainGraphError(f"{self.source}: the shape of output {self.output!r} could not "
                                  f"be inferred for inputs {dict(shapes)}")
        pred_shape = tuple(pred_shape)
        labels = self._check_labels(pred_shape, prediction.dtype.numpy(), labels)
        loss = self._loss_graph(pred_shape, prediction.dtype.numpy(), labels)
        buffers = flags.momentum and (zero_buffers or all(
            self.optimizer.state.get(p, {}).get("momentum_buffer") is not None
            for p in self._params.values()))
        made = training_graph(model, list(self._params), loss, output=self.output, flags=flags,
                              buffers=buffers, freeze_bn=self.freeze_bn, labels=LABELS)
        proto = ir.serde.serialize_model(made.model)
        updated: dict[str, Tensor] = {}
        for name in made.parameters:
            updated[name] = self._params[name]
        for name in made.statistics:
            updated[name] = self._stats[name]
        for param, buf in made.buffers.items():
            updated[buf] = (Tensor(Val(np.zeros_like(self._params[param]._v.data)))
                            if zero_buffers else
                            self.optimizer.state[self._params[param]]["momentum_buffer"])
        grads = {out: self._params[p] for out, p in made.grads.items()}
        created = {out: (self.optimizer, self._params[p], "momentum_buffer")
                   for out, p in made.created.items()}
        dtype = self._params[made.parameters[0]].dtype
        getters = self.optimizer.hyperparameters(self.optimizer.param_groups[0])
        scalars = {name: (getters[name], dtype) for name in made.scalars}
        runner = StepRunner(proto.SerializeToString(), made.state,
                            {name: t._v.data for name, t in updated.items()}, carried=list(grads))
        # optimizer.load_state_dict puts new buffer tensors into its state: the program follows.
        owners = {buf: (self.optimizer, self._params[param], "momentum_buffer")
                  for param, buf in made.buffers.items()}
        return Program(proto, runner, made.data_inputs, ["output"], "t", updated, {}, grads,
                       scalars, created, owners)

    def _check_labels(self, pred_shape: tuple[int, ...], pred_dtype: np.dtype,
                      labels: np.ndarray | None) -> np.ndarray | None:
        """Built-in losses' labels, checked against the prediction (and cast where harmless)."""
        name = self.loss_name if self._loss_fn in LOSSES.values() else None
        if labels is None or name is None:
            return labels
        if name == "cross_entropy":
            if len(pred_shape) != 2:
                raise ValueError(f"loss 'cross_entropy' takes a prediction [N, C]; output "
                                 f"{self.output!r} has shape {list(pred_shape)}")
            if labels.dtype.kind not in "iu" or labels.shape != pred_shape[:1]:
                raise ValueError(f"loss 'cross_entropy' takes labels of class indices (integers) "
                                 f"of shape {[pred_shape[0]]}; got {labels.dtype} labels of shape "
                                 f"{list(labels.shape)} for output {self.output!r} of shape "
                                 f"{list(pred_shape)}")
            return labels
        if labels.shape != pred_shape:
            raise ValueError(f"loss {name!r}: labels of shape {list(labels.shape)} do not match "
                             f"output {self.output!r} of shape {list(pred_shape)}")
        if labels.dtype != pred_dtype:
            raise TypeError(f"loss {name!r} takes {pred_dtype} labels, got {labels.dtype}")
        return labels

    def _loss_graph(self, pred_shape: tuple[int, ...], pred_dtype: np.dtype,
                    labels: np.ndarray | None) -> ir.Graph:
        """The loss as an ONNX graph: ``og.compile`` traces it on a stand-in prediction."""
        key = (pred_shape, pred_dtype.str,
               None if labels is None else (labels.shape, labels.dtype.str))
        if key not in self._loss_graphs:
            fn = self._loss_fn
            if labels is None:
                def loss_graph(prediction):
                    return fn(prediction)
                args = [np.zeros(pred_shape, pred_dtype)]
            else:
                def loss_graph(prediction, labels):
                    return fn(prediction, labels)
                args = [np.zeros(pred_shape, pred_dtype), labels]
            traced = og_compile(loss_graph)
            result = traced(*args)
            if not isinstance(result, Tensor):
                raise TypeError(f"the loss function must return one onnxgrad Tensor, got "
                                f"{type(result).__name__}")
            proto = traced.last.model
            if len(proto.graph.input) != len(args):
                raise TrainGraphError("the loss function reads tensors other than the prediction "
                                      "and the labels (parameters or buffers); a loss of a "
                                      "training step has no state of its own")
            self._loss_graphs[key] = ir.serde.deserialize_model(proto).graph
        return self._loss_graphs[key]

    # ----------------------------------------------------------------- export and state
    def build(self, batch_size: int | None = None) -> Program:
        """The step's graph for the model's declared input shapes, without running it.

        A dynamic batch dimension takes ``batch_size``; labels are shaped as the built-in loss
        expects (a custom loss needs one call with real labels instead).
        """
        arrays = []
        for name, (dims, dtype) in self._inputs.items():
            shape = []
            for i, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    shape.append(d)
                elif i == 0 and batch_size is not None:
                    shape.append(batch_size)
                else:
                    raise TrainGraphError(f"{self.source}: input {name!r} has dynamic dimension "
                                          f"{i} ({d or '?'}); give a batch size (batch_size=, "
                                          f"--batch-size) or run one step first")
            arrays.append(np.zeros(shape, dtype))
        labels = None
        if self._loss_fn is not _sum:
            if self._loss_fn not in LOSSES.values():
                raise TrainGraphError("a custom loss needs one call with real labels before export")
            model = _bind(self._proto, {n: a.shape for n, a in zip(self._inputs, arrays)},
                          self.source)
            out = next(o for o in model.graph.output if o.name == self.output)
            pred = [d.dim_value for d in out.type.tensor_type.shape.dim]
            if self.loss_name == "cross_entropy":
                labels = np.zeros(pred[:1], np.int64)
            else:
                labels = np.zeros(pred, onnx.helper.tensor_dtype_to_np_dtype(
                    out.type.tensor_type.elem_type))
        flags = self.optimizer.structure(self.optimizer.param_groups[0])
        if flags.momentum and flags.dampening and not all(
                self.optimizer.state.get(p, {}).get("momentum_buffer") is not None
                for p in self._params.values()):
            # NOTE: the graph of a dampened first step creates the buffers instead of carrying
            # them: a file of it never accumulates momentum. Write the step that loops, from zero
            # buffers, leaving this step's own first call PyTorch's.
            warnings.warn(f"{self.source}: with dampening, the file's momentum buffers start at "
                          f"zero, so its first step takes (1 - dampening) of the gradient where "
                          f"PyTorch's first step takes all of it", stacklevel=3)
            self.last = self._build(arrays, labels, flags, zero_buffers=True)
            return self.last
        return self._program(arrays, labels)

    def export(self, path: str | os.PathLike[str], batch_size: int | None = None) -> None:
        """Write the step as ``og.compile(...).export`` does: state inputs default to its values.

        Before any call, the graph is built for the declared shapes (see :meth:`build`).
        """
        program = self.last if self.last is not None else self.build(batch_size)
        program.export(path)

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        yield from self._params.items()

    def parameters(self) -> Iterator[Parameter]:
        yield from self._params.values()

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]:
        """BatchNorm running statistics, by their names in the model."""
        yield from self._stats.items()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters' and statistics' current values, by initializer name."""
        return {name: np.array(t._v.data) for name, t in
                list(self._params.items()) + list(self._stats.items())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        tensors = {**self._params, **self._stats}
        unknown = [n for n in state if n not in tensors]
        if unknown:
            raise KeyError(f"not a parameter or statistic of this step: {unknown}")
        for name, value in state.items():
            t = tensors[name]
            array = np.array(value._v.data if isinstance(value, Tensor) else value, dtype=t.dtype)
            if array.shape != t.shape:
                raise ValueError(f"{name}: expected shape {list(t.shape)}, got {list(array.shape)}")
            t._set_leaf_data(array)  # the next run writes it into the runtime's state

    @property
    def model(self) -> onnx.ModelProto:
        """The last-run step's ONNX model."""
        if self.last is None:
            raise RuntimeError("the step has not been built yet: call it once (or build())")
        return self.last.model

    def __onnxgrad_model__(self) -> onnx.ModelProto:
        return self.model

    def __repr__(self) -> str:
        size = sum(int(np.prod(p.shape)) for p in self._params.values())
        return (f"TrainingStep({self.source}, loss={self.loss_name!r}, "
                f"{len(self._params)} parameters ({size} values), "
                f"{len(self._stats) // 2} BatchNorm layers in training mode)")


def training_step(model: Any, loss: str | Callable[..., Tensor] = "cross_entropy",
                  optimizer: Any = None, *, lr: float = 1e-3, momentum: float = 0.0,
                  dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                  trainable: None | Sequence[str] | Callable[[str], bool] = None,
                  freeze_bn: bool = False, output: str | None = None) -> TrainingStep:
    """Make an inference ONNX model trainable: an SGD training step of standard ONNX operators.

    ``model``: a path to an ``.onnx`` file (external data beside it is read), an
    ``onnx.ModelProto`` or its bytes; any opset (converted to onnxgrad's, with a warning).
    ``loss``: ``"cross_entropy"`` (integer class labels [N] for a prediction [N, C]), ``"mse"``,
    ``"l1"`` (labels shaped as the prediction), ``"sum"`` (no labels), or a function
    ``(prediction, labels) -> scalar Tensor`` written with onnxgrad ops, traced once per shape.
    ``optimizer``: ``og.optim.SGD`` (the default) with ``lr``, ``momentum``, ``dampening``,
    ``weight_decay``, ``nesterov`` as in ``torch.optim.SGD``.
    ``trainable``: None for every float initializer except BatchNorm statistics (only those
    marked as overridable inputs, when the model marks some); or names; or a predicate on names.
    ``freeze_bn``: keep BatchNorm in inference mode (statistics constant) instead of training it.
    ``output``: the model output the loss reads (default: the first).

    Returns a :class:`TrainingStep`: ``loss = step(data, labels)``, ``step.export(path)``.
    """
    return TrainingStep(model, loss, optimizer, lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, trainable=trainable,
                        freeze_bn=freeze_bn, output=output)


# --------------------------------------------------------------------------- the command
def train_graph_main(argv: list[str]) -> int:
    """``onnxgrad train-graph IN.onnx OUT.onnx``: write the training step of an inference model."""
    parser = argparse.ArgumentParser(
        prog="onnxgrad train-graph",
        description="Turn an inference ONNX model into its SGD training step, one standard-ONNX "
        "model (forward, loss, gradients, update; BatchNorm in training mode) that any runtime "
        "can loop: its metadata 'onnxgrad.state' maps each state output to the input it feeds.",
    )
    parser.add_argument("model", metavar="IN.onnx", help="the inference model")
    parser.add_argument("out", metavar="OUT.onnx", help="where to write the training step")
    parser.add_argument("--loss", default="cross_entropy", choices=sorted(LOSSES),
                        help="the loss on the model's output (default: cross_entropy)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (an input too)")
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--dampening", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--nesterov", action="store_true")
    parser.add_argument("--freeze", metavar="PATTERN", action="append", default=[],
                        help="keep initializers matching this glob constant (repeatable)")
    parser.add_argument("--freeze-bn", action="store_true",
                        help="keep BatchNorm in inference mode with constant statistics")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the batch size to bind a dynamic batch dimension to")
    parser.add_argument("--output", default=None, help="the model output the loss reads")
    args = parser.parse_args(argv)

    def trainable(name: str) -> bool:
        return not any(fnmatch.fnmatchcase(name, pattern) for pattern in args.freeze)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step = training_step(args.model, args.loss, lr=args.lr, momentum=args.momentum,
                                 dampening=args.dampening, weight_decay=args.weight_decay,
                                 nesterov=args.nesterov, freeze_bn=args.freeze_bn,
                                 output=args.output,
                                 trainable=trainable if args.freeze else None)
            step.export(args.out, batch_size=args.batch_size)
        for w in caught:
            print(f"onnxgrad train-graph: warning: {w.message}", file=sys.stderr)
    except (TrainGraphError, NoGradientRule, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"onnxgrad train-graph: error: {exc}", file=sys.stderr)
        return 2
    names = list(step.state_dict())
    size = sum(int(np.prod(p.shape)) for p in step.parameters())
    print(f"wrote {args.out}: {len(list(step.parameters()))} trained parameters ({size} values), "
          f"{len(names) - len(list(step.parameters()))} BatchNorm statistics as state; "
          f"inputs {step.last.data_names} + lr" + (", momentum" if args.momentum else ""))
    return 0
