"""ONNX Runtime sessions: providers, options, and the bounded single-node kernel cache."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .opset import IR_VERSION, OPSET

_providers: list[str] | None = None


def _default_providers() -> list[str]:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def get_providers() -> list[str]:
    """The execution providers every new session uses (CUDA when onnxruntime-gpu offers it)."""
    global _providers
    if _providers is None:
        _providers = _default_providers()
    return list(_providers)


def set_providers(providers: Sequence[str]) -> None:
    """Override the execution providers for sessions created from now on."""
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"execution provider(s) {missing} not available; available: {available}")
    if not providers:
        raise ValueError("set_providers needs at least one execution provider")
    global _providers
    _providers = list(providers)
    _kernel_cache.clear()


def session_options(*, level: str = "extended") -> ort.SessionOptions:
    opts = ort.SessionOptions()
    # NOTE: EXTENDED rather than ALL: the NCHWc layout transform that ALL adds was measured slower
    # for training graphs (many layout conversions around the gradient convolutions).
    opts.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    opts.log_severity_level = 3
    return opts


def make_session(model: onnx.ModelProto | bytes, *, level: str = "extended") -> ort.InferenceSession:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, session_options(level=level), providers=get_providers())


class _LRU(OrderedDict):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def get_or_make(self, key, make):
        try:
            value = self[key]
        except KeyError:
            value = make()
            self[key] = value
            if len(self) > self.capacity:
                self.popitem(last=False)
            return value
        self.move_to_end(key)
        return value


_kernel_cache = _LRU(1024)


def kernel_cache_size() -> int:
    return len(_kernel_cache)


def _single_node_model(
    op_type: str, attrs: dict[str, Any], in_types: Sequence[tuple[int, tuple[int, ...]] | None], n_out: int
) -> onnx.ModelProto:
    in_names = [f"x{i}" if t is not None else "" for i, t in enumerate(in_types)]
    out_names = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op_type, in_names, out_names, **attrs)
    inputs = [
        helper.make_tensor_value_info(name, t[0], t[1])
        for name, t in zip(in_names, in_types)
        if t is not None
    ]
    outputs = [helper.make_empty_tensor_value_info(name) for name in out_names]
    graph = helper.make_graph([node], op_type, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def run_node(
    op_type: str,
    attrs: dict[str, Any],
    attrs_key: Any,
    inputs: Sequence[np.ndarray | None],
    n_out: int = 1,
) -> list[np.ndarray]:
    """Evaluate one ONNX node eagerly; sessions are cached by op, attributes, dtypes and shapes."""
    key = (op_type, attrs_key, n_out, tuple(None if x is None else (x.dtype, x.shape) for x in inputs))

    def make():
        in_types = [
            None if x is None else (helper.np_dtype_to_tensor_dtype(x.dtype), x.shape) for x in inputs
        ]
        return make_session(_single_node_model(op_type, attrs, in_types, n_out))

    sess = _kernel_cache.get_or_make(key, make)
    feeds = {f"x{i}": x for i, x in enumerate(inputs) if x is not None}
    return sess.run(None, feeds)
