"""PyTorch parity of the transformer layers: same state_dict names, forward values and gradients.

Each og layer loads the PyTorch layer's state_dict (so names and shapes must agree), runs the same
input, and backpropagates the same random projection of the output; outputs, the input gradient
and every parameter gradient are compared.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import onnxgrad as og
import onnxgrad.nn.functional as F

torch = pytest.importorskip("torch")

RTOL, ATOL = 1e-4, 1e-5


def _copy(tm: Any, om: og.nn.Module) -> None:
    theirs = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    assert list(theirs) == list(om.state_dict()), "state_dict names or order differ"
    om.load_state_dict(theirs)


def _close(ours: Any, theirs: Any, what: str) -> None:
    a = ours.detach().numpy() if isinstance(ours, og.Tensor) else np.asarray(ours)
    b = theirs.detach().numpy()
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=what)


def _parity(tm: Any, om: og.nn.Module, inputs: list[np.ndarray], call=None,
            grad_inputs: tuple[int, ...] = (0,)) -> None:
    """Forward and backward of ``call(module, *inputs)`` (default: ``module(*inputs)``)."""
    call = call or (lambda m, *xs: m(*xs))
    _copy(tm, om)
    t_in = [torch.tensor(x, requires_grad=i in grad_inputs) for i, x in enumerate(inputs)]
    o_in = [og.tensor(x, requires_grad=i in grad_inputs) for i, x in enumerate(inputs)]
    t_out, o_out = call(tm, *t_in), call(om, *o_in)
    _close(o_out, t_out, "output")
    seed = np.random.default_rng(1).standard_normal(tuple(t_out.shape)).astype(np.float32)
    (t_out * torch.tensor(seed)).sum().backward()
    (o_out * og.tensor(seed)).sum().backward()
    for i in grad_inputs:
        _close(o_in[i].grad, t_in[i].grad, f"grad of input {i}")
    ours = dict(om.named_parameters())
    for name, p in tm.named_parameters():
        assert p.grad is not None, name
        _close(ours[name].grad, p.grad, f"grad of {name}")


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("shape,affine,bias", [((8,), True, True), ((3, 8), True, True),
                                              ((8,), False, True), ((8,), True, False)])
def test_layer_norm(shape, affine, bias):
    torch.manual_seed(0)
    tm = torch.nn.LayerNorm(shape, eps=1e-4, elementwise_affine=affine, bias=bias)
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p))
    om = og.nn.LayerNorm(shape, eps=1e-4, elementwise_affine=affine, bias=bias)
    _parity(tm, om, [_rand(2, 5, *shape) * 3 + 1])


def test_layer_norm_init_and_errors():
    m = og.nn.LayerNorm(4)
    assert list(m.state_dict()) == ["weight", "bias"]
    assert np.all(m.weight.detach().numpy() == 1) and np.all(m.bias.detach().numpy() == 0)
    with pytest.raises(ValueError, match="layer_norm: normalized_shape"):
        F.layer_norm(og.randn(2, 3), (4,))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    x = _rand(3, 7) * 3
    t = torch.tensor(x, requires_grad=True)
    o = og.tensor(x, requires_grad=True)
    tm, om = torch.nn.GELU(approximate), og.nn.GELU(approximate)
    _close(om(o), tm(t), "gelu")
    tm(t).pow(2).sum().backward()
    om(o).pow(2).sum().backward()
    _close(o.grad, t.grad, "gelu grad")
    with pytest.raises(ValueError, match="approximate"):
        og.nn.GELU("fast")


def test_embedding_padding_idx():
    torch.manual_seed(0)
    tm = torch.nn.Embedding(10, 4, padding_idx=2)
    om = og.nn.Embedding(10, 4, padding_idx=2)
    assert np.all(om.weight.detach().numpy()[2] == 0)  # PyTorch's init zeroes the padding row
    with torch.no_grad():
        tm.weight[2] = 5.0  # a non-zero padding row is still read, and still gets no gradient
    idx = np.array([[1, 2, 2, 9], [2, 0, 1, 3]], dtype=np.int64)
    _parity(tm, om, [idx], grad_inputs=())
    assert np.all(om.weight.grad.numpy()[2] == 0)
    with pytest.raises(IndexError, match="out of range"):
        om(og.tensor(np.array([10])))


@pytest.mark.parametrize("kind", ["plain", "causal", "bool", "float", "scale"])
def test_sdpa(kind):
    q, k, v = _rand(2, 3, 5, 4, seed=1), _rand(2, 3, 6, 4, seed=2), _rand(2, 3, 6, 2, seed=3)
    extra: list[np.ndarray] = []
    kw: dict[str, Any] = {}
    if kind == "causal":
        kw["is_causal"] = True
    if kind == "scale":
        kw["scale"] = 0.7
    if kind == "bool":
        mask = np.random.default_rng(4).random((5, 6)) < 0.7
        mask[:, 0] = True
        extra = [mask]
    if kind == "float":
        extra = [_rand(1, 3, 5, 6, seed=5)]

    def call(m, q, k, v, *mask):
        f = m.nn.functional if m is torch else F
        return f.scaled_dot_product_attention(q, k, v, *mask, **kw)

    tq = [torch.tensor(x, requires_grad=x.dtype != bool) for x in (q, k, v, *extra)]
    oq = [og.tensor(x, requires_grad=x.dtype != bool) for x in (q, k, v, *extra)]
    t_out, o_out = call(torch, *tq), call(og, *oq)
    _close(o_out, t_out, "sdpa")
    t_out.sin().sum().backward()
    o_out.sin().sum().backward()
    for a, b in zip(oq, tq):
        if b.requires_grad:
            _close(a.grad, b.grad, "sdpa grad")


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_self_attention(batch_first, need_weights):
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first)
    with torch.no_grad():  # PyTorch's init has zero biases: make them matter
        tm.in_proj_bias.normal_()
        tm.out_proj.bias.normal_()
    om = og.nn.MultiheadAttention(8, 2, batch_first=batch_first)
    x = _rand(3, 4, 8)  # [N, L, E] or [L, N, E]
    mask = np.triu(np.ones((4, 4) if batch_first else (3, 3), dtype=bool), 1)
    n, s = (3, 4) if batch_first else (4, 3)
    kpm = np.zeros((n, s), dtype=bool)
    kpm[0, -1] = True

    def call(m, x, mask, kpm):
        out, w = m(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=need_weights)
        if need_weights:
            return out + w.sum() * 0.1
        assert w is None
        return out

    _parity(tm, om, [x, mask, kpm], call)


def test_multihead_cross_attention_weights():
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(8, 4, batch_first=True, kdim=6, vdim=5)
    om = og.nn.MultiheadAttention(8, 4, batch_first=True, kdim=6, vdim=5)
    q, k, v = _rand(2, 3, 8, seed=1), _rand(2, 5, 6, seed=2), _rand(2, 5, 5, seed=3)

    def call(m, q, k, v):
        out, w = m(q, k, v, average_attn_weights=False)
        assert tuple(w.shape) == (2, 4, 3, 5)
        return out * w.sum((1, 3))[..., None]

    _parity(tm, om, [q, k, v], call, grad_inputs=(0, 1, 2))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder(norm_first, activation):
    torch.manual_seed(0)
    kw = {"dim_feedforward": 16, "dropout": 0.0, "activation": activation, "batch_first": True,
          "norm_first": norm_first}
    tm = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, **kw), 2,
                                     norm=torch.nn.LayerNorm(8), enable_nested_tensor=False)
    om = og.nn.TransformerEncoder(og.nn.TransformerEncoderLayer(8, 2, **kw), 2,
                                  norm=og.nn.LayerNorm(8))
    mask = np.triu(np.full((5, 5), -np.inf, dtype=np.float32), 1)
    _parity(tm, om, [_rand(3, 5, 8), mask], lambda m, x, mask: m(x, mask=mask, is_causal=True))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_decoder_layer(norm_first):
    torch.manual_seed(0)
    kw = {"dim_feedforward": 16, "dropout": 0.0, "norm_first": norm_first}
    tm = torch.nn.TransformerDecoderLayer(8, 2, **kw)
    om = og.nn.TransformerDecoderLayer(8, 2, **kw)
    tgt, mem = _rand(4, 2, 8, seed=1), _rand(6, 2, 8, seed=2)
    mask = np.triu(np.ones((4, 4), dtype=bool), 1)
    _parity(tm, om, [tgt, mem, mask], lambda m, t, mem, mask: m(t, mem, tgt_mask=mask),
            grad_inputs=(0, 1))


def test_encoder_layers_are_copies_and_dropout_trains():
    layer = og.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    enc = og.nn.TransformerEncoder(layer, 3)
    w = [lay.linear1.weight for lay in enc.layers]
    assert len(enc.layers) == 3 and w[0] is not w[1]
    assert np.array_equal(w[0].detach().numpy(), w[2].detach().numpy())
    x = og.tensor(_rand(5, 2, 8))
    enc(x).pow(2).sum().backward()  # the copies are fresh leaves: the template gets no .grad
    assert layer.linear1.weight.grad is None and all(t.grad is not None for t in w)
    enc.train()
    assert not np.array_equal(enc(x).detach().numpy(), enc(x).detach().numpy())
    enc.eval()
    np.testing.assert_array_equal(enc(x).detach().numpy(), enc(x).detach().numpy())
