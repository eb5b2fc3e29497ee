"""og.save / og.load and runtime.checkpoint: round trips, atomic writes, exact resume.

The resume test is the issue's contract: train compiled for k steps, save model and optimizer
state, resume in a new process for n steps, and get bit-identical parameters to an uninterrupted
run of k + n steps (CPU provider).

Run as a script (``python test_checkpoint.py resume CKPT OUT N``), this file is the new process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from onnxgrad.runtime import checkpoint
from onnxgrad.runtime.checkpoint import CheckpointError, read_arrays, write_arrays

import onnxgrad as og
from onnxgrad import nn

FORMATS = ["npz", "safetensors"]


def _needs(fmt: str) -> None:
    if fmt == "safetensors":
        pytest.importorskip("safetensors")


# --------------------------------------------------------------------------- a small model
def _net() -> nn.Module:
    """Conv + BatchNorm (running stats and an int64 counter as state) + Linear."""
    og.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(step)
    return rng.standard_normal((4, 3, 6, 6), dtype=np.float32), rng.integers(0, 3, 4)


def _trainer(model: nn.Module):
    optim = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3,
                         nesterov=True)

    @og.compile
    def step(x, y):
        optim.zero_grad()
        loss = og.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
        return loss

    return optim, step


def _train(step, optim, first: int, count: int) -> list[float]:
    losses = []
    for k in range(first, first + count):
        optim.param_groups[0]["lr"] = 0.1 / (1 + k)  # a schedule, so resume must restore lr
        losses.append(float(step(*_batch(k))))
    return losses


def _resume(ckpt: str, out: str, first: int, count: int) -> None:
    """The new process: rebuild, load the checkpoint, train ``count`` more steps, save."""
    model = _net()
    optim, step = _trainer(model)
    state = og.load(ckpt)
    model.load_state_dict(state["model"])
    optim.load_state_dict(state["optim"])
    losses = _train(step, optim, first, count)
    og.save({"model": model.state_dict(), "optim": optim.state_dict(), "losses": losses}, out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_in_new_process_is_bit_identical(tmp_path: Path, fmt: str) -> None:
    _needs(fmt)
    k, n = 3, 3
    model = _net()
    optim, step = _trainer(model)
    _train(step, optim, 0, k)
    ckpt = tmp_path / f"ckpt.{fmt}"
    og.save({"model": model.state_dict(), "optim": optim.state_dict()}, ckpt)
    out = tmp_path / f"resumed.{fmt}"
    done = subprocess.run([sys.executable, __file__, "resume", str(ckpt), str(out), str(k),
                           str(n)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    losses = _train(step, optim, k, n)  # the uninterrupted run goes on in this process
    resumed = og.load(out)
    assert resumed["losses"] == losses
    expected = model.state_dict()
    assert list(resumed["model"]) == list(expected)
    for name, t in expected.items():
        got = resumed["model"][name].numpy()
        assert got.dtype == t.dtype and np.array_equal(got, t.numpy()), name
    mine = optim.state_dict()
    assert resumed["optim"]["param_groups"] == mine["param_groups"]
    for i, entry in mine["state"].items():
        assert np.array_equal(resumed["optim"]["state"][i]["momentum_buffer"].numpy(),
                              entry["momentum_buffer"])
    # The BatchNorm counter really was state that travelled (k + n training steps).
    assert int(resumed["model"]["1.num_batches_tracked"].item()) == k + n


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_keeps_structure_and_values(tmp_path: Path, fmt: str) -> None:
    _needs(fmt)
    obj = {
        "model": OrderedDict([("w", og.tensor([[1.0, 2.0]])),
                              ("n", og.tensor(7, dtype=og.int64))]),
        "optim": {"state": {0: {"momentum_buffer": np.arange(3, dtype=np.float64)}},
                  "param_groups": [{"lr": 0.1, "nesterov": False, "params": [0, 1]}]},
        "epoch": 3, "best": float("inf"), "nan": float("nan"), "name": "run-1", "none": None,
        "pair": (1, 2.5), "flags": [True, False], "np": np.float32(0.25),
        (2, "k"): "tuple key", "mask": np.array([True, False]), "empty": og.zeros(0, 4),
    }
    path = tmp_path / f"obj.{fmt}"
    og.save(obj, path)
    back = og.load(path)
    assert list(back) == list(obj)
    assert isinstance(back["model"], OrderedDict) and list(back["model"]) == ["w", "n"]
    assert isinstance(back["model"]["w"], og.Tensor)
    np.testing.assert_array_equal(back["model"]["w"].numpy(), [[1.0, 2.0]])
    assert back["model"]["n"].dtype == np.int64 and back["model"]["n"].shape == ()
    buf = back["optim"]["state"][0]["momentum_buffer"]
    assert isinstance(buf, og.Tensor) and buf.dtype == np.float64
    assert list(back["optim"]["state"]) == [0]  # int keys stay ints
    assert back["optim"]["param_groups"] == obj["optim"]["param_groups"]
    assert back["best"] == float("inf") and np.isnan(back["nan"])
    assert back["pair"] == (1, 2.5) and back["flags"] == [True, False]
    assert back["np"] == np.float32(0.25) and back["np"].dtype == np.float32
    assert back[(2, "k")] == "tuple key"
    assert back["mask"].dtype == np.bool_ and back["empty"].shape == (0, 4)
    assert back["epoch"] == 3 and type(back["epoch"]) is int
    assert back["name"] == "run-1" and back["none"] is None


def test_flat_state_dict_as_npz_is_a_plain_numpy_archive(tmp_path: Path) -> None:
    model = _net()
    path = tmp_path / "weights.npz"
    og.save(model.state_dict(), path)
    with np.load(path, allow_pickle=False) as archive:
        assert archive.files == list(model.state_dict())  # no metadata member
    again = _net()
    for p in again.parameters():
        p.data = np.zeros(p.shape, p.dtype)
    again.load_state_dict(og.load(path))
    for name, t in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name].numpy(), t.numpy())


def test_load_reads_foreign_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "plain.npz", a=np.ones(2, np.float32), b=np.zeros((), np.int64))
    back = og.load(tmp_path / "plain.npz")
    assert list(back) == ["a", "b"] and all(isinstance(v, og.Tensor) for v in back.values())
    st = pytest.importorskip("safetensors.numpy")
    st.save_file({"x": np.eye(2, dtype=np.float32)}, str(tmp_path / "foreign.safetensors"))
    np.testing.assert_array_equal(og.load(tmp_path / "foreign.safetensors")["x"].numpy(),
                                  np.eye(2))


def test_safetensors_file_keeps_plain_arrays(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    model = _net()
    path = tmp_path / "w.safetensors"
    og.save(model.state_dict(), path)
    plain = st.load_file(str(path))  # what safetensors itself (or safetensors.torch) sees
    assert set(plain) == set(model.state_dict())


def test_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # og.save writes PyTorch's format for .pt (tests/test_serialization_torch.py); the array
    # layer itself still takes only its two formats.
    with pytest.raises(CheckpointError, match=r"\.pt.*\.npz, \.safetensors"):
        write_arrays(tmp_path / "x.pt", {})
    with pytest.raises(TypeError, match=r"type builtin_function_or_method \(at optim\.fn\)"):
        og.save({"optim": {"fn": print}}, tmp_path / "x.npz")
    with pytest.raises(TypeError, match="dtype <U1"):
        og.save({"s": np.array(["a"])}, tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError):
        og.load(tmp_path / "missing.npz")
    # safetensors missing: the message names the extra and the alternative.
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r"onnxgrad\[safetensors\].*\.npz"):
        og.save({"a": np.ones(1)}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_metadata_of_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.npz"
    write_arrays(path, {}, json.dumps({"format": "onnxgrad.checkpoint", "version": 99,
                                       "tree": None}))
    with pytest.raises(CheckpointError, match="newer"):
        og.load(path)


# --------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("fmt", FORMATS)
def test_crash_mid_write_leaves_no_partial_file(tmp_path: Path, fmt: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _needs(fmt)
    target = tmp_path / f"ckpt.{fmt}"

    real = checkpoint.atomic_file

    @contextmanager
    def crash(path, **kwargs):
        with real(path, **kwargs) as f:
            f.write(b"PK\x03\x04 half a file")
            raise KeyboardInterrupt  # even an interrupt, not only an error
        yield f  # never reached

    monkeypatch.setattr(checkpoint, "atomic_file", crash)
    with pytest.raises(KeyboardInterrupt):
        og.save({"a": og.ones(3)}, target)
    assert not list(tmp_path.iterdir())  # neither the target nor the temporary file

    monkeypatch.setattr(checkpoint, "atomic_file", real)
    og.save({"a": og.ones(3)}, target)
    monkeypatch.setattr(checkpoint, "atomic_file", crash)
    with pytest.raises(KeyboardInterrupt):
        og.save({"a": og.zeros(3)}, target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    np.testing.assert_array_equal(og.load(target)["a"].numpy(), np.ones(3))  # the old file


def test_written_file_has_an_ordinary_mode(tmp_path: Path) -> None:
    umask = os.umask(0o027)
    try:
        path = write_arrays(tmp_path / "m.npz", {"a": np.ones(1)})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o640  # what open(path, "w") gives under that umask
    arrays, meta = read_arrays(path)
    assert list(arrays) == ["a"] and meta is None


# --------------------------------------------------------------------------- export over 2 GB
def test_export_over_the_protobuf_limit_writes_external_data(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A model over 2 GB cannot be serialized whole, so it must never be checked in memory.

    Simulated: both the exporter's threshold and the checker's limit are lowered to a few KB.
    """
    import onnx
    from onnx import TensorProto, helper
    from onnxgrad.runtime import export

    monkeypatch.setattr(export, "_PROTOBUF_LIMIT", 64 * 1024**2 + 1024)
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 4096)
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4096])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    value = np.arange(4096, dtype=np.float32)
    path = export.save_model(model, tmp_path / "big.onnx", {"x": value})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    onnx.checker.check_model(str(path), full_check=True)
    loaded = onnx.load(str(path))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]), value)


if __name__ == "__main__":
    if sys.argv[1] == "resume":
        _resume(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
