"""Make an inference ONNX graph trainable: its whole SGD training step as one standard-ONNX graph.

:func:`training_graph` turns an imported model into the graph ``og.compile`` makes of
``zero_grad(); loss(model(x), labels).backward(); optimizer.step()``, with the same inputs,
outputs, names and metadata, so the front runs and exports it with the compiled-step machinery:

- the chosen float initializers (parameters) become state inputs named as before, with
  ``<name>.new`` outputs, ``grad.<name>`` outputs and ``momentum.<name>`` buffers; the other
  initializers stay constants;
- inference-mode ``BatchNormalization`` nodes become training-mode normalization built from
  primitives (as ``og.nn.functional.batch_norm`` does), their running statistics state updated
  like PyTorch's (or, frozen, eval-mode normalization with constant statistics);
- ``Dropout`` runs in training mode; a single-output ``MaxPool`` gets its ``Indices`` output, which
  its gradient rule reads;
- the loss graph (inputs: the prediction and, unless it takes none, the labels; one scalar output)
  is appended and named ``output``; gradients come from :func:`passes.autodiff.gradients`, the
  update from :func:`passes.sgd.sgd_updates`.

The model must carry static shapes for every value on the way from a parameter to the loss (the
front binds dynamic dimensions and runs ONNX shape inference). Knows nothing of tensors.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveInitializersFromInputsPass

from ..runtime.metadata import DATA_INPUTS, ORIGIN, PARAMETERS, STATE
from .autodiff import NoGradientRule, describe, gradients, topological_nodes
from .builder import Builder, name_outputs, static_shape
from .cleanup import cleanup
from .rules import RULES, attr
from .sgd import SGDFlags, SGDHyper, sgd_update

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16,
                         ir.DataType.BFLOAT16})
# Op types this pass rewrites into their training form instead of differentiating them as they are.
REWRITTEN = frozenset({"BatchNormalization", "Dropout"})
STANDARD_DOMAINS = ("", "ai.onnx")
HYPER_NAMES = ("lr", "momentum", "dampening", "weight_decay")


class TrainGraphError(ValueError):
    """The model cannot become a training step as asked: bad input, not a bug."""


@dataclass
class TrainingGraph:
    """The training-step model and what the front needs to run it; names are graph value names."""

    model: ir.Model
    data_inputs: list[str]  # the model's own inputs, then the labels (when the loss takes them)
    labels: str | None
    parameters: list[str]  # trained: state inputs updated by SGD
    frozen: list[str]  # asked for but no gradient reaches them: kept as constants
    statistics: list[str]  # BatchNorm running statistics: state inputs updated in the forward
    buffers: dict[str, str]  # parameter -> its momentum-buffer state input
    created: dict[str, str]  # output -> parameter: buffers a dampened first step creates
    grads: dict[str, str]  # output -> parameter
    scalars: list[str]  # hyperparameter inputs, in HYPER_NAMES order
    state: dict[str, str]  # state input -> the output holding its next value
    initial: dict[str, np.ndarray] = field(default_factory=dict)  # state made from constants


# --------------------------------------------------------------------------- inspecting a model
def prepare(model: ir.Model) -> set[str]:
    """Normalize an imported model in place; returns the initializers that were also inputs.

    Initializers listed as graph inputs (onnxgrad's exports, ``keep_initializers_as_inputs``)
    become plain initializers: overridable defaults are how those exporters mark parameters,
    which :func:`default_parameters` uses. ``Constant`` outputs get their ``const_value`` so the
    rules that need constant operands (axes, pads, slice bounds) see them.
    """
    graph = model.graph
    overridable = {v.name for v in graph.inputs if v.name in graph.initializers}
    RemoveInitializersFromInputsPass()(model)
    _annotate_constants(graph)
    _unalias_initializers(graph, overridable)
    return overridable


def _unalias_initializers(graph: ir.Graph, overridable: set[str]) -> None:
    """Give each ``Identity(initializer)`` output an initializer of its own.

    NOTE: ``torch.onnx.export`` deduplicates parameters that merely have equal values (every
    fresh BatchNorm's weight is ones) into one initializer and Identity nodes; trained, they
    would stay tied where PyTorch trains them apart. A parameter PyTorch really shares is one
    initializer read directly, not through an Identity, and stays shared.
    """
    for node in list(graph):
        if node.op_type != "Identity" or node.domain not in STANDARD_DOMAINS:
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


def _annotate_constants(graph: ir.Graph) -> None:
    for node in graph:
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS \
                and node.outputs[0].const_value is None:
            tensor = ir.convenience.get_const_tensor(node.outputs[0])
            if tensor is not None:
                node.outputs[0].const_value = tensor


def float_initializers(graph: ir.Graph) -> list[str]:
    return [name for name, v in graph.initializers.items() if v.dtype in FLOAT_TYPES]


def batchnorm_statistics(graph: ir.Graph) -> set[str]:
    """Names of the values fed to BatchNormalization's running mean and variance inputs."""
    return {v.name for node in graph if node.op_type == "BatchNormalization"
            for v in node.inputs[3:5] if v is not None}


def default_parameters(graph: ir.Graph, overridable: set[str]) -> list[str]:
    """What ``trainable=None`` trains: every float initializer but BatchNorm statistics.

    When the model marks some initializers as overridable inputs, only those: the other float
    initializers of such models are constants the exporter baked in (epsilons, scales).
    """
    stats = batchnorm_statistics(graph)
    names = [n for n in float_initializers(graph) if n not in stats]
    marked = [n for n in names if n in overridable]
    return marked or names


def check_differentiable(graph: ir.Graph, parameters: Sequence[str], output: str) -> list[str]:
    """Fail early, naming the op type and node, where a gradient would need a missing rule.

    Returns the parameters from which no float path leads to ``output`` (no gradient can
    reach them). A node needs a rule when it depends on a parameter and one of its outputs lies on
    a float path to ``output``; integer paths (``Shape`` feeding a ``Reshape``) carry none.
    """
    out = next((v for v in graph.outputs if v.name == output), None)
    if out is None:
        raise TrainGraphError(f"the model has no output {output!r}; its outputs are "
                              f"{[v.name for v in graph.outputs]}")
    wrt = [graph.initializers[name] for name in parameters]
    nodes = topological_nodes([out])
    active = {id(v) for v in wrt}
    for node in nodes:
        if any(v is not None and id(v) in active for v in node.inputs):
            active.update(id(v) for v in node.outputs)
    carries = {id(out)}
    for node in reversed(nodes):
        if any(id(v) in carries for v in node.outputs):
            carries.update(id(v) for v in node.inputs
                           if v is not None and (v.dtype is None or v.dtype in FLOAT_TYPES))
    for node in nodes:
        if not any(id(v) in active and id(v) in carries for v in node.outputs):
            continue
        if node.domain not in STANDARD_DOMAINS:
            raise TrainGraphError(f"node {node.name} is {node.domain}::{node.op_type}, outside "
                                  f"standard ONNX (ai.onnx): onnxgrad's training steps use "
                                  f"standard operators only")
        if node.op_type not in RULES and node.op_type not in REWRITTEN:
            raise NoGradientRule(f"no gradient rule for ONNX op '{node.op_type}' (node "
                                 f"{node.name}): {describe(node)}")
    return [name for name, v in zip(parameters, wrt) if id(v) not in carries]


# --------------------------------------------------------------------------- names
class _Names:
    """Unique value names in one graph; the training step's own names win over internal ones."""

    def __init__(self, graph: ir.Graph):
        self.values: dict[str, ir.Value] = {}
        for v in list(graph.inputs) + list(graph.initializers.values()):
            self.values[v.name] = v
        for node in graph:
            for v in node.outputs:
                if v.name:
                    self.values[v.name] = v
        self.taken = set(self.values)

    def unique(self, hint: str) -> str:
        name, i = hint, 0
        while name in self.taken:
            i += 1
            name = f"{hint}_{i}"
        self.taken.add(name)
        return name

    def claim(self, name: str) -> str:
        """Reserve ``name`` for the step; an internal value of that name is renamed."""
        holder = self.values.pop(name, None)
        if holder is not None:
            if holder.is_graph_input() or holder.is_initializer():
                raise TrainGraphError(f"the model's {name!r} has the name of one of the training "
                                      f"step's own inputs or outputs")
            holder.name = self.unique(f"{name}_")
            self.values[holder.name] = holder
        self.taken.add(name)
        return name

    def prefix(self) -> str:
        """A builder prefix no existing name starts like (builders name values ``<p><n>_<op>``)."""
        prefix = "t"
        while any(re.match(rf"{re.escape(prefix)}\d+_", n) for n in self.taken):
            prefix += "_"
        return prefix


# --------------------------------------------------------------------------- the transform
def training_graph(model: ir.Model, parameters: Sequence[str], loss: ir.Graph, *, output: str,
                   flags: SGDFlags, buffers: bool, freeze_bn: bool = False,
                   labels: str = "labels") -> TrainingGraph:
    """Turn ``model`` (in place) into its SGD training step; see the module docstring.

    ``buffers``: with momentum, whether the momentum buffers exist yet (state inputs); False is a
    dampened first step, which creates them (PyTorch's ``buf = clone(d_p)``).
    """
    graph = model.graph
    prepare(model)
    names = _Names(graph)
    out_names = [v.name for v in graph.outputs]
    if output not in out_names:
        raise TrainGraphError(f"the model has no output {output!r}")
    out_index = out_names.index(output)  # its name may be claimed: "output" is the loss's
    missing = [p for p in parameters if p not in graph.initializers]
    if missing:
        raise TrainGraphError(f"no initializer named {missing}")
    if not parameters:
        raise TrainGraphError("nothing to train: no parameters were chosen")
    for node in graph:
        node.metadata_props.setdefault(ORIGIN, "fwd")
    data_inputs = [v.name for v in graph.inputs]
    reserved = ["output", labels] if len(loss.inputs) > 1 else ["output"]
    reserved += list(HYPER_NAMES)
    for p in parameters:
        reserved += [f"{p}.new", f"grad.{p}", f"momentum.{p}", f"momentum.{p}.new"]
    for name in reserved:
        names.claim(name)
    b = Builder(graph, origin="fwd", prefix=names.prefix())

    initial: dict[str, np.ndarray] = {}
    stats = _rewrite_batchnorm(graph, b, names, freeze_bn, initial)
    _train_dropout(graph, b)
    _maxpool_indices(graph, b, [graph.initializers[p] for p in parameters])
    # Looked up after the rewrites, which may have replaced the output value.
    prediction = graph.outputs[out_index]

    # Parameters become state inputs; their values are the caller's (and the export's) defaults.
    params: list[ir.Value] = []
    for name in parameters:
        value = graph.initializers.pop(name)
        initial[name] = np.array(value.const_value.numpy())
        value.const_value = None
        graph.inputs.append(value)
        params.append(value)

    b.origin = "fwd"
    loss_value, labels_value = _append_loss(graph, loss, prediction, labels, names)
    graph.outputs.clear()
    _annotate_constants(graph)  # the rewrites' constants: the rules read axes and shapes

    b.origin = "grad"
    seed = b.const(np.ones(static_shape(loss_value) or (), dtype=loss_value.dtype.numpy()))
    grads = gradients(b, [loss_value], [seed], params)
    frozen = []
    trained: list[tuple[ir.Value, ir.Value]] = []
    for p, g in zip(params, grads):
        if g is None:  # no gradient reaches it: it stays a constant, as PyTorch's step skips it
            graph.inputs.remove(p)
            p.const_value = ir.tensor(initial.pop(p.name), name=p.name)
            graph.register_initializer(p)
            frozen.append(p.name)
        else:
            g.shape, g.dtype = ir.Shape(p.shape), p.dtype
            trained.append((p, g))
    if not trained:
        raise TrainGraphError(f"no gradient of the loss reaches any of the parameters "
                              f"{list(parameters)}")

    # The update: one parameter group, laid out as optim.SGD.step lays out its nodes' inputs.
    b.origin = "opt"
    dtype = trained[0][0].dtype
    scalars: list[ir.Value] = []
    present = {"lr": True, "momentum": flags.momentum,
               "dampening": flags.momentum and flags.dampening, "weight_decay": flags.weight_decay}
    for name in HYPER_NAMES:
        if present[name]:
            scalars.append(ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(dtype)))
    bufs: dict[str, ir.Value] = {}
    values: list[ir.Value] = []
    layout = []
    for p, g in trained:
        buf = None
        if flags.momentum and buffers:
            buf = bufs[p.name] = ir.Value(name=f"momentum.{p.name}", shape=ir.Shape(p.shape),
                                          type=p.type)
        values += [p, g] + ([buf] if buf is not None else [])
        layout.append((0, buf is not None))
    updates = iter(sgd_updates(b, values + scalars, layout, [flags], [0]))

    roots: list[ir.Value] = [loss_value]
    root_names = ["output"]
    state: dict[str, str] = {}
    created: dict[str, str] = {}
    new_buffers: list[tuple[ir.Value, str]] = []
    for p, _ in trained:
        roots.append(next(updates))
        root_names.append(state.setdefault(p.name, f"{p.name}.new"))
        if flags.momentum:
            new_buffers.append((next(updates), p.name))
    for buf, p in new_buffers:
        if buffers:
            roots.append(buf)
            root_names.append(state.setdefault(f"momentum.{p}", f"momentum.{p}.new"))
    for stat, new in stats:
        new.shape, new.dtype = ir.Shape(stat.shape), stat.dtype
        roots.append(new)
        root_names.append(state.setdefault(stat.name, names.claim(f"{stat.name}.new")))
    for buf, p in new_buffers:
        if not buffers:
            roots.append(buf)
            root_names.append(f"momentum.{p}")
            created[f"momentum.{p}"] = p
    grad_outputs = {}
    for p, g in trained:
        roots.append(g)
        root_names.append(f"grad.{p.name}")
        grad_outputs[f"grad.{p.name}"] = p.name

    copies: list[ir.Node] = []
    outputs = name_outputs(roots, root_names, copies,
                           list(graph.inputs) + list(graph.initializers.values()) + scalars)
    graph.extend(copies)
    model_inputs = [v for v in graph.inputs if v.name in data_inputs]
    state_inputs = ([p for p, _ in trained] + [stat for stat, _ in stats] + list(bufs.values()))
    graph.inputs.clear()
    graph.inputs.extend(model_inputs + ([labels_value] if labels_value is not None else [])
                        + scalars + state_inputs)
    graph.outputs.extend(outputs)
    graph.name = "train_step"
    model.producer_name, model.producer_version = "onnxgrad", None
    data_names = data_inputs + ([labels] if labels_value is not None else [])
    model.metadata_props[STATE] = json.dumps({out: inp for inp, out in state.items()})
    model.metadata_props[DATA_INPUTS] = json.dumps(data_names)
    model.metadata_props[PARAMETERS] = json.dumps([p.name for p, _ in trained])
    cleanup(model)
    return TrainingGraph(model, data_names, labels if labels_value is not None else None,
                         [p.name for p, _ in trained], frozen, [s.name for s, _ in stats],
                         {p: v.name for p, v in bufs.items()}, created, grad_outputs,
                         [s.name for s in scalars], state, initial)


# --------------------------------------------------------------------------- BatchNormalization
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


def _detach_statistic(graph: ir.Graph, node: ir.Node, index: int, name: str, names: _Names,
                      as_state: bool, initial: dict[str, np.ndarray]) -> ir.Value:
    """The statistic input of ``node`` as a value of its own named ``name``: a state input, or a
    constant.

    NOTE: exporters share equal initializers (PyTorch's turns a fresh running_var into
    ``Identity(bn.weight)``, both being ones); the statistic must not stay tied to a parameter,
    so a shared or aliased statistic gets its own value.
    """
    value = node.inputs[index]
    what = "mean" if index == 3 else "variance"
    source = _constant_behind(value)
    if source is None:
        raise TrainGraphError(f"BatchNormalization node {node.name}: its running {what} "
                              f"{getattr(value, 'name', None)!r} is computed in the graph; "
                              f"training needs it to be an initializer")
    if value.is_initializer() and value.name == name:  # its own initializer: it becomes the state
        if as_state:
            graph.initializers.pop(name)
            initial[name] = np.array(value.const_value.numpy())
            value.const_value = None
            graph.inputs.append(value)
        return value
    array = np.array(source.const_value.numpy())
    if value.name == name:  # an Identity's output steps aside for the statistic it names
        value.name = names.unique(f"{name}_")
    names.taken.add(name)
    own = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(source.dtype))
    if as_state:
        graph.inputs.append(own)
        initial[name] = array
    else:
        own.const_value = ir.tensor(array, name=name)
        graph.register_initializer(own)
    node.replace_input_with(index, own)
    return own


