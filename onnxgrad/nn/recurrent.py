"""Recurrent layers (``LSTM``, ``GRU``, ``RNN``) and the replay of ONNX's recurrent nodes.

Both are compositions of existing ops unrolled over the (static) sequence length: one MatMul
for the input projection of every time step at once, then per step a MatMul of the hidden state,
Split into gates, Sigmoid/Tanh/Mul/Add, and a final Concat of the steps. Their gradients are the
rules of those ops: no recurrent rule exists, and an imported ``LSTM``/``GRU``/``RNN`` node
trains through the same cell code (:func:`replay_onnx_recurrent`) as ``og.nn.LSTM``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..tracer import ops as T
from ..tracer.factories import zeros
from ..tracer.tensor import Tensor, Val
from . import functional as F
from .modules import Module, Parameter, _uniform

__all__ = ["GRU", "LSTM", "RNN", "replay_onnx_recurrent"]

# Gate count per cell kind (rows of weight_ih are gates * hidden_size).
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


# --------------------------------------------------------------------------- the cells
def _run_direction(kind: str, xp: Tensor, h: Tensor, c: Tensor | None, w_hh: Tensor,
                   b_hh: Tensor | None, reverse: bool, order: Sequence[int],
                   gru_reset_after: bool = True, b_hn_only: Tensor | None = None
                   ) -> tuple[list[Tensor], Tensor, Tensor | None]:
    """One direction of one layer.

    ``xp``: the input projection with its bias, [L, N, G*H]; ``h``, ``c``: [N, H]; ``w_hh``:
    [G*H, H]; ``b_hh``: [G*H] or None. ``order``: where each gate of the cell's own order (LSTM:
    i, f, g, o; GRU: r, z, n) sits among the G chunks (PyTorch's layout is ``range(G)``, ONNX's
    LSTM iofc is (0, 2, 3, 1), its GRU zrh (1, 0, 2)). ``gru_reset_after``: PyTorch's GRU (ONNX
    linear_before_reset=1) applies r after the hidden MatMul; else r scales h before it (then
    ``b_hn_only`` is the hidden bias of n, added after). Returns the outputs in time order, and
    the final h and c.
    """
    length = xp.shape[0]
    steps: list[Tensor | None] = [None] * length
    w_t = w_hh.transpose(0, 1)
    gates = GATES[kind]
    for t in (range(length - 1, -1, -1) if reverse else range(length)):
        x_t = xp[t]
        if kind == "GRU" and not gru_reset_after:
            xg = T.chunk(x_t, 3, 1)
            hg = T.chunk(T.matmul(h, w_t), 3, 1)  # hidden n part unused: recomputed below
            r = T.sigmoid(xg[order[0]] + hg[order[0]])
            z = T.sigmoid(xg[order[1]] + hg[order[1]])
            w_n = T.chunk(w_hh, 3, 0)[order[2]]
            hn = T.matmul(r * h, w_n.transpose(0, 1))
            if b_hn_only is not None:
                hn = hn + b_hn_only
            n = T.tanh(xg[order[2]] + hn)
            h = (1 - z) * n + z * h
        else:
            hp = T.matmul(h, w_t)
            if b_hh is not None:
                hp = hp + b_hh
            if kind == "LSTM":
                s = T.chunk(x_t + hp, 4, 1)
                i, f = T.sigmoid(s[order[0]]), T.sigmoid(s[order[1]])
                g, o = T.tanh(s[order[2]]), T.sigmoid(s[order[3]])
                c = f * c + i * g
                h = o * T.tanh(c)
            elif kind == "GRU":
                xg, hg = T.chunk(x_t, 3, 1), T.chunk(hp, 3, 1)
                r = T.sigmoid(xg[order[0]] + hg[order[0]])
                z = T.sigmoid(xg[order[1]] + hg[order[1]])
                n = T.tanh(xg[order[2]] + r * hg[order[2]])
                h = (1 - z) * n + z * h
            else:
                assert gates == 1
                h = T.tanh(x_t + hp) if kind == "RNN_TANH" else T.relu(x_t + hp)
        steps[t] = h
    return steps, h, c  # type: ignore[return-value]


def _project(x: Tensor, w_ih: Tensor, b_ih: Tensor | None) -> Tensor:
    """x [L, N, I] @ w_ih^T (+ b_ih): every time step's input projection in one MatMul."""
    xp = T.matmul(x, w_ih.transpose(0, 1))
    return xp if b_ih is None else xp + b_ih


