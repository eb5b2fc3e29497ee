"""``onnxgrad verify FILE``: an exported step looped in each runtime installed, compared with ONNX
Runtime step by step (onnxgrad/verify.py, the library that benchmarks/portable_runtimes.py uses).

ONNX Runtime and the reference evaluator are always installed, so they are always tested; OpenVINO
and tract are tested where they are installed (pip install openvino tract) and skipped otherwise.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxgrad.runtime.metadata import STATE_FILE
from test_portable_export import _step  # the compiled SGD-momentum step

import onnxgrad as og
from onnxgrad import nn
from onnxgrad.__main__ import main as cli
from onnxgrad.verify import (
    RUNTIMES,
    Runtime,
    VerifyError,
    format_table,
    label_classes,
    random_batches,
    read_step,
    relative_difference,
    verify,
)

CLASSES = 5


def _cnn() -> nn.Module:
    og.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, CLASSES))


def _batch(seed: int, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 8, 8), dtype=np.float32), rng.integers(0, CLASSES, n)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One trained step in both formats, and with a symbolic batch."""
    folder = tmp_path_factory.mktemp("verify")
    step = _step(_cnn())
    step(*_batch(0))
    step.export(folder / "default.onnx")
    step.export(folder / "portable.onnx", portable=True)
    step.export(folder / "dynamic.onnx", portable=True, dynamic_batch=True)
    return {name: folder / f"{name}.onnx" for name in ("default", "portable", "dynamic")}


def _table(out: str) -> dict[str, list[str]]:
    """The printed table's rows by runtime: the columns split at two spaces or more."""
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("runtime"))
    return {line.split()[0]: [c.strip() for c in line.split("  ") if c.strip()]
            for line in lines[at + 1:]}