def statistic_name(node: ir.Node, index: int) -> str:
    """The state name of BatchNorm ``node``'s statistic input ``index`` (3: mean, 4: variance).

    The name the node sees it by, unless that initializer is shared with other uses: then the
    node's name qualifies it.
    """
    value = node.inputs[index]
    if value.is_initializer() and len(value.uses()) > 1:
        return f"{node.name}.running_{'mean' if index == 3 else 'var'}"
    return value.name


def batchnorm_state(graph: ir.Graph) -> dict[str, np.ndarray]:
    """The running statistics a training step keeps as state, by state name, with their values.

    Statistics that are computed rather than constant are left out (the transform rejects them).
    """
    state = {}
    for node in graph:
        if node.op_type == "BatchNormalization":
            for index in (3, 4):
                source = _constant_behind(node.inputs[index])
                if source is not None:
                    state[statistic_name(node, index)] = np.array(source.const_value.numpy())
    return state


def _torch_momentum(onnx_momentum: float) -> float:
    """PyTorch's BatchNorm momentum from ONNX's (running = running * m + batch * (1 - m)).

    NOTE: the attribute is a float32; its shortest decimal (0.9, as the exporter wrote it) makes
    1 - m exactly the Python float PyTorch uses (0.1), so the update constants match bit for bit.
    """
    return 1.0 - float(str(np.float32(onnx_momentum)))


