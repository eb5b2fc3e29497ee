"""Convolution and pooling: the op table of ``tracer/nnops.py`` and the rules in ``passes/rules/nn.py``.

Every row is checked as DESIGN.md asks, through ``opcheck``: forward against a NumPy reference,
VJP against float64 central differences, ONNX Runtime against the reference evaluator. Two checks
are added here because ONNX Runtime's CPU provider has no float64 ``Conv``, ``ConvTranspose``,
``AveragePool`` or ``GlobalAveragePool`` kernel, so opcheck's float64 ``check_vjp`` cannot run
these ops:

- :func:`check_vjp_f32`: the VJP that ``backward`` computes in float32 against float64 central
  differences of the NumPy reference (tolerance for float32 rounding);
- :func:`check_gradient_exact`: the very gradient graph ``backward`` runs, promoted to float64
  and run on ``onnx.reference.ReferenceEvaluator``, against the same central differences to
  1e-7, which pins the rules down exactly (not just to float32 noise). It also compares that
  graph on ONNX Runtime and on the reference evaluator in float32 (with ``check_model``).

Both take an ``OpCase`` and only use opcheck's public pieces, so they can move into opcheck.
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnxgrad.passes import gradient_graph
from onnxgrad.passes.rules import nn as rules
from onnxgrad.runtime import IR_VERSION, OPSET, make_session, run_node
from onnxgrad.runtime import session as ort_session
from onnxgrad.tracer import nnops
from onnxgrad.tracer.autograd import backward, gradient_model
from onnxgrad.tracer.tensor import attrs_key
from opcheck import (
    OpCase,
    arg,
    case,
    check_forward,
    check_onnx_model,
    check_runtimes,
    check_vjp,
    make_inputs,
)

import onnxgrad as og

F = nnops


# =========================================================================== NumPy references
def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (v[0], v[-1])


def np_conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride: Any = 1,
              padding: Any = 0, dilation: Any = 1, groups: int = 1) -> np.ndarray:
    """Direct convolution: one einsum per kernel tap and group. ``padding`` may also be a
    4-tuple (top, left, bottom, right), "same" or "valid"."""
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    o, cg, kh, kw = w.shape
    if padding == "valid":
        pads = (0, 0, 0, 0)
    elif padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (th // 2, tw // 2, th - th // 2, tw - tw // 2)
    elif isinstance(padding, tuple) and len(padding) == 4:
        pads = padding
    else:
        ph, pw = _pair(padding)
        pads = (ph, pw, ph, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, _, hp, wp = xp.shape
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    og_ = o // groups
    out = np.zeros((n, o, ho, wo), dtype=np.result_type(x, w))
    for g in range(groups):
        xs, ws = xp[:, g * cg:(g + 1) * cg], w[g * og_:(g + 1) * og_]
        for i, j in itertools.product(range(kh), range(kw)):
            patch = xs[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh,
                       j * dw:j * dw + sw * (wo - 1) + 1:sw]
            out[:, g * og_:(g + 1) * og_] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    if b is not None:
        out += b[None, :, None, None]
    return out[0] if unbatched else out


def _pool_out(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size, written out independently of nnops."""
    span = d * (k - 1) + 1
    out = (size + 2 * p - span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _grid(x: np.ndarray, kernel, stride, padding, dilation, ceil_mode) -> tuple[int, int]:
    (kh, kw), (sh, sw) = _pair(kernel), _pair(stride if stride is not None else kernel)
    (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
    h, w = x.shape[2:]
    return _pool_out(h, kh, sh, ph, dh, ceil_mode), _pool_out(w, kw, sw, pw, dw, ceil_mode)


def _windows(x: np.ndarray, kernel, stride, padding, dilation, out: tuple[int, int],
             fill: float) -> np.ndarray:
    """[N, C, Ho, Wo, kh*kw] contents of the ``out`` grid of windows, ``fill`` outside ``x``."""
    (kh, kw), (sh, sw) = _pair(kernel), _pair(stride if stride is not None else kernel)
    (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
    (h, w), (ho, wo) = x.shape[2:], out
    # Enough end padding for the last (possibly ceil-mode) window.
    eh = max((ho - 1) * sh + dh * (kh - 1) + 1 - h - ph, 0)
    ew = max((wo - 1) * sw + dw * (kw - 1) + 1 - w - pw, 0)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, eh), (pw, ew)), constant_values=fill)
    taps = [xp[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
            for i, j in itertools.product(range(kh), range(kw))]
    return np.stack(taps, axis=-1)


def _unbatch(fn: Callable) -> Callable:
    def wrapped(x, *args, **kwargs):
        if x.ndim == 3:
            out = fn(x[None], *args, **kwargs)
            return tuple(o[0] for o in out) if isinstance(out, tuple) else out[0]
        return fn(x, *args, **kwargs)
    return wrapped


@_unbatch
def np_max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                  return_indices=False):
    out = _grid(x, kernel_size, stride, padding, dilation, ceil_mode)
    win = _windows(x, kernel_size, stride, padding, dilation, out, -np.inf)
    y = win.max(axis=-1)
    if not return_indices:
        return y
    # PyTorch's indices: the first maximum in window order, flat within the H*W plane.
    plane = np.arange(x.shape[2] * x.shape[3], dtype=np.float64).reshape(1, 1, *x.shape[2:])
    pos = _windows(plane, kernel_size, stride, padding, dilation, out, -1)
    first = np.take_along_axis(np.broadcast_to(pos, win.shape), win.argmax(axis=-1)[..., None],
                               axis=-1)[..., 0]
    return y, first.astype(np.int64)


