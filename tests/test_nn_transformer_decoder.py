"""``og.nn.TransformerDecoder``: PyTorch's signature and state-dict names, forward values and
gradients (inputs and every parameter), and 3 compiled SGD steps like PyTorch's."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_nn_transformer import _copy, _parity, _rand

import onnxgrad as og
import onnxgrad.nn.functional as F

torch = pytest.importorskip("torch")


def _pair(norm: bool, **kw: Any) -> tuple[Any, og.nn.TransformerDecoder]:
    torch.manual_seed(0)
    kw = {"dim_feedforward": 16, "dropout": 0.0, **kw}
    tm = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(8, 2, **kw), 2,
                                     norm=torch.nn.LayerNorm(8) if norm else None)
    om = og.nn.TransformerDecoder(og.nn.TransformerDecoderLayer(8, 2, **kw), 2,
                                  norm=og.nn.LayerNorm(8) if norm else None)
    return tm, om


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_decoder_causal_batch_first(norm_first: bool, activation: str) -> None:
    tm, om = _pair(True, norm_first=norm_first, activation=activation, batch_first=True)
    mask = np.triu(np.full((4, 4), -np.inf, dtype=np.float32), 1)
    _parity(tm, om, [_rand(2, 4, 8, seed=1), _rand(2, 6, 8, seed=2), mask],
            lambda m, t, mem, mask: m(t, mem, tgt_mask=mask, tgt_is_causal=True),
            grad_inputs=(0, 1))


def test_decoder_sequence_first_with_padding_masks_and_no_norm() -> None:
    tm, om = _pair(False)
    bool_mask = np.triu(np.ones((4, 4), dtype=bool), 1)
    tgt_pad = np.array([[False, False, False, True], [False, False, False, False]])
    # Float like memory_mask (PyTorch deprecates mixing bool and float masks of one attention).
    mem_pad = np.zeros((2, 6), np.float32)
    mem_pad[1, 4:] = -np.inf
    mem_mask = np.zeros((4, 6), np.float32)
    mem_mask[0, 1] = -1.5  # an additive float mask on the cross-attention

    def call(m, t, mem, mask, tp, mp, mm):
        return m(t, mem, tgt_mask=mask, memory_mask=mm, tgt_key_padding_mask=tp,
                 memory_key_padding_mask=mp)

    _parity(tm, om, [_rand(4, 2, 8, seed=3), _rand(6, 2, 8, seed=4), bool_mask, tgt_pad,
                     mem_pad, mem_mask], call, grad_inputs=(0, 1))


def test_decoder_layers_are_copies() -> None:
    layer = og.nn.TransformerDecoderLayer(8, 2, dim_feedforward=16)
    dec = og.nn.TransformerDecoder(layer, 3)
    w = [lay.multihead_attn.in_proj_weight for lay in dec.layers]
    assert len(dec.layers) == 3 and dec.num_layers == 3 and w[0] is not w[1]
    assert np.array_equal(w[0].detach().numpy(), w[2].detach().numpy())
    assert [k for k in dec.state_dict() if k.startswith("layers.2.norm3")] == \
        ["layers.2.norm3.weight", "layers.2.norm3.bias"]


def test_decoder_trains_compiled_like_pytorch() -> None:
    tm, om = _pair(True, batch_first=True, norm_first=True)
    _copy(tm, om)
    head, t_head = og.nn.Linear(8, 5), torch.nn.Linear(8, 5)
    t_head.load_state_dict({k: torch.tensor(v.numpy()) for k, v in head.state_dict().items()})
    opt = og.optim.SGD([*om.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    t_opt = torch.optim.SGD([*tm.parameters(), *t_head.parameters()], lr=0.1, momentum=0.9)
    mask = np.triu(np.full((4, 4), -np.inf, dtype=np.float32), 1)

    @og.compile
    def step(tgt, mem, y):
        opt.zero_grad()
        out = head(om(tgt, mem, tgt_mask=og.tensor(mask), tgt_is_causal=True))
        loss = F.cross_entropy(out.reshape(-1, 5), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss

    rng = np.random.default_rng(0)
    for _ in range(3):
        tgt, mem = _rand(2, 4, 8, seed=int(rng.integers(99))), _rand(2, 6, 8, seed=7)
        y = rng.integers(0, 5, (2, 4))
        loss = float(step(og.tensor(tgt), og.tensor(mem), og.tensor(y)))
        t_opt.zero_grad()
        out = t_head(tm(torch.tensor(tgt), torch.tensor(mem), tgt_mask=torch.tensor(mask),
                        tgt_is_causal=True))
        t_loss = torch.nn.functional.cross_entropy(out.reshape(-1, 5), torch.tensor(y).reshape(-1))
        t_loss.backward()
        t_opt.step()
        np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-4)
    theirs = tm.state_dict()
    for name, value in om.state_dict().items():
        np.testing.assert_allclose(value.numpy(), theirs[name].numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=name)
