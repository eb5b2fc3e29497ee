"""Checkpoints and writes that go wrong: damaged files, bad targets, killed writers, CLI errors.

Every damaged file gets one onnxgrad error naming the path (never zipfile's, NumPy's or
pickle's text); a folder or a read-only folder as target fails before anything is written; a
writer killed mid-write leaves the old file, and its temporary file is gone after the next
write into that folder; the CLI reports each of these in one line with exit code 2.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxgrad.runtime import files
from onnxgrad.runtime.checkpoint import CheckpointError
from onnxgrad.runtime.files import FileWriteError

import onnxgrad as og
from onnxgrad.__main__ import main as cli_main


def _state() -> dict[str, og.Tensor]:
    return {"w": og.tensor(np.arange(6, dtype=np.float32).reshape(2, 3)),
            "step": og.tensor(np.array(3, dtype=np.int64))}


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- damaged files
def _valid_bytes(tmp_path: Path, suffix: str) -> bytes:
    path = tmp_path / f"valid{suffix}"
    og.save({"a": og.ones(64), "b": [og.zeros(3, 3)], "n": 1}, path)
    return path.read_bytes()


def _not_a_checkpoint_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("hello.txt", "not tensors")
    return buf.getvalue()


def _damaged(tmp_path: Path, suffix: str) -> dict[str, bytes]:
    valid = _valid_bytes(tmp_path, suffix)
    return {
        "empty": b"",
        "truncated": valid[: len(valid) // 2],
        "one byte": valid[:1],
        "header only": valid[:64],
        "garbage": bytes(range(256)) * 4,
        "text": b"this is a README, not weights\n",
        "other zip": _not_a_checkpoint_zip(),
        "npy header": b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 100,
    }


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".npz", ".safetensors", ".bin"])
def test_every_damaged_file_gets_one_onnxgrad_error(tmp_path: Path, suffix: str) -> None:
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    for kind, data in _damaged(tmp_path, suffix).items():
        path = tmp_path / f"{kind.replace(' ', '_')}{suffix}"
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            og.load(path)
        message = str(info.value)
        assert message == (f"not an onnxgrad/PyTorch checkpoint: truncated or corrupt "
                           f"({path})"), kind
        # The reader's own exception is neither chained nor shown as context.
        error = info.value
        assert error.__cause__ is None, kind
        assert error.__context__ is None or error.__suppress_context__, kind
        for leak in ("BadZip", "EOF", "Header", "pickle", "Errno"):
            assert leak not in message


def test_a_damaged_file_object_and_storage_are_corrupt(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"truncated or corrupt \(<file object>\)"):
        og.load(io.BytesIO(b"\x00" * 10))
    # A storage shorter than its tensors claim: refused before any read outside of it.
    path = tmp_path / "short.pth"
    og.save({"a": og.ones(1000)}, path)
    damaged = tmp_path / "damaged.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:16] if info.filename.endswith("data/0") else data)
    with pytest.raises(CheckpointError, match=r"truncated or corrupt \(.*damaged\.pth\)"):
        og.load(damaged)


def test_missing_file_and_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        og.load(tmp_path / "missing.pth")
    with pytest.raises(IsADirectoryError, match=f"is a folder, not a checkpoint file: "
                                                f"'{tmp_path}'"):
        og.load(tmp_path)


# --------------------------------------------------------------------------- bad targets


@pytest.mark.parametrize("suffix", [".pth", ".npz"])
def test_save_into_a_read_only_folder_or_onto_a_folder(read_only: Path, tmp_path: Path,
                                                       suffix: str) -> None:
    target = read_only / f"ckpt{suffix}"
    with pytest.raises(FileWriteError) as info:
        og.save(_state(), target)
    assert str(info.value) == f"cannot write {target}: permission denied in folder {read_only}"
    assert "tmp" not in str(info.value).replace(str(tmp_path), "")
    folder = tmp_path / f"dir{suffix}"
    folder.mkdir()
    with pytest.raises(FileWriteError, match=f"^cannot write {folder}: it is a folder$"):
        og.save(_state(), folder)
    assert _temps(tmp_path) == [] and list(folder.iterdir()) == []


def _inference_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ones((3, 3), np.float32), "w")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]),
                    str(path))
    return path


def test_cli_train_graph_into_a_read_only_folder_or_onto_a_folder(
        read_only: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _inference_model(tmp_path / "mm.onnx")
    target = read_only / "step.onnx"
    assert cli_main(["train-graph", str(src), str(target), "--loss", "sum"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"onnxgrad train-graph: error: cannot write {target}: permission denied in "
                   f"folder {read_only}")
    folder = tmp_path / "out"
    folder.mkdir()
    assert cli_main(["train-graph", str(src), str(folder), "--loss", "sum"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"onnxgrad train-graph: error: cannot write {folder}: it is a folder"


def test_cli_demo_out_read_only_or_a_file(read_only: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    args = ["--steps", "2", "--skip-resnet", "--min-accuracy", "0"]
    assert cli_main(["demo", "--out", str(read_only), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxgrad demo: error: cannot write "
                                               f"{read_only}/")
    assert err[0].endswith(f"permission denied in folder {read_only}")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert cli_main(["demo", "--out", str(a_file), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"onnxgrad demo: error: {a_file}: file exists"


# --------------------------------------------------------------------------- killed writers
_STALLING_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    import onnxgrad as og
    from onnxgrad.runtime import files

    real = files._finish

    def stall(tmp, target):
        real(tmp, target)  # the temporary file holds the complete new data; no rename yet
        print("written", flush=True)
        time.sleep(120)

    files._finish = stall
    if sys.argv[1].endswith(".onnx"):
        model = og.nn.Linear(3, 2)
        opt = og.optim.SGD(model.parameters(), lr=0.1)

        @og.compile
        def step(x):
            opt.zero_grad()
            loss = model(x).sum()
            loss.backward()
            opt.step()
            return loss

        step(og.ones(4, 3))
        step.export(sys.argv[1])
    else:
        og.save({"w": og.tensor(np.full(4096, 7.0, np.float32))}, sys.argv[1])
""")

