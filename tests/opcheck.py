"""A table-driven harness that checks one op case three ways (DESIGN.md, "Tests are tables").

A row of an op table is an :class:`OpCase`, made with :func:`case`::

    case("add/broadcast", lambda a, b: a + b, np.add, (2, 3), (3,))
    case("log", og.log, np.log, pos(2, 3))                      # inputs kept positive
    case("relu", og.relu, lambda x: np.maximum(x, 0), (2, 3), avoid=(0.0,))  # away from the kink
    case("gather", lambda x, i: x[i], lambda x, i: x[i], (4, 3), index([2, 0]))
    case("eq", lambda a, b: a == b, np.equal, fixed(A), fixed(B), grad=False)  # forward only

``fn`` takes onnxgrad tensors and ``ref`` takes NumPy arrays, one per input, and both return one
array-like or a sequence of them (``split``, ``max(dim)``). Inputs are specs: a shape tuple means
random float32 in [-2, 2]; :func:`arg`, :func:`pos`, :func:`fixed` and :func:`index` say more.
:func:`check_case` then runs

(a) **forward**: ``fn`` on float32 tensors against ``ref`` on the same arrays (values, shapes
    and dtypes);
(b) **VJP**: for each differentiable input ``x_j`` and random directions ``v`` (input) and ``u``
    (outputs), ``<v, J^T u>`` from ``backward(gradient=u)`` against the float64 central
    difference ``<u, (f(x + eps v) - f(x - eps v)) / (2 eps)>``;
(c) **runtimes**: the gradient graph that ``backward`` runs (``tracer.autograd.gradient_model``)
    and the recorded forward graph, on ONNX Runtime and on ``onnx.reference.ReferenceEvaluator``;
    each model also passes ``onnx.checker.check_model(full_check=True)`` and uses only ai.onnx.

Non-smooth ops need inputs away from their kinks: ``avoid=(points...)`` keeps every random float
input element at least ``margin`` from each point; ``distinct=True`` redraws all random float
elements as distinct, well-separated values (ties of max/min/maximum-like ops). A row whose inputs
sit on a tie on purpose (``fixed`` data) sets ``vjp=False``: there the gradient is a convention,
which the PyTorch parity tests pin down instead. Per-row tolerances (``rtol``/``atol`` forward,
``grad_rtol``/``grad_atol``/``eps`` VJP, ``rt_rtol``/``rt_atol`` runtimes) override the defaults.

A test module wires a table to pytest with :func:`table_tests`, one test per check, so a failure
names the row and the check (``test_vjp[log_softmax/dim0]``)::

    test_forward, test_vjp, test_runtimes, test_ids_are_unique = table_tests(CASES)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator
from onnxgrad.runtime import IR_VERSION, OPSET, make_session
from onnxgrad.tracer.autograd import backward, gradient_model
from onnxgrad.tracer.graph import CONST, DATA, Walk

import onnxgrad as og

AI_ONNX = ("", "ai.onnx")


# --------------------------------------------------------------------------- ONNX validity
def check_onnx_model(model: onnx.ModelProto) -> None:
    """Raise unless ``model`` is valid standard ONNX: the full checker and the ai.onnx domain only.

    DESIGN decision 1: no custom domain and no com.microsoft op, so the graphs run on any runtime.
    """
    onnx.checker.check_model(model, full_check=True)
    imports = {o.domain: o.version for o in model.opset_import}
    assert set(imports) <= set(AI_ONNX), f"opset imports outside ai.onnx: {imports}"
    assert all(v == OPSET for v in imports.values()), f"opset {imports} is not the pinned {OPSET}"
    bad = [f"{n.op_type}@{n.domain}" for n in _all_nodes(model.graph) if n.domain not in AI_ONNX]
    assert not bad, f"nodes outside the ai.onnx domain: {bad}"
    assert not model.functions, "model-local functions are not plain ai.onnx"


def _all_nodes(graph: onnx.GraphProto):
    """Every node, including those of subgraphs (If/Loop/Scan bodies)."""
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            yield node
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                stack.extend(a.graphs)


# --------------------------------------------------------------------------- input specs
@dataclasses.dataclass(frozen=True)
class Input:
    """How to make one input of a case: random in ``[low, high)`` of ``shape``, or ``value``."""

    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    low: float = -2.0
    high: float = 2.0
    value: np.ndarray | None = None
    grad: bool | None = None  # None: differentiate exactly the floating-point inputs

    @property
    def differentiable(self) -> bool:
        if self.grad is not None:
            return self.grad
        return np.dtype(self.dtype).kind == "f"

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        if self.value is not None:
            return np.array(self.value, dtype=self.dtype, copy=True)
        if np.dtype(self.dtype).kind == "f":
            return rng.uniform(self.low, self.high, self.shape).astype(self.dtype)
        if np.dtype(self.dtype) == np.bool_:
            return rng.random(self.shape) < 0.5
        return rng.integers(int(self.low), int(self.high), self.shape).astype(self.dtype)


def arg(*shape: int, low: float = -2.0, high: float = 2.0, dtype: str = "float32",
        grad: bool | None = None) -> Input:
    """A random input of ``shape``; float inputs are differentiated unless ``grad=False``."""
    return Input(tuple(shape), dtype, low, high, grad=grad)


def pos(*shape: int, low: float = 0.5, high: float = 2.0) -> Input:
    """A random positive float input (domains of log, sqrt, a real power, a divisor)."""
    return Input(tuple(shape), "float32", low, high)


def fixed(value: Any, dtype: str | None = None, grad: bool | None = None) -> Input:
    """Exactly ``value`` (ties, masks, bools); its dtype defaults to NumPy's, floats to float32."""
    array = np.asarray(value)
    if dtype is None:
        dtype = "float32" if array.dtype.kind == "f" else str(array.dtype)
    return Input(array.shape, dtype, value=array.astype(dtype), grad=grad)


