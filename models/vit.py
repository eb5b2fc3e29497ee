"""A small configurable Vision Transformer with torchvision's ``VisionTransformer`` names.

``conv_proj`` (patch embedding), ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_N.{ln_1, self_attention, ln_2, mlp.0, mlp.3}``, ``encoder.ln``
and ``heads.head``: a torchvision ``vit_*`` state dict of the same sizes loads 1:1.
Initialisation follows torchvision's, except that ``conv_proj``'s truncated normal is a plain
normal of the same standard deviation.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from .. import nn
from ..tracer import ops
from ..tracer.factories import generator
from ..tracer.tensor import Tensor, get_default_dtype

__all__ = ["VisionTransformer", "vit"]


def _normal(shape: tuple[int, ...], std: float) -> np.ndarray:
    return (generator().standard_normal(shape) * std).astype(get_default_dtype())


def _mlp(hidden_dim: int, mlp_dim: int, dropout: float) -> nn.Sequential:
    """torchvision's ``MLPBlock``: Linear, GELU, Dropout, Linear, Dropout (indices 0-4)."""
    block = nn.Sequential(nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                          nn.Linear(mlp_dim, hidden_dim), nn.Dropout(dropout))
    for i in (0, 3):
        lin = block[i]
        fan_out, fan_in = lin.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        lin.weight = nn.Parameter(generator().uniform(-bound, bound, (fan_out, fan_in))
                                  .astype(get_default_dtype()))
        lin.bias = nn.Parameter(_normal((fan_out,), 1e-6))
    return block


class EncoderBlock(nn.Module):
    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float,
                 attention_dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads,
                                                    dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = _mlp(hidden_dim, mlp_dim, dropout)

    def forward(self, input: Tensor) -> Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(_normal((1, seq_length, hidden_dim), 0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}",
             EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout))
            for i in range(num_layers)))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int,
                 hidden_dim: int, mlp_dim: int, dropout: float = 0.0,
                 attention_dropout: float = 0.0, num_classes: int = 1000) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"vit: input shape indivisible by patch size! ({image_size} % "
                             f"{patch_size})")
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, patch_size, stride=patch_size)
        fan_in = 3 * patch_size * patch_size
        self.conv_proj.weight = nn.Parameter(
            _normal((hidden_dim, 3, patch_size, patch_size), math.sqrt(1 / fan_in)))
        self.conv_proj.bias = nn.Parameter(np.zeros(hidden_dim, get_default_dtype()))
        self.class_token = nn.Parameter(np.zeros((1, 1, hidden_dim), get_default_dtype()))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout,
                               attention_dropout)
        self.heads = nn.Sequential(OrderedDict([("head", nn.Linear(hidden_dim, num_classes))]))
        head = self.heads.head
        head.weight = nn.Parameter(np.zeros((num_classes, hidden_dim), get_default_dtype()))
        head.bias = nn.Parameter(np.zeros(num_classes, get_default_dtype()))

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"vit: wrong image size: expected {self.image_size}, got {h}x{w}")
        x = self.conv_proj(x)                                       # [N, D, h/p, w/p]
        x = ops.permute(ops.reshape(x, (n, self.hidden_dim, -1)), 0, 2, 1)
        cls = ops.expand(self.class_token, n, -1, -1)
        x = self.encoder(ops.cat([cls, x], 1))
        return self.heads(x[:, 0])


def vit(image_size: int = 32, patch_size: int = 8, num_layers: int = 2, num_heads: int = 2,
        hidden_dim: int = 64, mlp_dim: int = 128, num_classes: int = 10, *,
        dropout: float = 0.0, attention_dropout: float = 0.0) -> VisionTransformer:
    """A ViT of any size (torchvision's ``vit_b_16`` is ``vit(224, 16, 12, 12, 768, 3072,
    1000)``), small by default."""
    return VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim,
                             dropout, attention_dropout, num_classes)
