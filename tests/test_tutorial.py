"""The issue's snippet runs as written and prints exactly what it says."""
from __future__ import annotations

import subprocess
import sys

import pytest

SNIPPET = """\
import onnxgrad as og
a = og.tensor([2., 3.], requires_grad=True)
b = og.tensor([6., 4.], requires_grad=True)
Q = 3*a**3 - b**2
Q.backward(gradient=og.tensor([1., 1.]))
print(9*a**2 == a.grad)
print(-2*b == b.grad)
"""
EXPECTED = "tensor([True, True])\ntensor([True, True])\n"


def test_snippet_prints_what_it_says(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(SNIPPET, "<tutorial>", "exec"), {"__name__": "__tutorial__"})  # noqa: S102
    assert capsys.readouterr().out == EXPECTED


def test_snippet_in_a_fresh_interpreter() -> None:
    # A new process: nothing cached, nothing imported by other tests, exactly what a user runs.
    result = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXPECTED
    assert result.stderr == ""
