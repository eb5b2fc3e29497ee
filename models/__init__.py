"""Architectures built with onnxgrad.nn."""
from __future__ import annotations
