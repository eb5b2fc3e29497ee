"""Tensor printing with PyTorch's layout: the same text for the same values.

PyTorch programs print tensors and users compare that text (tutorials, logs, doctests), so
``repr`` follows PyTorch's rules: one number format for the whole tensor (integral values as
``3.``, scientific notation when the magnitudes span more than 1000x, exceed 1e8 or go below
1e-4, else four decimals), every element right-aligned to the widest, as many per line as fit in
80 columns after the indent, and tensors over 1000 elements summarised to 3 edge items per dim.
"""
from __future__ import annotations

import math

import numpy as np

LINEWIDTH = 80
PRECISION = 4
THRESHOLD = 1000
EDGEITEMS = 3


class _Formatter:
    def __init__(self, values: np.ndarray):
        self.floating = values.dtype.kind == "f"
        self.int_mode = True
        self.sci_mode = False
        flat = values.ravel()
        if not self.floating:
            self.width = max((len(self._plain(v)) for v in flat), default=1)
            return
        as64 = flat.astype(np.float64)  # float16 would overflow in the ratio below
        finite = as64[np.isfinite(as64) & (as64 != 0)]
        if finite.size == 0:  # only zeros, infs, nans: PyTorch leaves them unaligned
            self.width = 1
            return
        big, small = float(np.abs(finite).max()), float(np.abs(finite).min())
        self.int_mode = bool(np.all(finite == np.ceil(finite)))
        if self.int_mode:
            self.sci_mode = big / small > 1000.0 or big > 1.0e8
        else:
            self.sci_mode = big / small > 1000.0 or big > 1.0e8 or small < 1.0e-4
        # NOTE: as PyTorch: integral widths from the nonzero finite values only (so nan and inf
        # stay unpadded), the others from every value.
        self.width = max(len(self._text(v)) for v in (finite if self.int_mode else as64))

    def _plain(self, v: object) -> str:
        return str(bool(v)) if isinstance(v, (bool, np.bool_)) else str(v)

    def _text(self, v: float) -> str:
        if self.sci_mode:
            return f"{v:.{PRECISION}e}"
        if self.int_mode:
            text = f"{v:.0f}"
            return text if math.isinf(v) or math.isnan(v) else text + "."
        return f"{v:.{PRECISION}f}"

    def format(self, v: object) -> str:
        text = self._text(float(v)) if self.floating else self._plain(v)
        return text.rjust(self.width)


def _summarized(values: np.ndarray) -> np.ndarray:
    """The edge items PyTorch shows (its formatter sees only these)."""
    if values.ndim == 0:
        return values
    if values.shape[0] > 2 * EDGEITEMS:
        values = np.concatenate([values[:EDGEITEMS], values[-EDGEITEMS:]])
    return np.stack([_summarized(v) for v in values]) if values.ndim > 1 else values


def _vector(values: np.ndarray, indent: int, summarize: bool, fmt: _Formatter) -> str:
    per_line = max(1, (LINEWIDTH - indent) // (fmt.width + 2))
    if summarize and values.shape[0] > 2 * EDGEITEMS:
        data = ([fmt.format(v) for v in values[:EDGEITEMS]] + [" ..."]
                + [fmt.format(v) for v in values[-EDGEITEMS:]])
    else:
        data = [fmt.format(v) for v in values]
    lines = [", ".join(data[i:i + per_line]) for i in range(0, len(data), per_line)]
    return "[" + ("," + "\n" + " " * (indent + 1)).join(lines) + "]"


def _nested(values: np.ndarray, indent: int, summarize: bool, fmt: _Formatter) -> str:
    if values.ndim == 0:
        return fmt.format(values.item())
    if values.ndim == 1:
        return _vector(values, indent, summarize, fmt)
    n = values.shape[0]
    if summarize and n > 2 * EDGEITEMS:
        slices = ([_nested(values[i], indent + 1, summarize, fmt) for i in range(EDGEITEMS)]
                  + ["..."]
                  + [_nested(values[i], indent + 1, summarize, fmt) for i in range(n - EDGEITEMS, n)])
    else:
        slices = [_nested(values[i], indent + 1, summarize, fmt) for i in range(n)]
    return "[" + ("," + "\n" * (values.ndim - 1) + " " * (indent + 1)).join(slices) + "]"


def tensor_body(values: np.ndarray, indent: int) -> str:
    """The numbers part of ``tensor(...)``, for a tensor printed after ``indent`` columns."""
    if values.size == 0:
        return "[]"
    summarize = values.size > THRESHOLD
    fmt = _Formatter(_summarized(values) if summarize else values)
    return _nested(values, indent, summarize, fmt)


def add_suffixes(text: str, suffixes: list[str], indent: int) -> str:
    """``text`` and ``, dtype=...``-style suffixes, each on a new line where the line would pass
    80 columns (PyTorch's rule, its arithmetic included), then the closing parenthesis."""
    parts = [text]
    last_line = len(text) - text.rfind("\n") + 1
    for suffix in suffixes:
        if last_line + len(suffix) + 2 > LINEWIDTH:
            parts.append(",\n" + " " * indent + suffix)
            last_line = indent + len(suffix)
        else:
            parts.append(", " + suffix)
            last_line += len(suffix) + 2
    return "".join(parts) + ")"