def _rewrite_batchnorm(graph: ir.Graph, b: Builder, names: _Names, freeze: bool,
                       initial: dict[str, np.ndarray]) -> list[tuple[ir.Value, ir.Value]]:
    """Feed each BatchNormalization the batch statistics; returns (statistic input, new value).

    The node stays an inference-form BatchNormalization (it has a gradient rule), as in
    ``og.nn.functional.batch_norm``; frozen, it keeps reading the constant running statistics.
    """
    stats: list[tuple[ir.Value, ir.Value]] = []
    nodes = [n for n in graph if n.op_type == "BatchNormalization"]
    for i, node in enumerate(nodes):
        if any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[1:]):
            raise TrainGraphError(f"BatchNormalization node {node.name}: its running-statistics "
                                  f"outputs are used; only inference-mode BatchNorm is supported")
        if attr(node, "training_mode", 0) or len(node.outputs) > 1:
            nodes[i] = _inference_form(graph, node)
    # Named before any is detached: detaching one changes how shared the others look.
    stat_names = [(statistic_name(n, 3), statistic_name(n, 4)) for n in nodes]
    for node, (mean_name, var_name) in zip(nodes, stat_names):
        x = node.inputs[0]
        xs = static_shape(x)
        if xs is None or len(xs) < 2:
            raise TrainGraphError(f"BatchNormalization node {node.name}: needs a static input "
                                  f"shape of rank >= 2 (got {xs}): {describe(node)}")
        mean = _detach_statistic(graph, node, 3, mean_name, names, not freeze, initial)
        var = _detach_statistic(graph, node, 4, var_name, names, not freeze, initial)
        if freeze:
            continue
        momentum = _torch_momentum(attr(node, "momentum", 0.9))
        batch_mean, batch_var, new_mean, new_var = _batch_statistics(b, node, x, xs, mean, var,
                                                                     momentum)
        # Appended at the graph's end, the statistics nodes are sorted into place by cleanup.
        node.replace_input_with(3, batch_mean)
        node.replace_input_with(4, batch_var)
        stats += [(mean, new_mean), (var, new_var)]
    return stats