def index(value: Any) -> Input:
    """An int64 index input, never differentiated."""
    return fixed(np.asarray(value, dtype=np.int64), "int64", grad=False)


def _spec(x: Input | tuple[int, ...] | np.ndarray) -> Input:
    if isinstance(x, Input):
        return x
    if isinstance(x, np.ndarray):
        return fixed(x)
    return arg(*x)


# --------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class OpCase:
    """One row of an op table; see the module docstring."""

    id: str
    fn: Callable[..., Any]
    ref: Callable[..., Any]
    inputs: tuple[Input, ...]
    grad: bool = True           # False: forward only (comparisons, integer results)
    vjp: bool = True            # False: at ties/kinks the gradient is a convention, not a limit
    check_dtype: bool = True    # compare result dtypes with the reference's
    rtol: float = 1e-5          # forward tolerances (float32 against NumPy)
    atol: float = 1e-6
    grad_rtol: float = 1e-6     # VJP tolerances, relative to sum |v * J^T u| (float64)
    grad_atol: float = 1e-9
    eps: float = 1e-6           # central-difference step (float64)
    rt_rtol: float = 1e-4       # ONNX Runtime against ReferenceEvaluator (float32)
    rt_atol: float = 1e-5
    avoid: tuple[float, ...] = ()
    distinct: bool = False
    margin: float = 0.05
    seed: int = 0
    grad_xfail: str = ""        # a known bug in the gradient (strict xfail of vjp and runtimes)

    def __str__(self) -> str:
        return self.id


def case(id: str, fn: Callable[..., Any], ref: Callable[..., Any],
         *inputs: Input | tuple[int, ...] | np.ndarray, **options: Any) -> OpCase:
    """A table row: ``id``, onnxgrad ``fn``, NumPy ``ref``, input specs, then OpCase options."""
    return OpCase(id, fn, ref, tuple(_spec(x) for x in inputs), **options)


def make_inputs(c: OpCase) -> list[np.ndarray]:
    """The case's input arrays: seeded, so every check and every run sees the same data."""
    rng = np.random.default_rng(c.seed)
    arrays = [spec.sample(rng) for spec in c.inputs]
    randoms = [i for i, s in enumerate(c.inputs) if s.value is None and arrays[i].dtype.kind == "f"]
    if c.distinct:
        _spread(c, arrays, randoms, rng)
    elif c.avoid:
        for i in randoms:
            arrays[i] = _push_away(arrays[i], c.avoid, c.margin).astype(arrays[i].dtype)
    return arrays


