"""``og.nn.LSTM``, ``GRU``, ``RNN`` against PyTorch: forward, gradients, compiled SGD steps."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnxgrad as og
from onnxgrad import nn

TOL = {"rtol": 1e-4, "atol": 1e-5}
CONFIGS = [  # num_layers, bidirectional, batch_first
    pytest.param(1, False, False, id="1layer"),
    pytest.param(2, False, True, id="2layers-batch_first"),
    pytest.param(2, True, False, id="2layers-bidirectional"),
    pytest.param(1, True, True, id="bidirectional-batch_first"),
]
KINDS = ["LSTM", "GRU", "RNN"]


def _pair(kind: str, layers: int, bidirectional: bool, batch_first: bool, **kw: Any):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, kind)(5, 7, num_layers=layers, bidirectional=bidirectional,
                                     batch_first=batch_first, **kw)
    ours = getattr(nn, kind)(5, 7, num_layers=layers, bidirectional=bidirectional,
                             batch_first=batch_first, **kw)
    # PyTorch's parameter names, shapes and order: its state dict loads as it is.
    assert [(n, tuple(p.shape)) for n, p in ours.named_parameters()] == \
        [(n, tuple(p.shape)) for n, p in theirs.named_parameters()]
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    return ours, theirs


def _outputs(kind: str, result: Any) -> list[Any]:
    out, hidden = result
    return [out, *hidden] if kind == "LSTM" else [out, hidden]


def _data(batch_first: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (3, 4, 5) if batch_first else (4, 3, 5)  # batch 3, length 4
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers, bidirectional, batch_first", CONFIGS)
def test_forward_and_gradients_match_pytorch(kind: str, layers: int, bidirectional: bool,
                                              batch_first: bool) -> None:
    ours, theirs = _pair(kind, layers, bidirectional, batch_first)
    x = _data(batch_first)
    og_x, t_x = og.tensor(x, requires_grad=True), torch.from_numpy(x).requires_grad_(True)
    og_outs = _outputs(kind, ours(og_x))
    t_outs = _outputs(kind, theirs(t_x))
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal(tuple(t.shape)).astype(np.float32) for t in t_outs]
    for o, t in zip(og_outs, t_outs):
        assert tuple(o.shape) == tuple(t.shape)
        np.testing.assert_allclose(o.detach().numpy(), t.detach().numpy(), **TOL)
    # A loss reading every output, so gradients flow through output, h_n and c_n.
    og_loss = sum((o * og.tensor(w)).sum() for o, w in zip(og_outs, weights))
    t_loss = sum((t * torch.from_numpy(w)).sum() for t, w in zip(t_outs, weights))
    og_loss.backward()
    t_loss.backward()
    np.testing.assert_allclose(og_x.grad.numpy(), t_x.grad.numpy(), **TOL)
    t_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), t_params[name].grad.numpy(), **TOL,
                                   err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_initial_state_and_unbatched_input(kind: str) -> None:
    ours, theirs = _pair(kind, 2, True, False)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 5)).astype(np.float32)  # unbatched: [L, I]
    h0 = rng.standard_normal((4, 7)).astype(np.float32)  # [layers * 2, H]
    c0 = rng.standard_normal((4, 7)).astype(np.float32)
    if kind == "LSTM":
        og_r = ours(og.tensor(x), (og.tensor(h0), og.tensor(c0)))
        t_r = theirs(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    else:
        og_r = ours(og.tensor(x), og.tensor(h0))
        t_r = theirs(torch.from_numpy(x), torch.from_numpy(h0))
    for o, t in zip(_outputs(kind, og_r), _outputs(kind, t_r)):
        assert tuple(o.shape) == tuple(t.shape)
        np.testing.assert_allclose(o.detach().numpy(), t.detach().numpy(), **TOL)


def test_rnn_relu_and_no_bias() -> None:
    ours, theirs = _pair("RNN", 1, False, False, nonlinearity="relu", bias=False)
    assert not any("bias" in n for n, _ in ours.named_parameters())
    x = _data(False)
    np.testing.assert_allclose(ours(og.tensor(x))[0].detach().numpy(),
                               theirs(torch.from_numpy(x))[0].detach().numpy(), **TOL)


def test_dropout_between_layers_follows_train_and_eval() -> None:
    ours, theirs = _pair("GRU", 2, False, False, dropout=0.5)
    theirs.eval()
    ours.eval()
    x = _data(False)
    np.testing.assert_allclose(ours(og.tensor(x))[0].detach().numpy(),
                               theirs(torch.from_numpy(x))[0].detach().numpy(), **TOL)
    ours.train()
    og.manual_seed(0)
    a = ours(og.tensor(x))[0].detach().numpy()
    assert not np.allclose(a, theirs(torch.from_numpy(x))[0].detach().numpy(), **TOL)


def test_errors_name_the_problem() -> None:
    lstm = nn.LSTM(5, 7)
    with pytest.raises(ValueError, match="input_size"):
        lstm(og.zeros(4, 3, 6))
    with pytest.raises(ValueError, match="hidden"):
        lstm(og.zeros(4, 3, 5), (og.zeros(2, 3, 7), og.zeros(2, 3, 7)))
    with pytest.raises(ValueError, match="dropout"):
        nn.GRU(5, 7, dropout=2.0)
    assert repr(nn.LSTM(5, 7, 2, batch_first=True)) == \
        "LSTM(5, 7, num_layers=2, batch_first=True)"


class _Classifier:
    """A recurrent layer, the last step's output, a Linear head: built in both libraries."""

    @staticmethod
    def make(lib: Any, kind: str):
        class Net(lib.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn = getattr(lib.nn, kind)(5, 7, num_layers=2, bidirectional=True,
                                                 batch_first=True)
                self.fc = lib.nn.Linear(14, 3)

            def forward(self, x):
                out, _ = self.rnn(x)
                return self.fc(out[:, -1])
        return Net()


@pytest.mark.parametrize("kind", KINDS)
def test_three_compiled_sgd_steps_match_pytorch(kind: str) -> None:
    torch.manual_seed(0)
    theirs = _Classifier.make(torch, kind)
    ours = _Classifier.make(og, kind)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    og_opt = og.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    t_opt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)

    @og.compile
    def step(x, y):
        og_opt.zero_grad()
        loss = nn.functional.cross_entropy(ours(x), y)
        loss.backward()
        og_opt.step()
        return loss

    rng = np.random.default_rng(3)
    for _ in range(3):
        x = rng.standard_normal((6, 4, 5)).astype(np.float32)
        y = rng.integers(0, 3, 6)
        t_opt.zero_grad()
        t_loss = torch.nn.functional.cross_entropy(theirs(torch.from_numpy(x)),
                                                   torch.from_numpy(y))
        t_loss.backward()
        t_opt.step()
        np.testing.assert_allclose(step(og.tensor(x), og.tensor(y)).item(), t_loss.item(), **TOL)
    t_state = theirs.state_dict()
    for name, value in ours.state_dict().items():
        np.testing.assert_allclose(value.numpy(), t_state[name].numpy(), **TOL, err_msg=name)
