"""``onnxgrad.utils``: helpers outside the tensor core, as ``torch.utils`` (``utils.data``)."""
from __future__ import annotations


def __getattr__(name: str):
    # og.utils.data loads on first use, as og.nn does.
    if name == "data":
        import importlib

        return importlib.import_module(f"{__name__}.data")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
