"""The one pinned ONNX opset (DESIGN decision 1)."""
from __future__ import annotations

OPSET = 21
IR_VERSION = 10
DOMAIN = ""  # ai.onnx
