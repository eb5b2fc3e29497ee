"""The op table of ``tracer/activations.py`` and the rules of ``passes/rules/activations.py``.

Each row runs opcheck's three checks (forward against NumPy, float64 VJP against central
differences, ONNX Runtime against the reference evaluator). ONNX Runtime has no float64
``HardSwish``, ``HardSigmoid``, ``Mish`` or ``Conv`` kernel, so float64 inputs of the first three
take a composition and the float64 VJP check differentiates that; the single-node rules (and
``conv1d``'s 1-D ``Conv``) are pinned down by ``test_nn_ops``'s two extra checks, which run the
float32 gradient graph promoted to float64 on the reference evaluator against central
differences.
"""
from __future__ import annotations

import numpy as np
import pytest
from opcheck import (
    arg,
    case,
    check_forward,
    check_node_rule,
    check_runtimes,
    table_tests,
)
from test_nn_ops import check_gradient_exact, check_vjp_f32, np_conv2d

import onnxgrad as og

F = og.nn.functional


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_relu6(x):
    return np.clip(x, 0, 6).astype(x.dtype)


def np_hardswish(x):
    return (x * np.clip(x + 3, 0, 6) / 6).astype(x.dtype)


def np_hardsigmoid(x):
    return (np.clip(x + 3, 0, 6) / 6).astype(x.dtype)


def np_mish(x):
    return (x * np.tanh(np.log1p(np.exp(x)))).astype(x.dtype)


def np_group_norm(x, groups, w=None, b=None, eps=1e-5):
    n, c = x.shape[:2]
    x3 = x.astype(np.float64).reshape(n, groups, -1)
    y = (x3 - x3.mean(-1, keepdims=True)) / np.sqrt(x3.var(-1, keepdims=True) + eps)
    y = y.reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y.astype(x.dtype)


