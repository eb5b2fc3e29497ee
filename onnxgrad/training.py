"""``og.training_step``: an inference ``.onnx`` model as a compiled SGD training step.

A thin front over :class:`onnxgrad.nn.OnnxModule`: the model is a module, the loss an ordinary
function of tensors (built-in names are ``og.nn.functional`` losses), and the step is
``og.compile`` of ``zero_grad(); loss(model(x), labels).backward(); optimizer.step()``, so an
imported model runs, exports and checkpoints exactly as a hand-written compiled step does. This
module keeps the step's interface: state by the file's initializer names, labels checked
against the prediction, export before any call, and the ``onnxgrad train-graph`` command
(:func:`train_graph_main`).
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from . import optim as og_optim
from .nn import functional as F
from .nn.modules import Parameter
from .nn.onnx_module import (
    OnnxModule,
    TrainGraphError,
    check_differentiable,
    float_initializers,
    load_model,
)
from .passes.autodiff import NoGradientRule
from .runtime.metadata import PARAMETERS
from .tracer import ops
from .tracer.compile import CompiledFunction, Program
from .tracer.state import no_grad
from .tracer.tensor import Tensor

__all__ = ["LOSSES", "TrainGraphError", "TrainingStep", "train_graph_main", "training_step"]

LABELS = "labels"
#: The batch size a dynamic-batch export traces at when no call or batch size fixed one.
AUTO_BATCH = 4


# --------------------------------------------------------------------------- losses
# Built-in losses by name. Each is an ordinary function of onnxgrad tensors, traced like a custom
# one.
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

# Kept for callers of the former name.
load_inference_model = load_model


# --------------------------------------------------------------------------- the step
def _make_optimizer(optimizer: Any, params: list[Parameter], *, lr: float, momentum: float,
                    dampening: float, weight_decay: float, nesterov: bool) -> og_optim.Optimizer:
    """``optimizer`` as given to :func:`training_step`, made for ``params``."""
    if optimizer is None or optimizer is og_optim.SGD:
        return og_optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening,
                            weight_decay=weight_decay, nesterov=nesterov)
    if isinstance(optimizer, type) and issubclass(optimizer, og_optim.Optimizer):
        sgd_only = {k: v for k, v in (("momentum", momentum), ("dampening", dampening),
                                      ("nesterov", nesterov)) if v}
        if sgd_only:
            raise TypeError(f"training_step: {sorted(sgd_only)} are SGD's; for "
                            f"{optimizer.__name__}'s own options pass a function, "
                            f"optimizer=lambda params: og.optim.{optimizer.__name__}(params, ...)")
        return optimizer(params, lr=lr, weight_decay=weight_decay)
    if callable(optimizer) and not isinstance(optimizer, og_optim.Optimizer):
        made = optimizer(params)
        if isinstance(made, og_optim.Optimizer):
            return made
        raise TypeError(f"training_step: optimizer(params) must return an og.optim optimizer, "
                        f"got {type(made).__name__}")
    raise TypeError(f"training_step: optimizer must be an og.optim optimizer class (og.optim.SGD, "
                    f"og.optim.AdamW...) or a function params -> optimizer, got {optimizer!r}")


class TrainingStep:
    """A training step made from an inference model; see :func:`training_step`.

    ``step(data, labels)`` runs one training step and returns the loss. Parameters and BatchNorm
    statistics are onnxgrad tensors named as the model's initializers (``named_parameters()``,
    ``named_buffers()``, ``state_dict()``), the model is ``step.module`` (an
    :class:`~onnxgrad.nn.OnnxModule`) and the optimizer ``step.optimizer`` (change
    ``param_groups[0]["lr"]`` at will: hyperparameters are graph inputs). One graph is traced per
    data signature, at the first call with it, by ``og.compile``.
    """

    def __init__(self, model: Any, loss: str | Callable[..., Tensor] = "cross_entropy",
                 optimizer: Any = None, *, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 trainable: None | Sequence[str] | Callable[[str], bool] = None,
                 freeze_bn: bool = False, output: str | None = None) -> None:
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
        proto, self.source = load_model(model)
        outputs = [o.name for o in proto.graph.output]
        self.output = output if output is not None else outputs[0]
        if self.output not in outputs:
            raise TrainGraphError(f"{self.source} has no output {self.output!r}; its outputs "
                                  f"are {outputs}")
        self.module = OnnxModule(proto, outputs=[self.output], parameters=trainable,
                                 freeze_bn=freeze_bn, name=self.source)
        graph = self.module.graph
        if not float_initializers(graph):
            raise TrainGraphError(f"{self.source} has no float initializers: nothing to train")
        original = self.module.initializer_names
        params = {original[q]: p for q, p in self.module.named_parameters()}
        unreached = check_differentiable(graph, list(params), self.module.output_values)
        if unreached and trainable is not None and not callable(trainable):
            warnings.warn(f"{self.source}: no gradient of output {self.output!r} reaches "
                          f"{unreached}; they stay constant", stacklevel=3)
        for name in unreached:
            params.pop(name).requires_grad_(False)
        if not params:
            raise TrainGraphError(f"{self.source}: output {self.output!r} depends on none of the "
                                  f"float initializers chosen to train")
        self._params: dict[str, Parameter] = params
        self._stats: dict[str, Tensor] = {original[q]: t
                                          for q, t in self.module.named_buffers()}
        out = next(v for v in graph.outputs if v.name == self.output)
        self._out_dtype = out.dtype.numpy() if out.dtype is not None else None
        self.optimizer = _make_optimizer(optimizer, list(params.values()), lr=lr,
                                         momentum=momentum, dampening=dampening,
                                         weight_decay=weight_decay, nesterov=nesterov)
        # The graph's data inputs are named as the model's, then the labels.
        self._compiled = CompiledFunction(self._step, arg_names=list(self.module.input_names) + (
            [LABELS] if self._takes_labels else []))

    @property
    def _takes_labels(self) -> bool:
        return self._loss_fn is not _sum

    def _step(self, *args: Tensor) -> Tensor:
        """The traced step: PyTorch's training loop body."""
        n = len(self.module.input_names)
        data, labels = args[:n], (args[n] if len(args) > n else None)
        self.optimizer.zero_grad()
        prediction = self.module(*data)
        if labels is None:
            loss = self._loss_fn(prediction)
        else:
            self._check_labels(prediction, labels)
            loss = self._loss_fn(prediction, labels)
        if not isinstance(loss, Tensor):
            raise TypeError(f"the loss function must return one onnxgrad Tensor, got "
                            f"{type(loss).__name__}")
        loss.backward()
        self.optimizer.step()
        return loss

    # ----------------------------------------------------------------- running
    def __call__(self, data: Any, labels: Any = None) -> Tensor:
        args = self._data(data)
        labels_array = self._labels(labels)
        if labels_array is not None:
            args.append(labels_array)
        loss = self._compiled(*args)
        self._label(self._compiled.last)
        return loss

    @property
    def _programs(self) -> dict[Any, Program]:
        return self._compiled._programs

    @property
    def last(self) -> Program | None:
        """The last-run (or built) step's program."""
        return self._compiled.last

    def _label(self, program: Program | None) -> None:
        """Name the trained parameters in the program's metadata, as the file's readers expect."""
        if program is not None:
            self._label_model(program.model)

    def _label_model(self, model: onnx.ModelProto) -> None:
        if not any(p.key == PARAMETERS for p in model.metadata_props):
            inputs = {i.name for i in model.graph.input}
            entry = model.metadata_props.add()
            entry.key = PARAMETERS
            entry.value = json.dumps([n for n in self._params if n in inputs])

    def _data(self, data: Any) -> list[np.ndarray]:
        names = list(self.module.input_names)
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
            want = self.module.input_dtype(name)
            if want is not None and array.dtype != want:
                if array.dtype.kind != want.kind and not (array.dtype.kind in "iu"
                                                          and want.kind in "iu"):
                    raise TypeError(f"input {name!r} takes {want}, got {array.dtype}")
                array = array.astype(want)
            out.append(np.ascontiguousarray(array))
        return out

    def _labels(self, labels: Any) -> np.ndarray | None:
        if labels is None:
            if self._takes_labels:
                raise ValueError(f"loss {self.loss_name!r} needs labels: step(data, labels)")
            return None
        if not self._takes_labels:
            raise ValueError("loss 'sum' takes no labels: call step(data)")
        array = np.asarray(labels._v.data if isinstance(labels, Tensor) else labels)
        # Built-in losses take int64 class indices or labels of the prediction's float type;
        # other integer or float widths are cast here (their shapes are checked when traced).
        if self._loss_fn is _cross_entropy:
            if array.dtype.kind in "iu":
                array = array.astype(np.int64, copy=False)
        elif self._loss_fn in (_mse, _l1) and array.dtype.kind == "f" \
                and self._out_dtype is not None:
            array = array.astype(self._out_dtype, copy=False)
        return np.ascontiguousarray(array)

    def _check_labels(self, prediction: Tensor, labels: Tensor) -> None:
        """Built-in losses' labels, checked against the prediction."""
        if self._loss_fn not in LOSSES.values():
            return
        name, pred_shape = self.loss_name, prediction.shape
        if name == "cross_entropy":
            if len(pred_shape) != 2:
                raise ValueError(f"loss 'cross_entropy' takes a prediction [N, C]; output "
                                 f"{self.output!r} has shape {list(pred_shape)}")
            if labels.dtype.kind not in "iu" or labels.shape != pred_shape[:1]:
                raise ValueError(f"loss 'cross_entropy' takes labels of class indices (integers) "
                                 f"of shape {[pred_shape[0]]}; got {labels.dtype} labels of shape "
                                 f"{list(labels.shape)} for output {self.output!r} of shape "
                                 f"{list(pred_shape)}")
            return
        if labels.shape != pred_shape:
            raise ValueError(f"loss {name!r}: labels of shape {list(labels.shape)} do not match "
                             f"output {self.output!r} of shape {list(pred_shape)}")
        if labels.dtype != prediction.dtype:
            raise TypeError(f"loss {name!r} takes {prediction.dtype} labels, got {labels.dtype}")

    # ----------------------------------------------------------------- export and state
    def build(self, batch_size: int | None = None) -> Program:
        """The step's graph for the model's declared input shapes, traced without running it.

        A dynamic batch dimension takes ``batch_size``; labels are shaped as the built-in loss
        expects (a custom loss needs one call with real labels instead).
        """
        arrays = []
        for name in self.module.input_names:
            dims = self.module.input_dims(name)
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
            arrays.append(np.zeros(shape, self.module.input_dtype(name) or np.float32))
        args = list(arrays)
        if self._takes_labels:
            if self._loss_fn not in LOSSES.values():
                raise TrainGraphError("a custom loss needs one call with real labels before export")
            # The prediction's shape: one inference-mode forward (no statistics updated).
            was = self.module.training
            with no_grad():
                self.module.eval()
                try:
                    pred = self.module(*arrays)
                finally:
                    self.module.train(was)
            if self._loss_fn is _cross_entropy:
                args.append(np.zeros(pred.shape[:1], np.int64))
            else:
                args.append(np.zeros(pred.shape, pred.dtype))
        with self._looping_state():
            return self._trace(args)

    @contextlib.contextmanager
    def _looping_state(self, warn: bool = True) -> Iterator[None]:
        """Traces inside see the optimizer state a looping step carries."""
        opt = self.optimizer
        missing = [(p, key) for group in opt.param_groups for key in opt.state_keys(group)
                   if opt.first_step_creates(group, key)
                   for p in group["params"] if key not in opt.state.get(p, {})]
        if not missing:
            yield
            return
        # NOTE: the graph of such a first step (SGD with dampening) creates the state instead
        # of carrying it: a file of it would never accumulate it. Trace the step that loops,
        # from the state's initial value, leaving this step's own first call PyTorch's.
        keys = sorted({key for _, key in missing})
        if warn:
            warnings.warn(f"{self.source}: the optimizer's first step makes its {keys} itself "
                          f"(SGD with dampening); the file's step starts them at zero, so "
                          f"its first step takes (1 - dampening) of the gradient where "
                          f"PyTorch's first step takes all of it", stacklevel=5)
        for p, key in missing:
            opt.initial_state(p, key)
        try:
            yield
        finally:
            for p, key in missing:
                del opt.state[p][key]

    def _trace(self, args: list[np.ndarray]) -> Program:
        program = self._compiled.trace(*args)
        self._label(program)
        return program

    def export(self, path: str | os.PathLike[str], batch_size: int | None = None, *,
               portable: bool = False, opset: int | None = None,
               dynamic_batch: bool | None = None) -> None:
        """Write the step as ``og.compile(...).export`` does: state inputs default to its values
        (``portable=True``: in a safetensors file beside it; ``opset``: that opset;
        ``dynamic_batch=True``: a symbolic batch dimension, refused naming the node where the
        step's graph depends on the batch size).

        Before any call, the graph is traced for the declared shapes (see :meth:`build`).
        ``dynamic_batch=None`` (the default) is True when neither a call nor ``batch_size`` fixed
        the batch of a model whose batch dimension is dynamic, else False (the file of the
        batch size that ran or was given, as before).
        """
        if dynamic_batch is None:
            dynamic_batch = self.last is None and batch_size is None and self._dynamic_batch()
            if dynamic_batch:
                batch_size = AUTO_BATCH
        elif dynamic_batch and not self._dynamic_batch():
            fixed = {name: self.module.input_dims(name) for name in self.module.input_names}
            raise TrainGraphError(f"{self.source}: dynamic_batch: the model's inputs {fixed} "
                                  f"have a fixed batch dimension; export the inference model "
                                  f"with a dynamic one (torch.onnx.export's dynamic_axes, "
                                  f"export(dynamic_batch=True))")
        program = self.last if self.last is not None else self.build(batch_size)
        if not dynamic_batch:
            program.export(path, portable=portable, opset=opset)
            return
        with self._looping_state(warn=False):
            # NOTE: the other batch sizes are traced from the same looping state (the compiled
            # function keeps none of their programs); the model is labelled as this step's.
            model = self._compiled._dynamic_batch_model(program, portable)
        self._label_model(model)
        program.export(path, portable=portable, opset=opset, model=model)

    def _dynamic_batch(self) -> bool:
        """Whether the model declares its inputs' leading dimension dynamic."""
        dims = [self.module.input_dims(name) for name in self.module.input_names]
        return bool(dims) and all(d and not (isinstance(d[0], int) and d[0] > 0) for d in dims)

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """The trained parameters, by their initializer names in the model."""
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
    """Make an inference ONNX model trainable: a training step of standard ONNX operators.

    ``model``: a path to an ``.onnx`` file (external data beside it is read), an
    ``onnx.ModelProto`` or its bytes; any opset (converted to onnxgrad's, with a warning).
    ``loss``: ``"cross_entropy"`` (integer class labels [N] for a prediction [N, C]), ``"mse"``,
    ``"l1"`` (labels shaped as the prediction), ``"sum"`` (no labels), or a function
    ``(prediction, labels) -> scalar Tensor`` written with onnxgrad ops, traced once per shape.
    ``optimizer``: ``og.optim.SGD`` (the default) with ``lr``, ``momentum``, ``dampening``,
    ``weight_decay``, ``nesterov`` as in ``torch.optim.SGD``; another ``og.optim`` class
    (``og.optim.AdamW``), made with ``lr`` and ``weight_decay``; or a function
    ``params -> optimizer`` for any options (``lambda ps: og.optim.Adam(ps, betas=(0.8, 0.99))``).
    ``trainable``: None for the float initializers the graph uses as weights (never scalars or
    BatchNorm statistics; only those marked as overridable inputs, when the model marks some);
    or names; or a predicate on names.
    ``freeze_bn``: keep BatchNorm in inference mode (statistics constant) instead of training it.
    ``output``: the model output the loss reads (default: the first).

    Returns a :class:`TrainingStep`: ``loss = step(data, labels)``, ``step.export(path)``. For
    several parameter groups, or a model mixed with ``og.nn`` layers, use
    :class:`onnxgrad.nn.OnnxModule` with ``og.compile`` directly.
    """
    return TrainingStep(model, loss, optimizer, lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, trainable=trainable,
                        freeze_bn=freeze_bn, output=output)