def _inference_form(graph: ir.Graph, node: ir.Node) -> ir.Node:
    """A training-mode BatchNormalization (``torch.onnx.export(training=TRAINING)``) whose
    statistics outputs go unused, as the one-output inference-form node the rewrite feeds."""
    attributes = [a for name, a in node.attributes.items() if name != "training_mode"]
    new = ir.Node(node.domain, node.op_type, list(node.inputs), attributes, num_outputs=1,
                  name=node.name, metadata_props=dict(node.metadata_props))
    new.outputs[0].type = node.outputs[0].type
    graph.insert_before(node, new)
    _replace(graph, node, new.outputs)
    return new


def _batch_statistics(b: Builder, node: ir.Node, x: ir.Value, xs: tuple[int, ...],
                      mean: ir.Value, var: ir.Value, momentum: float):
    """``og.nn.functional.batch_norm``'s statistics nodes, in its order (the numbers agree)."""
    c = xs[1]
    axes = [0] + list(range(2, len(xs)))
    shape = [1, c] + [1] * (len(xs) - 2)

    def shaped(value: ir.Value, dims: Sequence[int]) -> ir.Value:
        value.shape = ir.Shape(list(dims))
        return value

    count = int(np.prod([xs[a] for a in axes]))
    if count <= 1:
        raise TrainGraphError(f"BatchNormalization node {node.name}: training needs more "
                              f"than 1 value per channel, got input shape {list(xs)}")
    batch_mean = shaped(b.op("ReduceMean", x, b.ints(axes), keepdims=1), shape)
    centered = shaped(b.op("Sub", x, batch_mean), xs)
    square = shaped(b.op("Mul", centered, centered), xs)
    batch_var = shaped(b.op("ReduceMean", square, b.ints(axes), keepdims=0), [c])
    flat_mean = shaped(b.op("Reshape", batch_mean, b.ints([c])), [c])
    # Running statistics as PyTorch keeps them: the unbiased variance, momentum 1 - ONNX's.
    b.origin = "bn-stats"
    keep, take = b.const_like(1 - momentum, x), b.const_like(momentum, x)
    new_mean = shaped(b.op("Add", shaped(b.op("Mul", mean, keep), [c]),
                           shaped(b.op("Mul", flat_mean, take), [c])), [c])
    unbiased_take = b.const_like(momentum * count / (count - 1), x)
    new_var = shaped(b.op("Add", shaped(b.op("Mul", var, keep), [c]),
                          shaped(b.op("Mul", batch_var, unbiased_take), [c])), [c])
    b.origin = "fwd"
    return flat_mean, batch_var, new_mean, new_var