@_unbatch
def np_avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False,
                  count_include_pad=True):
    out = _grid(x, kernel_size, stride, padding, 1, ceil_mode)
    sums = _windows(x, kernel_size, stride, padding, 1, out, 0.0).sum(axis=-1)
    # Divisors: taps inside the input, plus those in the padding when counted; never the taps
    # that ceil mode lets run past the end padding (the grid below pads those with 0).
    (ph, pw), (h, w) = _pair(padding), x.shape[2:]
    counted = np.pad(np.ones((1, 1, h, w)), ((0, 0), (0, 0), (ph, ph), (pw, pw)),
                     constant_values=float(count_include_pad))
    counts = _windows(counted, kernel_size, stride, 0, 1, out, 0.0).sum(axis=-1)
    return (sums / counts).astype(x.dtype)


@_unbatch
def np_adaptive_avg_pool2d(x, output_size):
    oh, ow = (output_size, output_size) if not isinstance(output_size, tuple) else output_size
    h, w = x.shape[2:]
    oh, ow = oh or h, ow or w
    out = np.zeros(x.shape[:2] + (oh, ow), dtype=x.dtype)
    for i, j in itertools.product(range(oh), range(ow)):
        hs, he = (i * h) // oh, -(-((i + 1) * h) // oh)
        ws, we = (j * w) // ow, -(-((j + 1) * w) // ow)
        out[:, :, i, j] = x[:, :, hs:he, ws:we].mean(axis=(2, 3))
    return out


def np_max_pool2d_grad(x, u, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """PyTorch's max-pool gradient: each window's upstream gradient goes to its first maximum
    (window order), accumulated where windows overlap."""
    _, idx = np_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode,
                           return_indices=True)
    n, c, h, w = x.shape
    grad = np.zeros((n * c, h * w))
    flat_idx, flat_u = idx.reshape(n * c, -1), u.reshape(n * c, -1)
    for p in range(n * c):
        np.add.at(grad[p], flat_idx[p], flat_u[p])
    return grad.reshape(x.shape)


# =========================================================================== the extra checks
def _outputs(result: Any) -> list:
    return list(result) if isinstance(result, (list, tuple)) else [result]


def _leaves(c: OpCase, arrays: Sequence[np.ndarray]) -> list[og.Tensor]:
    return [og.tensor(a, requires_grad=s.differentiable) for s, a in zip(c.inputs, arrays)]


def _central_differences(c: OpCase, x64: list[np.ndarray], live: list[int],
                         seeds: list[np.ndarray], j: int, v: np.ndarray, eps: float) -> float:
    """<u, (ref(x + eps v) - ref(x - eps v)) / 2 eps> along input ``j``, in float64."""
    def directional(shifted):
        outs = _outputs(c.ref(*shifted))
        return sum(float(np.sum(np.asarray(outs[k], np.float64) * u)) for k, u in zip(live, seeds))
    plus, minus = list(x64), list(x64)
    plus[j], minus[j] = x64[j] + eps * v, x64[j] - eps * v
    return (directional(plus) - directional(minus)) / (2 * eps)


def _setup(c: OpCase, seed_offset: int):
    arrays = make_inputs(c)
    x64 = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays]
    leaves = _leaves(c, arrays)
    outs = _outputs(c.fn(*leaves))
    live = [k for k, o in enumerate(outs) if isinstance(o, og.Tensor) and o.requires_grad]
    assert live, f"{c.id}: no output requires grad"
    rng = np.random.default_rng(c.seed + seed_offset)
    # float32-representable seeds, so the float64 graph sees exactly what float32 code sees.
    seeds = [rng.standard_normal(outs[k].shape).astype(np.float32) for k in live]
    return arrays, x64, leaves, [outs[k] for k in live], live, seeds, rng


def check_vjp_f32(c: OpCase, rtol: float = 1e-4) -> None:
    """``backward`` in float32 against float64 central differences of ``c.ref``."""
    _, x64, leaves, tensors, live, seeds, rng = _setup(c, 11)
    backward(tensors, [og.tensor(u) for u in seeds])
    for j, spec in enumerate(c.inputs):
        if not spec.differentiable:
            continue
        g = leaves[j].grad
        assert g is not None and g.shape == x64[j].shape, f"{c.id}: no gradient for input {j}"
        g = g.numpy().astype(np.float64)
        v = rng.standard_normal(x64[j].shape)
        analytic = float(np.sum(v * g))
        numeric = _central_differences(c, x64, live, [u.astype(np.float64) for u in seeds], j,
                                       v, 1e-6)
        scale = float(np.sum(np.abs(v * g))) + abs(numeric)
        assert abs(analytic - numeric) <= 1e-6 + rtol * scale, (
            f"{c.id}: input {j}: float32 <v, J^T u> = {analytic!r}, central difference {numeric!r}")


