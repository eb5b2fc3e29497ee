"""PyTorch's beginner programs run on onnxgrad with only their imports changed.

Each file in ``tests/pytorch_programs/`` is a copy of one of PyTorch's official beginner
tutorials (the 60-minute blitz's four parts, the Quickstart, "Learning PyTorch with Examples")
written for PyTorch, with its datasets replaced by generated data. The test swaps the block
between ``# --- imports ---`` and ``# --- end imports ---`` mechanically (``import torch`` ->
``import onnxgrad as torch``, ``torch.nn`` -> ``onnxgrad.nn``, ...), runs both versions in fresh
interpreters and compares what they print: the same text, and the same numbers to float32
training precision.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAMS = sorted((Path(__file__).parent / "pytorch_programs").glob("*.py"))
BEGIN, END = "# --- imports ---\n", "# --- end imports ---\n"

NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|\bnan\b|\binf\b")
ADDRESS = re.compile(r"<(\w+) object at 0x[0-9a-fA-F]+>")
GRAD_FN = re.compile(r"grad_fn=<\w+>")


def onnxgrad_imports(source: str) -> str:
    """The program with its import block rewritten for onnxgrad, nothing else changed."""
    head, rest = source.split(BEGIN)
    block, tail = rest.split(END)
    lines = []
    for line in block.splitlines():
        if line.strip() == "import torch":
            line = "import onnxgrad as torch"
        lines.append(re.sub(r"\btorch\b", "onnxgrad", line) if " as torch" not in line else line)
    return head + BEGIN + "\n".join(lines) + "\n" + END + tail


def run(source: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                            cwd=cwd, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def normalized(out: str) -> tuple[str, list[float]]:
    """Printed text with numbers cut out, and the numbers. Object addresses and autograd node
    names are masked: PyTorch names the nodes of its own kernels (``MseLossBackward0``), which
    onnxgrad composes from several ONNX nodes."""
    out = out.replace("onnxgrad", "torch")
    # "onnxgrad.float64" is longer than "torch.float64": a suffix may wrap in one and not the other
    out = re.sub(r",\n *(dtype=|size=|grad_fn=|requires_grad=)", r", \1", out)
    out = ADDRESS.sub("<node>", out)
    out = GRAD_FN.sub("grad_fn=<node>", out)
    numbers = [float(n) for n in NUMBER.findall(out)]
    return NUMBER.sub("#", out), numbers


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.stem)
def test_import_block_is_swapped(program: Path) -> None:
    swapped = onnxgrad_imports(program.read_text())
    block = swapped.split(BEGIN)[1].split(END)[0]
    assert "onnxgrad" in block
    assert not re.search(r"\btorch\b", re.sub(r" as torch$", "", block, flags=re.MULTILINE))
    assert swapped.split(END)[1] == program.read_text().split(END)[1]


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.stem)
def test_runs_on_onnxgrad_and_prints_pytorchs_numbers(program: Path, tmp_path: Path) -> None:
    (tmp_path / "og").mkdir()
    got = run(onnxgrad_imports(program.read_text()), tmp_path / "og")
    assert got.strip()
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("PyTorch is not installed: the program ran, its numbers are not compared")
    (tmp_path / "torch").mkdir()
    expected = run(program.read_text(), tmp_path / "torch")
    want_text, want = normalized(expected)
    got_text, have = normalized(got)
    assert got_text == want_text
    assert len(have) == len(want)
    bad = [(i, w, h) for i, (w, h) in enumerate(zip(want, have))
           if not math.isclose(w, h, rel_tol=2e-3, abs_tol=2e-4)
           and not (math.isnan(w) and math.isnan(h))]
    assert not bad, f"numbers differ (index, PyTorch, onnxgrad): {bad[:10]}"