# --------------------------------------------------------------------------- Dropout, MaxPool
def _replace(graph: ir.Graph, node: ir.Node, outputs: Sequence[ir.Value]) -> None:
    """Swap ``node`` for the node producing ``outputs`` (same order), keeping the value names."""
    for old, new in zip(node.outputs, outputs):
        if old is None:
            continue
        new.shape = old.shape if old.shape is not None else new.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    for old, new in zip(node.outputs, outputs):
        if old is not None and old.name:
            new.name = old.name


def _train_dropout(graph: ir.Graph, b: Builder) -> None:
    """Every Dropout in training mode, with the mask output its gradient rule reads."""
    for node in [n for n in graph if n.op_type == "Dropout"]:
        x = node.inputs[0]
        ratio = node.inputs[1] if len(node.inputs) > 1 else None
        seed = attr(node, "seed")
        out, mask = b.op("Dropout", x, ratio, b.const(np.asarray(True)), _outputs=2, seed=seed)
        out.shape, mask.shape, mask.dtype = x.shape, x.shape, ir.DataType.BOOL
        _replace(graph, node, [out, mask])


def _maxpool_indices(graph: ir.Graph, b: Builder, params: Sequence[ir.Value]) -> None:
    """Give single-output MaxPools (what torch.onnx.export emits) their Indices output.

    The MaxPool rule scatters the gradient to the Indices; with them in the forward graph the
    backward reads them instead of running a second MaxPool. Only pools a gradient flows
    through: ONNX Runtime's MaxPool is much slower with Indices than without.
    """
    active = {id(v) for v in params}
    for node in topological_nodes(list(graph.outputs)):
        if any(v is not None and id(v) in active for v in node.inputs):
            active.update(id(v) for v in node.outputs)
    for node in [n for n in graph if n.op_type == "MaxPool"]:
        if len(node.outputs) > 1 or attr(node, "storage_order", 0) != 0 \
                or id(node.inputs[0]) not in active:
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        out, indices = b.op("MaxPool", node.inputs[0], _outputs=2, **attrs)
        out.dtype = node.inputs[0].dtype
        indices.dtype = ir.DataType.INT64
        indices.shape = node.outputs[0].shape
        _replace(graph, node, [out])


