"""onnxgrad: PyTorch-style eager code whose every operation is a standard ONNX node.

The public front: tensor factories, ops, ``no_grad``, providers. Layers live in
``onnxgrad.nn``, optimizers in ``onnxgrad.optim``, architectures in ``onnxgrad.models``.
"""
from __future__ import annotations

from . import accelerator, cuda
from .inspection import inspect, summary
from .random import Generator
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
from .tracer import registry as _registry
from .tracer.autograd import inference_mode, is_inference_mode_enabled
from .tracer.compile import compile
from .tracer.device import device
from .tracer.dtypes import (
    Size,
    bool_,
    dtype,
    float16,
    float32,
    float64,
    int8,
    int16,
    int32,
    int64,
    uint8,
)
from .tracer.factories import manual_seed
from .tracer.ops import ShapeError
from .tracer.random_stream import get_rng_state, initial_seed, set_rng_state
from .tracer.values import set_default_dtype

bool = bool_
float = float32
double = float64
long = int64
half = float16
short = int16
int = int32  # torch.int is int32


def get_default_dtype() -> dtype:
    """The default floating-point dtype (``onnxgrad.float32`` unless ``set_default_dtype``)."""
    from .tracer.dtypes import as_dtype
    from .tracer.values import get_default_dtype as current

    return as_dtype(current())

__version__ = "0.1.0"

# The ops declared @op(og=True) (tracer/ops.py, tracer/factories.py): og.exp, og.zeros, ...
globals().update(_registry.namespace("og"))

__all__ = [
    "Generator",
    "ShapeError",
    "Tensor",
    "TraceError",
    "as_tensor",
    "autograd",
    "bool",
    "compile",
    "double",
    "enable_grad",
    "float",
    "float16",
    "float32",
    "float64",
    "get_default_dtype",
    "get_providers",
    "get_rng_state",
    "grad",
    "inference_mode",
    "initial_seed",
    "inspect",
    "int8",
    "int16",
    "int32",
    "int64",
    "is_inference_mode_enabled",
    "load",
    "long",
    "manual_seed",
    "models",
    "nn",
    "no_grad",
    "optim",
    "save",
    "set_default_dtype",
    "set_grad_enabled",
    "set_providers",
    "set_rng_state",
    "summary",
    "tensor",
    "training_step",
    "uint8",
    "utils",
]
# Devices and PyTorch's type objects (tracer/device.py, tracer/dtypes.py).
__all__ += ["Size", "accelerator", "cuda", "device", "dtype", "half", "int", "short"]
__all__.extend(_registry.names("og"))


def __getattr__(name: str):
    # Submodules load on first use (og.nn, og.optim, og.models), keeping `import onnxgrad` light.
    if name in ("nn", "optim", "models", "utils", "autograd", "distributed"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name in ("training_step", "TrainingStep"):
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
