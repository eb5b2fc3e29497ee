"""Rules of ONNX ops that imported files emit: ``ScatterND``, ``GatherND``,
``InstanceNormalization`` and ``Range`` (op-table rows: NumPy forward, float64 VJP against
central differences, ONNX Runtime against the reference evaluator), and PyTorch models with
``InstanceNorm2d`` and ``torch.arange``-built masks, exported by both exporters, training like
PyTorch through ``OnnxModule``.

The rows call the ONNX op itself (``emit``), as ``OnnxModule`` replays a file's node.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import onnx
import pytest
from onnxgrad.tracer.tensor import Tensor
from onnxgrad.tracer.values import emit
from opcheck import case, check_node_rule, fixed, index, table_tests

import onnxgrad as og


def onnx_op(op: str, **attrs: Any):
    """``fn`` of a row: the single ONNX node ``op`` on the row's tensors."""
    def fn(*tensors: Tensor) -> Tensor:
        return Tensor(emit(op, [t._v for t in tensors], attrs)[0])
    return fn


def np_scatter_nd(data, indices, updates, reduction="none"):
    out = data.copy()
    for k in np.ndindex(indices.shape[:-1]):
        at = tuple(indices[k])
        out[at] = out[at] + updates[k] if reduction == "add" else updates[k]
    return out


def np_gather_nd(data, indices, batch_dims=0):
    if batch_dims == 0:
        return np.stack([data[tuple(indices[k])] for k in np.ndindex(indices.shape[:-1])]
                        ).reshape(indices.shape[:-1] + data.shape[indices.shape[-1]:])
    return np.stack([np_gather_nd(data[b], indices[b]) for b in range(data.shape[0])])


def np_instance_norm(x, scale, bias, eps=1e-5):
    axes = tuple(range(2, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axes, keepdims=True)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x64 - mean) / np.sqrt(var + eps) * scale.reshape(shape) + bias.reshape(shape)
    return y.astype(x.dtype)


ROWS_2 = np.array([[2, 0], [0, 1], [3, 2]], np.int64)      # (row, col) of a (4, 3) tensor
ROWS_1 = np.array([[3], [1]], np.int64)                       # whole rows
REPEATED = np.array([[1, 2], [0, 0], [1, 2]], np.int64)       # one element twice
BATCHED = np.array([[[0, 1], [2, 2]], [[1, 3], [1, 3]]], np.int64)  # batch_dims=1, (2, 3, 4)


CASES = [
    # ------------------------------------------------------------------ ScatterND
    case("scatter_nd/elements", onnx_op("ScatterND"), np_scatter_nd, (4, 3), index(ROWS_2), (3,)),
    case("scatter_nd/rows", onnx_op("ScatterND"), np_scatter_nd, (4, 3), index(ROWS_1), (2, 3)),
    case("scatter_nd/add-repeated", onnx_op("ScatterND", reduction="add"),
         lambda d, i, u: np_scatter_nd(d, i, u, "add"), (4, 3), index(REPEATED), (3,)),
    case("scatter_nd/add-3d", onnx_op("ScatterND", reduction="add"),
         lambda d, i, u: np_scatter_nd(d, i, u, "add"), (2, 3, 4), index([[1, 0], [0, 2]]),
         (2, 4)),
    # ------------------------------------------------------------------ GatherND
    case("gather_nd/elements", onnx_op("GatherND"), np_gather_nd, (4, 3), index(ROWS_2)),
    case("gather_nd/rows", onnx_op("GatherND"), np_gather_nd, (4, 3), index(ROWS_1)),
    case("gather_nd/repeated", onnx_op("GatherND"), np_gather_nd, (4, 3), index(REPEATED)),
    case("gather_nd/batch-dims", onnx_op("GatherND", batch_dims=1),
         lambda d, i: np_gather_nd(d, i, 1), (2, 3, 4), index(BATCHED)),
    # ------------------------------------------------------------------ Range
    # start and delta are differentiable, limit only sets the length.
    case("range/float", onnx_op("Range"),
         lambda s, lim, d: np.arange(s, lim, d, dtype=np.float32),
         fixed(np.float32(0.25)), fixed(np.float32(3.0), grad=False), fixed(np.float32(0.5))),
    case("range/negative-delta", onnx_op("Range"),
         lambda s, lim, d: np.arange(s, lim, d, dtype=np.float32),
         fixed(np.float32(2.0)), fixed(np.float32(-1.0), grad=False), fixed(np.float32(-0.7))),
    case("range/int64", onnx_op("Range"), lambda s, lim, d: np.arange(s, lim, d),
         index(1), index(9), index(3), grad=False),
    # ------------------------------------------------------------------ InstanceNormalization
    # NOTE: ONNX Runtime has no float64 InstanceNormalization kernel, so the float64 VJP of the
    # rule is checked on its gradient graph alone (test_instance_normalization_rule below).
    case("instance_norm/2d", onnx_op("InstanceNormalization", epsilon=1e-5), np_instance_norm,
         (2, 3, 4, 5), (3,), (3,), vjp=False),
    case("instance_norm/1d-eps", onnx_op("InstanceNormalization", epsilon=1e-3),
         lambda x, s, b: np_instance_norm(x, s, b, 1e-3), (3, 2, 6), (2,), (2,), vjp=False),
]

