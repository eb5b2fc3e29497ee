"""Op-table rows for the transformer ops and the rules of ONNX ops transformer exports emit.

Each row is checked three ways by ``opcheck.check_case`` (NumPy forward, float64 VJP against
central differences, ONNX Runtime against the reference evaluator).
"""
from __future__ import annotations

import math

import numpy as np
from opcheck import OpCase, arg, case, fixed, index, table_tests

import onnxgrad as og
import onnxgrad.nn.functional as F

np_erf = np.vectorize(math.erf, otypes=[np.float64])


def f32(fn):
    return lambda *a: np.asarray(fn(*a), dtype=np.float32)


def np_layer_norm(x, w=None, b=None, n=1, eps=1e-5):
    axes = tuple(range(x.ndim - n, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axes, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y.astype(x.dtype)


def np_gelu(x):
    return (0.5 * x * (1 + np_erf(x / math.sqrt(2)))).astype(x.dtype)


def np_gelu_tanh(x):
    x64 = x.astype(np.float64)
    y = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    return y.astype(x.dtype)


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_sdpa(q, k, v, mask=None, causal=False, scale=None):
    s = (q.astype(np.float64) @ np.swapaxes(k, -2, -1)) * (
        1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    elif mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    return (np_softmax(s) @ v).astype(q.dtype)


def np_logsumexp(x, axis, keepdims=False):
    m = x.max(axis=axis, keepdims=True)
    out = np.log(np.exp(x - m).sum(axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis)


EMB_IDX = np.array([[0, 3, 1], [3, 3, 2]], dtype=np.int64)
KEY_MASK = np.array([[True, True, False, True], [True, False, True, True],
                     [True, True, True, False]])

CASES: list[OpCase] = [
    # ------------------------------------------------------------------ layer_norm
    case("layer_norm/affine", lambda x, w, b: F.layer_norm(x, (4,), w, b),
         lambda x, w, b: np_layer_norm(x, w, b), (3, 4), (4,), (4,)),
    case("layer_norm/no-affine", lambda x: F.layer_norm(x, 4), np_layer_norm, (2, 3, 4)),
    case("layer_norm/two-dims", lambda x, w, b: F.layer_norm(x, (3, 4), w, b, eps=1e-3),
         lambda x, w, b: np_layer_norm(x, w, b, n=2, eps=1e-3), (2, 3, 4), (3, 4), (3, 4)),
    case("layer_norm/weight-only", lambda x, w: F.layer_norm(x, [5], w),
         lambda x, w: np_layer_norm(x, w), (2, 2, 5), (5,)),
    # ------------------------------------------------------------------ gelu
    # NOTE: float64 Gelu and Erf compute in float32 (no ORT kernel): VJP at float32 accuracy.
    case("gelu", F.gelu, np_gelu, (2, 3), eps=1e-2, grad_rtol=5e-4),
    case("gelu/tanh", lambda x: F.gelu(x, approximate="tanh"), np_gelu_tanh, (2, 3, 2),
         eps=1e-2, grad_rtol=5e-4),
    # ------------------------------------------------------------------ embedding
    case("embedding", lambda i, w: F.embedding(i, w), lambda i, w: w[i], index(EMB_IDX), (5, 3)),
    # NOTE: the padding row gets no gradient on purpose (not the true derivative), so the VJP
    # check is off; tests/test_nn_transformer.py pins the gradient against PyTorch's.
    case("embedding/padding_idx", lambda i, w: F.embedding(i, w, padding_idx=3),
         lambda i, w: w[i], index(EMB_IDX), (5, 3), vjp=False),
    # ------------------------------------------------------------------ attention
    case("sdpa", F.scaled_dot_product_attention, np_sdpa, (2, 3, 4), (2, 5, 4), (2, 5, 3)),
    case("sdpa/causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
         lambda q, k, v: np_sdpa(q, k, v, causal=True), (1, 2, 4, 3), (1, 2, 4, 3), (1, 2, 4, 2)),
    case("sdpa/bool-mask", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m),
         np_sdpa, (2, 3, 4), (2, 4, 4), (2, 4, 2), fixed(KEY_MASK)),
    case("sdpa/float-mask-scale",
         lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, scale=0.3),
         lambda q, k, v, m: np_sdpa(q, k, v, m, scale=0.3), (3, 4), (4, 4), (4, 2),
         arg(3, 4, grad=True)),
    # ------------------------------------------------------------------ ops transformer exports emit
    case("tril", og.tril, np.tril, (3, 4)),
    case("triu/diagonal", lambda x: og.triu(x, 1), lambda x: np.triu(x, 1), (2, 3, 3)),
    case("tril/method-negative", lambda x: x.tril(-1), lambda x: np.tril(x, -1), (4, 3)),
    case("einsum/matmul", lambda a, b: og.einsum("ij,jk->ik", a, b),
         lambda a, b: np.einsum("ij,jk->ik", a, b), (2, 3), (3, 4)),
    case("einsum/attention-scores", lambda a, b: og.einsum("bhqd,bhkd->bhqk", a, b),
         lambda a, b: np.einsum("bhqd,bhkd->bhqk", a, b), (2, 2, 3, 4), (2, 2, 5, 4)),
    case("einsum/implicit", lambda a, b: og.einsum("ij,jk", a, b),
         lambda a, b: np.einsum("ij,jk", a, b), (2, 3), (3, 4)),
    case("einsum/ellipsis", lambda a, b: og.einsum("...ij,...jk->...ik", a, b),
         lambda a, b: np.einsum("...ij,...jk->...ik", a, b), (2, 2, 3), (2, 3, 4)),
    case("einsum/summed-alone", lambda a, b: og.einsum("ij,k->jk", a, b),
         lambda a, b: np.einsum("ij,k->jk", a, b), (2, 3), (4,)),
    case("einsum/one-operand", lambda a: og.einsum("ijk->ki", a),
         lambda a: np.einsum("ijk->ki", a), (2, 3, 4)),
    case("logsumexp", lambda x: og.logsumexp(x, 1), lambda x: np_logsumexp(x, 1), (3, 4)),
    case("logsumexp/keepdim", lambda x: x.logsumexp((0, 2), keepdim=True),
         lambda x: np_logsumexp(x, (0, 2), True), (2, 3, 2)),
    case("norm", og.norm, lambda x: np.asarray(np.linalg.norm(x), dtype=np.float32), (3, 4)),
    case("norm/dim", lambda x: og.norm(x, 2, dim=1, keepdim=True),
         lambda x: np.linalg.norm(x, axis=1, keepdims=True).astype(np.float32), (3, 4)),
    case("repeat", lambda x: x.repeat(2, 1, 3), lambda x: np.tile(x, (2, 1, 3)), (2, 3)),
    case("repeat/same-rank", lambda x: x.repeat(1, 2), lambda x: np.tile(x, (1, 2)), (2, 3)),
]

test_forward, test_vjp, test_runtimes, test_ids_are_unique = table_tests(CASES)


def test_rules_on_an_imported_graph_match_pytorch():
    """The rules as imported files use them: ``CastLike``, ``LayerNormalization`` keeping only
    ``Y`` (statistics recomputed by the rule), ``Gelu`` (tanh), ``Trilu`` and ``Einsum``."""
    import pytest
    torch = pytest.importorskip("torch")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    scale = rng.standard_normal(4).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    x = rng.standard_normal((2, 4, 4))
    nodes = [
        helper.make_node("CastLike", ["x", "like"], ["x32"]),
        helper.make_node("LayerNormalization", ["x32", "scale", "bias"], ["ln"], axis=-1,
                         epsilon=1e-5),
        helper.make_node("Gelu", ["ln"], ["act"], approximate="tanh"),
        helper.make_node("Trilu", ["act"], ["low"], upper=0),
        helper.make_node("Einsum", ["low", "w"], ["y"], equation="bij,jk->bik"),
    ]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "like"),
             numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias"),
             numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    module = og.nn.OnnxModule(model, parameters=["scale", "bias", "w"])
    seed = rng.standard_normal((2, 4, 3)).astype(np.float32)
    xo = og.tensor(x, requires_grad=True)
    out = module(xo)
    (out * og.tensor(seed)).sum().backward()

    xt = torch.tensor(x, requires_grad=True)
    pt = {k: torch.tensor(v, requires_grad=True) for k, v in
          {"scale": scale, "bias": bias, "w": w}.items()}
    ln = torch.nn.functional.layer_norm(xt.float(), (4,), pt["scale"], pt["bias"], 1e-5)
    yt = torch.einsum("bij,jk->bik", torch.tril(torch.nn.functional.gelu(ln, approximate="tanh")),
                      pt["w"])
    (yt * torch.tensor(seed)).sum().backward()
    np.testing.assert_allclose(out.detach().numpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert xo.grad.dtype == np.float64
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    params = dict(module.named_parameters())
    for name, p in pt.items():
        np.testing.assert_allclose(params[name].grad.numpy(), p.grad.numpy(), rtol=1e-4,
                                   atol=1e-5, err_msg=name)
