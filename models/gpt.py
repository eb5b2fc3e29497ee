"""A GPT-style decoder with Hugging Face GPT-2's module and parameter names.

``gpt(vocab_size, n_layer, n_head, n_embd, block_size)`` builds ``GPT``, laid out as
``transformers.GPT2LMHeadModel``::

    transformer.wte            Embedding(vocab_size, n_embd)      token embeddings
    transformer.wpe            Embedding(block_size, n_embd)      learned positions
    transformer.h.N.ln_1       LayerNorm
    transformer.h.N.attn.c_attn / c_proj     Conv1D (weight [in, out], as GPT-2's)
    transformer.h.N.ln_2       LayerNorm
    transformer.h.N.mlp.c_fc / c_proj        Conv1D, GELU (tanh approximation, GPT-2's gelu_new)
    transformer.ln_f           LayerNorm
    lm_head                    Linear(n_embd, vocab_size, bias=False)

NOTE: ``lm_head.weight`` is tied to ``transformer.wte.weight`` by default (GPT-2's
``tie_word_embeddings=True``): one Parameter under both names, so ``parameters()`` lists it once
and ``state_dict()`` has both keys, as PyTorch. ``tie_weights=False`` gives ``lm_head`` its own.
Because the names and shapes are GPT-2's, a ``GPT2LMHeadModel`` state dict loads with
``load_state_dict(..., strict=False)`` (GPT-2 also stores non-parameter attention-mask buffers in
some versions). Initialisation is GPT-2's: N(0, 0.02) weights, zero biases, and the residual
projections (``c_proj``) scaled by 1/sqrt(2 n_layer).
"""
from __future__ import annotations

import math

import numpy as np

from .. import nn
from ..nn import functional as F
from ..tracer import ops
from ..tracer.factories import generator
from ..tracer.tensor import Tensor, get_default_dtype, tensor

__all__ = ["GPT", "Conv1D", "gpt"]


def _normal(shape: tuple[int, ...], std: float) -> np.ndarray:
    return (generator().standard_normal(shape) * std).astype(get_default_dtype())


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored ``[in, out]`` (``x @ W + b``)."""

    def __init__(self, nf: int, nx: int, std: float = 0.02) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(_normal((nx, nf), std))
        self.bias = nn.Parameter(np.zeros(nf, get_default_dtype()))

    def forward(self, x: Tensor) -> Tensor:
        return ops.add(ops.matmul(x, self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.weight.shape[0]}"


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_layer: int, dropout: float) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"gpt: n_embd {n_embd} must be divisible by n_head {n_head}")
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout
        self.c_attn = Conv1D(3 * n_embd, n_embd)
        self.c_proj = Conv1D(n_embd, n_embd, std=0.02 / math.sqrt(2 * n_layer))
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        h = self.n_head
        q, k, v = ops.split(self.c_attn(x), c, 2)
        q, k, v = (ops.transpose(ops.reshape(z, (b, t, h, c // h)), 1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = ops.reshape(ops.transpose(y, 1, 2), (b, t, c))
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, n_layer: int, dropout: float) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * n_embd, n_embd)
        self.c_proj = Conv1D(n_embd, 4 * n_embd, std=0.02 / math.sqrt(2 * n_layer))
        self.act = nn.GELU(approximate="tanh")
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_layer: int, dropout: float,
                 eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.attn = Attention(n_embd, n_head, n_layer, dropout)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.mlp = MLP(n_embd, n_layer, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, vocab_size: int, n_layer: int, n_head: int, n_embd: int,
                 block_size: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd, _weight=_normal((vocab_size, n_embd), 0.02))
        self.wpe = nn.Embedding(block_size, n_embd, _weight=_normal((block_size, n_embd), 0.02))
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, n_layer, dropout, eps)
                               for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.shape[-1]
        if t > self.wpe.num_embeddings:
            raise ValueError(f"gpt: sequence of {t} tokens is longer than block_size "
                             f"{self.wpe.num_embeddings}")
        positions = tensor(np.arange(t, dtype=np.int64))
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT(nn.Module):
    """``GPT2LMHeadModel``'s layout: ``forward(input_ids [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, n_embd: int, block_size: int,
                 *, dropout: float = 0.0, layer_norm_epsilon: float = 1e-5,
                 tie_weights: bool = True) -> None:
        super().__init__()
        self.config = {"vocab_size": vocab_size, "n_layer": n_layer, "n_head": n_head,
                       "n_embd": n_embd, "block_size": block_size, "dropout": dropout}
        self.transformer = Transformer(vocab_size, n_layer, n_head, n_embd, block_size, dropout,
                                       layer_norm_epsilon)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            self.lm_head.weight = nn.Parameter(_normal((vocab_size, n_embd), 0.02))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm_head(self.transformer(input_ids))


def gpt(vocab_size: int, n_layer: int, n_head: int, n_embd: int, block_size: int, *,
        dropout: float = 0.0, tie_weights: bool = True) -> GPT:
    """A GPT-2-style decoder (pre-norm blocks, causal attention, learned positions)."""
    for name, v in (("vocab_size", vocab_size), ("n_layer", n_layer), ("n_head", n_head),
                    ("n_embd", n_embd), ("block_size", block_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"gpt: {name} must be a positive int, got {v!r}")
    return GPT(vocab_size, n_layer, n_head, n_embd, block_size, dropout=dropout,
               tie_weights=tie_weights)