# --------------------------------------------------------------------------- og.nn layers
class _RNNBase(Module):
    """PyTorch's ``nn.RNNBase``: parameters ``weight_ih_l{k}[_reverse]``, ``weight_hh_l{k}``,
    ``bias_ih_l{k}``, ``bias_hh_l{k}``, all initialized U(-1/sqrt(hidden), 1/sqrt(hidden))."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"{name}: hidden_size must be a positive integer, got {hidden_size!r}")
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"{name}: num_layers must be a positive integer, got {num_layers!r}")
        if isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(f"{name}: dropout should be a number in range [0, 1] representing "
                             f"the probability of an element being zeroed, got {dropout!r}")
        if proj_size:
            raise NotImplementedError(f"{name}: proj_size is not supported by onnxgrad")
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first = bias, batch_first
        self.dropout, self.bidirectional = float(dropout), bidirectional
        self.proj_size = 0
        directions = 2 if bidirectional else 1
        gates = GATES[mode] * hidden_size
        bound = 1.0 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * directions
            for d in range(directions):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                setattr(self, f"weight_ih{sfx}", Parameter(_uniform((gates, width), bound)))
                setattr(self, f"weight_hh{sfx}", Parameter(_uniform((gates, hidden_size), bound)))
                if bias:
                    setattr(self, f"bias_ih{sfx}", Parameter(_uniform((gates,), bound)))
                    setattr(self, f"bias_hh{sfx}", Parameter(_uniform((gates,), bound)))

    def _check(self, x: Tensor, hx: Tensor | None, what: str) -> tuple[Tensor, bool]:
        name = type(self).__name__
        if x.ndim not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {x.ndim}D input of "
                             f"shape {list(x.shape)}")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{name}: input.size(-1) must be equal to input_size. Expected "
                             f"{self.input_size}, got {x.shape[-1]}")
        batched = x.ndim == 3
        if not batched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        if hx is not None:
            want = (self.num_layers * (2 if self.bidirectional else 1), x.shape[1],
                    self.hidden_size)
            got = tuple(hx.shape) if batched else (*hx.shape[:1], 1, *hx.shape[1:])
            if got != want:
                raise ValueError(f"{name}: Expected {what} size {list(want if batched else (want[0], want[2]))}, "
                                 f"got {list(hx.shape)}")
        return x, batched

    def _run(self, x: Tensor, h0: Tensor | None, c0: Tensor | None
             ) -> tuple[Tensor, Tensor, Tensor | None]:
        """x [L, N, I] -> output [L, N, D*H], h_n [layers*D, N, H], c_n (LSTM) or None."""
        directions = 2 if self.bidirectional else 1
        n, hidden = x.shape[1], self.hidden_size
        hs, cs = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(directions):
                k = layer * directions + d
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh = getattr(self, f"weight_ih{sfx}"), getattr(self, f"weight_hh{sfx}")
                b_ih = getattr(self, f"bias_ih{sfx}") if self.bias else None
                b_hh = getattr(self, f"bias_hh{sfx}") if self.bias else None
                h = h0[k] if h0 is not None else _zeros_state(n, hidden, x)
                c = None
                if self.mode == "LSTM":
                    c = c0[k] if c0 is not None else _zeros_state(n, hidden, x)
                steps, h, c = _run_direction(self.mode, _project(x, w_ih, b_ih), h, c, w_hh,
                                             b_hh, bool(d), range(GATES[self.mode]))
                outs.append(T.stack(steps, 0))
                hs.append(h)
                if c is not None:
                    cs.append(c)
            x = outs[0] if directions == 1 else T.cat(outs, 2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, T.stack(hs, 0), (T.stack(cs, 0) if cs else None)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s


def _zeros_state(n: int, hidden: int, like: Tensor) -> Tensor:
    return zeros(n, hidden, dtype=like.dtype)


def _finish(self: _RNNBase, out: Tensor, batched: bool) -> Tensor:
    if not batched:
        return out.squeeze(1)
    return out.transpose(0, 1) if self.batch_first else out


class LSTM(_RNNBase):
    """``torch.nn.LSTM``: ``output, (h_n, c_n) = lstm(input, (h_0, c_0))``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0) -> None:
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h0 = c0 = None
        if hx is not None:
            h0, c0 = hx
        x, batched = self._check(input, h0, "hidden[0]")
        if c0 is not None:
            self._check(input, c0, "hidden[1]")
        if not batched and h0 is not None:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        out, h_n, c_n = self._run(x, h0, c0)
        if not batched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return _finish(self, out, batched), (h_n, c_n)


