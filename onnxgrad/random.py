"""``og.Generator``: a random number generator object, as ``torch.Generator``.

An explicit generator makes one consumer's random stream independent of the global one
(``og.manual_seed``): ``DataLoader(shuffle=True, generator=g)``, ``random_split(...,
generator=g)`` and the samplers draw from it.

NOTE: the numbers differ from PyTorch's. A ``torch.Generator`` is a Mersenne Twister (mt19937)
whose ``randperm`` / ``randint`` algorithms are PyTorch's own; this one is NumPy's PCG64, so the
same seed gives a different (equally reproducible) shuffle order. Code that needs PyTorch's exact
order must compute the permutation with PyTorch and pass it as a ``sampler``.
"""
from __future__ import annotations

import json
import secrets
from typing import Any

import numpy as np

__all__ = ["Generator"]

# torch.Generator().initial_seed() and torch.initial_seed() before any manual_seed.
_DEFAULT_SEED = 67280421310721
_MASK64 = (1 << 64) - 1


class Generator:
    """A seeded random stream: ``manual_seed``, ``seed``, ``initial_seed``, ``get_state``,
    ``set_state``, as ``torch.Generator``. Only ``device="cpu"`` exists."""

    def __init__(self, device: Any = "cpu") -> None:
        name = str(getattr(device, "type", device))
        if name != "cpu":
            raise RuntimeError(f"onnxgrad.Generator: only device 'cpu' is supported, got "
                               f"{str(device)!r} (a generator's numbers are drawn on the host)")
        self.device = "cpu"
        self.manual_seed(_DEFAULT_SEED)

    def manual_seed(self, seed: int) -> Generator:
        """Reset the stream to ``seed``; returns the generator (as PyTorch's)."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            try:
                seed = int(seed)
            except (TypeError, ValueError):
                raise TypeError(f"manual_seed expected an int seed, got "
                                f"{type(seed).__name__}") from None
        # PyTorch takes negative seeds modulo 2**64 as well.
        self._seed = int(seed) & _MASK64
        self._rng = np.random.default_rng(self._seed)
        return self

    def seed(self) -> int:
        """Reseed from the operating system's entropy; returns the new seed."""
        new = secrets.randbits(63)
        self.manual_seed(new)
        return new

    def initial_seed(self) -> int:
        """The seed the stream was last reset to."""
        return self._seed

    def get_state(self) -> Any:
        """The stream's full state as a uint8 tensor (restore it with :meth:`set_state`)."""
        from .tracer.tensor import tensor

        blob = json.dumps({"seed": self._seed, "state": self._rng.bit_generator.state})
        return tensor(np.frombuffer(blob.encode(), dtype=np.uint8))

    def set_state(self, new_state: Any) -> Generator:
        """Restore a state :meth:`get_state` returned."""
        data = getattr(new_state, "_v", None)
        array = np.asarray(data.data if data is not None else new_state)
        try:
            if array.dtype != np.uint8 or array.ndim != 1:
                raise ValueError
            saved = json.loads(array.tobytes().decode())
            rng = np.random.default_rng()
            rng.bit_generator.state = saved["state"]
            seed = int(saved["seed"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise RuntimeError("Generator.set_state: not a state that Generator.get_state "
                               "returned (expected a 1-d uint8 tensor)") from None
        self._rng, self._seed = rng, seed
        return self

    @property
    def numpy_generator(self) -> np.random.Generator:
        """The NumPy generator that draws this generator's numbers (``og.rand(...,
        generator=g)`` and the samplers use it)."""
        return self._rng

    # ---------------------------------------------------------------- draws (onnxgrad-internal)
    def _permutation(self, n: int) -> list[int]:
        return [int(i) for i in self._rng.permutation(n)]

    def _integers(self, high: int, size: int) -> list[int]:
        return [int(i) for i in self._rng.integers(0, high, size=size)]

    def __repr__(self) -> str:
        return f"<onnxgrad.Generator object at {id(self):#x}>"


def _global_seed() -> int:
    """A fresh seed drawn from the global stream (``og.manual_seed``), as PyTorch's samplers
    seed a private generator when none is given; so ``og.manual_seed`` fixes their order."""
    from .tracer.factories import generator

    return int(generator().integers(0, 2**63 - 1))


def _private(generator: Generator | None) -> Generator:
    """``generator``, or a new one seeded from the global stream."""
    if generator is not None:
        if not isinstance(generator, Generator):
            raise TypeError(f"generator must be an onnxgrad.Generator, got "
                            f"{type(generator).__name__}")
        return generator
    return Generator().manual_seed(_global_seed())