def _push_away(x: np.ndarray, points: Sequence[float], margin: float) -> np.ndarray:
    x = x.astype(np.float64)
    for p in points:
        near = np.abs(x - p) < margin
        # Reflect into the band just outside the margin, keeping the side of the kink.
        x = np.where(near, p + np.where(x >= p, 1.0, -1.0) * (margin + np.abs(x - p)), x)
    return x


def _spread(c: OpCase, arrays: list[np.ndarray], which: list[int], rng: np.random.Generator
            ) -> None:
    """Redraw the random float inputs as distinct grid points (jittered), away from ``avoid``."""
    sizes = [arrays[i].size for i in which]
    total = sum(sizes)
    if not total:
        return
    low = min(c.inputs[i].low for i in which)
    high = max(c.inputs[i].high for i in which)
    grid = np.linspace(low, high, 4 * total + 1)
    for p in c.avoid:
        grid = grid[np.abs(grid - p) >= c.margin + (high - low) / (4 * total)]
    if grid.size < total:
        raise ValueError(f"{c.id}: range too small for {total} distinct values")
    step = (high - low) / (4 * total)
    values = rng.permutation(grid)[:total] + rng.uniform(-0.25, 0.25, total) * step
    start = 0
    for i, n in zip(which, sizes):
        arrays[i] = values[start:start + n].reshape(arrays[i].shape).astype(arrays[i].dtype)
        start += n


# --------------------------------------------------------------------------- helpers
def _outputs(result: Any) -> list[Any]:
    """A result as a list: a tensor/array, or a sequence of them (split, max(dim))."""
    if isinstance(result, (list, tuple)):
        return list(result)
    return [result]


def _tensors(c: OpCase, arrays: Sequence[np.ndarray], float_dtype: Any = None,
             grad: bool = True) -> list[og.Tensor]:
    out = []
    for spec, a in zip(c.inputs, arrays):
        dtype = float_dtype if float_dtype is not None and a.dtype.kind == "f" else a.dtype
        out.append(og.tensor(a, dtype=dtype, requires_grad=grad and spec.differentiable))
    return out


def _data(t: og.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _differentiable_outputs(outs: Sequence[og.Tensor]) -> list[int]:
    return [k for k, o in enumerate(outs) if isinstance(o, og.Tensor) and o.requires_grad]


# --------------------------------------------------------------------------- (a) forward
def check_forward(c: OpCase) -> None:
    arrays = make_inputs(c)
    got = _outputs(c.fn(*_tensors(c, arrays, grad=False)))
    want = _outputs(c.ref(*[a.copy() for a in arrays]))
    assert len(got) == len(want), f"{c.id}: {len(got)} outputs, reference has {len(want)}"
    for k, (g, w) in enumerate(zip(got, want)):
        assert isinstance(g, og.Tensor), f"{c.id}: output {k} is a {type(g).__name__}"
        g, w = _data(g), np.asarray(w)
        assert g.shape == w.shape, f"{c.id}: output {k} shape {g.shape}, reference {w.shape}"
        if c.check_dtype:
            assert g.dtype == w.dtype, f"{c.id}: output {k} dtype {g.dtype}, reference {w.dtype}"
        if w.dtype.kind in "fc":
            np.testing.assert_allclose(g, w, rtol=c.rtol, atol=c.atol, err_msg=f"{c.id}[{k}]")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"{c.id}[{k}]")


