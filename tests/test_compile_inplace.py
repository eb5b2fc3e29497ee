"""An in-place activation inside a compiled step (MobileNetV2's ``ReLU6(inplace=True)``) traces
silently and computes what eager computes."""
from __future__ import annotations

import warnings

import numpy as np

import onnxgrad as og


def _step():
    og.manual_seed(0)
    model = og.nn.Sequential(og.nn.Conv2d(3, 4, 3), og.nn.ReLU6(inplace=True), og.nn.Flatten(),
                             og.nn.Linear(4 * 4 * 4, 3))
    opt = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(x, y):
        opt.zero_grad()
        loss = og.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def test_inplace_activation_in_a_compiled_step_warns_nothing() -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32) * 4
    y = np.array([0, 2])
    losses = {}
    for compiled in (False, True):
        run = og.compile(_step()) if compiled else _step()
        with warnings.catch_warnings():
            # NOTE: tracing once read .grad of the tensor ReLU6 wrote in place (a non-leaf),
            # which warned "The .grad attribute of a Tensor that is not a leaf..." at the user.
            warnings.simplefilter("error")
            losses[compiled] = [float(run(og.tensor(x), og.tensor(y))) for _ in range(3)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
