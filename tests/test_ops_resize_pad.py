"""``pad``, ``interpolate`` and ``conv_transpose2d``: op-table rows (``tracer/spatial_ops.py``,
rules in ``passes/rules/spatial.py`` and ``shape.py``) and parity with PyTorch.

Each row: forward against a NumPy transcription of PyTorch's definition, the float32 VJP and the
exact (float64, reference evaluator) gradient graph against central differences, ONNX Runtime
against the reference evaluator; opcheck's float64 VJP where ONNX Runtime has float64 kernels
(``Pad`` has; ``Resize`` and ``ConvTranspose`` have none).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from opcheck import OpCase, arg, check_forward, check_runtimes, check_vjp
from test_nn_ops import check_gradient_exact, check_vjp_f32, row

import onnxgrad as og
from onnxgrad.nn import functional as F


# =========================================================================== NumPy references
def np_pad(x: np.ndarray, pad: tuple, mode: str = "constant", value: float = 0.0) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    for k in range(len(pad) // 2):
        widths[x.ndim - 1 - k] = (pad[2 * k], pad[2 * k + 1])
    np_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge",
               "circular": "wrap"}[mode]
    kw = {"constant_values": value} if mode == "constant" else {}
    return np.pad(x, widths, mode=np_mode, **kw)


def _axis_map(x: np.ndarray, axis: int, weights: list[list[tuple[int, float]]]) -> np.ndarray:
    """Output position j along ``axis`` = sum of w * x[i] over (i, w) in weights[j]."""
    moved = np.moveaxis(x, axis, -1)
    out = np.stack([sum(w * moved[..., i] for i, w in taps) for taps in weights], -1)
    return np.moveaxis(out, -1, axis).astype(x.dtype)


def np_interpolate(x: np.ndarray, size: Any = None, scale_factor: Any = None,
                   mode: str = "nearest", align_corners: bool | None = None) -> np.ndarray:
    """PyTorch's upsample_nearest / upsample_bilinear (aten's source-index formulas)."""
    spatial = x.ndim - 2
    ins = x.shape[2:]
    if size is not None:
        outs = [size] * spatial if isinstance(size, int) else list(size)
        scales = [n / o for n, o in zip(ins, outs)]
    else:
        factors = [scale_factor] * spatial if isinstance(scale_factor, (int, float)) \
            else list(scale_factor)
        outs = [int(np.floor(n * f)) for n, f in zip(ins, factors)]
        scales = [1.0 / f for f in factors]
    for k, (n, o, s) in enumerate(zip(ins, outs, scales)):
        taps = []
        for j in range(o):
            if mode == "nearest":
                taps.append([(min(int(np.floor(j * s)), n - 1), 1.0)])
                continue
            if align_corners:
                src = j * (n - 1) / (o - 1) if o > 1 else 0.0
            else:
                src = max((j + 0.5) * s - 0.5, 0.0)
            i0 = min(int(np.floor(src)), n - 1)
            i1 = min(i0 + 1, n - 1)
            lam = src - i0
            taps.append([(i0, 1.0 - lam), (i1, lam)])
        x = _axis_map(x, 2 + k, taps)
    return x


def np_conv_transpose2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
                        stride: Any = 1, padding: Any = 0, output_padding: Any = 0,
                        groups: int = 1, dilation: Any = 1) -> np.ndarray:
    """Scatter form: each input pixel adds its weighted kernel into the output."""
    def pair(v: Any) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else tuple(v)

    (sh, sw), (ph, pw), (oh, ow), (dh, dw) = map(pair, (stride, padding, output_padding,
                                                       dilation))
    n, cin, h, wd = x.shape
    _, cout_g, kh, kw = w.shape
    full_h = (h - 1) * sh + dh * (kh - 1) + 1 + oh
    full_w = (wd - 1) * sw + dw * (kw - 1) + 1 + ow
    out = np.zeros((n, cout_g * groups, full_h, full_w), np.float64)
    cin_g = cin // groups
    for g in range(groups):
        xs = x[:, g * cin_g:(g + 1) * cin_g].astype(np.float64)
        ws = w[g * cin_g:(g + 1) * cin_g].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                contrib = np.einsum("nchw,co->nohw", xs, ws[:, :, i, j])
                out[:, g * cout_g:(g + 1) * cout_g, i * dh:i * dh + (h - 1) * sh + 1:sh,
                    j * dw:j * dw + (wd - 1) * sw + 1:sw] += contrib
    out = out[:, :, ph:full_h - ph, pw:full_w - pw]  # padding crops both ends
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out.astype(x.dtype)


# =========================================================================== the table
def pad_row(id: str, shape: tuple, pad: tuple, mode: str = "constant", **kw: Any):
    return row(f"pad/{id}", lambda t: F.pad(t, pad, mode, **kw),
               lambda a: np_pad(a, pad, mode, **kw), arg(*shape), f64_kernels=True)


def interp_row(id: str, shape: tuple, **kw: Any):
    return row(f"interpolate/{id}", lambda t: F.interpolate(t, **kw),
               lambda a: np_interpolate(a, **kw), arg(*shape), rtol=1e-5, atol=1e-5)


def convt_row(id: str, x: tuple, w: tuple, bias: bool = True, **kw: Any):
    groups = kw.get("groups", 1)
    inputs = [arg(*x), arg(*w)] + ([arg(w[1] * groups)] if bias else [])

    def fn(*t: Any) -> Any:
        return F.conv_transpose2d(t[0], t[1], t[2] if bias else None, **kw)

    def ref(*a: Any) -> Any:
        return np_conv_transpose2d(a[0], a[1], a[2] if bias else None, **kw)

    # NOTE: onnx's reference ConvTranspose fails on group > 1 (it reshapes the weight as if
    # [group, in/group, out]); those rows skip its forward (their gradient graphs still run).
    return row(f"conv_transpose2d/{id}", fn, ref, *inputs, rtol=1e-4, atol=1e-4,
               ref_forward=groups == 1)


ROWS = [
    pad_row("constant-last-dim", (2, 3, 4), (1, 2)),
    pad_row("constant-value-2d", (2, 3, 4, 5), (1, 0, 2, 1), value=0.5),
    pad_row("constant-three-dims", (2, 3, 4), (0, 1, 2, 0, 1, 1)),
    pad_row("reflect", (2, 3, 5, 4), (2, 1, 1, 3), "reflect"),
    pad_row("reflect-1d", (2, 3, 6), (3, 2), "reflect"),
    pad_row("replicate", (1, 2, 4, 3), (2, 3, 1, 2), "replicate"),
    pad_row("circular", (1, 2, 4, 5), (1, 2, 3, 1), "circular"),
    interp_row("nearest-x2", (2, 3, 3, 4), scale_factor=2),
    interp_row("nearest-size-down", (1, 2, 7, 6), size=(4, 3)),
    interp_row("nearest-size-up-uneven", (1, 2, 3, 4), size=(7, 5)),
    interp_row("nearest-1d", (2, 3, 5), size=8),
    interp_row("bilinear-x2", (2, 2, 3, 4), scale_factor=2, mode="bilinear",
               align_corners=False),
    interp_row("bilinear-size-down", (1, 2, 7, 6), size=(4, 5), mode="bilinear"),
    interp_row("bilinear-align-corners", (1, 2, 3, 4), size=(6, 7), mode="bilinear",
               align_corners=True),
    interp_row("bilinear-align-corners-down", (1, 2, 6, 5), size=(4, 2), mode="bilinear",
               align_corners=True),
    interp_row("linear-1d", (2, 2, 5), scale_factor=1.5, mode="linear"),
    convt_row("3x3", (2, 3, 4, 5), (3, 4, 3, 3)),
    convt_row("stride2-pad1-outpad1", (2, 3, 4, 4), (3, 2, 3, 3), stride=2, padding=1,
              output_padding=1),
    convt_row("4x4-stride2-pad1-no-bias", (1, 4, 3, 3), (4, 2, 4, 4), bias=False, stride=2,
              padding=1),
    convt_row("groups2-dilation2", (2, 4, 4, 3), (4, 3, 3, 2), groups=2, dilation=2,
              padding=(1, 0)),
    convt_row("stride3-rect", (1, 2, 3, 4), (2, 2, 2, 3), stride=(3, 2), output_padding=(2, 1)),
]


@pytest.mark.parametrize(("c", "ref_forward", "f64_kernels"), ROWS)
def test_op_table(c: OpCase, ref_forward: bool, f64_kernels: bool) -> None:
    check_forward(c)
    check_vjp_f32(c)
    check_gradient_exact(c)
    if f64_kernels:
        check_vjp(c)
    if ref_forward:
        check_runtimes(c)


# =========================================================================== errors
@pytest.mark.parametrize(("call", "error", "pattern"), [
    (lambda x: F.pad(x, (1,)), ValueError, "even"),
    (lambda x: F.pad(x, (4, 0), "reflect"), ValueError, "less than the corresponding"),
    (lambda x: F.pad(x, (1, 1), "wrap"), ValueError, "mode must be one of"),
    (lambda x: F.interpolate(x), ValueError, "only one of size or scale_factor"),
    (lambda x: F.interpolate(x, size=4, mode="bicubic"), NotImplementedError, "bicubic"),
    (lambda x: F.interpolate(x, size=4, align_corners=True), ValueError, "align_corners"),
    (lambda x: F.conv_transpose2d(x, og.zeros(3, 2, 3, 3)), Exception, "channels"),
    (lambda x: F.conv_transpose2d(x, og.zeros(2, 2, 3, 3), stride=2, output_padding=2),
     ValueError, "output padding"),
])
def test_errors(call: Callable, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        call(og.zeros(1, 2, 4, 4))


# =========================================================================== PyTorch
PARITY = [
    ("pad", {"pad": (1, 2, 0, 3), "mode": "reflect"}),
    ("pad", {"pad": (2, 1, 1, 0), "mode": "replicate"}),
    ("pad", {"pad": (1, 3, 2, 2), "mode": "circular"}),
    ("pad", {"pad": (1, 1, 2, 2), "mode": "constant", "value": -1.0}),
    ("interpolate", {"scale_factor": 2, "mode": "nearest"}),
    ("interpolate", {"size": (5, 9), "mode": "nearest"}),
    ("interpolate", {"scale_factor": 1.7, "mode": "bilinear", "align_corners": False}),
    ("interpolate", {"size": (3, 11), "mode": "bilinear", "align_corners": True}),
]


@pytest.mark.parametrize(("fn", "kw"), PARITY, ids=[f"{f}-{i}" for i, (f, _) in
                                                    enumerate(PARITY)])
def test_torch_parity(fn: str, kw: dict) -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 6)).astype(np.float32)
    ours_x, theirs_x = og.tensor(x, requires_grad=True), torch.from_numpy(x).requires_grad_()
    ours = getattr(F, fn)(ours_x, **kw)
    theirs = getattr(torch.nn.functional, fn)(theirs_x, **kw)
    np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), rtol=1e-5,
                               atol=1e-6)
    u = np.random.default_rng(1).standard_normal(tuple(theirs.shape)).astype(np.float32)
    (ours * og.tensor(u)).sum().backward()
    (theirs * torch.from_numpy(u)).sum().backward()
    np.testing.assert_allclose(ours_x.grad.numpy(), theirs_x.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_torch_parity_conv_transpose2d() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    ours = og.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
    assert [(n, tuple(p.shape)) for n, p in ours.named_parameters()] == \
        [(n, tuple(p.shape)) for n, p in layer.named_parameters()]
    ours.load_state_dict({k: v.detach().numpy() for k, v in layer.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(np.float32)
    y, ty = ours(og.tensor(x)), layer(torch.from_numpy(x))
    np.testing.assert_allclose(y.detach().numpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    (y * y).sum().backward()
    (ty * ty).sum().backward()
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), dict(layer.named_parameters())[name]
                                   .grad.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)
    assert repr(ours) == repr(layer)