# --------------------------------------------------------------------------- (b) VJP
def check_vjp(c: OpCase) -> None:
    """``<v, J^T u>`` (backward, float64) against central differences, one input at a time."""
    arrays = make_inputs(c)
    x64 = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays]
    rng = np.random.default_rng(c.seed + 1)
    leaves = _tensors(c, x64)
    outs = _outputs(c.fn(*leaves))
    live = _differentiable_outputs(outs)
    assert live, f"{c.id}: no output requires grad, so there is nothing to differentiate"
    for k in live:
        assert outs[k].dtype == np.float64, f"{c.id}: float64 inputs gave a {outs[k].dtype} output"
    seeds = [rng.standard_normal(outs[k].shape) for k in live]
    backward([outs[k] for k in live], [og.tensor(u, dtype=og.float64) for u in seeds])

    def directional(shifted: list[np.ndarray]) -> float:
        with og.no_grad():
            values = _outputs(c.fn(*_tensors(c, shifted, grad=False)))
        return sum(float(np.sum(_data(values[k]) * u)) for k, u in zip(live, seeds))

    for j, spec in enumerate(c.inputs):
        if not spec.differentiable:
            continue
        leaf = leaves[j]
        g = np.zeros_like(x64[j]) if leaf.grad is None else _data(leaf.grad)
        assert g.shape == x64[j].shape, f"{c.id}: grad of input {j} has shape {g.shape}"
        assert g.dtype == np.float64, f"{c.id}: grad of input {j} has dtype {g.dtype}"
        v = rng.standard_normal(x64[j].shape)
        analytic = float(np.sum(v * g))
        plus, minus = list(x64), list(x64)
        plus[j], minus[j] = x64[j] + c.eps * v, x64[j] - c.eps * v
        numeric = (directional(plus) - directional(minus)) / (2 * c.eps)
        scale = float(np.sum(np.abs(v * g))) + abs(numeric)
        assert abs(analytic - numeric) <= c.grad_atol + c.grad_rtol * scale, (
            f"{c.id}: input {j}: <v, J^T u> = {analytic!r} but central difference = {numeric!r}"
        )


