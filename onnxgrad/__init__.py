"""onnxgrad: PyTorch-style eager code whose every operation is a standard ONNX node.

The public front: tensor factories, ops, ``no_grad``, providers. Layers live in
``onnxgrad.nn``, optimizers in ``onnxgrad.optim``, architectures in ``onnxgrad.models``.
"""
from __future__ import annotations

from .inspection import inspect, summary
from .runtime import get_providers, set_providers
from .serialization import load, save
from .tracer import (
    Tensor,
    TraceError,
    as_tensor,
    enable_grad,
    grad,
    no_grad,
    set_grad_enabled,
    tensor,
)
from .tracer.compile import compile
from .tracer.factories import (
    arange,
    full,
    manual_seed,
    ones,
    ones_like,
    rand,
    randint,
    randn,
    zeros,
    zeros_like,
)
from .tracer.ops import (
    ShapeError,
    abs,
    amax,
    amin,
    argmax,
    argmin,
    cat,
    chunk,
    clamp,
    exp,
    flatten,
    log,
    log_softmax,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    permute,
    relu,
    reshape,
    sigmoid,
    softmax,
    split,
    sqrt,
    squeeze,
    stack,
    sum,
    tanh,
    transpose,
    unsqueeze,
    where,
)
from .tracer.tensor import (
    bool_,
    float16,
    float32,
    float64,
    get_default_dtype,
    int8,
    int16,
    int32,
    int64,
    set_default_dtype,
    uint8,
)

bool = bool_  # noqa: A001  (og.bool, as torch.bool)
float = float32  # noqa: A001
double = float64
long = int64
clip = clamp

__version__ = "0.1.0"

__all__ = [
    "ShapeError", "Tensor", "TraceError", "abs", "amax", "amin", "arange", "argmax", "argmin",
    "as_tensor", "bool", "cat", "chunk", "clamp", "clip", "compile", "double", "enable_grad", "exp",
    "flatten", "float", "float16", "float32", "float64", "full", "get_default_dtype",
    "get_providers", "grad", "inspect", "int8", "int16", "int32", "int64", "load", "log",
    "log_softmax", "long", "manual_seed", "matmul", "max", "maximum", "mean", "min", "minimum",
    "models", "nn", "no_grad", "ones", "ones_like", "optim", "permute", "rand", "randint", "randn",
    "relu", "reshape", "save", "set_default_dtype", "set_grad_enabled", "set_providers",
    "sigmoid", "softmax", "split", "sqrt", "squeeze", "stack", "sum", "summary", "tanh", "tensor",
    "training_step", "transpose", "uint8", "unsqueeze", "where", "zeros", "zeros_like",
]


def __getattr__(name: str):
    # Submodules load on first use (og.nn, og.optim, og.models), keeping `import onnxgrad` light.
    if name in ("nn", "optim", "models"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name in ("training_step", "TrainingStep"):
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
