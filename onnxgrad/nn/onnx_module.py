"""``og.nn.OnnxModule``: an ONNX model as an ``og.nn.Module`` that replays its nodes eagerly.

The model's float initializers are the module's parameters (BatchNorm running statistics its
buffers) and ``forward`` emits every node of the file through the tracer, so each node is an eager
op with its gradient rule: an imported model trains eagerly, compiles with ``og.compile`` with
any optimizer, and composes with other modules exactly like a model written in ``og.nn``.

Replay follows the module's mode where the file cannot: ``BatchNormalization`` is
``og.nn.functional.batch_norm`` (batch statistics and PyTorch's running-statistics update in
``train()``, running statistics in ``eval()``) and ``Dropout`` is ``og.nn.functional.dropout``.
Shapes are static per call (``og.compile`` retraces on a new input shape), so ``Shape`` and
``Size`` outputs, ``Constant`` nodes and every node whose inputs are all constant are constants
that the rules and the single-node kernels can read (Reshape shapes, Slice bounds, axes).

Loading prepares the graph once: external data, conversion to onnxgrad's opset (with a warning),
inlined local functions, initializers tied by ``torch.onnx.export`` untied, and the initializers
that a model lists among its inputs marking which float initializers are its parameters.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper, version_converter
from onnx_ir.passes.common import RemoveInitializersFromInputsPass

from ..passes.autodiff import NoGradientRule, describe, topological_nodes
from ..passes.rules import RULES
from ..runtime import OPSET, run_node
from ..tracer import ops, state
from ..tracer.tensor import Tensor, Val, _contig, attrs_key, emit
from . import functional as F
from .modules import Module, Parameter
from .recurrent import replay_onnx_recurrent

__all__ = ["FoldedBatchNormWarning", "OnnxModule", "TrainGraphError", "load_model"]

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16,
                         ir.DataType.BFLOAT16})
STANDARD_DOMAINS = ("", "ai.onnx")
# Op types replayed as og.nn.functional calls that follow train()/eval(), not as they are.
FUNCTIONAL = frozenset({"BatchNormalization", "Dropout"})
# Op types replayed as compositions of ops that have rules (recurrent cells unrolled, sequences as
# Python lists of values, CastLike as Cast): they need no rule of their own.
RECURRENT = frozenset({"LSTM", "GRU", "RNN"})
SEQUENCE = frozenset({"SplitToSequence", "SequenceAt", "SequenceConstruct",
                      "ConcatFromSequence", "SequenceLength"})
EXPANDED = RECURRENT | SEQUENCE | {"CastLike"}
# Never folded even when every input is constant: each run draws new values.
RANDOM = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                    "Multinomial", "Bernoulli", "Dropout"})
# Constants up to this many elements are attribute-like (baked into single-node kernels, their
# values part of the kernel cache key); larger ones are fed as plain values.
SMALL = 4096


class TrainGraphError(ValueError):
    """The ONNX model cannot be used as asked: bad input, not a bug."""


class FoldedBatchNormWarning(UserWarning):
    """A file's convolutions look like BatchNorm folded in by the exporter (silence it with
    ``warnings.filterwarnings("ignore", category=FoldedBatchNormWarning)``)."""


NORMALIZATIONS = frozenset({"BatchNormalization", "InstanceNormalization",
                            "LayerNormalization", "GroupNormalization"})


def warn_folded_batchnorm(proto: onnx.ModelProto, graph: ir.Graph, where: str) -> None:
    """Warn when a PyTorch export's convolutions look like folded eval-mode BatchNorm.

    NOTE: a heuristic. ``torch.onnx.export`` in eval mode (the dynamo exporter's optimizer, the
    TorchScript exporter's ``training=EVAL``) folds each BatchNorm into the Conv before it: the
    file then has no normalization node and every Conv has a bias. Trained, it is another model
    (no batch statistics, no running statistics), and nothing else would say so. A model that
    really has no BatchNorm and biased convolutions warns too; hence the category to silence.
    """
    if not proto.producer_name.lower().startswith("pytorch"):
        return
    convs = [n for n in graph if n.op_type == "Conv"]
    if not convs or any(n.op_type in NORMALIZATIONS for n in graph):
        return
    if all(len(n.inputs) > 2 and n.inputs[2] is not None for n in convs):
        warnings.warn(
            f"{where}: all {len(convs)} convolutions have biases and there is no "
            f"BatchNormalization: this looks like a PyTorch export that folded eval-mode "
            f"BatchNorm into the convolutions, which trains without batch statistics, unlike "
            f"the PyTorch model. To train with BatchNorm, export keeping it: "
            f"torch.onnx.export(..., dynamo=True, optimize=False) or torch.onnx.export(..., "
            f"dynamo=False, training=torch.onnx.TrainingMode.PRESERVE). If the model has no "
            f"BatchNorm, silence this with warnings.filterwarnings('ignore', "
            f"category=onnxgrad.nn.onnx_module.FoldedBatchNormWarning)",
            FoldedBatchNormWarning, stacklevel=_user_stacklevel())


# --------------------------------------------------------------------------- loading
def load_model(model: Any) -> tuple[onnx.ModelProto, str]:
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
        raise TypeError(f"expected a path, an onnx.ModelProto or bytes of an ONNX model, got "
                        f"{type(model).__name__}")
    if not proto.graph.node or not proto.graph.output:
        raise TrainGraphError(f"{where} is not an ONNX model (it has no graph)")
    if any(external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        raise TrainGraphError(f"{where} keeps initializers in external data that is not loaded; "
                              f"pass the file's path so the data beside it is read")
    if proto.functions:  # model-local functions are not plain ai.onnx: inline them
        proto = onnx.inliner.inline_local_functions(proto)
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node
                      if n.domain not in STANDARD_DOMAINS})
    if foreign:
        raise TrainGraphError(f"{where} uses operators outside standard ONNX (ai.onnx): "
                              f"{foreign}; onnxgrad runs standard ONNX only")
    versions = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    version = versions.get("ai.onnx")
    if version is None:
        raise TrainGraphError(f"{where} imports no ai.onnx opset")
    if version != OPSET:
        warnings.warn(f"{where}: converting from ONNX opset {version} to onnxgrad's opset {OPSET} "
                      f"with onnx.version_converter", stacklevel=_user_stacklevel())
        try:
            proto = version_converter.convert_version(proto, OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors of its C++ core
            raise TrainGraphError(f"{where}: onnx.version_converter could not convert it from "
                                  f"opset {version} to {OPSET}: {exc}") from exc
    return proto, where


def _user_stacklevel() -> int:
    """The stacklevel of the innermost caller outside onnxgrad, for warnings."""
    import sys

    level, frame = 1, sys._getframe(1)
    roots = state._ROOTS
    while frame is not None and frame.f_code.co_filename.startswith(roots):
        level += 1
        frame = frame.f_back
    return level


def _parse(load: Callable[[], onnx.ModelProto], where: str) -> onnx.ModelProto:
    try:
        return load()
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise TrainGraphError(f"{where} is not an ONNX model: {exc}") from exc


def declared_inputs(proto: onnx.ModelProto) -> dict[str, tuple[list[int | str | None], np.dtype]]:
    """Per data input (initializers excluded): its dims (ints, symbolic names or None) and dtype."""
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


def _prepare(proto: onnx.ModelProto, where: str) -> tuple[ir.Graph, set[str]]:
    """The graph, typed by (lenient) shape inference and normalized; returns it and the
    initializers that were also inputs (how exporters mark overridable parameters)."""
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise TrainGraphError(f"{where}: ONNX shape inference failed: {exc}") from exc
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    overridable = {v.name for v in graph.inputs if v.name in graph.initializers}
    RemoveInitializersFromInputsPass()(model)
    for node in graph:
        if node.op_type == "Constant" and node.outputs[0].const_value is None:
            tensor = ir.convenience.get_const_tensor(node.outputs[0])
            if tensor is None:
                raise TrainGraphError(f"{where}: Constant node {node.name!r} has no value "
                                      f"onnxgrad can read: {describe(node)}")
            node.outputs[0].const_value = tensor
    _unalias_initializers(graph, overridable)
    graph.sort()
    return graph, overridable


def _unalias_initializers(graph: ir.Graph, overridable: set[str]) -> None:
    """Give each ``Identity(initializer)`` output an initializer of its own.

    NOTE: ``torch.onnx.export`` deduplicates parameters that merely have equal values (every
    fresh BatchNorm's weight is ones) into one initializer and Identity nodes; trained, they
    would stay tied where PyTorch trains them apart. A parameter PyTorch really shares is one
    initializer read directly, not through an Identity, and stays shared.
    """
    for node in list(graph):
        if node.op_type != "Identity":
            continue
        source, alias = node.inputs[0], node.outputs[0]
        if source is None or not source.is_initializer() or alias.is_graph_output():
            continue
        name = alias.name
        own = ir.Value(name=name, shape=source.shape, type=source.type,
                       const_value=ir.tensor(np.array(source.const_value.numpy()), name=name))
        alias.replace_all_uses_with(own)
        graph.remove(node, safe=True)
        graph.register_initializer(own)
        if source.name in overridable:
            overridable.add(name)


# --------------------------------------------------------------------------- what trains
def float_initializers(graph: ir.Graph) -> list[str]:
    return [name for name, v in graph.initializers.items() if v.dtype in FLOAT_TYPES]


def batchnorm_statistics(graph: ir.Graph) -> set[str]:
    """Names of the values fed to BatchNormalization's running mean and variance inputs."""
    return {v.name for node in graph if node.op_type == "BatchNormalization"
            for v in node.inputs[3:5] if v is not None}


# Inputs that are weights of their op (by position): a float initializer there is a parameter
# whatever its size (a Linear(k, 1)'s bias has one element).
WEIGHT_INPUTS: dict[str, frozenset[int]] = {
    "Conv": frozenset({1, 2}), "ConvTranspose": frozenset({1, 2}), "Gemm": frozenset({0, 1, 2}),
    "MatMul": frozenset({0, 1}), "BatchNormalization": frozenset({1, 2}),
    "LayerNormalization": frozenset({1, 2}), "InstanceNormalization": frozenset({1, 2}),
    "GroupNormalization": frozenset({1, 2}), "PRelu": frozenset({1}),
    "LSTM": frozenset({1, 2, 3}), "GRU": frozenset({1, 2, 3}), "RNN": frozenset({1, 2, 3}),
    "Gather": frozenset({0}),
}
# Inputs that are settings (ratios, bounds, scales, pad values): never parameters.
SETTING_INPUTS: dict[str, frozenset[int]] = {
    "Dropout": frozenset({1, 2}), "BatchNormalization": frozenset({3, 4}),
    "Clip": frozenset({1, 2}), "Pad": frozenset({1, 2, 3}), "Resize": frozenset({1, 2, 3}),
    "Upsample": frozenset({1}), "Range": frozenset({0, 1, 2}),
    "ConstantOfShape": frozenset({0}),
    # NOTE: recurrent initial states too: PyTorch's h_0 / c_0 are inputs, never parameters, but
    # the dynamo exporter folds the default zeros into an initializer.
    "LSTM": frozenset({4, 5, 6}), "GRU": frozenset({4, 5}), "RNN": frozenset({4, 5}),
}


def default_parameters(graph: ir.Graph, overridable: set[str]) -> list[str]:
    """The float initializers that are parameters unless told otherwise: those the graph uses
    as weights.

    A weight has rank >= 1 and feeds some input other than a setting (BatchNorm statistics,
    Dropout ratios, Clip bounds, Resize scales...); one of a single element only when it feeds
    a weight input (Conv, Gemm, MatMul, normalization, recurrent and embedding weights).
    NOTE: scalars never: exporters bake attention scales, GELU's 0.5 and sqrt(2) in as float
    initializers, and training them changes the model (GPT-2 diverges).
    When the model marks some initializers as overridable inputs, only those: the other float
    initializers of such models are constants the exporter baked in (epsilons, scales).
    """
    names = []
    for name in float_initializers(graph):
        value = graph.initializers[name]
        shape = value.const_value.shape if value.const_value is not None else value.shape
        dims = list(shape) if shape is not None else []
        if not dims:
            continue
        weight = other = False
        for node, index in value.uses():
            if index in WEIGHT_INPUTS.get(node.op_type, ()):
                weight = True
            elif index not in SETTING_INPUTS.get(node.op_type, ()):
                other = True
        if weight or (other and int(np.prod(dims)) > 1) or (value.is_graph_output() and
                                                             not value.uses()):
            names.append(name)
    marked = [n for n in names if n in overridable]
    return marked or names


def check_differentiable(graph: ir.Graph, parameters: Sequence[str],
                         outputs: Sequence[ir.Value]) -> list[str]:
    """Fail early, naming the op type and node, where a gradient would need a missing rule.

    Returns the parameters from which no float path leads to ``outputs`` (no gradient can reach
    them). A node needs a rule when it depends on a parameter and one of its outputs lies on a
    float path to an output; integer paths (``Shape`` feeding a ``Reshape``) carry none.
    """
    wrt = [graph.initializers[name] for name in parameters]
    nodes = topological_nodes(list(outputs))
    active = {id(v) for v in wrt}
    for node in nodes:
        if any(v is not None and id(v) in active for v in node.inputs):
            active.update(id(v) for v in node.outputs)
    carries = {id(v) for v in outputs}
    for node in reversed(nodes):
        if node.op_type in ("Shape", "Size"):
            continue  # constants while replaying: nothing flows back through them
        if any(id(v) in carries for v in node.outputs):
            carries.update(id(v) for v in node.inputs
                           if v is not None and (v.dtype is None or v.dtype in FLOAT_TYPES))
    for node in nodes:
        if not any(id(v) in active and id(v) in carries for v in node.outputs):
            continue
        if node.op_type not in RULES and node.op_type not in FUNCTIONAL | EXPANDED:
            raise NoGradientRule(f"no gradient rule for ONNX op '{node.op_type}' (node "
                                 f"{node.name}): {describe(node)}")
    return [name for name, v in zip(parameters, wrt) if id(v) not in carries]


def _constant_behind(value: ir.Value | None) -> ir.Value | None:
    """The initializer or Constant output ``value`` is, through Identity nodes; None if computed."""
    while value is not None:
        if value.const_value is not None:
            return value
        node = value.producer()
        if node is None or node.op_type != "Identity":
            return None
        value = node.inputs[0]
    return None


def statistic_name(node: ir.Node, index: int) -> str:
    """The buffer name of BatchNorm ``node``'s statistic input ``index`` (3: mean, 4: variance).

    The name the node sees it by, unless that value has other uses: then the node's name
    qualifies it, so that each BatchNorm keeps statistics of its own.
    """
    value = node.inputs[index]
    if not value.is_initializer() or len(value.uses()) > 1:
        return f"{node.name}.running_{'mean' if index == 3 else 'var'}"
    return value.name


def _torch_momentum(onnx_momentum: float) -> float:
    """PyTorch's BatchNorm momentum from ONNX's (running = running * m + batch * (1 - m)).

    NOTE: the attribute is a float32; its shortest decimal (0.9, as the exporter wrote it) makes
    1 - m exactly the Python float PyTorch uses (0.1), so the update constants match bit for bit.
    """
    return 1.0 - float(str(np.float32(onnx_momentum)))


def _qualified_names(names: Iterable[str]) -> dict[str, str]:
    """Module-tree names for initializer names: ``layer1.0.conv1.weight`` stays as it is (a
    parameter ``weight`` of submodules ``layer1``, ``0``, ``conv1``, as in PyTorch); a name with an
    empty segment (``a..b``) or that is also another name's module (``a`` and ``a.b``) becomes one
    top-level name with ``_`` for its dots."""
    names = list(names)
    plain = [n for n in names if all(n.split("."))]
    modules = {".".join(parts[:i]) for n in plain for parts in [n.split(".")]
               for i in range(1, len(parts))}
    out = {n: n for n in plain if n not in modules}
    taken = set(out.values()) | modules
    for n in names:
        if n in out:
            continue
        base = n.replace(".", "_") or "_"
        candidate, i = base, 1
        while candidate in taken:
            candidate, i = f"{base}_{i}", i + 1
        taken.add(candidate)
        out[n] = candidate
    return out


class OnnxScope(Module):
    """A level of an :class:`OnnxModule`'s parameter tree (``layer1``, ``layer1.0``): it holds
    parameters and buffers; the OnnxModule's forward uses them."""

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("an OnnxScope only holds parameters of an OnnxModule; call the "
                           "OnnxModule (or cut it with outputs=[...])")


# --------------------------------------------------------------------------- the module
class OnnxModule(Module):
    """An ONNX model as a module: ``OnnxModule(path_or_ModelProto_or_bytes)``.

    ``outputs``: the values ``forward`` returns, graph outputs or any intermediate value by name
    (cutting the model there: ``outputs=["pooled"]`` drops a classifier head; only the nodes and
    initializers they need are kept). Default: the model's outputs.
    ``parameters``: which float initializers are parameters: None (those the graph uses as
    weights, see :func:`default_parameters`: never scalars, BatchNorm statistics, Dropout ratios
    or other settings; only the overridable ones, when the model lists some initializers among
    its inputs), names, or a predicate on names filtering that default. The other initializers
    are constants; ``repr(module)`` lists the float ones.
    ``freeze_bn``: BatchNormalization always normalizes with its running statistics, which are
    then constants rather than buffers.
    ``name``: how messages refer to the model (default: its path, or "the model").

    ``named_parameters()`` names follow the initializers' names (``layer1.0.conv1.weight`` is
    parameter ``weight`` of ``self.layer1[0].conv1``-like scopes; see :func:`_qualified_names`);
    ``initializer_names`` maps them back, and exported graphs use the original names.
    ``forward(*inputs)`` takes the model's data inputs in order (or by name); it returns one
    tensor, or a tuple when there are several outputs.
    """

    def __init__(self, model: Any, *, outputs: str | Sequence[str] | None = None,
                 parameters: None | Sequence[str] | Callable[[str], bool] = None,
                 freeze_bn: bool = False, name: str | None = None) -> None:
        super().__init__()
        proto, source = load_model(model)
        source = name if name is not None else source
        graph, overridable = _prepare(proto, source)
        warn_folded_batchnorm(proto, graph, source)
        declared = declared_inputs(proto)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "graph", graph)
        object.__setattr__(self, "freeze_bn", bool(freeze_bn))

        values = {v.name: v for v in list(graph.inputs) + list(graph.initializers.values())}
        values.update({v.name: v for node in graph for v in node.outputs if v.name})
        if outputs is None:
            outputs = [v.name for v in graph.outputs]
        elif isinstance(outputs, str):
            outputs = [outputs]
        unknown = [n for n in outputs if n not in values]
        if unknown:
            raise TrainGraphError(f"{source} has no value {unknown}; its outputs are "
                                  f"{[v.name for v in graph.outputs]}")
        out_values = [values[n] for n in outputs]
        needed = {id(n) for n in topological_nodes(out_values)}
        nodes = [n for n in graph if id(n) in needed]
        read = {id(v) for n in nodes for v in n.inputs if v is not None} | {
            id(v) for v in out_values}
        inputs = [v.name for v in graph.inputs if id(v) in read]
        object.__setattr__(self, "output_names", list(outputs))
        object.__setattr__(self, "input_names", inputs)
        object.__setattr__(self, "_declared", {n: declared[n] for n in inputs if n in declared})
        object.__setattr__(self, "_nodes", nodes)
        object.__setattr__(self, "output_values", out_values)

        chosen = self._choose(graph, overridable, parameters)
        # In order of first use, which is a torch export's parameter order (conv, then bn, ...).
        used = list(dict.fromkeys(v.name for v in [u for n in nodes for u in n.inputs]
                                  + out_values if v is not None and v.is_initializer()))
        stats: dict[str, np.ndarray] = {}  # buffer name -> value
        bn_buffers: dict[int, tuple[str, str]] = {}  # node index -> (mean, var) buffer names
        for i, node in enumerate(nodes):
            if node.op_type != "BatchNormalization":
                continue
            extra = [v for v in node.outputs[1:] if v is not None and v.name
                     and (v.uses() or v.is_graph_output() or any(v is o for o in out_values))]
            if extra:
                raise TrainGraphError(f"{source}: BatchNormalization node {node.name}: its "
                                      f"running-statistics outputs are used; only inference-mode "
                                      f"BatchNorm is supported")
            if freeze_bn or len(node.inputs) < 5:
                continue
            sources = [_constant_behind(node.inputs[k]) for k in (3, 4)]
            if any(s is None for s in sources):
                continue  # computed statistics: batch statistics in training, no update
            names = (statistic_name(node, 3), statistic_name(node, 4))
            for stat, src in zip(names, sources):
                stats.setdefault(stat, np.array(src.const_value.numpy()))
            bn_buffers[i] = names
        object.__setattr__(self, "_bn_buffers", bn_buffers)

        params = [n for n in used if n in chosen]
        qualified = _qualified_names(params + [n for n in stats if n not in params])
        constants: dict[str, Val] = {}
        for init in used:
            if init in chosen:
                continue
            array = np.array(graph.initializers[init].const_value.numpy())
            # Small ones (shapes, axes, scales) are attribute-like; large ones (frozen weights,
            # tables) stay plain values: constants of a compiled graph either way.
            constants[init] = Val(_contig(array), const=array.size <= SMALL)
        object.__setattr__(self, "_constants", constants)
        for init in params:
            array = graph.initializers[init].const_value.numpy()
            self._place(qualified[init], Parameter(np.array(array)))
        for stat, array in stats.items():
            self._place(qualified[stat], Tensor(Val(_contig(array))), buffer=True)
        # state name in the module tree -> initializer (or statistic) name in the file
        object.__setattr__(self, "initializer_names",
                           {qualified[n]: n for n in params + list(stats)})
        object.__setattr__(self, "_qualified", qualified)
        object.__setattr__(self, "_folded", {})  # node index -> (constant inputs, outputs)

    # ----------------------------------------------------------------- building
    def _choose(self, graph: ir.Graph, overridable: set[str], parameters: Any) -> set[str]:
        defaults = default_parameters(graph, overridable)
        if parameters is None:
            return set(defaults)
        if callable(parameters):
            return {n for n in defaults if parameters(n)}
        if isinstance(parameters, str):
            parameters = [parameters]
        wanted = set(parameters)
        stats = wanted & batchnorm_statistics(graph)
        if stats:
            raise TrainGraphError(f"{self.source}: {sorted(stats)} are BatchNorm running "
                                  f"statistics: buffers that training updates, not parameters")
        floats = float_initializers(graph)
        unknown = sorted(wanted - set(floats))
        if unknown:
            raise TrainGraphError(f"{self.source}: {unknown} are not float initializers; "
                                  f"they are {floats}")
        return wanted

    def _place(self, qualified: str, tensor: Tensor, buffer: bool = False) -> None:
        *path, leaf = qualified.split(".")
        module: Module = self
        for part in path:
            child = module._modules.get(part)
            if child is None:
                child = OnnxScope()
                module.add_module(part, child)
            module = child
        if buffer:
            module.register_buffer(leaf, tensor)
        else:
            module.register_parameter(leaf, tensor)

    def input_dims(self, name: str) -> list[int | str | None]:
        """Input ``name``'s declared dims: ints, symbolic names, or None where unknown."""
        return list(self._declared[name][0]) if name in self._declared else []

    def input_dtype(self, name: str) -> np.dtype | None:
        return self._declared[name][1] if name in self._declared else None

    def _graph_state_names(self) -> dict[str, Tensor]:
        """The state by its names in the ONNX file (``og.compile`` names graph inputs so)."""
        return {self.initializer_names.get(k, k): t for k, t in self._state_tensors().items()}

    # ----------------------------------------------------------------- replay
    def forward(self, *inputs: Any, **named: Any) -> Tensor | tuple[Tensor, ...]:
        args = list(inputs)
        for name in self.input_names[len(args):]:
            if name not in named:
                raise TypeError(f"{self.source}: forward() is missing input {name!r}; the model "
                                f"takes {self.input_names}")
            args.append(named.pop(name))
        if named or len(args) != len(self.input_names):
            raise TypeError(f"{self.source}: the model takes inputs {self.input_names}, got "
                            f"{len(inputs)} positional and {sorted(named)} named")
        values: dict[str, Val | None] = {}
        for name, arg in zip(self.input_names, args):
            values[name] = self._data(name, arg)
        values.update(self._constants)
        tensors = self._state_tensors()
        for name, q in self._qualified.items():
            t = tensors.get(q)
            if t is None:
                raise RuntimeError(f"{self.source}: the module has no tensor {q!r} any more "
                                   f"(initializer {name!r}): its state was replaced")
            values[name] = t._v
        for i, node in enumerate(self._nodes):
            ins = [None if v is None else values[v.name] for v in node.inputs]
            try:
                outs = self._replay(i, node, ins, tensors)
            except (NoGradientRule, TrainGraphError):
                raise
            except Exception as exc:  # ORT's or a builder's message, plus the node
                message = f"{self.source}: node {node.name!r} ({node.op_type}): {exc}"
                if _reraisable(exc):
                    raise type(exc)(message) from exc
                raise RuntimeError(message) from exc
            for value, val in zip(node.outputs, outs):
                if value is not None and value.name:
                    values[value.name] = val
        results = tuple(Tensor(values[n]) for n in self.output_names)
        return results[0] if len(results) == 1 else results

    def _data(self, name: str, arg: Any) -> Val:
        val = arg._v if isinstance(arg, Tensor) else Val(_contig(np.asarray(arg)))
        declared = self._declared.get(name)
        if declared is not None:
            dims, dtype = declared
            shape = val.data.shape
            if dims and (len(dims) != len(shape) or any(
                    isinstance(d, int) and d > 0 and d != n for d, n in zip(dims, shape))):
                shown = [d if d is not None else "?" for d in dims]
                raise TrainGraphError(f"{self.source}: input {name!r} has shape {shown}, the data "
                                      f"has shape {list(shape)}")
            if val.data.dtype != dtype:
                raise TypeError(f"{self.source}: input {name!r} takes {dtype}, got "
                                f"{val.data.dtype}")
        return val

    def _replay(self, i: int, node: ir.Node, ins: list[Val | None],
                tensors: Mapping[str, Tensor]) -> list[Val | None]:
        op = node.op_type
        if op == "Constant":
            return [Val(_contig(node.outputs[0].const_value.numpy()), const=True)]
        if op == "Shape":
            dims = np.asarray(ins[0].data.shape, np.int64)
            start, end = _attr(node, "start", 0), _attr(node, "end", None)
            return [Val(dims[start:end].copy(), const=True)]
        if op == "Size":
            return [Val(np.asarray(ins[0].data.size, np.int64), const=True)]
        if op == "BatchNormalization":
            return [self._batch_norm(i, node, ins, tensors)]
        if op == "Dropout" and not any(v is not None and v.name and v.uses()
                                       for v in node.outputs[1:]):
            ratio = float(ins[1].data) if len(ins) > 1 and ins[1] is not None else 0.5
            return [F.dropout(Tensor(ins[0]), ratio, training=self.training)._v]
        if op in SEQUENCE:
            return [_sequence_op(node, ins)]
        if any(isinstance(v, list) for v in ins):
            raise TrainGraphError(f"{self.source}: node {node.name!r} ({op}) takes a sequence, "
                                  f"which onnxgrad replays only through {sorted(SEQUENCE)}: "
                                  f"{describe(node)}")
        present = [v for v in ins if v is not None]
        if present and all(v.const for v in present) and op not in RANDOM:
            return self._fold(i, node, ins)
        attrs = _attributes(node, self.source)
        n_out = len(node.outputs)
        if op in RECURRENT:
            return replay_onnx_recurrent(op, attrs, ins, n_out, lambda: f"{op} node {node.name!r}")
        if op == "CastLike":  # the dynamo exporter's; a Cast to the second input's dtype
            to = onnx.helper.np_dtype_to_tensor_dtype(ins[1].data.dtype)
            return emit("Cast", [ins[0]], {"to": int(to)})
        if op == "MaxPool" and n_out == 1 and _attr(node, "storage_order", 0) == 0 \
                and ins[0].requires_grad and state.grad_enabled():
            # Indices feed the MaxPool rule; only asked for when a gradient can flow (ONNX
            # Runtime's MaxPool with Indices is ~20x slower, see tracer.nnops.max_pool2d).
            return emit(op, ins, attrs, n_out=2)[:1]
        if op == "Dropout":  # the mask is read: the node as it is, in the module's mode
            ins = [ins[0], ins[1] if len(ins) > 1 else None,
                   Val(np.asarray(self.training), const=True)]
        outs = emit(op, ins, attrs, n_out=n_out)
        if op not in RULES and any(v.requires_grad for v in outs):
            raise NoGradientRule(f"{self.source}: no gradient rule for ONNX op '{op}' (node "
                                 f"{node.name}): {describe(node)}; freeze what feeds it "
                                 f"(requires_grad_(False)) or run it under og.no_grad()")
        return outs

    def _fold(self, i: int, node: ir.Node, ins: list[Val | None]) -> list[Val]:
        """A node of constant inputs, computed once per input values: constant outputs."""
        key = tuple(None if v is None else (v.data.dtype.str, v.data.shape, v.data.tobytes())
                    for v in ins)
        cached = self._folded.get(i)
        if cached is None or cached[0] != key:
            datas = [None if v is None else v.data for v in ins]
            if any(a.type in (ir.AttributeType.TENSOR, ir.AttributeType.GRAPH)
                   for a in node.attributes.values()):
                arrays = _reference_node(node, datas)
            else:
                attrs = _attributes(node, self.source)
                arrays = run_node(node.op_type, attrs, attrs_key(attrs), datas,
                                  len(node.outputs), [v is not None for v in ins])
            cached = self._folded[i] = (key, arrays)
        return [Val(a, const=a.size <= SMALL) for a in cached[1]]

    def _batch_norm(self, i: int, node: ir.Node, ins: list[Val | None],
                    tensors: Mapping[str, Tensor]) -> Val:
        x, scale, bias, mean, var = (ins + [None] * 5)[:5]
        names = self._bn_buffers.get(i)
        training = self.training and not self.freeze_bn
        if names is not None:
            running_mean = tensors[self._qualified[names[0]]]
            running_var = tensors[self._qualified[names[1]]]
        elif training:  # statistics computed in the graph: batch statistics, nothing to update
            running_mean = running_var = None
        else:
            running_mean, running_var = Tensor(mean), Tensor(var)
        y = F.batch_norm(Tensor(x), running_mean, running_var,
                         None if scale is None else Tensor(scale),
                         None if bias is None else Tensor(bias), training=training,
                         momentum=_torch_momentum(_attr(node, "momentum", 0.9)),
                         eps=_attr(node, "epsilon", 1e-5))
        return y._v

    def extra_repr(self) -> str:
        frozen = sorted(n for n, v in self._constants.items()
                        if v.data.dtype.kind == "f" and n in self.graph.initializers)
        shown = ", ".join(frozen[:8]) + (", ..." if len(frozen) > 8 else "")
        return (f"{self.source}, inputs={self.input_names}, outputs={self.output_names}, "
                f"{len(self._nodes)} nodes, {len(self._parameters_in_file())} parameters"
                + (f", float constants (not trained): [{shown}]" if frozen else ""))

    def _parameters_in_file(self) -> list[str]:
        return [self.initializer_names[q] for q, _ in self.named_parameters()
                if q in self.initializer_names]


# --------------------------------------------------------------------------- helpers
def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _attributes(node: ir.Node, source: str) -> dict[str, Any]:
    """The node's attributes as Python values for ``emit`` (tensor and graph attributes are only
    supported on nodes of constant inputs, which are folded)."""
    attrs: dict[str, Any] = {}
    for name, a in node.attributes.items():
        if a.type in (ir.AttributeType.TENSOR, ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS,
                      ir.AttributeType.TENSORS):
            raise TrainGraphError(f"{source}: node {node.name!r} ({node.op_type}) has a "
                                  f"{a.type.name.lower()} attribute {name!r} on computed inputs, "
                                  f"which onnxgrad cannot replay: {describe(node)}")
        value = a.value
        attrs[name] = list(value) if isinstance(value, (tuple, list)) else value
    return attrs


def _reference_node(node: ir.Node, inputs: list[np.ndarray | None]) -> list[np.ndarray]:
    """One node evaluated by ONNX's reference evaluator (tensor-valued attributes)."""
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    names = [f"x{k}" if a is not None else "" for k, a in enumerate(inputs)]
    outs = [f"y{k}" for k in range(len(node.outputs))]
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(outs)
    graph = onnx.helper.make_graph(
        [proto], "fold",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype),
                                            a.shape) for n, a in zip(names, inputs) if n],
        [onnx.helper.make_empty_tensor_value_info(n) for n in outs])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    results = ReferenceEvaluator(model).run(None, {n: a for n, a in zip(names, inputs) if n})
    return [_contig(np.asarray(r)) for r in results]