class GRU(_RNNBase):
    """``torch.nn.GRU``: ``output, h_n = gru(input, h_0)``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False) -> None:
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional)

    def forward(self, input: Tensor, hx: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        x, batched = self._check(input, hx, "hidden")
        if not batched and hx is not None:
            hx = hx.unsqueeze(1)
        out, h_n, _ = self._run(x, hx, None)
        return _finish(self, out, batched), (h_n if batched else h_n.squeeze(1))


class RNN(_RNNBase):
    """``torch.nn.RNN`` (``nonlinearity="tanh" | "relu"``): ``output, h_n = rnn(input, h_0)``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' "
                             f"or 'relu'.")
        super().__init__(f"RNN_{nonlinearity.upper()}", input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional)
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        x, batched = self._check(input, hx, "hidden")
        if not batched and hx is not None:
            hx = hx.unsqueeze(1)
        out, h_n, _ = self._run(x, hx, None)
        return _finish(self, out, batched), (h_n if batched else h_n.squeeze(1))

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + ", nonlinearity='relu'"


# --------------------------------------------------------------------------- ONNX nodes
# ONNX's gate layouts, as positions of the cell's own gate order (LSTM i, f, g, o; GRU r, z, n).
ONNX_ORDER = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"],
                       "RNN": ["Tanh"]}