test_forward, test_vjp, test_runtimes, test_ids_are_unique = table_tests(CASES)


@pytest.mark.parametrize(("shape", "eps"), [((2, 3, 4, 5), 1e-5), ((3, 2, 6), 1e-3),
                                            ((1, 2, 2, 3, 2), 1e-5)])
def test_instance_normalization_rule(shape: tuple[int, ...], eps: float) -> None:
    """The rule's float64 gradient graph, on ORT and on the reference evaluator, against central
    differences of the NumPy instance norm, for the input, the scale and the bias."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    w, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    check_node_rule("InstanceNormalization", {"epsilon": eps}, {"x": x, "scale": w, "bias": b},
                    lambda x, w, b: np_instance_norm(x, w, b, eps), rng)


# --------------------------------------------------------------------------- exported models
def _net(torch: Any, affine: bool) -> Any:
    class Net(torch.nn.Module):
        """InstanceNorm2d, then causal attention over the pixels with a torch.arange mask."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.inorm = torch.nn.InstanceNorm2d(4, affine=affine)
            self.q = torch.nn.Linear(4, 4)
            self.k = torch.nn.Linear(4, 4)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.inorm(self.conv(x)))
            s = h.flatten(2).transpose(1, 2)
            pos = torch.arange(s.shape[1])
            mask = pos[None, :] <= pos[:, None]     # Range -> LessOrEqual: a causal mask
            scores = self.q(s) @ self.k(s).transpose(1, 2)
            scores = scores.masked_fill(~mask, float("-inf"))
            return self.fc((scores.softmax(-1) @ s).mean(1))

    torch.manual_seed(0)
    model = Net()
    if affine:
        with torch.no_grad():  # away from ones and zeros: every parameter's gradient matters
            model.inorm.weight.add_(torch.randn(4) * 0.3)
            model.inorm.bias.add_(torch.randn(4) * 0.3)
    return model


@pytest.mark.parametrize(("exporter", "affine"), [
    ("torchscript", True), ("torchscript", False), ("dynamo-unoptimized", True),
    ("dynamo-unoptimized", False), ("dynamo", True)])
def test_instance_norm_and_arange_mask_export_trains_like_pytorch(exporter: str,
                                                                  affine: bool) -> None:
    torch = pytest.importorskip("torch")
    model = _net(torch, affine).eval()
    example = (torch.zeros(2, 3, 4, 4),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(model, example, buf, dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["logits"])
            proto = onnx.load_from_string(buf.getvalue())
        else:
            pytest.importorskip("onnxscript")
            proto = torch.onnx.export(model, example, dynamo=True,
                                      optimize=exporter == "dynamo", input_names=["x"],
                                      output_names=["logits"], verbose=False).model_proto
        ops = {n.op_type for n in proto.graph.node}
        assert "InstanceNormalization" in ops
        if exporter == "dynamo-unoptimized":
            assert "Range" in ops  # replayed as a constant: its inputs come from shapes
        step = og.training_step(proto, lr=0.1, momentum=0.9)
    # File initializer -> (parameter, stored transposed), by initial value: the TorchScript
    # exporter and the dynamo exporter's optimizer store q and k's weights transposed.
    mapping = {}
    for init in proto.graph.initializer:
        value = onnx.numpy_helper.to_array(init)
        for name, p in model.named_parameters():
            p = p.detach().numpy()
            if value.shape == p.shape and np.array_equal(value, p):
                mapping[init.name] = (name, False)
            elif value.ndim == 2 and np.array_equal(value.T, p):
                mapping[init.name] = (name, True)
    assert sorted(n for n, _ in mapping.values()) == sorted(n for n, _ in model.named_parameters())
    # What trains by default is exactly the model's parameters (none for affine=False).
    assert {step.module.initializer_names.get(n, n)
            for n, _ in step.module.named_parameters()} == set(mapping)
    model.train()
    t_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
        y = rng.integers(0, 3, 2)
        loss = float(np.asarray(step(x, y)))
        t_opt.zero_grad()
        t_loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)),
                                                   torch.from_numpy(y))
        t_loss.backward()
        t_opt.step()
        np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-4)
    state = {step.module.initializer_names.get(k, k): v.numpy()
             for k, v in step.module.state_dict().items()}
    for init_name, (name, transposed) in mapping.items():
        actual = state[init_name].T if transposed else state[init_name]
        np.testing.assert_allclose(actual, model.get_parameter(name).detach().numpy(),
                                   rtol=1e-4, atol=1e-6, err_msg=name)