def _sequence_op(node: ir.Node, ins: list[Any]) -> Any:
    """ONNX sequence ops on Python lists of values (the dynamo exporter's unoptimized files):
    every element stays a tensor with its own gradient path (Split, Squeeze, Concat...)."""
    op = node.op_type
    if op == "SequenceConstruct":
        return list(ins)
    seq = ins[0]
    if not isinstance(seq, list) and op != "SplitToSequence":
        raise TrainGraphError(f"node {node.name!r} ({op}): its first input is not a sequence")
    if op == "SequenceLength":
        return Val(np.asarray(len(seq), np.int64), const=True)
    if op == "SequenceAt":
        if not ins[1].const:
            raise TrainGraphError(f"node {node.name!r} (SequenceAt): the position is computed "
                                  f"from data; onnxgrad needs it constant")
        return seq[int(ins[1].data)]
    axis = int(_attr(node, "axis", 0))
    if op == "ConcatFromSequence":
        tensors = [Tensor(v) for v in seq]
        if _attr(node, "new_axis", 0):
            return ops.stack(tensors, axis)._v
        return ops.cat(tensors, axis)._v
    # SplitToSequence
    x = Tensor(seq)
    axis = axis % x.ndim
    split = ins[1] if len(ins) > 1 else None
    if split is None:
        parts = ops.split(x, 1, axis)
        if not _attr(node, "keepdims", 1):
            parts = [p.squeeze(axis) for p in parts]
        return [p._v for p in parts]
    if not split.const:
        raise TrainGraphError(f"node {node.name!r} (SplitToSequence): split sizes computed from "
                              f"data; onnxgrad needs them constant")
    sizes = np.asarray(split.data)
    return [p._v for p in ops.split(x, int(sizes) if sizes.ndim == 0 else sizes.tolist(), axis)]


def _reraisable(exc: Exception) -> bool:
    """Whether ``type(exc)(message)`` rebuilds the error (ours and Python's plain ones)."""
    return type(exc) in (ValueError, TypeError, RuntimeError, IndexError, KeyError) or \
        type(exc).__module__.startswith(("onnxgrad", "tracer", "passes", "runtime"))
