"""``onnxgrad bench``: runs ``benchmarks/compiled_step.py`` of the source checkout.

The benchmark compares against PyTorch, which onnxgrad does not depend on, so it stays a script
beside the sources rather than part of the installed package; this verb finds it from an
editable install (``pip install -e .``).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compiled_step.py"


def main(argv: list[str]) -> int:
    if not SCRIPT.is_file():
        print(f"onnxgrad bench: error: {SCRIPT} not found; the benchmark runs from a source "
              "checkout (pip install -e .)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("onnxgrad_bench_compiled_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))
