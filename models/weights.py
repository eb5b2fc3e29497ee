"""Local weight files for ``onnxgrad.models``: ``.npz`` and ``.safetensors`` state dicts.

onnxgrad never downloads anything: pretrained weights are a local file holding a state dict with
torchvision's key names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...). Loading goes
through ``Module.load_state_dict`` (strict), so a wrong architecture fails naming the keys.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import nn
from ..runtime.files import atomic_file, atomic_path

__all__ = ["load_weights", "read_state", "save_weights"]

SUFFIXES = (".npz", ".safetensors", ".pth", ".pt", ".bin")

_EXPORT_HINT = (
    "To use torchvision's pretrained weights, save them once where torchvision is installed:\n"
    "    import numpy as np, torchvision\n"
    "    sd = torchvision.models.{name}(weights='DEFAULT').state_dict()\n"
    "    np.savez('{name}.npz', **{{k: v.numpy() for k, v in sd.items()}})\n"
    "(or safetensors.torch.save_file(sd, '{name}.safetensors')), then pass the file: "
    "{name}(weights='{name}.npz')."
)


def _no_download(name: str, what: str) -> RuntimeError:
    return RuntimeError(f"{name}: {what}, and onnxgrad cannot download pretrained weights; pass "
                        f"a local .npz or .safetensors file as weights=...\n"
                        + _EXPORT_HINT.format(name=name))


def resolve_weights(weights: Any, pretrained: bool | None, name: str) -> str | None:
    """The local weights path a model constructor was given, or None for random init."""
    if pretrained:
        raise _no_download(name, "pretrained=True asks for downloaded weights")
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        # torchvision's Weights enums (ResNet18_Weights.DEFAULT) carry a URL to download.
        raise _no_download(name, f"weights={weights!r} is not a local file path")
    path = os.fspath(weights)
    if os.path.isfile(path):
        return path
    if not path.lower().endswith(SUFFIXES) and os.sep not in path and "/" not in path:
        # "DEFAULT", "IMAGENET1K_V1": torchvision's weight names, which mean a download.
        raise _no_download(name, f"weights={path!r} names downloadable weights, not a file")
    raise FileNotFoundError(f"{name}: weights file {path!r} does not exist")


def read_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz``, ``.safetensors`` or PyTorch ``.pth`` file, by key."""
    path = os.fspath(path)
    lower = path.lower()
    if lower.endswith(".npz"):
        # allow_pickle=False: a weights file must never run code when it is read.
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    if lower.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ImportError(
                f"reading {path!r} needs the optional 'safetensors' package: install the "
                "extra with `pip install onnxgrad[safetensors]` (or `pip install safetensors`), "
                "or convert the file to .npz") from None
        return dict(load_file(path))
    if lower.endswith((".pth", ".pt", ".bin")):
        # PyTorch's own format, read without torch by a restricted unpickler (never runs code).
        from onnxgrad.serialization import load

        state = load(path, weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"weights file {path!r} holds a {type(state).__name__}, "
                             "not a state dict")
        return {k: v.numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in state.items()}
    raise ValueError(
        f"unsupported weights file {path!r}: expected one of {', '.join(SUFFIXES)}")


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """Load a weights file (or an already-read state dict) into ``model``, strictly."""
    state = dict(source) if isinstance(source, Mapping) else read_state(source)
    where = "" if isinstance(source, Mapping) else f" from {os.fspath(source)!r}"
    # NOTE: torchvision's original ResNet checkpoints predate BatchNorm's num_batches_tracked;
    # PyTorch's BatchNorm loads them by starting that counter at 0, and so does this.
    for key, tensor in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = np.zeros(tensor.shape, tensor.dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"loading weights{where}: {exc}") from None
    return model


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model.state_dict()`` as ``.npz`` or ``.safetensors`` (atomically)."""
    path = os.fspath(path)
    lower = path.lower()
    if not lower.endswith(SUFFIXES):
        raise ValueError(f"unsupported weights file {path!r}: expected one of {', '.join(SUFFIXES)}")
    # NOTE: not np.ascontiguousarray, which turns the 0-d num_batches_tracked into shape [1].
    arrays = {k: _c_order(t.numpy()) for k, t in model.state_dict().items()}
    if lower.endswith(".npz"):
        with atomic_file(path) as f:  # a file object, so numpy appends no second suffix
            np.savez(f, **arrays)
        return
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ImportError(
            f"writing {path!r} needs the optional 'safetensors' package: install the "
            "extra with `pip install onnxgrad[safetensors]` (or `pip install "
            "safetensors`), or save as .npz") from None
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp))


def _c_order(array: np.ndarray) -> np.ndarray:
    return array if array.flags.c_contiguous else array.copy(order="C")


def head_size(state: Mapping[str, Any], key: str) -> int:
    """Rows of a classifier weight in a state dict (its number of classes)."""
    weight = state.get(key)
    if weight is None or np.ndim(weight) != 2:
        raise ValueError(f"the weights have no 2-D {key!r}; are they a torchvision state dict "
                         "of this architecture?")
    return int(np.shape(weight)[0])