# --------------------------------------------------------------------------- the command
@pytest.mark.parametrize("fmt", ["default", "portable"])
def test_ort_and_reference_match_and_exit_0(files: dict[str, Path], fmt: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["verify", str(files[fmt]), "--runtime", "ort,reference", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert set(rows) == {"ort", "reference"}
    assert rows["ort"][-1] == "reference" and rows["reference"][-1] == "matches"
    assert rows["reference"][1:3] == ["yes", "yes"]
    diffs = [float(d) for d in rows["reference"][3].split()]
    assert len(diffs) == 2 and all(0 <= d <= 1e-4 for d in diffs)  # two steps, float32 apart
    # The data the file was looped with is described: labels in the class range the graph has.
    assert "y: int64 [3], integers in [0, 5)" in out
    assert ("portable format" if fmt == "portable" else "default format") in out


def test_a_runtime_that_differs_exits_1(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    reference = RUNTIMES["reference"].make

    def tampered(step):
        run = reference(step)

        def wrong(feeds):  # a runtime whose second step's update is off by 1%
            out = run(feeds)
            if feeds["lr"] != 0 and wrong.calls == 1:
                out = {k: v * np.float32(1.01) if v.dtype == np.float32 else v
                       for k, v in out.items()}
            wrong.calls += 1
            return out
        wrong.calls = 0
        return wrong

    monkeypatch.setitem(RUNTIMES, "reference", Runtime("onnx", "onnx", tampered))
    assert cli(["verify", str(files["portable"]), "--runtime", "reference"]) == 1
    rows = _table(capsys.readouterr().out)
    assert rows["reference"][-1].startswith("differs from step 2 (")
    first, second, third = (float(d) for d in rows["reference"][3].split())
    assert first < 1e-4 and second == pytest.approx(0.01, rel=1e-3) and third > 1e-4


def test_a_runtime_that_fails_gives_one_line_and_exits_1(
        files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def broken(step):
        raise RuntimeError("Exception from src/core.cpp:117:\nUnsupported operation: Col2Im\n\n"
                           "Stack backtrace:\n 0: frame")

    monkeypatch.setitem(RUNTIMES, "reference", Runtime("onnx", "onnx", broken))
    assert cli(["verify", str(files["portable"]), "--runtime", "reference"]) == 1
    rows = _table(capsys.readouterr().out)
    assert rows["reference"][1:3] == ["no", "no"]
    assert rows["reference"][-1] == "fails: RuntimeError: Unsupported operation: Col2Im"


def test_a_runtime_not_installed_is_listed_not_failed(
        files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(RUNTIMES, "openvino",
                        Runtime("no_such_runtime_module", "openvino", RUNTIMES["openvino"].make))
    assert cli(["verify", str(files["portable"]), "--runtime", "openvino,reference"]) == 0
    rows = _table(capsys.readouterr().out)
    assert rows["openvino"][-1] == "not installed (pip install openvino)"


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "missing.onnx: no such file"),
    (["{plain}"], "not an exported training step"),
    (["{portable}", "--runtime", "ort,onnxruntimes"], "unknown runtime onnxruntimes"),
    (["{portable}", "--steps", "0"], "expected a positive integer"),
    (["{portable}", "--data", "{npz}"], "no array for the data inputs ['y']"),
    (["{nostate}"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(files: dict[str, Path], tmp_path: Path, args: list[str],
                                         message: str, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain.onnx"  # a model onnxgrad did not make: no step metadata
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [value],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])), plain)
    np.savez(tmp_path / "data.npz", x=np.zeros((3, 3, 8, 8), np.float32))
    nostate = tmp_path / "nostate.onnx"
    nostate.write_bytes(files["portable"].read_bytes())  # its safetensors file left behind
    names = {"plain": plain, "portable": files["portable"], "npz": tmp_path / "data.npz",
             "nostate": nostate}
    argv = ["verify"] + [a.format(**names) if a.startswith("{") else str(tmp_path / a)
                         if a.endswith(".onnx") else a for a in args]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    # One line (argparse's usage errors print the usage above it, as every verb's do).
    assert message in err.splitlines()[-1] and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("onnxgrad verify: error: ")


def test_data_file_loops_the_given_batches_as_onnxgrad_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    step = _step(_cnn())
    step(*_batch(0))
    step.export(tmp_path / "step.onnx", portable=True)
    batches = [_batch(seed) for seed in (1, 2, 3)]
    np.savez(tmp_path / "data.npz", x=np.stack([b[0] for b in batches]),
             y=np.stack([b[1] for b in batches]))
    assert cli(["verify", str(tmp_path / "step.onnx"), "--runtime", "ort",
                "--data", str(tmp_path / "data.npz")]) == 0
    assert "x: from" in capsys.readouterr().out
    # The same loop through the library: ONNX Runtime's losses are onnxgrad's own steps'.
    file = read_step(tmp_path / "step.onnx")
    rows = verify(file, ["ort"], [{"x": x, "y": y} for x, y in batches])
    np.testing.assert_array_equal([r["output"] for r in rows[0].results],
                                  [step(x, y).numpy() for x, y in batches])


def test_dynamic_batch_file_loops_several_batch_sizes(
        files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["verify", str(files["dynamic"]), "--runtime", "ort,reference",
                "--batch-size", "4,2"]) == 0
    out = capsys.readouterr().out
    assert "x: float32 [4|2, 3, 8, 8], standard normal" in out
    assert _table(out)["reference"][-1] == "matches"


# --------------------------------------------------------------------------- the library
def test_reading_the_file_takes_the_metadata_and_the_state(files: dict[str, Path]) -> None:
    portable, default = read_step(files["portable"]), read_step(files["default"])
    assert portable.portable and not default.portable
    assert portable.data_inputs == default.data_inputs == ["x", "y"]
    assert portable.feeds_for == default.feeds_for
    assert set(portable.state) == set(default.state)
    for name, value in default.state.items():
        np.testing.assert_array_equal(portable.state[name], value, err_msg=name)
    meta = {p.key: p.value for p in portable.model.metadata_props}
    assert meta[STATE_FILE] == "portable.safetensors"
    assert json.loads(meta["onnxgrad.data_inputs"]) == ["x", "y"]


def test_label_range_is_the_class_axis_the_labels_index(files: dict[str, Path]) -> None:
    for fmt, path in files.items():
        model = read_step(path).model
        assert label_classes(model, "y") == CLASSES, fmt
        assert label_classes(model, "x") is None  # floats index nothing
    step = read_step(files["portable"])
    batches, _ = random_batches(step, 20, seed=3)
    labels = np.concatenate([b["y"] for b in batches])
    assert labels.dtype == np.int64 and set(labels) == set(range(CLASSES))


def test_an_integer_input_that_indexes_nothing_takes_0_and_1(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.INT64, [6])
    s = onnx.helper.make_tensor_value_info("s", onnx.TensorProto.INT64, [6])
    out = onnx.helper.make_tensor_value_info("s.new", onnx.TensorProto.INT64, [6])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["x", "s"], ["s.new"])], "g",
                                   [x, s], [out],
                                   [onnx.numpy_helper.from_array(np.zeros(6, np.int64), "s")])
    model = onnx.helper.make_model(graph)
    onnx.helper.set_model_props(model, {"onnxgrad.state": '{"s.new": "s"}',
                                        "onnxgrad.data_inputs": '["x"]'})
    onnx.save(model, tmp_path / "count.onnx")
    step = read_step(tmp_path / "count.onnx")
    assert label_classes(step.model, "x") is None
    batches, lines = random_batches(step, 10)
    assert lines == ["x: int64 [6], integers in [0, 2)"]
    assert set(np.concatenate([b["x"] for b in batches])) == {0, 1}
    rows = verify(step, ["reference"], batches)
    assert [r.diffs for r in rows] == [[0.0] * 10, [0.0] * 10]
    total = sum(b["x"] for b in batches)
    np.testing.assert_array_equal(rows[1].results[-1]["s.new"], total)  # the state was fed back