# --------------------------------------------------------------------------- the command
def train_graph_main(argv: list[str]) -> int:
    """``onnxgrad train-graph IN.onnx OUT.onnx``: write the training step of an inference model."""
    parser = argparse.ArgumentParser(
        prog="onnxgrad train-graph",
        description="Turn an inference ONNX model into its training step, one standard-ONNX "
        "model (forward, loss, gradients, update; BatchNorm in training mode) that any runtime "
        "can loop: its metadata 'onnxgrad.state' maps each state output to the input it feeds.",
    )
    parser.add_argument("model", metavar="IN.onnx", help="the inference model")
    parser.add_argument("out", metavar="OUT.onnx", help="where to write the training step")
    parser.add_argument("--loss", default="cross_entropy", choices=sorted(LOSSES),
                        help="the loss on the model's output (default: cross_entropy)")
    parser.add_argument("--optimizer", default="sgd", choices=sorted(_OPTIMIZERS),
                        help="the update (default: sgd); hyperparameters are inputs too")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (an input too)")
    parser.add_argument("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"),
                        help="adam/adamw: the moment decay rates (default 0.9 0.999)")
    parser.add_argument("--eps", type=float, default=None, help="adam/adamw: the epsilon")
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--dampening", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="default: the optimizer's (0, AdamW 1e-2)")
    parser.add_argument("--nesterov", action="store_true")
    parser.add_argument("--freeze", metavar="PATTERN", action="append", default=[],
                        help="keep initializers matching this glob constant (repeatable)")
    parser.add_argument("--freeze-bn", action="store_true",
                        help="keep BatchNorm in inference mode with constant statistics")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the batch size to trace at (a dynamic batch dimension is bound to "
                        "it, unless --dynamic-batch)")
    parser.add_argument("--output", default=None, help="the model output the loss reads")
    parser.add_argument("--portable", action="store_true",
                        help="the portable format: no defaults in the graph, the state in "
                        "OUT.safetensors beside it, ops and opset that OpenVINO, tract and "
                        "tinygrad run too")
    parser.add_argument("--dynamic-batch", action=argparse.BooleanOptionalAction, default=None,
                        help="a symbolic batch dimension, so that the file trains on any batch "
                        "size (refused, naming the node, where the graph depends on the batch "
                        "size); default: on when the model's batch is dynamic and no "
                        "--batch-size is given")
    parser.add_argument("--opset", type=int, default=None,
                        help="the opset to write (default: onnxgrad's; with --portable the "
                        "lowest from 17 the graph converts to)")
    args = parser.parse_args(argv)

    def trainable(name: str) -> bool:
        return not any(fnmatch.fnmatchcase(name, pattern) for pattern in args.freeze)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step = training_step(args.model, args.loss, _cli_optimizer(args), lr=args.lr,
                                 momentum=args.momentum, dampening=args.dampening,
                                 weight_decay=args.weight_decay or 0.0, nesterov=args.nesterov,
                                 freeze_bn=args.freeze_bn, output=args.output,
                                 trainable=trainable if args.freeze else None)
            step.export(args.out, batch_size=args.batch_size, portable=args.portable,
                        opset=args.opset, dynamic_batch=args.dynamic_batch)
        for w in caught:
            print(f"onnxgrad train-graph: warning: {w.message}", file=sys.stderr)
    except (TrainGraphError, NoGradientRule, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"onnxgrad train-graph: error: {exc}", file=sys.stderr)
        return 2
    names = list(step.state_dict())
    size = sum(int(np.prod(p.shape)) for p in step.parameters())
    print(f"wrote {args.out}: {len(list(step.parameters()))} trained parameters ({size} values), "
          f"{len(names) - len(list(step.parameters()))} BatchNorm statistics as state; "
          f"inputs {step.last.data_names} + {', '.join(step.last.scalars)}")
    return 0


_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


def _cli_optimizer(args: argparse.Namespace) -> Any:
    cls = getattr(og_optim, _OPTIMIZERS[args.optimizer])
    adam = {k: v for k, v in (("betas", args.betas), ("eps", args.eps)) if v is not None}
    if cls is og_optim.SGD:
        if adam:
            raise ValueError("--betas and --eps are Adam's, not SGD's (use --optimizer adam)")
        return cls
    if args.weight_decay is not None:
        adam["weight_decay"] = args.weight_decay  # else the class's default (AdamW: 1e-2)
    lr = args.lr
    return lambda params: cls(params, lr=lr, **adam)