def replay_onnx_recurrent(op: str, attrs: dict[str, Any], ins: list[Val | None],
                          n_out: int, where: Callable[[], str]) -> list[Val | None]:
    """An ONNX ``LSTM``/``GRU``/``RNN`` node as its cell equations on eager ops.

    ``ins``: X, W, R, B, sequence_lens, initial_h (, initial_c, P for LSTM). Returns Y
    [L, D, N, H] (layout 1: [N, L, D, H]), Y_h [D, N, H] (layout 1: [N, D, H]) and, for LSTM, Y_c.
    ``where()`` names the node for errors.
    """
    x, w, r, b, seq_lens, h0 = (list(ins) + [None] * 8)[:6]
    c0 = ins[6] if op == "LSTM" and len(ins) > 6 else None
    peep = ins[7] if op == "LSTM" and len(ins) > 7 else None
    if peep is not None:
        raise ValueError(f"{where()}: LSTM peepholes (input P) are not supported")
    for name in ("clip", "activation_alpha", "activation_beta"):
        if attrs.get(name) is not None:
            raise ValueError(f"{where()}: attribute {name!r} is not supported (PyTorch's "
                             f"exports never set it)")
    if attrs.get("input_forget", 0):
        raise ValueError(f"{where()}: input_forget=1 is not supported")
    direction = attrs.get("direction", "forward")
    if isinstance(direction, bytes):
        direction = direction.decode()
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ValueError(f"{where()}: unknown direction {direction!r}")
    dirs = 2 if direction == "bidirectional" else 1
    acts = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations") or []]
    kind = op
    if op == "RNN":
        acts = acts or ["Tanh"] * dirs
        if len(set(acts)) != 1 or acts[0] not in ("Tanh", "Relu"):
            raise ValueError(f"{where()}: RNN activations {acts} are not supported (Tanh or "
                             f"Relu, the same in both directions)")
        kind = "RNN_TANH" if acts[0] == "Tanh" else "RNN_RELU"
    elif acts and acts != DEFAULT_ACTIVATIONS[op] * dirs:
        raise ValueError(f"{where()}: {op} activations {acts} are not supported (only the "
                         f"default {DEFAULT_ACTIVATIONS[op]})")
    layout = attrs.get("layout", 0)
    X = Tensor(x)
    if layout:
        X = X.transpose(0, 1)  # [N, L, I] -> [L, N, I]
    length, n = X.shape[0], X.shape[1]
    W, R = Tensor(w), Tensor(r)
    hidden = R.shape[-1]
    if seq_lens is not None:
        lens = np.asarray(seq_lens.data).reshape(-1)
        if not seq_lens.const or np.any(lens != length):
            shown = lens.tolist() if seq_lens.const else "computed values"
            raise ValueError(f"{where()}: sequence_lens {shown} differ from the sequence length "
                             f"{length}; onnxgrad unrolls every sequence to the full length "
                             f"(pad the batch to one length, or drop sequence_lens)")
    H0 = Tensor(h0) if h0 is not None else None
    C0 = Tensor(c0) if c0 is not None else None
    if layout:
        H0 = None if H0 is None else H0.transpose(0, 1)
        C0 = None if C0 is None else C0.transpose(0, 1)
    gates = GATES[kind] * hidden
    ys, hs, cs = [], [], []
    for d in range(dirs):
        reverse = direction == "reverse" or d == 1
        w_ih, w_hh = W[d], R[d]
        b_ih = b_hh = None
        if b is not None:
            bias = Tensor(b)[d]
            b_ih, b_hh = bias[:gates], bias[gates:]
        h = H0[d] if H0 is not None else _zeros_state(n, hidden, X)
        c = None
        if op == "LSTM":
            c = C0[d] if C0 is not None else _zeros_state(n, hidden, X)
        reset_after = bool(attrs.get("linear_before_reset", 0)) if op == "GRU" else True
        b_hn = None
        if op == "GRU" and not reset_after and b_hh is not None:
            # The hidden biases of z and r add before the sigmoid; that of h after r * (h R^T).
            order = ONNX_ORDER["GRU"]
            parts = T.chunk(b_hh, 3, 0)
            b_hn = parts[order[2]]
            zero = zeros(hidden, dtype=X.dtype)
            b_ih = b_ih + T.cat([parts[k] if k != order[2] else zero for k in range(3)], 0)
            b_hh = None
        steps, h, c = _run_direction(kind, _project(X, w_ih, b_ih), h, c, w_hh, b_hh, reverse,
                                     ONNX_ORDER[op], gru_reset_after=reset_after, b_hn_only=b_hn)
        ys.append(T.stack(steps, 0))  # [L, N, H]
        hs.append(h)
        if c is not None:
            cs.append(c)
    Y = T.stack(ys, 1)  # [L, D, N, H]
    Y_h = T.stack(hs, 0)  # [D, N, H]
    Y_c = T.stack(cs, 0) if cs else None
    if layout:
        Y = Y.permute(2, 0, 1, 3)  # [N, L, D, H]
        Y_h = Y_h.transpose(0, 1)
        Y_c = None if Y_c is None else Y_c.transpose(0, 1)
    outs = [Y._v, Y_h._v] + ([Y_c._v] if op == "LSTM" else [])
    return outs[:n_out] + [None] * max(0, n_out - len(outs))
