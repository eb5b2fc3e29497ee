"""Atomic writes (``runtime.files``): modes as a normal write gives them, nothing half-written,
the target untouched by a failed write, errors naming the target, and every writer using it."""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnxgrad.runtime import export, files
from onnxgrad.runtime.files import (
    FileWriteError,
    atomic_file,
    atomic_path,
    atomic_paths,
    atomic_write,
)

import onnxgrad as og
from onnxgrad.__main__ import main as cli_main


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def write_by_file(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_by_path(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


WRITERS = {"atomic_write": atomic_write, "atomic_file": write_by_file,
           "atomic_path": write_by_path}


# --------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600),
                                                (0o002, 0o664)])
def test_a_new_file_gets_the_mode_a_normal_write_gives(tmp_path: Path, writer: str, mask: int,
                                                       expected: int) -> None:
    target = tmp_path / "new.bin"
    with umask(mask):
        WRITERS[writer](target, b"data")
        with open(tmp_path / "plain.bin", "wb") as f:  # the reference: an ordinary write
            f.write(b"data")
    assert mode(target) == expected == mode(tmp_path / "plain.bin")
    assert target.read_bytes() == b"data"
    assert names(tmp_path) == ["new.bin", "plain.bin"]


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("existing", [0o600, 0o755, 0o640])
def test_a_replaced_file_keeps_its_mode(tmp_path: Path, writer: str, existing: int) -> None:
    target = tmp_path / "old.bin"
    target.write_bytes(b"old")
    target.chmod(existing)
    with umask(0o022):
        WRITERS[writer](target, b"new")
    assert mode(target) == existing
    assert target.read_bytes() == b"new"
    assert names(tmp_path) == ["old.bin"]


def test_a_symbolic_link_is_written_through_and_kept(tmp_path: Path) -> None:
    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    atomic_write(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    assert names(tmp_path) == ["link.bin", "real.bin"]


# --------------------------------------------------------------------------- failures
@pytest.mark.parametrize("error", [RuntimeError("writer failed"), KeyboardInterrupt()])
@pytest.mark.parametrize("exists", [False, True], ids=["new", "replacing"])
def test_an_error_mid_write_leaves_no_temp_file_and_the_target_unchanged(
        tmp_path: Path, error: BaseException, exists: bool) -> None:
    target = tmp_path / "t.bin"
    if exists:
        target.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_file(target) as f:
        f.write(b"half a ")
        f.flush()
        raise error
    assert names(tmp_path) == (["t.bin"] if exists else [])
    if exists:
        assert target.read_bytes() == b"old"

    # The same by path: the writer has the temporary file on disk when it fails.
    with pytest.raises(type(error)), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a ")
        raise error
    assert names(tmp_path) == (["t.bin"] if exists else [])


def test_the_writers_own_error_propagates_unchanged(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="^disk full$") as info, atomic_file(tmp_path / "t.bin"):
        raise OSError("disk full")
    assert not isinstance(info.value, FileWriteError)
    assert names(tmp_path) == []


def test_data_is_fsynced_before_the_rename_and_the_folder_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "t.bin", b"data")
    assert events == ["fsync file", "replace", "fsync folder"]


def test_a_failed_fsync_removes_the_temp_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(FileWriteError, match=f"cannot write {target}: input/output error"):
        atomic_write(target, b"new")
    assert names(tmp_path) == ["t.bin"] and target.read_bytes() == b"old"




def test_a_read_only_folder_gives_an_error_naming_the_target(read_only: Path) -> None:
    target = read_only / "step.onnx"
    with pytest.raises(FileWriteError) as info:
        atomic_write(target, b"data")
    message = str(info.value)
    assert message == f"cannot write {target}: permission denied in folder {read_only}"
    assert ".tmp" not in message  # the temporary name means nothing to the user
    assert isinstance(info.value, OSError) and info.value.errno == errno.EACCES
    assert names(read_only) == []


def test_og_save_into_a_read_only_folder(read_only: Path) -> None:
    with pytest.raises(OSError, match=r"cannot write .*ckpt\.npz: permission denied in folder"):
        og.save({"a": og.ones(2)}, read_only / "ckpt.npz")


