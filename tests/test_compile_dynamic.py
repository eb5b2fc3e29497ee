"""``og.compile(dynamic=True)``: one program for every batch size, equal to eager."""
from __future__ import annotations

import numpy as np
import pytest

import onnxgrad as og
from onnxgrad import nn
from onnxgrad.nn import functional as F


def _mlp() -> nn.Module:
    og.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _cnn() -> nn.Module:
    og.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))


def _batches(sizes: list[int], shape: tuple[int, ...]) -> list[tuple[og.Tensor, og.Tensor]]:
    rng = np.random.default_rng(1)
    return [(og.tensor(rng.standard_normal((n, *shape)).astype(np.float32)),
             og.tensor(rng.integers(0, 3, n))) for n in sizes]


def _train(make, batches, *, dynamic: bool | None, compiled: bool) -> tuple[list, nn.Module, int]:
    model = make()
    opt = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(x: og.Tensor, y: og.Tensor) -> og.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    run = og.compile(step, dynamic=dynamic) if compiled else step
    losses = [run(x, y).item() for x, y in batches]
    return losses, model, len(run._programs) if compiled else 0


@pytest.mark.parametrize("make, shape, exact", [(_mlp, (6,), True), (_cnn, (3, 8, 8), False)])
def test_one_program_trains_every_batch_size_as_eager(make, shape, exact) -> None:
    batches = _batches([4, 7, 3, 7, 1], shape)
    eager_losses, eager_model, _ = _train(make, batches, dynamic=None, compiled=False)
    losses, model, programs = _train(make, batches, dynamic=True, compiled=True)
    assert programs == 1
    expected = eager_model.state_dict()
    for name, value in model.state_dict().items():
        if exact:  # the same nodes as eager: the same bits
            assert np.array_equal(value.numpy(), expected[name].numpy()), name
        else:  # the conv weight gradient's batch-independent formulation sums in another order
            np.testing.assert_allclose(value.numpy(), expected[name].numpy(), rtol=1e-4,
                                       atol=1e-5, err_msg=name)
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-5)


def test_a_step_that_depends_on_the_batch_size_warns_and_is_traced_per_size() -> None:
    w = og.ones(4, requires_grad=True)

    def half(x: og.Tensor) -> og.Tensor:
        return (x[: x.shape[0] // 2] * w).sum()

    compiled = og.compile(half, dynamic=True)
    x5, x9 = og.rand(5, 4), og.rand(9, 4)
    with pytest.warns(UserWarning, match=r"dynamic=True.*traced for each batch size"):
        first = compiled(x5)
    assert first.item() == pytest.approx(half(x5).item())
    assert compiled(x9).item() == pytest.approx(half(x9).item())
    assert len(compiled._programs) == 2


def test_dynamic_is_a_decorator_option_and_checked() -> None:
    @og.compile(dynamic=True)
    def double(x: og.Tensor) -> og.Tensor:
        return x * 2

    for n in (2, 5, 3):
        assert np.array_equal(double(og.ones(n, 3)).numpy(), np.full((n, 3), 2, np.float32))
    assert len(double._programs) == 1
    static = og.compile(lambda x: x * 2)
    static(og.ones(2, 3))
    static(og.ones(5, 3))
    assert len(static._programs) == 2
    with pytest.raises(TypeError, match="dynamic must be True, False or None"):
        og.compile(lambda x: x, dynamic="yes")


@pytest.mark.parametrize("k", [4, 64, 256, 1024])
@pytest.mark.parametrize("n_a, n_b", [(8, 9), (8, 19), (4, 5), (1, 5)])
def test_batchnorms_unbiased_factor_is_found_as_a_function_of_the_batch(k, n_a, n_b) -> None:
    """BatchNorm's ``momentum * count / (count - 1)`` with count = k * N (k = H * W): the fit must
    find c = 0.1 and k exactly (resnet18's layer1 at 64x64 has k = 256, its stem k = 1024)."""
    from onnxgrad.passes.portable import _fit_batch_function

    def value(n: int) -> float:
        return float(np.float32(0.1 * (k * n) / (k * n - 1)))

    assert _fit_batch_function(value(n_a), value(n_b), n_a, n_b, np.dtype(np.float32)) == (
        "c*k*N/(k*N-1)", 0.1, k)
