"""Devices: ``og.device`` and which ONNX Runtime execution provider runs the ops.

The rule (one compute device per process): tensor data are NumPy arrays in host memory, and every
op, eager or compiled, runs on ONNX Runtime's execution providers (``og.get_providers()``, CUDA
first when onnxruntime-gpu finds a GPU, see ``runtime/session.py``). A tensor's ``.device`` is
that compute device: ``cuda:0`` while ``CUDAExecutionProvider`` leads the providers, else
``cpu``. So there is nothing to move and mixed-device operations cannot happen: ``device=``,
``.to(device)``, ``.cuda()`` and ``.cpu()`` check the request and never copy data. Asking for
``cuda`` where ONNX Runtime has no CUDA provider raises :class:`CudaUnavailableError` (an
``AssertionError``, as PyTorch's CPU build raises, and a ``RuntimeError``, as its CUDA build without
a GPU raises), so either ``except`` catches it. ``cpu`` requests are always accepted: PyTorch
programs create their tensors there and then move them.

Nothing here runs on the eager hot path: factories check ``device`` only when it is given.
"""
from __future__ import annotations

import re
from typing import Any

import onnxruntime as ort

from ..runtime import get_providers

CUDA_PROVIDER = "CUDAExecutionProvider"

# PyTorch's list, so an unknown string gets PyTorch's message word for word.
_TORCH_TYPES = ("cpu", "cuda", "ipu", "xpu", "mkldnn", "opengl", "opencl", "ideep", "hip", "ve",
                "fpga", "maia", "xla", "lazy", "vulkan", "mps", "meta", "hpu", "mtia",
                "privateuseone")

# PyTorch's grammar: a type name, then optionally ``:`` and an index without leading zeros.
_DEVICE_STRING = re.compile(r"([a-zA-Z_]+)(?::([1-9][0-9]*|0))?")


class CudaUnavailableError(AssertionError, RuntimeError):
    """``cuda`` was asked for where ONNX Runtime has no CUDA execution provider."""


class device:
    """``og.device("cpu")``, ``og.device("cuda:0")``, ``og.device("cuda", 0)``, as PyTorch's."""

    __slots__ = ("_index", "_type")

    def __init__(self, type: Any, index: int | None = None):
        if isinstance(type, device):
            if index is not None:
                raise RuntimeError("type (string) must not include an index because index was "
                                   f"passed explicitly: {type}")
            self._type, self._index = type._type, type._index
            return
        if isinstance(type, int) and not isinstance(type, bool):
            type, index = "cuda", type  # torch.device(0): the accelerator's device 0
        if not isinstance(type, str):
            raise TypeError(f"device() received an invalid combination of arguments - got "
                            f"({builtins_type_name(type)}), but expected one of:\n"
                            " * (onnxgrad.device device)\n * (str type, int index = -1)")
        match = _DEVICE_STRING.fullmatch(type)
        if match is None:
            raise RuntimeError(f"Invalid device string: '{type}'")
        name, idx = match.groups()
        if name not in _TORCH_TYPES:
            raise RuntimeError(f"Expected one of {', '.join(_TORCH_TYPES)} device type at start "
                               f"of device string: {type}")
        if idx is not None:
            if index is not None:
                raise RuntimeError("type (string) must not include an index because index was "
                                   f"passed explicitly: {type}")
            index = int(idx)
        if index is not None:
            if not isinstance(index, int) or isinstance(index, bool):
                raise TypeError(f"device index must be an int, got {builtins_type_name(index)}")
            if index < 0:
                raise RuntimeError("Device index must not be negative")
        self._type, self._index = name, index

    @property
    def type(self) -> str:
        return self._type

    @property
    def index(self) -> int | None:
        return self._index

    def __repr__(self) -> str:
        if self._index is None:
            return f"device(type='{self._type}')"
        return f"device(type='{self._type}', index={self._index})"

    def __str__(self) -> str:
        return self._type if self._index is None else f"{self._type}:{self._index}"

    def __eq__(self, other: object) -> bool:
        # NOTE: as PyTorch 2.13, a device never equals a string (device("cpu") == "cpu" is False).
        if not isinstance(other, device):
            return NotImplemented
        return self._type == other._type and self._index == other._index

    def __hash__(self) -> int:
        return hash((self._type, self._index))

    def __reduce__(self) -> tuple:
        return (device, (self._type, self._index))


def builtins_type_name(value: Any) -> str:
    return type(value).__name__


CPU = device("cpu")
CUDA0 = device("cuda", 0)


# --------------------------------------------------------------------------- CUDA availability
def cuda_available() -> bool:
    """Whether ONNX Runtime offers the CUDA execution provider (onnxruntime-gpu and a GPU)."""
    return CUDA_PROVIDER in ort.get_available_providers()


def cuda_device_count() -> int:
    # NOTE: ONNX Runtime's sessions run on CUDA device 0 (its default device_id); onnxgrad uses
    # no other, so it reports one device where CUDA is available.
    return 1 if cuda_available() else 0


def current() -> device:
    """The process's compute device: where every op runs (see the module's rule)."""
    return CUDA0 if get_providers()[0] == CUDA_PROVIDER else CPU


def _no_cuda() -> CudaUnavailableError:
    return CudaUnavailableError(
        "onnxgrad was not started with CUDA enabled: ONNX Runtime has no "
        f"CUDAExecutionProvider here (available: {', '.join(ort.get_available_providers())}). "
        "Install onnxruntime-gpu on a machine with an NVIDIA GPU, or use device='cpu' "
        "(og.cuda.is_available() says which)."
    )


def require_cuda(index: int | None = None) -> None:
    """Raise unless ops run on CUDA device ``index`` (None: the current one)."""
    if not cuda_available():
        raise _no_cuda()
    if index not in (None, 0):
        raise RuntimeError(f"CUDA error: invalid device ordinal: onnxgrad runs on CUDA device 0 "
                           f"only (asked for cuda:{index})")
    if get_providers()[0] != CUDA_PROVIDER:
        raise RuntimeError(
            "CUDA is available but not selected: og.set_providers chose "
            f"{get_providers()}; call og.set_providers(['CUDAExecutionProvider', "
            "'CPUExecutionProvider']) to run on cuda"
        )


def as_device(value: Any) -> device:
    return value if isinstance(value, device) else device(value)


def check(value: Any) -> device:
    """The device a ``device=`` argument or ``.to(...)`` names, checked to exist here."""
    if value.__class__ is str and value == "cpu":
        return CPU
    d = as_device(value)
    if d.type == "cuda":
        require_cuda(d.index)
    elif d.type != "cpu":
        raise RuntimeError(f"onnxgrad runs on cpu or cuda (ONNX Runtime's execution "
                           f"providers), not on {d.type}")
    return d


def is_device_like(value: Any) -> bool:
    """Whether ``.to(value)`` means a device (a string, an og.device or a device index)."""
    return isinstance(value, (str, device)) or (isinstance(value, int)
                                                and not isinstance(value, bool))
