"""A multilayer perceptron: ``Linear`` layers with ``ReLU`` between them, as a ``Sequential``."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from .. import nn
from .weights import load_weights, resolve_weights

__all__ = ["mlp"]


def mlp(in_features: int, hidden: Sequence[int] | int = (), out_features: int = 10, *,
        bias: bool = True, dropout: float = 0.0, weights: Any = None) -> nn.Sequential:
    """``Linear(in, h0), ReLU(), [Dropout(p)], Linear(h0, h1), ..., Linear(h_last, out)``.

    The indices are ``Sequential``'s (``0.weight``, ``2.weight``, ...), so the state dict maps
    1:1 onto ``torch.nn.Sequential`` of the same layers. ``dropout`` > 0 puts a ``Dropout`` after
    each ``ReLU``. ``weights`` is a local ``.npz`` / ``.safetensors`` file, as for the ResNets.
    """
    hidden = [hidden] if isinstance(hidden, int) else list(hidden)
    sizes = [in_features, *hidden, out_features]
    for s in sizes:
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"mlp: layer sizes must be positive ints, got {sizes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"mlp: dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    model = nn.Sequential(*layers)
    path = resolve_weights(weights, None, "mlp")
    if path is not None:
        load_weights(model, path)
    return model