# --------------------------------------------------------------------------- (c) runtimes
def forward_model(outputs: Sequence[og.Tensor]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The recorded forward graph behind ``outputs`` as a model whose leaves are inputs."""
    walk = Walk([t._v for t in outputs], lambda v: v.rec is not None,
                lambda v: CONST if v.const else DATA)
    leaves, nodes, roots = walk.materialize()
    graph = ir.Graph([v for v, kind in zip(leaves, walk.kinds) if kind != CONST], roots,
                     nodes=nodes, opset_imports={"": OPSET}, name="forward")
    for v, kind in zip(leaves, walk.kinds):
        if kind == CONST:
            graph.register_initializer(v)
    for k, root in enumerate(roots):
        # A root that is a leaf (an op returned its input) cannot be both input and output.
        if root.producer() is None:
            raise ValueError(f"output {k} was not computed by a recorded node")
    model = ir.serde.serialize_model(ir.Model(graph, ir_version=IR_VERSION, producer_name="opcheck"))
    feeds = {v.name: walk.data_of(v.name) for v in graph.inputs}
    return model, feeds


def _run_both(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: Sequence[str]
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    check_onnx_model(model)
    ort_out = make_session(model).run(list(names), feeds)
    ref_out = ReferenceEvaluator(model).run(list(names), feeds)
    return ort_out, ref_out


def check_runtimes(c: OpCase) -> None:
    """ORT against the reference evaluator, on the forward and on the gradient graph (float32)."""
    arrays = make_inputs(c)
    rng = np.random.default_rng(c.seed + 2)
    leaves = _tensors(c, arrays)
    outs = _outputs(c.fn(*leaves))
    live = _differentiable_outputs(outs)
    assert live, f"{c.id}: no output requires grad"
    tensors = [outs[k] for k in live]
    seeds = [og.tensor(rng.standard_normal(t.shape), dtype=t.dtype) for t in tensors]

    fwd, fwd_feeds = forward_model(tensors)
    names = [o.name for o in fwd.graph.output]
    ort_out, ref_out = _run_both(fwd, fwd_feeds, names)
    for k, (t, a, b) in enumerate(zip(tensors, ort_out, ref_out)):
        np.testing.assert_allclose(a, _data(t), rtol=c.rt_rtol, atol=c.rt_atol,
                                   err_msg=f"{c.id}: forward output {k}, ORT vs eager")
        np.testing.assert_allclose(a, b, rtol=c.rt_rtol, atol=c.rt_atol,
                                   err_msg=f"{c.id}: forward output {k}, ORT vs reference")

    gm = gradient_model(tensors, seeds)
    ort_out, ref_out = _run_both(gm.model, gm.feeds, gm.outputs)
    backward(tensors, seeds)
    for name, leaf, a, b in zip(gm.outputs, gm.wrt, ort_out, ref_out):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype, f"{c.id}: {name} {a.shape}"
        np.testing.assert_allclose(a, b, rtol=c.rt_rtol, atol=c.rt_atol,
                                   err_msg=f"{c.id}: gradient {name}, ORT vs reference")
        # The exported gradient model is exactly what backward ran.
        np.testing.assert_allclose(_data(leaf.grad), a, rtol=0, atol=0,
                                   err_msg=f"{c.id}: gradient {name}, backward vs model")


CHECKS: dict[str, Callable[[OpCase], None]] = {
    "forward": check_forward,
    "vjp": check_vjp,
    "runtimes": check_runtimes,
}


def params(cases: Sequence[OpCase], check: str) -> list[Any]:
    """``pytest.param``s for the cases that ``check`` applies to, readable ids, known bugs xfailed.

    The xfail is strict, so the row fails loudly once the bug is fixed and the mark can go.
    """
    import pytest

    out = []
    for c in cases:
        if (check != "forward" and not c.grad) or (check == "vjp" and not c.vjp):
            continue
        marks = []
        if check != "forward" and c.grad_xfail:
            marks.append(pytest.mark.xfail(reason=c.grad_xfail, strict=True))
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def table_tests(cases: Sequence[OpCase]) -> tuple[Callable[..., None], ...]:
    """The pytest functions of an op table: forward, vjp and runtimes per row, and unique ids."""
    import pytest

    def make(check: str) -> Callable[[OpCase], None]:
        @pytest.mark.parametrize("c", params(cases, check))
        def test(c: OpCase) -> None:
            check_case(c, [check])

        test.__name__ = f"test_{check}"
        return test

    def test_ids_are_unique() -> None:
        ids = [c.id for c in cases]
        assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})

    return make("forward"), make("vjp"), make("runtimes"), test_ids_are_unique


def check_case(c: OpCase, checks: Sequence[str] = ("forward", "vjp", "runtimes")) -> None:
    """Run the named checks (all three by default; forward only for ``grad=False`` rows)."""
    for name in checks:
        if (name != "forward" and not c.grad) or (name == "vjp" and not c.vjp):
            continue
        CHECKS[name](c)


# --------------------------------------------------------------------------- one node's rule
def check_node_rule(op_type: str, attrs: dict[str, Any], args: dict[str, np.ndarray],
                    forward: Callable[..., np.ndarray], rng: np.random.Generator) -> None:
    """The rule of an ONNX node onnxgrad's own ops never emit (an imported node): its float64
    gradient graph, on ONNX Runtime and on the reference evaluator, against central differences
    of ``forward`` (NumPy, taking ``args`` in order) for every input."""
    from onnxgrad.passes import gradient_graph

    def value(name: str, shape: tuple[int, ...]) -> ir.Value:
        return ir.Value(name=name, shape=ir.Shape(list(shape)),
                        type=ir.TensorType(ir.DataType.DOUBLE))

    arrays = list(args.values())
    y = forward(*arrays)
    u = rng.standard_normal(y.shape)
    inputs = [value(name, a.shape) for name, a in args.items()]
    out = value("y", y.shape)
    ir.Node("", op_type, inputs, ir.convenience.convert_attributes(attrs), outputs=[out])
    graph, kept = gradient_graph([out], [value("seed", u.shape)], inputs, opset=OPSET)
    assert kept == list(range(len(arrays)))
    model = ir.serde.serialize_model(ir.Model(graph, ir_version=IR_VERSION))
    check_onnx_model(model)
    known = {**args, "y": y, "seed": u}
    feeds = {v.name: known[v.name] for v in graph.inputs}
    names = [v.name for v in graph.outputs]
    got = make_session(model).run(names, feeds)
    ref = ReferenceEvaluator(model).run(names, feeds)
    for j, (g, r) in enumerate(zip(got, ref)):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
        v = rng.standard_normal(arrays[j].shape)
        plus, minus = list(arrays), list(arrays)
        plus[j], minus[j] = arrays[j] + 1e-6 * v, arrays[j] - 1e-6 * v
        numeric = float(np.sum(u * (forward(*plus) - forward(*minus)))) / 2e-6
        analytic = float(np.sum(v * g))
        assert abs(analytic - numeric) <= 1e-7 * (np.sum(np.abs(v * g)) + abs(numeric)), j
