"""Giving freed memory back to the operating system after a trace.

Tracing a step makes many short-lived arrays (the eager forward, the graph's records) among the
long-lived ones a step keeps (its runner's state buffers, the tensors). glibc's malloc returns to
the OS only the free top of its heap, and, once a large array has been freed, serves arrays up
to that size from the heap instead of mapping them: so the freed trace stayed resident.
Measured on resnet18 1x3x64x64: a steady 591 MB against 503 MB after one trim.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None


_trim = _malloc_trim()


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (glibc's ``malloc_trim``); elsewhere nothing."""
    if _trim is not None:
        _trim(0)