def promote_to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float64: float32 types, constants and casts become float64."""
    model = copy.deepcopy(model)
    graph = model.graph
    f32, f64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
    for vi in itertools.chain(graph.input, graph.output, graph.value_info):
        if vi.type.tensor_type.elem_type == f32:
            vi.type.tensor_type.elem_type = f64

    def promoted(t: onnx.TensorProto) -> onnx.TensorProto:
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name)

    for init in graph.initializer:
        if init.data_type == f32:
            init.CopyFrom(promoted(init))
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == f32:
                a.t.CopyFrom(promoted(a.t))
            if node.op_type == "Cast" and a.name == "to" and a.i == f32:
                a.i = f64
    return model


def check_gradient_exact(c: OpCase, rtol: float = 1e-7) -> None:
    """The gradient graph of ``backward``: ORT against the reference evaluator (float32, after
    check_model), then promoted to float64 on the reference evaluator against central
    differences of ``c.ref``."""
    _, x64, leaves, tensors, live, seeds, rng = _setup(c, 12)
    gm = gradient_model(tensors, [og.tensor(u) for u in seeds])
    check_onnx_model(gm.model)
    ort_out = make_session(gm.model).run(gm.outputs, gm.feeds)
    ref_out = ReferenceEvaluator(gm.model).run(gm.outputs, gm.feeds)
    for name, a, b in zip(gm.outputs, ort_out, ref_out):
        np.testing.assert_allclose(a, b, rtol=c.rt_rtol, atol=c.rt_atol,
                                   err_msg=f"{c.id}: gradient {name}, ORT vs reference")
    feeds64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v)
               for k, v in gm.feeds.items()}
    exact = ReferenceEvaluator(promote_to_float64(gm.model)).run(gm.outputs, feeds64)
    position = {id(t): j for j, t in enumerate(leaves)}
    seen = set()
    for leaf, g in zip(gm.wrt, exact):
        j = position[id(leaf)]
        seen.add(j)
        assert g.dtype == np.float64 and g.shape == x64[j].shape
        v = rng.standard_normal(x64[j].shape)
        analytic = float(np.sum(v * g))
        numeric = _central_differences(c, x64, live, [u.astype(np.float64) for u in seeds], j,
                                       v, 1e-6)
        scale = float(np.sum(np.abs(v * g))) + abs(numeric)
        assert abs(analytic - numeric) <= 1e-9 + rtol * scale, (
            f"{c.id}: input {j}: float64 <v, J^T u> = {analytic!r}, central difference {numeric!r}")
    wanted = {j for j, s in enumerate(c.inputs) if s.differentiable}
    assert seen == wanted, f"{c.id}: gradients for inputs {sorted(seen)}, expected {sorted(wanted)}"


# =========================================================================== the table
def row(id: str, fn: Callable, ref: Callable, *inputs: Any, ref_forward: bool = True,
        f64_kernels: bool = False, **options: Any):
    """A table row; ``ref_forward=False`` where the onnx reference evaluator's forward op is known
    to be wrong (its gradient graph is still compared), ``f64_kernels`` where ORT can also run
    opcheck's float64 VJP check."""
    options.setdefault("rt_rtol", 1e-4)
    options.setdefault("rt_atol", 1e-4)
    c = case(id, fn, ref, *inputs, **options)
    return pytest.param(c, ref_forward, f64_kernels, id=id)


def conv_row(id: str, x: tuple, w: tuple, bias: bool = True, **kw: Any):
    o = w[0]
    inputs = [arg(*x), arg(*w)] + ([arg(o)] if bias else [])

    def fn(*t):
        return F.conv2d(t[0], t[1], t[2] if bias else None, **kw)

    def ref(*a):
        return np_conv2d(a[0], a[1], a[2] if bias else None, **kw)

    return row(f"conv2d/{id}", fn, ref, *inputs, rtol=1e-4, atol=1e-4)