# --------------------------------------------------------------------------- the loss
def _append_loss(graph: ir.Graph, loss: ir.Graph, prediction: ir.Value, labels: str,
                 names: _Names) -> tuple[ir.Value, ir.Value | None]:
    """Copy the loss graph's nodes after the model's; returns (loss value, labels input)."""
    if len(loss.inputs) not in (1, 2) or len(loss.outputs) != 1:
        raise TrainGraphError(f"a loss graph takes the prediction (and the labels) and gives one "
                              f"value; got {len(loss.inputs)} inputs, {len(loss.outputs)} outputs")
    result = loss.outputs[0]
    if result.shape is None or int(np.prod(list(result.shape))) != 1:
        raise TrainGraphError(f"the loss must be a scalar, got shape "
                              f"{None if result.shape is None else list(result.shape)}")
    if prediction.shape is not None and loss.inputs[0].shape is not None and \
            list(prediction.shape) != list(loss.inputs[0].shape):
        raise TrainGraphError(f"the loss was made for a prediction of shape "
                              f"{list(loss.inputs[0].shape)}, the model gives "
                              f"{list(prediction.shape)}")
    mapping: dict[int, ir.Value] = {id(loss.inputs[0]): prediction}
    labels_value = None
    if len(loss.inputs) == 2:
        src = loss.inputs[1]
        labels_value = ir.Value(name=labels, shape=src.shape, type=src.type)
        graph.inputs.append(labels_value)
        mapping[id(src)] = labels_value
    for init in loss.initializers.values():
        own = ir.Value(name=names.unique(f"loss.{init.name}"), shape=init.shape, type=init.type,
                       const_value=init.const_value)
        graph.register_initializer(own)
        mapping[id(init)] = own
    for node in loss:
        inputs = [None if v is None else mapping[id(v)] for v in node.inputs]
        outputs = [ir.Value(name=names.unique(f"loss.{v.name}"), shape=v.shape, type=v.type)
                   for v in node.outputs]
        copy = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()),
                       outputs=outputs, name=f"loss.{node.name}",
                       metadata_props=dict(node.metadata_props))
        graph.append(copy)
        mapping.update({id(src): v for src, v in zip(node.outputs, outputs)})
    return mapping[id(result)], labels_value


