"""The demo, run as a user runs it (a subprocess), in a reduced form."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("sklearn")


def _demo(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxgrad", "demo", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_demo_trains_exports_and_verifies(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = _demo("--steps", "120", "--skip-resnet", "--min-accuracy", "0.8", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "held-out accuracy" in run.stdout
    assert "onnxgrad verify" in run.stdout
    table = run.stdout[run.stdout.index("(onnxgrad verify):"):]
    assert "reference" in table and "matches" in table and "differs" not in table
    assert (out / "digits_train_step.portable.safetensors").exists()
    path = out / "digits_train_step.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {""}
    meta = {p.key: p.value for p in model.metadata_props}
    state = json.loads(meta["onnxgrad.state"])
    assert state["0.weight.new"] == "0.weight"
    assert json.loads(meta["onnxgrad.data_inputs"]) == ["data", "labels"]
    assert (out / "digits_train_step.txt").read_text().count("\n") > 20
    assert (out / "digits_train_step.dot").read_text().startswith("digraph")
    # The exported step really trains: loop it in plain onnxruntime from its defaults.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(0)
    x = rng.random((64, 64), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    feeds = {"data": x, "labels": y, "lr": np.array(0.05, np.float32),
             "momentum": np.array(0.9, np.float32)}
    losses = []
    for _ in range(5):
        outs = dict(zip(names, sess.run(None, feeds)))
        losses.append(float(outs["output"]))
        feeds.update({state[k]: v for k, v in outs.items() if k in state})
    assert losses[-1] < losses[0]


def test_demo_reports_low_accuracy_as_failure(tmp_path: Path) -> None:
    run = _demo("--steps", "1", "--skip-resnet", "--out", str(tmp_path / "d"))
    assert run.returncode == 1
    assert "accuracy" in run.stderr and "Traceback" not in run.stderr


def test_demo_without_scikit_learn_names_the_extra(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "sklearn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'sklearn'\", "
                                      "name='sklearn')\n")
    import os

    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
    run = _demo("--out", str(tmp_path / "d"), env=env)
    assert run.returncode == 2
    assert "onnxgrad[demo]" in run.stderr
    assert "Traceback" not in run.stderr