CONV_ROWS = [
    conv_row("3x3-pad1", (2, 3, 6, 5), (4, 3, 3, 3), padding=1),
    conv_row("3x3-stride2-pad1", (2, 4, 7, 8), (6, 4, 3, 3), bias=False, stride=2, padding=1),
    conv_row("stem-7x7-stride2-pad3", (2, 3, 12, 11), (4, 3, 7, 7), bias=False, stride=2,
             padding=3),
    conv_row("down-1x1-stride2", (2, 4, 7, 6), (6, 4, 1, 1), bias=False, stride=2),
    conv_row("1x1-pad1", (2, 3, 4, 5), (2, 3, 1, 1), padding=1),
    conv_row("batch1-3x3", (1, 8, 8, 8), (8, 8, 3, 3), padding=1),
    conv_row("batch1-3x3-stride2", (1, 6, 9, 8), (5, 6, 3, 3), stride=2, padding=1),
    conv_row("dilation2", (1, 2, 9, 8), (3, 2, 3, 3), padding=2, dilation=2),
    conv_row("groups2-stride2", (2, 4, 6, 6), (6, 2, 3, 3), stride=2, padding=1, groups=2),
    conv_row("depthwise", (2, 4, 6, 5), (4, 1, 3, 3), padding=1, groups=4),
    conv_row("depthwise-multiplier2", (1, 3, 5, 5), (6, 1, 3, 3), groups=3),
    conv_row("groups2-3-in-2-out", (2, 6, 5, 6), (4, 3, 3, 2), padding=(1, 0), groups=2),
    conv_row("groups2-dilation2-stride2", (2, 4, 9, 7), (4, 2, 3, 2), stride=2, padding=(2, 1),
             dilation=2, groups=2),
    conv_row("mixed-stride-pad-dilation", (2, 3, 9, 7), (4, 3, 2, 3), stride=(2, 3),
             padding=(1, 0), dilation=(2, 1)),
    conv_row("same-even-kernel", (1, 2, 6, 5), (3, 2, 4, 2), padding="same"),
    conv_row("same-dilated", (1, 2, 6, 7), (3, 2, 3, 3), padding="same", dilation=(2, 1)),
    conv_row("valid", (2, 2, 5, 6), (3, 2, 2, 3), padding="valid"),
    conv_row("kernel-fills-padded-input", (1, 2, 3, 3), (2, 2, 5, 5), padding=1),
    conv_row("stride-above-kernel", (2, 2, 9, 9), (3, 2, 2, 2), bias=False, stride=3),
    conv_row("tail-not-read", (2, 3, 8, 8), (4, 3, 3, 3), bias=False, stride=3),
    conv_row("unbatched", (3, 6, 5), (4, 3, 3, 3), padding=1),
]


def pool_row(id: str, fn: Callable, ref: Callable, x: tuple, **options: Any):
    return row(id, fn, ref, arg(*x), **options)


def maxpool_row(id: str, x: tuple, **kw: Any):
    # Distinct inputs: the max-pool VJP is only a derivative away from ties (ties: see below).
    return pool_row(f"max_pool2d/{id}", lambda t: F.max_pool2d(t, **kw),
                    lambda a: np_max_pool2d(a, **kw), x, distinct=True, f64_kernels=True)


def avgpool_row(id: str, x: tuple, ref_forward: bool = True, **kw: Any):
    return pool_row(f"avg_pool2d/{id}", lambda t: F.avg_pool2d(t, **kw),
                    lambda a: np_avg_pool2d(a, **kw), x, ref_forward=ref_forward)


def adaptive_row(id: str, x: tuple, size: Any):
    return pool_row(f"adaptive_avg_pool2d/{id}", lambda t: F.adaptive_avg_pool2d(t, size),
                    lambda a: np_adaptive_avg_pool2d(a, size), x)


POOL_ROWS = [
    maxpool_row("resnet-3x3-stride2-pad1", (2, 3, 8, 8), kernel_size=3, stride=2, padding=1),
    maxpool_row("2x2", (1, 2, 6, 7), kernel_size=2),
    maxpool_row("overlapping-3x3-stride1", (1, 2, 5, 5), kernel_size=3, stride=1),
    maxpool_row("ceil-mode", (1, 2, 8, 6), kernel_size=3, stride=2, ceil_mode=True),
    maxpool_row("ceil-mode-pad-stride3", (1, 2, 8, 8), kernel_size=2, stride=3, padding=1,
                ceil_mode=True),
    maxpool_row("ceil-mode-no-effect", (1, 2, 5, 5), kernel_size=2, stride=2, padding=1,
                ceil_mode=True),
    maxpool_row("dilation2-pad1", (1, 2, 9, 8), kernel_size=3, stride=1, padding=1, dilation=2),
    maxpool_row("rectangular", (2, 2, 6, 7), kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)),
    maxpool_row("unbatched", (3, 6, 5), kernel_size=2, stride=1),
    pool_row("max_pool2d/return-indices", lambda t: F.max_pool2d(t, 3, 2, 1, return_indices=True),
             lambda a: np_max_pool2d(a, 3, 2, 1, return_indices=True), (2, 2, 7, 6),
             distinct=True, f64_kernels=True),
    avgpool_row("2x2", (2, 3, 6, 8), kernel_size=2),
    avgpool_row("3x3-stride1-pad1-include-pad", (1, 2, 5, 6), kernel_size=3, stride=1, padding=1),
    avgpool_row("3x3-stride1-pad1-exclude-pad", (1, 2, 5, 6), kernel_size=3, stride=1, padding=1,
                count_include_pad=False),
    avgpool_row("ceil-mode-include-pad", (1, 2, 8, 8), kernel_size=3, stride=2, padding=1,
                ceil_mode=True),
    avgpool_row("ceil-mode-exclude-pad", (1, 2, 8, 7), kernel_size=3, stride=2, padding=1,
                ceil_mode=True, count_include_pad=False),
    # NOTE: onnx 1.23's reference AveragePool divides this overflowing ceil-mode window by the
    # full kernel size (ORT and PyTorch by the taps inside the input): its forward is skipped.
    avgpool_row("ceil-mode-overflow-stride3", (1, 2, 7, 7), ref_forward=False, kernel_size=3,
                stride=3, ceil_mode=True),
    avgpool_row("rectangular", (2, 2, 6, 7), kernel_size=(2, 3), stride=(2, 1), padding=(1, 1)),
    avgpool_row("stride-above-kernel", (1, 2, 8, 9), kernel_size=2, stride=3),
    avgpool_row("unbatched", (3, 5, 6), kernel_size=2, stride=1, padding=1),
    adaptive_row("global", (2, 3, 5, 4), 1),
    adaptive_row("resnet-head", (2, 8, 2, 2), (1, 1)),
    adaptive_row("divisible", (2, 3, 6, 4), (2, 2)),
    adaptive_row("overlapping-bins", (1, 2, 7, 5), (3, 2)),
    adaptive_row("keep-height", (1, 2, 5, 6), (None, 4)),
]


