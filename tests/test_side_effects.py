"""onnxgrad leaves the user's process as it found it."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import onnxgrad as og


def test_subnormals_survive_in_numpy_and_in_onnxgrad() -> None:
    x = og.tensor([1e-310, 2.5e-310], dtype=og.float64)
    y = (x * 1.0 + 0.0).numpy()
    assert np.array_equal(y, [1e-310, 2.5e-310])
    small = og.tensor([1e-40], dtype=og.float32) * 1.0  # a float32 subnormal
    assert small.item() != 0.0
    assert (np.array([1e-310]) * 1.0)[0] != 0.0  # the user's NumPy is untouched


def test_first_op_does_not_change_the_threads_float_mode() -> None:
    # A fresh interpreter: the first session ever made is the one that would flip the mode.
    code = ("import numpy as np, onnxgrad as og\n"
            "og.tensor([1.0]).exp().sum().item()\n"
            "print(np.array([1e-310]) * 1.0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[1.e-310]"


def test_a_failing_kernel_prints_nothing_and_raises_onnxgrads_words() -> None:
    # The fallback for what only the runtime can see (ops check their operands first; here a
    # node emitted directly, MatMul of bools, which ONNX Runtime has no kernel for), in a fresh
    # interpreter so that ONNX Runtime's logger would write to this process's stderr.
    code = ("import numpy as np, onnxgrad as og\n"
            "from onnxgrad.tracer.values import Val, emit\n"
            "og.tensor([[1.0]]).log()  # warm up: sessions exist\n"
            "a = Val(np.array([[True]]))\n"
            "try:\n"
            "    emit('MatMul', [a, a])\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stderr == ""
    assert "MatMul(bool[1, 1], bool[1, 1]) at <string>:6" in result.stdout
    assert "ONNX Runtime has no kernel for bool inputs" in result.stdout
    assert "ONNXRuntimeError" not in result.stdout and "INVALID_GRAPH" not in result.stdout


def test_a_kept_state_dict_is_a_consistent_snapshot_across_compiled_steps() -> None:
    # Parameters live in double-buffered runner memory; a state_dict() or detach() taken
    # between steps must stay the values it was taken at (documented), never the live values of
    # a later step, nor values one step stale.
    model = og.nn.Linear(2, 1)
    opt = og.optim.SGD(model.parameters(), lr=0.1)

    @og.compile
    def step(x):
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        opt.step()
        return loss

    x = og.ones(4, 2)
    step(x)
    kept = model.state_dict()
    detached = model.bias.detach()
    twice = detached.detach()
    at = model.bias.item()
    for _ in range(4):
        step(x)
        assert model.bias.item() != at
        assert kept["bias"].item() == detached.item() == twice.item() == at


def test_eager_training_with_varying_batch_sizes_keeps_its_caches_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels are made per rank, not per size (one set serves every batch size), and gradient
    plans, made per shape, stay within their bound: native memory does not grow per new shape
    (benchmarks/eager_memory.py measures RSS over 1,000 steps)."""
    from onnxgrad.runtime import session

    from onnxgrad import nn
    from onnxgrad.nn import functional as F

    monkeypatch.setattr(session, "_plans", session._LRU(capacity=1 << 30, max_entries=4))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)

    def step(batch: int) -> None:
        x = og.tensor(rng.standard_normal((batch, 6)).astype(np.float32))
        y = og.tensor(rng.integers(0, 3, batch))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step(2)
    kernels = len(session._kernels)
    for batch in range(3, 12):
        step(batch)
    assert len(session._kernels) == kernels  # no kernel made for a new size
    assert len(session._plans) == 4
    tiny = session._LRU(capacity=3 * session.SESSION_BYTES, max_entries=100)
    monkeypatch.setattr(session, "_plans", tiny)
    for batch in range(3, 9):
        step(batch)
    assert len(tiny) <= 3 and tiny.weight <= tiny.capacity


def test_a_session_does_not_keep_a_core_busy_after_its_run() -> None:
    """ONNX Runtime's workers spin for more work after a run, by default for ~40 ms of CPU,
    taken from whatever the user (or the next session) runs then; onnxgrad's sessions spin at
    most 1 ms. Process CPU time while the main thread sleeps is the workers' spinning."""
    code = ("import time, numpy as np, onnxgrad as og\n"
            "from onnxgrad import nn\n"
            "model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))\n"
            "opt = og.optim.SGD(model.parameters(), lr=0.1)\n"
            "@og.compile\n"
            "def step(x, y):\n"
            "    opt.zero_grad()\n"
            "    loss = nn.functional.cross_entropy(model(x), y)\n"
            "    loss.backward()\n"
            "    opt.step()\n"
            "    return loss\n"
            "x, y = og.randn(64, 256), og.tensor(np.arange(64) % 10)\n"
            "for _ in range(5): step(x, y)\n"
            "busy = []\n"
            "for _ in range(3):\n"
            "    step(x, y)\n"
            "    t = time.process_time(); time.sleep(0.1); busy.append(time.process_time() - t)\n"
            "print(min(busy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert float(out) < 0.015, f"{float(out) * 1e3:.1f} ms of CPU in 100 ms after a step"
