"""The ``onnxgrad`` command: each verb as a subprocess (``python -m onnxgrad``), its exit codes,
and one-line errors without tracebacks; the verb registry in-process."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from test_inspect import step_model

from onnxgrad import __main__ as cli


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxgrad", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def step_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "step.onnx"
    path.write_bytes(step_model().SerializeToString())
    return path


# --------------------------------------------------------------------------- top level


def test_help_lists_every_verb() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for verb in ("demo", "inspect", "bench"):
        assert f"    {verb} " in proc.stdout


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run().returncode == 2
    assert cli.main(["frobnicate"]) == 2  # in-process from here on: main returns, never exits
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["inspect", "a.onnx", "--no-such-option"]) == 2


# --------------------------------------------------------------------------- inspect


def test_inspect_prints_the_summary(step_file: Path) -> None:
    proc = run("inspect", str(step_file))
    assert proc.returncode == 0, proc.stderr
    assert "FLOPs per run: 44,672 (44.67 KFLOP)" in proc.stdout
    assert "  by origin: fwd 6, opt 5, grad 1" in proc.stdout


def test_inspect_nodes_prints_the_dump(step_file: Path) -> None:
    proc = run("inspect", "--nodes", str(step_file))
    assert proc.returncode == 0, proc.stderr
    assert "  %r: f32[2,4,8,8] = Relu(%y)  # fwd  (model.py:13: r = y.relu())" in proc.stdout


def test_inspect_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: onnxgrad inspect") and "--nodes" in out and "--svg" in out


def test_inspect_bad_files(tmp_path: Path, step_file: Path) -> None:
    assert_one_line_error(run("inspect", str(tmp_path / "missing.onnx")), "no such file")
    text = tmp_path / "notes.onnx"
    text.write_text("these are not the weights you are looking for\n")
    assert_one_line_error(run("inspect", str(text)), "not an ONNX model")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(step_file.read_bytes()[:300])
    assert_one_line_error(run("inspect", str(truncated)), str(truncated))


def test_inspect_bad_files_in_process(tmp_path: Path, step_file: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Every cut of a model is rejected with one line (in-process: many cases, fast)."""
    data = step_file.read_bytes()
    path = tmp_path / "cut.onnx"
    for cut in range(1, len(data), max(1, len(data) // 40)):
        path.write_bytes(data[:cut])
        assert cli.main(["inspect", str(path)]) == 2, cut
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (cut, err)


def test_inspect_dot(tmp_path: Path, step_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "step.dot"
    proc = run("inspect", str(step_file), "--dot", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith('digraph "step" {')
    assert cli.main(["inspect", str(step_file), "--dot", str(tmp_path / "no" / "x.dot")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no such directory" in captured.err


def test_inspect_svg_renders_or_says_to_install_graphviz(tmp_path: Path, step_file: Path) -> None:
    out = tmp_path / "step.svg"
    proc = run("inspect", str(step_file), "--svg", str(out))
    if shutil.which("dot"):
        assert proc.returncode == 0, proc.stderr
        assert "<svg" in out.read_text()
    else:
        assert_one_line_error(proc, "install graphviz", "apt-get install graphviz")
        assert not out.exists() and proc.stdout == ""


# --------------------------------------------------------------------------- demo and bench


@pytest.mark.parametrize("verb", ["demo", "bench"])
def test_demo_and_bench_exist_or_say_not_yet(verb: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    module = cli.VERBS[verb].target.partition(":")[0]
    if importlib.util.find_spec(module) is None:
        assert_one_line_error(run(verb), "not available yet")
        assert cli.main([verb, "--help"]) == 0
        assert "not available yet" in capsys.readouterr().out
    else:
        proc = run(verb, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- the registry


def test_registry_dispatch(monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[list[str]] = []
    fake = types.ModuleType("onnxgrad_fake_verb")

    def verb_main(argv: list[str]) -> int:
        calls.append(argv)
        return 0

    def exits(argv: list[str]) -> None:
        raise SystemExit(3)

    fake.main, fake.exits = verb_main, exits
    monkeypatch.setitem(sys.modules, "onnxgrad_fake_verb", fake)
    monkeypatch.setattr(fake, "__spec__", importlib.util.spec_from_loader(fake.__name__, None))
    verbs = {
        "fake": cli.Verb("onnxgrad_fake_verb:main", "a verb"),
        "exits": cli.Verb("onnxgrad_fake_verb:exits", "exits 3"),
        "later": cli.Verb("onnxgrad_not_written_yet:main", "coming soon"),
        "broken": cli.Verb("onnxgrad_fake_verb:missing", "no function"),
    }
    monkeypatch.setattr(cli, "VERBS", verbs)

    assert cli.main(["fake", "--steps", "3", "x"]) == 0
    assert calls == [["--steps", "3", "x"]]
    assert cli.main(["exits"]) == 3
    assert cli.main(["later"]) == 2
    assert "onnxgrad later: error: not available yet" in capsys.readouterr().err
    assert cli.main(["broken"]) == 2
    assert "has no missing(argv) function" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "coming soon" in capsys.readouterr().out


def test_a_missing_optional_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "onnxgrad_needs_extra.py").write_text("import sklearn_not_installed_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "VERBS", {
        "needy": cli.Verb("onnxgrad_needs_extra:main", "needs an extra", extra="demo")})
    assert cli.main(["needy"]) == 2
    err = capsys.readouterr().err
    assert "'sklearn_not_installed_here'" in err and "pip install 'onnxgrad[demo]'" in err