def np_conv1d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    unbatched = x.ndim == 2
    x = x[None] if unbatched else x
    if padding == "same":
        total = dilation * (w.shape[-1] - 1)
        pads = (0, total // 2, 0, total - total // 2)
    elif padding == "valid":
        pads = (0, 0, 0, 0)
    else:
        pads = (0, padding, 0, padding)
    y = np_conv2d(x[:, :, None, :], w[:, :, None, :], b, stride=(1, stride), padding=pads,
                  dilation=(1, dilation), groups=groups)[:, :, 0, :]
    return y[0] if unbatched else y


KINKS = (-3.0, 3.0)
CASES = [
    case("silu", F.silu, np_silu, arg(2, 3, 4, low=-6, high=6)),
    case("silu/int", F.silu, lambda x: np_silu(x.astype(np.float32)),
         arg(5, low=-3, high=3, dtype="int64"), grad=False),
    case("relu6", F.relu6, np_relu6, arg(3, 8, low=-2, high=8), avoid=(0.0, 6.0)),
    case("hardswish", F.hardswish, np_hardswish, arg(4, 6, low=-5, high=5), avoid=KINKS),
    case("hardswish/4d", F.hardswish, np_hardswish, arg(2, 3, 2, 2, low=-5, high=5), avoid=KINKS),
    case("hardsigmoid", F.hardsigmoid, np_hardsigmoid, arg(4, 6, low=-5, high=5), avoid=KINKS),
    case("mish", F.mish, np_mish, arg(3, 7, low=-6, high=6)),
    case("mish/large", F.mish, np_mish, arg(10, low=-30, high=30), rtol=1e-5, atol=1e-5),
    case("group_norm", lambda x, w, b: F.group_norm(x, 2, w, b),
         lambda x, w, b: np_group_norm(x, 2, w, b), (2, 4, 3, 2), (4,), (4,), atol=1e-5),
    case("group_norm/no-affine", lambda x: F.group_norm(x, 3, eps=1e-3),
         lambda x: np_group_norm(x, 3, eps=1e-3), (2, 6, 5), atol=1e-5),
    case("group_norm/one-group", lambda x, w: F.group_norm(x, 1, w),
         lambda x, w: np_group_norm(x, 1, w), (3, 4, 2, 3), (4,), atol=1e-5),
    case("group_norm/instance", lambda x, w, b: F.group_norm(x, 4, w, b),
         lambda x, w, b: np_group_norm(x, 4, w, b), (2, 4, 6), (4,), (4,), atol=1e-5),
    case("group_norm/2d", lambda x, b: F.group_norm(x, 2, None, b),
         lambda x, b: np_group_norm(x, 2, None, b), (3, 4), (4,), atol=1e-5),
]

test_forward, test_vjp, test_runtimes, test_ids_are_unique = table_tests(CASES)


# --------------------------------------------------------------------------- single-node rules
SINGLE_NODE = [
    case("hardswish/node", F.hardswish, np_hardswish, arg(3, 8, low=-5, high=5), avoid=KINKS),
    case("hardsigmoid/node", F.hardsigmoid, np_hardsigmoid, arg(3, 8, low=-5, high=5),
         avoid=KINKS),
    case("mish/node", F.mish, np_mish, arg(3, 8, low=-6, high=6)),
]


def conv1d_row(id: str, x: tuple, w: tuple, bias: bool = True, **kw):
    inputs = [arg(*x), arg(*w)] + ([arg(w[0])] if bias else [])

    def fn(*t):
        return F.conv1d(t[0], t[1], t[2] if bias else None, **kw)

    def ref(*a):
        return np_conv1d(a[0], a[1], a[2] if bias else None, **kw)

    return case(f"conv1d/{id}", fn, ref, *inputs, rtol=1e-4, atol=1e-4, rt_rtol=1e-4,
                rt_atol=1e-4)


CONV1D = [
    conv1d_row("k3-pad1", (2, 3, 9), (4, 3, 3), padding=1),
    conv1d_row("stride2-no-bias", (2, 4, 11), (6, 4, 3), bias=False, stride=2, padding=1),
    conv1d_row("groups2-dilation2", (2, 4, 10), (6, 2, 3), groups=2, dilation=2, padding=2),
    conv1d_row("depthwise", (2, 5, 8), (5, 1, 5), groups=5, padding=2),
    conv1d_row("depthwise-stride2-multiplier2", (1, 3, 9), (6, 1, 3), groups=3, stride=2),
    conv1d_row("pointwise", (2, 6, 7), (4, 6, 1)),
    conv1d_row("same-even-kernel", (2, 2, 7), (3, 2, 4), padding="same"),
    conv1d_row("valid", (2, 2, 7), (3, 2, 3), padding="valid"),
    conv1d_row("unbatched", (3, 8), (2, 3, 3), padding=1),
    conv1d_row("tail-not-read", (2, 3, 8), (4, 3, 3), stride=3),
]


@pytest.mark.parametrize("c", SINGLE_NODE + CONV1D, ids=lambda c: c.id)
def test_float32_node_rules(c) -> None:
    """The very node float32 code emits: its rule against float64 central differences (the
    graph promoted to float64 on the reference evaluator), ORT against the reference."""
    check_forward(c)
    check_vjp_f32(c)
    check_gradient_exact(c)
    check_runtimes(c)


def test_float32_nodes_are_the_onnx_ops() -> None:
    """float32 emits the HardSwish / HardSigmoid / Mish nodes that exports hold, so these rules
    are the ones imported models use."""
    x = og.tensor(np.linspace(-4, 4, 12, dtype=np.float32).reshape(1, 4, 3), requires_grad=True)
    for fn, op in [(F.hardswish, "HardSwish"), (F.hardsigmoid, "HardSigmoid"), (F.mish, "Mish")]:
        assert fn(x)._v.rec.op == op


@pytest.mark.parametrize(("shape", "groups"), [((2, 4, 3, 2), 2), ((3, 6, 5), 3), ((2, 4, 3), 1)])
def test_group_normalization_rule(shape, groups) -> None:
    """An imported opset-21 GroupNormalization node (onnxgrad's group_norm is composed):
    the rule's float64 gradient graph on ORT and on the reference evaluator against central
    differences of the NumPy group norm."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    w, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    eps = 1e-5
    check_node_rule("GroupNormalization", {"num_groups": groups, "epsilon": eps, "stash_type": 11},
                    {"x": x, "scale": w, "bias": b},
                    lambda x, w, b: np_group_norm(x, groups, w, b, eps), rng)


@pytest.mark.parametrize(("fn", "x", "grad"), [
    # PyTorch's values at the kinks (torch.nn.functional, CPU).
    (F.hardswish, [-3.0, 3.0, -4.0, 4.0, 0.0], [-0.5, 1.5, 0.0, 1.0, 0.5]),
    (F.hardsigmoid, [-3.0, 3.0, -4.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1 / 6]),
], ids=["hardswish", "hardsigmoid"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kink_conventions(fn, x, grad, dtype) -> None:
    t = og.tensor(np.asarray(x, dtype), requires_grad=True)
    fn(t).sum().backward()
    np.testing.assert_allclose(t.grad.numpy(), np.asarray(grad, dtype), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", [F.silu, F.relu6, F.hardswish, F.hardsigmoid, F.mish])
def test_inplace(fn) -> None:
    x = og.tensor(np.linspace(-4, 7, 6, dtype=np.float32))
    want = fn(x).numpy()
    assert fn(x, inplace=True) is x
    np.testing.assert_array_equal(x.numpy(), want)
    leaf = og.tensor(np.ones(3, np.float32), requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fn(leaf, inplace=True)


@pytest.mark.parametrize(("call", "error", "pattern"), [
    (lambda: F.group_norm(og.zeros(2, 6, 4), 4), og.ShapeError,
     r"divisible by num_groups.*\[2, 6, 4\] and num_groups=4"),
    (lambda: F.group_norm(og.zeros(2, 4, 3), 2, og.zeros(3)), og.ShapeError,
     r"weight of shape \[4\].*got \[3\]"),
    (lambda: F.group_norm(og.zeros(4), 2), og.ShapeError, r"at least 2-D"),
    (lambda: F.conv1d(og.zeros(1, 4, 8), og.zeros(6, 3, 3)), og.ShapeError,
     r"expected input \[1, 4, 8\] to have 3 channels, but got 4"),
    (lambda: F.conv1d(og.zeros(1, 4, 8, 8), og.zeros(6, 4, 3)), og.ShapeError,
     r"2-D \(unbatched\) or 3-D \(batched\)"),
    (lambda: F.conv1d(og.zeros(1, 4, 8), og.zeros(6, 4, 3, 3)), og.ShapeError,
     r"weight must be 3-D"),
    (lambda: F.conv1d(og.zeros(1, 4, 2), og.zeros(6, 4, 5)), og.ShapeError,
     r"kernel 5 \(dilated to 5\) is larger than the padded input 2"),
    (lambda: F.conv1d(og.zeros(1, 4, 8), og.zeros(6, 4, 3), stride=2, padding="same"),
     ValueError, r"padding='same' is not supported for strided"),
    (lambda: F.conv1d(og.zeros(1, 4, 8), og.zeros(6, 4, 3), og.zeros(5)), og.ShapeError,
     r"bias must have shape \[6\], got \[5\]"),
])
def test_errors_name_the_problem(call, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        call()