def test_relative_difference() -> None:
    assert relative_difference(np.float32([1, -3]), np.float32([1, -2])) == 0.5
    assert relative_difference(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_difference(np.float32([1e-9]), np.float32([0])) == pytest.approx(1e-9)
    assert relative_difference(np.float32([np.nan]), np.float32([np.nan])) == 0.0
    assert relative_difference(np.float32([np.nan]), np.float32([1])) == float("inf")
    assert relative_difference(np.zeros(2), np.zeros(3)) == float("inf")
    with pytest.raises(VerifyError, match="no such file"):
        read_step("nowhere.onnx")


# --------------------------------------------------------------------------- other runtimes
@pytest.mark.parametrize("runtime, module", [("openvino", "openvino"), ("tract", "tract")])
@pytest.mark.parametrize("fmt", ["portable", "dynamic"])
def test_installed_runtimes_match_onnx_runtime(files: dict[str, Path], runtime: str, module: str,
                                               fmt: str) -> None:
    pytest.importorskip(module, reason=f"{runtime} is not installed (pip install {module})")
    step = read_step(files[fmt])
    batches, _ = random_batches(step, 3, batch_sizes=[3, 2])
    rows = verify(step, [runtime], batches)
    assert rows[1].runs, rows[1].error
    assert max(rows[1].diffs) <= 1e-4, rows[1].diffs


def test_when_onnx_runtime_fails_nothing_matches(files: dict[str, Path],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def broken(step):
        raise RuntimeError("no session")

    monkeypatch.setitem(RUNTIMES, "ort", Runtime("onnxruntime", "onnxruntime", broken))
    step = read_step(files["portable"])
    rows = verify(step, ["reference"], random_batches(step, 2)[0])
    assert rows[1].runs and not rows[1].ok(1.0)
    assert "not compared" in format_table(rows, 1e-4)
    assert cli(["verify", str(files["portable"]), "--runtime", "reference"]) == 2
    assert "ONNX Runtime cannot load it: RuntimeError: no session" in capsys.readouterr().err