_LOOPING_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxgrad as og

    print("ready", flush=True)
    k = 0
    while True:
        k += 1
        og.save({"w": og.tensor(np.full(200_000, float(k), np.float32))}, sys.argv[1])
""")


def _child(code: str, target: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE,
                            text=True)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and the orphan sweep are POSIX")
@pytest.mark.parametrize("suffix", [".pth", ".npz", ".onnx"])
def test_a_writer_killed_before_its_rename_leaves_the_old_file(tmp_path: Path,
                                                               suffix: str) -> None:
    """og.save and a compiled step's export, killed with the new data complete on disk."""
    target = tmp_path / f"model{suffix}"
    if suffix == ".onnx":
        target.write_bytes(b"the old export")
    else:
        og.save({"w": og.ones(4096)}, target)
    child = _child(_STALLING_CHILD, target)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "written"
        stray = _temps(tmp_path)
        assert len(stray) == 1 and stray[0].startswith(f".model{suffix}.og-")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()

    def check_old() -> None:
        if suffix == ".onnx":
            assert target.read_bytes() == b"the old export"
        else:
            np.testing.assert_array_equal(og.load(target)["w"].numpy(),
                                          np.ones(4096, np.float32))

    check_old()
    assert _temps(tmp_path) == stray  # nobody has written here since
    og.save({"x": og.zeros(2)}, tmp_path / "other.pth")  # the next write sweeps it
    assert _temps(tmp_path) == []
    check_old()


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and the orphan sweep are POSIX")
def test_writers_killed_at_random_moments_leave_a_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "model.pth"
    og.save({"w": og.zeros(200_000)}, target)
    rng = np.random.default_rng(0)
    for _ in range(3):
        child = _child(_LOOPING_CHILD, target)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            time.sleep(float(rng.uniform(0.05, 0.4)))
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        w = og.load(target)["w"].numpy()  # the old file or one complete new one
        assert w.shape == (200_000,) and (w == w[0]).all()
        og.save({"w": og.tensor(w)}, target)  # the next write: no stray file survives it
        assert _temps(tmp_path) == []


def test_temporary_files_of_live_or_foreign_owners_are_kept(tmp_path: Path) -> None:
    me = files._HOST
    live = tmp_path / f".a.pth.og-{me}-{os.getpid()}-0123abcd.tmp"
    other_host = tmp_path / ".a.pth.og-zzzzzz-1-0123abcd.tmp"
    not_ours = tmp_path / ".a.pth.tmp"
    for path in (live, other_host, not_ours):
        path.write_bytes(b"x")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    orphan = tmp_path / f".a.pth.og-{me}-{int(dead.stdout)}-0123abcd.tmp"
    orphan.write_bytes(b"x")
    og.save({"a": og.ones(1)}, tmp_path / "a.pth")
    assert sorted(_temps(tmp_path)) == sorted(p.name for p in (live, other_host, not_ours))
