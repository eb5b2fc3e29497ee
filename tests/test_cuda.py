"""The CUDA execution provider path: runs only where onnxruntime-gpu offers CUDA (never in CI).

State then lives in device OrtValues (runtime/step.py) and is copied to the host when read.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnxgrad.models import mlp

import onnxgrad as og

pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs onnxruntime-gpu with a CUDA device")


def _train(providers: list[str], compiled: bool) -> tuple[list[float], dict[str, np.ndarray]]:
    previous = og.get_providers()
    og.set_providers(providers)
    try:
        og.manual_seed(0)
        model = mlp(12, [32], 5)
        optim = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step(x, y):
            optim.zero_grad()
            loss = og.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optim.step()
            return loss

        run = og.compile(step) if compiled else step
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((8, 12), dtype=np.float32), rng.integers(0, 5, 8)
        losses = [run(og.tensor(x), og.tensor(y)).item() for _ in range(4)]
        return losses, {k: v.numpy().copy() for k, v in model.state_dict().items()}
    finally:
        og.set_providers(previous)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_training_matches_cpu(compiled: bool) -> None:
    cpu = _train(["CPUExecutionProvider"], compiled)
    cuda = _train(["CUDAExecutionProvider", "CPUExecutionProvider"], compiled)
    np.testing.assert_allclose(cuda[0], cpu[0], rtol=1e-4)
    for name in cpu[1]:
        np.testing.assert_allclose(cuda[1][name], cpu[1][name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