@pytest.mark.parametrize(("c", "ref_forward", "f64_kernels"), CONV_ROWS + POOL_ROWS)
def test_op_table(c: OpCase, ref_forward: bool, f64_kernels: bool) -> None:
    check_forward(c)
    check_vjp_f32(c)
    check_gradient_exact(c)
    if f64_kernels:
        check_vjp(c)
    if ref_forward:
        check_runtimes(c)


# Each Conv gradient formulation on every conv row, whatever the rule would pick for its shape.
VARIANTS = [("transpose", "conv"), ("col2im", "unfold"), ("transpose", "unfold_nl"),
            ("flipped", "conv"), ("transpose", "sliced")]


@pytest.mark.parametrize("variant", VARIANTS, ids=["/".join(v) for v in VARIANTS])
@pytest.mark.parametrize(("c", "ref_forward", "f64_kernels"), CONV_ROWS)
def test_conv_gradient_variants(c: OpCase, ref_forward: bool, f64_kernels: bool,
                                variant: tuple[str, str], monkeypatch) -> None:
    monkeypatch.setattr(rules, "CONV_GRAD_OVERRIDE", {"input": variant[0], "weight": variant[1]})
    check_gradient_exact(c)


def test_the_choice_covers_every_variant() -> None:
    """The measured per-shape choice really uses each formulation on resnet18's shapes."""
    def geo(n, c, o, k, s, p, size):
        out = (size + 2 * p - k) // s + 1
        return rules.ConvGeometry(n, c, o, 1, (size, size), (out, out), (k, k), (s, s), (1, 1),
                                  (p, p), (p, p))
    assert rules.choose_conv_weight_grad(geo(4, 3, 64, 7, 2, 3, 224)) == "conv"
    assert rules.choose_conv_weight_grad(geo(4, 64, 64, 3, 1, 1, 56)) == "unfold"
    assert rules.choose_conv_weight_grad(geo(4, 256, 256, 3, 1, 1, 14)) == "sliced"
    assert rules.choose_conv_weight_grad(geo(1, 64, 64, 3, 1, 1, 16)) == "unfold_nl"
    assert rules.choose_conv_weight_grad(geo(8, 64, 128, 1, 2, 0, 16)) == "unfold_nl"
    assert rules.choose_conv_input_grad(geo(8, 256, 256, 3, 1, 1, 4)) == "col2im"
    assert rules.choose_conv_input_grad(geo(8, 64, 64, 3, 1, 1, 16)) == "transpose"
    grouped = rules.ConvGeometry(2, 4, 4, 2, (8, 8), (8, 8), (3, 3), (1, 1), (1, 1), (1, 1),
                                 (1, 1))
    assert rules.choose_conv_weight_grad(grouped) == "conv"
    assert rules.choose_conv_input_grad(grouped) == "transpose"
    depthwise = rules.ConvGeometry(8, 32, 32, 32, (48, 48), (48, 48), (3, 3), (1, 1), (1, 1),
                                   (1, 1), (1, 1))
    assert rules.choose_conv_input_grad(depthwise) == "flipped"


# =========================================================================== max-pool ties
TIE_CASES = [
    dict(kernel_size=3, stride=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=2, stride=1, dilation=2),
    dict(kernel_size=3, stride=2, ceil_mode=True),
]


@pytest.mark.parametrize("kw", TIE_CASES, ids=[str(k) for k in TIE_CASES])
def test_max_pool_ties_and_overlaps(kw: dict) -> None:
    """With many ties and overlapping windows the gradient goes to the first maximum of each
    window (PyTorch's choice), accumulated across windows; constant input included."""
    rng = np.random.default_rng(3)
    for x in (np.round(rng.standard_normal((2, 2, 7, 8))).astype(np.float32),
              np.ones((1, 2, 6, 6), np.float32)):
        t = og.tensor(x, requires_grad=True)
        y = F.max_pool2d(t, **kw)
        u = rng.standard_normal(y.shape).astype(np.float32)
        y.backward(og.tensor(u))
        np.testing.assert_array_equal(y.detach().numpy(), np_max_pool2d(x, **kw))
        np.testing.assert_allclose(t.grad.numpy(), np_max_pool2d_grad(x, u, **kw), rtol=1e-6,
                                   atol=1e-6)