def test_cli_dot_into_a_read_only_folder_is_one_line(read_only: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(_neg_model(4), str(model))
    assert cli_main(["inspect", str(model), "--dot", str(read_only / "m.dot")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"onnxgrad inspect: error: cannot write {read_only / 'm.dot'}: "
                   f"permission denied in folder {read_only}")


def test_missing_folder_and_a_folder_as_target(tmp_path: Path) -> None:
    with pytest.raises(FileWriteError, match=f"no such folder {tmp_path / 'no'}"):
        atomic_write(tmp_path / "no" / "t.bin", b"x")
    assert atomic_write(tmp_path / "made" / "t.bin", b"x", make_folder=True).read_bytes() == b"x"
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileWriteError, match="dir: it is a folder"):
        atomic_write(tmp_path / "dir", b"x")
    assert names(tmp_path) == ["dir", "made"]
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileWriteError, match="is not a folder"):
        atomic_write(tmp_path / "file" / "t.bin", b"x")


# --------------------------------------------------------------------------- several files
def test_several_files_are_all_written_before_the_first_rename(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, model = tmp_path / "m.onnx.data", tmp_path / "m.onnx"
    data.write_bytes(b"old data")
    model.write_bytes(b"old model")
    with pytest.raises(RuntimeError), atomic_paths(data, model) as (tmp_data, tmp_model):
        tmp_data.write_bytes(b"new data")
        raise RuntimeError("the model failed to serialize")
    assert names(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert data.read_bytes() == b"old data" and model.read_bytes() == b"old model"

    renamed: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace",
                        lambda src, dst: (renamed.append(Path(dst).name), real_replace(src, dst)))
    with atomic_paths(data, model) as (tmp_data, tmp_model):
        tmp_data.write_bytes(b"new data")
        tmp_model.write_bytes(b"new model")
        assert tmp_data.parent == tmp_model.parent == tmp_path
    assert renamed == ["m.onnx.data", "m.onnx"]  # the referenced file is in place first
    assert data.read_bytes() == b"new data" and model.read_bytes() == b"new model"
    assert names(tmp_path) == ["m.onnx", "m.onnx.data"]


def _neg_model(n: int) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_export_with_external_data_fails_without_touching_the_old_pair(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "_PROTOBUF_LIMIT", 64 * 1024**2 + 1024)  # "large" at a few KB
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 4096)
    old = np.arange(4096, dtype=np.float32)
    path = export.save_model(_neg_model(4096), tmp_path / "big.onnx", {"x": old})
    before = {name: (tmp_path / name).read_bytes() for name in names(tmp_path)}
    assert list(before) == ["big.onnx", "big.onnx.data"]

    def fail(*args, **kwargs) -> None:
        raise RuntimeError("checker: the model is invalid")

    monkeypatch.setattr(export, "_point_external_data", fail)  # after both temps are written
    with pytest.raises(RuntimeError, match="invalid"):
        export.save_model(_neg_model(4096), path, {"x": -old})
    assert {name: (tmp_path / name).read_bytes() for name in names(tmp_path)} == before

    monkeypatch.undo()
    monkeypatch.setattr(export, "_PROTOBUF_LIMIT", 64 * 1024**2 + 1024)
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 4096)
    export.save_model(_neg_model(4096), path, {"x": -old})
    assert names(tmp_path) == ["big.onnx", "big.onnx.data"]
    loaded = onnx.load(str(path))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]), -old)


def test_no_writer_bypasses_the_helper() -> None:
    """Every writer of files goes through runtime.files (no second copy of the recipe)."""
    import onnxgrad.models
    import onnxgrad.passes
    import onnxgrad.tracer

    packages = (og, onnxgrad.models, onnxgrad.tracer, onnxgrad.passes, files)
    offenders = []
    for folder in {Path(package.__file__).parent for package in packages}:
        for source in folder.rglob("*.py"):
            if source.resolve() == Path(files.__file__).resolve():
                continue
            text = source.read_text()
            if any(call in text for call in ("os.replace(", "os.rename(", "mkstemp(",
                                              "NamedTemporaryFile(")):
                offenders.append(source.name)
    assert offenders == []
