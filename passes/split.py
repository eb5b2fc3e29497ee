"""Split one training-step model in two at given inputs: what does not depend on them, then the rest.

A data-parallel step is traced as one graph in which the gradients leave as packed bucket outputs
and come back, averaged across processes, as inputs (ONNX has no collective op). This pass cuts
that graph where the averaged buckets enter: model A (forward, gradients, BatchNorm statistics,
the packed buckets) is every node that does not depend on a cut input, model B (unpacking, the
optimizer update, ...) every node that does. A value A computes and B reads becomes an output of
A and an input of B of the same name, and each cut input is renamed after the output it averages,
so that a caller feeds B with what A returned once the buckets are reduced.

Pure ``ModelProto -> (ModelProto, ModelProto)``; knows nothing of tensors or collectives.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

__all__ = ["SplitError", "split_model"]


class SplitError(ValueError):
    """The graph cannot be cut there (a packed bucket depends on an averaged one)."""


def _node_reads(node: onnx.NodeProto) -> list[str]:
    """Every value a node reads, including those its subgraphs (If, Loop, Scan) read from outside."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            local = {i.name for i in g.input} | {i.name for i in g.initializer}
            for sub in g.node:
                local.update(sub.output)
                names += [n for n in _node_reads(sub) if n not in local]
    return names


def split_model(model: onnx.ModelProto, cuts: Mapping[str, str],
                names: Sequence[str] = ("gradients", "update")
                ) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    """``cuts`` maps each cut input (an averaged bucket) to the output it averages (the packed
    bucket). Returns model A, model B and the values passed from A to B (the buckets first)."""
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    for cut_in, packed in cuts.items():
        if cut_in not in inputs:
            raise SplitError(f"split: {cut_in!r} is not an input of the step")
    tainted = set(cuts)
    for node in graph.node:  # topologically sorted
        if any(n in tainted for n in _node_reads(node)):
            tainted.update(n for n in node.output if n)
    for packed in cuts.values():
        if packed in tainted:
            raise SplitError(f"split: the packed bucket {packed!r} depends on an averaged bucket")
    # A holds what its own outputs need; a node that only feeds B (an optimizer's product of a
    # hyperparameter and its state, which does not depend on the gradients) stays with B, so
    # each model reads the state it updates.
    producer = {n: i for i, node in enumerate(graph.node) for n in node.output if n}
    needed: set[int] = set()
    stack = [producer[o.name] for o in graph.output
             if o.name not in tainted and o.name in producer]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(producer[n] for n in _node_reads(graph.node[i]) if n in producer)
    a_nodes = [node for i, node in enumerate(graph.node) if i in needed]
    b_nodes = [node for i, node in enumerate(graph.node) if i not in needed]

    made_by_a = {n for node in a_nodes for n in node.output if n}
    b_reads = {n for node in b_nodes for n in _node_reads(node)}
    a_reads = {n for node in a_nodes for n in _node_reads(node)}
    outputs = list(graph.output)
    b_outputs = [o for o in outputs if o.name in tainted]
    a_outputs = [o for o in outputs if o.name not in tainted]
    a_output_names = {o.name for o in a_outputs}
    # Values A makes that B needs: through the graph's outputs of A when they are, else new outputs.
    cross = [n for n in dict.fromkeys(n for node in b_nodes for n in _node_reads(node))
             if n in made_by_a]
    renamed = {cut_in: packed for cut_in, packed in cuts.items()}
    types = _value_types(model)
    for name in cross:
        if name not in a_output_names:
            a_outputs.append(types[name])
            a_output_names.add(name)
    initializers = {t.name: t for t in graph.initializer}
    inputs_of_a = [i for i in graph.input if i.name in a_reads or i.name in a_output_names]
    inputs_of_b = [i for i in graph.input if (i.name in b_reads or
                                              i.name in {o.name for o in b_outputs})
                   and i.name not in cuts]
    cut_inputs = []
    for cut_in in cuts:
        value = onnx.ValueInfoProto()
        value.CopyFrom(inputs[cut_in])
        value.name = renamed[cut_in]
        cut_inputs.append(value)
    cross_inputs = [types[n] for n in cross]
    b_graph_nodes = []
    for node in b_nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        _rename_inputs(copy, renamed)
        b_graph_nodes.append(copy)

    def make(nodes: list[onnx.NodeProto], ins: list[onnx.ValueInfoProto],
             outs: list[onnx.ValueInfoProto], reads: set[str], name: str) -> onnx.ModelProto:
        known = {i.name for i in ins} | {n for node in nodes for n in node.output}
        g = onnx.helper.make_graph(
            nodes, name, ins, outs,
            initializer=[t for n, t in initializers.items() if n in reads and n not in known],
            value_info=[v for v in graph.value_info
                        if v.name in known and v.name not in {o.name for o in outs}])
        out = onnx.helper.make_model(g, opset_imports=list(model.opset_import),
                                     ir_version=model.ir_version,
                                     producer_name=model.producer_name)
        for prop in model.metadata_props:
            out.metadata_props.add(key=prop.key, value=prop.value)
        return out

    model_a = make(a_nodes, inputs_of_a, a_outputs, a_reads | {o.name for o in a_outputs},
                   f"{graph.name}.{names[0]}")
    b_reads_renamed = {renamed.get(n, n) for n in b_reads} | {o.name for o in b_outputs}
    model_b = make(b_graph_nodes, cut_inputs + cross_inputs + inputs_of_b, b_outputs,
                   b_reads_renamed, f"{graph.name}.{names[1]}")
    return model_a, model_b, list(cuts.values()) + cross


def _rename_inputs(node: onnx.NodeProto, renamed: Mapping[str, str]) -> None:
    for i, n in enumerate(node.input):
        if n in renamed:
            node.input[i] = renamed[n]
    for attr in node.attribute:
        for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            for sub in g.node:
                _rename_inputs(sub, renamed)


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Type and shape of every value (inputs, outputs, intermediates), by shape inference when
    the model does not say."""
    graph = model.graph
    found = {v.name: v for v in [*graph.input, *graph.output, *graph.value_info]
             if v.type.tensor_type.HasField("shape")}
    produced = {n for node in graph.node for n in node.output if n}
    if not produced <= set(found):
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        found.update({v.name: v for v in inferred.graph.value_info if v.name not in found
                      and v.type.tensor_type.HasField("shape")})
    return found