# =========================================================================== imported graphs
def _value(name: str, shape: Sequence[int], dtype=ir.DataType.FLOAT) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype))


def _grad_of_node(op: str, attrs: dict, arrays: Sequence[np.ndarray], n_out: int,
                  seed: np.ndarray | None = None) -> list[np.ndarray]:
    """Differentiate one hand-made ONNX node (as an imported model would have it) w.r.t. all its
    inputs; run the gradient graph on ORT and the reference evaluator and check they agree."""
    outs = run_node(op, attrs, attrs_key(attrs), list(arrays), n_out)
    inputs = [_value(f"x{i}", a.shape) for i, a in enumerate(arrays)]
    outputs = [_value(f"y{i}", o.shape, ir.DataType.from_numpy(o.dtype))
               for i, o in enumerate(outs)]
    ir.Node("", op, inputs, ir.convenience.convert_attributes(attrs), outputs=outputs)
    seed = np.ones_like(outs[0]) if seed is None else seed
    seed_value = _value("seed", seed.shape)
    graph, kept = gradient_graph([outputs[0]], [seed_value], inputs, opset=OPSET)
    assert kept == list(range(len(arrays)))
    model = ir.serde.serialize_model(ir.Model(graph, ir_version=IR_VERSION))
    check_onnx_model(model)
    feeds = {v.name: a for v, a in zip(inputs, arrays)} | {"seed": seed}
    feeds.update({v.name: o for v, o in zip(outputs, outs)})
    feeds = {v.name: feeds[v.name] for v in graph.inputs}
    names = [v.name for v in graph.outputs]
    got = make_session(model).run(names, feeds)
    ref = ReferenceEvaluator(model).run(names, feeds)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    return got


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},            # no Indices
    {"kernel_shape": [2, 2], "strides": [2, 1], "storage_order": 1},              # column-major
], ids=["single-output", "storage-order-1"])
def test_max_pool_without_usable_indices(attrs: dict) -> None:
    """An imported MaxPool without (row-major) Indices: the rule recomputes them.

    NOTE: not at stride 1: onnx 1.23's reference MaxPool computes wrong Indices for stride-1,
    dilation-1 pools (it takes window coordinates in the output's shape), and here the reference
    evaluator runs the recomputed MaxPool itself.
    """
    rng = np.random.default_rng(5)
    x = rng.permutation(2 * 3 * 7 * 6).reshape(2, 3, 7, 6).astype(np.float32)
    n_out = 1 if "storage_order" not in attrs else 2
    y = run_node("MaxPool", attrs, attrs_key(attrs), [x], 1)[0]
    u = rng.standard_normal(y.shape).astype(np.float32)
    (dx,) = _grad_of_node("MaxPool", attrs, [x], n_out, u)
    kw = dict(kernel_size=tuple(attrs["kernel_shape"]), stride=tuple(attrs["strides"]),
              padding=tuple(attrs.get("pads", [0, 0])[:2]))
    np.testing.assert_allclose(dx, np_max_pool2d_grad(x, u, **kw), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_auto_pad(auto_pad: str) -> None:
    """An imported Conv with the deprecated auto_pad: gradients against central differences of
    the NumPy conv with the pads auto_pad means (odd total padding on the stride-2 axis)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 8, 7)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    attrs = {"auto_pad": auto_pad, "strides": [2, 1], "kernel_shape": [3, 2]}
    y = run_node("Conv", attrs, attrs_key(attrs), [x, w], 1)[0]
    u = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = _grad_of_node("Conv", attrs, [x, w], 1, u)
    if auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    else:  # totals: rows (4-1)*2+3-8 = 1, columns 6+2-7... = 1; the odd pad goes last for UPPER
        pads = (0, 0, 1, 1) if auto_pad == "SAME_UPPER" else (1, 1, 0, 0)
    ref = np_conv2d(x.astype(np.float64), w.astype(np.float64), stride=(2, 1), padding=pads)
    assert ref.shape == y.shape
    for j, (arr, g) in enumerate([(x, dx), (w, dw)]):
        v = rng.standard_normal(arr.shape)
        args = [x.astype(np.float64), w.astype(np.float64)]
        plus, minus = list(args), list(args)
        plus[j], minus[j] = args[j] + 1e-6 * v, args[j] - 1e-6 * v
        numeric = float(np.sum(u * (np_conv2d(*plus, stride=(2, 1), padding=pads)
                                    - np_conv2d(*minus, stride=(2, 1), padding=pads)))) / 2e-6
        analytic = float(np.sum(v * g))
        assert abs(analytic - numeric) <= 1e-4 * (np.sum(np.abs(v * g)) + abs(numeric))


@pytest.mark.parametrize("rank", [1, 3])
def test_conv_other_ranks(rank: int) -> None:
    """An imported 1-D or 3-D Conv takes the rank-generic formulations (ConvTranspose, swapped
    Conv); checked against torch."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    size = {1: (11,), 3: (5, 6, 4)}[rank]
    x = rng.standard_normal((2, 4, *size)).astype(np.float32)
    w = rng.standard_normal((6, 2, *([3] * rank))).astype(np.float32)
    attrs = {"strides": [2] * rank, "pads": [1] * (2 * rank), "dilations": [1] * rank, "group": 2}
    y = run_node("Conv", attrs, attrs_key(attrs), [x, w], 1)[0]
    u = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = _grad_of_node("Conv", attrs, [x, w], 1, u)
    conv = {1: torch.nn.functional.conv1d, 3: torch.nn.functional.conv3d}[rank]
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    conv(xt, wt, stride=2, padding=1, groups=2).backward(torch.tensor(u))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_backward_hands_out_weight_gradients_before_their_reshape() -> None:
    """``backward``'s session outputs a weight gradient made by a Reshape of its matrix product
    before the Reshape (which copied it) and views it in the weight's shape: the values are the
    gradient model's, which keeps the Reshape."""
    og.manual_seed(0)
    conv = og.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    x = og.randn(2, 8, 6, 6)
    y = conv(x)
    u = og.randn(*y.shape)
    gm = gradient_model([y], [u])
    made_by = {o: n.op_type for n in gm.model.graph.node for o in n.output}
    assert made_by[gm.outputs[0]] == "Reshape"  # this shape's formulation reshapes a product
    want = make_session(gm.model).run(list(gm.outputs), gm.feeds)[0]
    y.backward(u)
    plan = next(reversed(ort_session._plans.values()))[0]
    assert plan.views == [[16, 8, 3, 3]]
    grad = conv.weight.grad.numpy()
    assert grad.shape == (16, 8, 3, 3) and grad.base.shape != grad.shape  # a view of the output
    np.testing.assert_array_equal(grad, want)


# =========================================================================== bad input
def _t(*shape: int, dtype: Any = np.float32) -> og.Tensor:
    return og.tensor(np.zeros(shape, dtype=dtype))


@pytest.mark.parametrize(("call", "error", "pattern"), [
    (lambda: F.conv2d(_t(1, 4, 8, 8), _t(6, 3, 3, 3)), og.ShapeError,
     r"expected input \[1, 4, 8, 8\] to have 3 channels, but got 4 channels"),
    (lambda: F.conv2d(_t(1, 4, 8, 8), _t(6, 1, 3, 3), groups=2), og.ShapeError,
     r"groups=2.*to have 2 channels, but got 4"),
    (lambda: F.conv2d(_t(1, 4, 8, 8), _t(5, 2, 3, 3), groups=2), og.ShapeError,
     r"divisible by 2 at dimension 0.*\[5, 2, 3, 3\]"),
    (lambda: F.conv2d(_t(4, 8, 8), _t(6, 3, 3, 3)), og.ShapeError,
     r"expected input \[4, 8, 8\] to have 3 channels"),
    (lambda: F.conv2d(_t(8, 8), _t(6, 3, 3, 3)), og.ShapeError,
     r"expected 3-D \(unbatched\) or 4-D \(batched\) input.*got 2-D input of shape \[8, 8\]"),
    (lambda: F.conv2d(_t(1, 3, 8, 8), _t(6, 3, 3)), og.ShapeError, r"weight must be 4-D.*\[6, 3, 3\]"),
    (lambda: F.conv2d(_t(1, 3, 4, 4), _t(6, 3, 7, 7), padding=1), og.ShapeError,
     r"kernel 7x7 \(dilated to 7x7\) is larger than the padded input 6x6 \(input \[1, 3, 4, 4\]"),
    (lambda: F.conv2d(_t(1, 3, 5, 5), _t(6, 3, 3, 3), dilation=3), og.ShapeError,
     r"dilated to 7x7\) is larger than the padded input 5x5"),
    (lambda: F.conv2d(_t(1, 3, 8, 8), _t(6, 3, 3, 3), _t(5)), og.ShapeError,
     r"bias must have shape \[6\].*got \[5\]"),
    (lambda: F.conv2d(_t(1, 3, 8, 8), _t(6, 3, 3, 3, dtype=np.float64)), TypeError,
     r"input dtype onnxgrad.float32 and weight dtype onnxgrad.float64 differ"),
    (lambda: F.conv2d(_t(1, 3, 8, 8), _t(6, 3, 3, 3), stride=2, padding="same"), ValueError,
     r"padding='same' is not supported for strided"),
    (lambda: F.conv2d(_t(1, 3, 8, 8), _t(6, 3, 3, 3), stride=0), ValueError, r"stride must be >= 1"),
    (lambda: F.conv2d(_t(1, 3, 8, 8), _t(6, 3, 3, 3), padding="full"), ValueError,
     r"padding must be 'valid', 'same'"),
    (lambda: F.max_pool2d(_t(1, 3, 2, 2), 3), og.ShapeError,
     r"kernel 3x3.*larger than the padded input: input \[1, 3, 2, 2\] gives an output of 0x0"),
    (lambda: F.max_pool2d(_t(1, 3, 8, 8), 3, padding=2), ValueError,
     r"pad should be at most half of kernel size"),
    (lambda: F.avg_pool2d(_t(8, 8), 2), og.ShapeError, r"got 2-D input of shape \[8, 8\]"),
    (lambda: F.avg_pool2d(_t(1, 3, 8, 8), 2, divisor_override=3), NotImplementedError,
     r"divisor_override"),
    (lambda: F.adaptive_avg_pool2d(_t(1, 3, 8, 8), (0, 2)), ValueError, r"must be positive"),
])
def test_errors(call: Callable, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern) as info:
        call()
    assert "test_nn_ops.py" in str(info.value), "the error names the user's line"


# =========================================================================== PyTorch parity
CONV_PARITY = [
    dict(x=(2, 3, 10, 9), w=(4, 3, 3, 3), stride=1, padding=1),
    dict(x=(2, 4, 9, 9), w=(6, 4, 3, 3), stride=2, padding=1),
    dict(x=(1, 3, 16, 16), w=(8, 3, 7, 7), stride=2, padding=3),
    dict(x=(2, 8, 6, 6), w=(16, 8, 1, 1), stride=2, padding=0),
    dict(x=(2, 4, 8, 7), w=(4, 2, 3, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
         groups=2),
    dict(x=(1, 6, 5, 5), w=(6, 1, 3, 3), stride=1, padding="same", groups=6),
]


@pytest.mark.parametrize("kw", CONV_PARITY, ids=[str(k) for k in range(len(CONV_PARITY))])
def test_torch_parity_conv2d(kw: dict) -> None:
    torch = pytest.importorskip("torch")
    kw = dict(kw)
    rng = np.random.default_rng(7)
    x = rng.standard_normal(kw.pop("x")).astype(np.float32)
    w = rng.standard_normal(kw.pop("w")).astype(np.float32)
    b = rng.standard_normal(w.shape[0]).astype(np.float32)
    ours = [og.tensor(a, requires_grad=True) for a in (x, w, b)]
    theirs = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    y = F.conv2d(*ours, **kw)
    yt = torch.nn.functional.conv2d(*theirs, **kw)
    u = rng.standard_normal(yt.shape).astype(np.float32)
    y.backward(og.tensor(u))
    yt.backward(torch.tensor(u))
    np.testing.assert_allclose(y.detach().numpy(), yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    for a, t in zip(ours, theirs):
        np.testing.assert_allclose(a.grad.numpy(), t.grad.numpy(), rtol=1e-4, atol=1e-4)


POOL_PARITY = [
    ("max", dict(kernel_size=3, stride=2, padding=1)),
    ("max", dict(kernel_size=3, stride=1)),
    ("max", dict(kernel_size=2, stride=1, dilation=2, padding=1)),
    ("max", dict(kernel_size=3, stride=2, ceil_mode=True)),
    ("max", dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 1), ceil_mode=True)),
    ("avg", dict(kernel_size=3, stride=2, padding=1)),
    ("avg", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("avg", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ("avg", dict(kernel_size=3, stride=3, ceil_mode=True)),
    ("avg", dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0))),
]


@pytest.mark.parametrize(("kind", "kw"), POOL_PARITY, ids=[f"{k}-{i}" for i, (k, _) in
                                                            enumerate(POOL_PARITY)])
def test_torch_parity_pools(kind: str, kw: dict) -> None:
    """Forward and gradient against torch.nn.functional; integer-valued inputs make ties in
    (overlapping) max windows, where the gradient must go where PyTorch sends it."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x = np.round(rng.standard_normal((2, 3, 9, 8)) * 1.5).astype(np.float32)
    ours, theirs = og.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    if kind == "max":
        y, yt = F.max_pool2d(ours, **kw), torch.nn.functional.max_pool2d(theirs, **kw)
        _, it = torch.nn.functional.max_pool2d(theirs.detach(), **kw, return_indices=True)
        _, i = F.max_pool2d(ours.detach(), **kw, return_indices=True)
        np.testing.assert_array_equal(i.numpy(), it.numpy())
    else:
        y, yt = F.avg_pool2d(ours, **kw), torch.nn.functional.avg_pool2d(theirs, **kw)
    u = rng.standard_normal(yt.shape).astype(np.float32)
    y.backward(og.tensor(u))
    yt.backward(torch.tensor(u))
    np.testing.assert_allclose(y.detach().numpy(), yt.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [1, (2, 2), (3, 2), (None, 3)], ids=str)
def test_torch_parity_adaptive_avg_pool2d(size: Any) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    ours, theirs = og.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    y = F.adaptive_avg_pool2d(ours, size)
    yt = torch.nn.functional.adaptive_avg_pool2d(theirs, size)
    u = rng.standard_normal(yt.shape).astype(np.float32)
    y.backward(og.tensor(u))
    yt.backward(torch.tensor(u))
    np.testing.assert_allclose(y.detach().numpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-5, atol=1e-6)