# --------------------------------------------------------------------------- the update
def sgd_updates(b: Builder, values: list[ir.Value], layout, flags, used) -> list[ir.Value]:
    """Every parameter's update, from a flat input list laid out as ``optim.SGD.step`` builds it.

    ``values``: per entry of ``layout`` (group index, has a buffer), the parameter, its gradient
    and the buffer if any; then per group in ``used``, its present hyperparameters in the order
    lr, momentum, dampening (holding 1 - dampening), weight_decay. Returns per entry the new
    parameter and the new buffer (when momentum is on), in the same order.
    """
    n_state = sum(3 if has_buf else 2 for _, has_buf in layout)
    hyper_values = iter(values[n_state:])
    hypers: dict[int, SGDHyper] = {}
    for gi in used:
        f = flags[gi]
        present = [True, f.momentum, f.momentum and f.dampening, f.weight_decay]
        lr, mom, damp, wd = (next(hyper_values) if on else None for on in present)
        hypers[gi] = SGDHyper(lr=lr, momentum=mom, dampening=damp, weight_decay=wd)
    outs: list[ir.Value] = []
    it = iter(values[:n_state])
    for gi, has_buf in layout:
        p, g = next(it), next(it)
        buf = next(it) if has_buf else None
        new_p, new_buf = sgd_update(b, p, g, buf, hypers[gi], flags[gi])
        outs.append(new_p)
        if new_buf is not None:
            outs.append(new_buf)
    return outs
