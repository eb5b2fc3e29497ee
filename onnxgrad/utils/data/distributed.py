"""``DistributedSampler``: each of ``num_replicas`` processes reads its own share of a dataset."""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TypeVar

from ...random import Generator
from .dataset import Dataset
from .sampler import Sampler

T_co = TypeVar("T_co", covariant=True)

__all__ = ["DistributedSampler"]


class DistributedSampler(Sampler[T_co]):
    """Rank ``rank``'s indices: every ``num_replicas``-th of the (shuffled, padded) order.

    PyTorch's rules: without ``drop_last`` the order is padded by repeating its start so each
    rank gets ``ceil(len / num_replicas)`` samples; with it, the tail is dropped. The shuffle is
    seeded with ``seed + epoch`` (call :meth:`set_epoch` each epoch), identical on every rank.

    ``num_replicas`` and ``rank`` default to the default process group's world size and rank
    (``onnxgrad.distributed.init_process_group()``); without a group, pass both.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        if num_replicas is None or rank is None:
            from ... import distributed as dist

            if dist.is_initialized():
                num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
                rank = dist.get_rank() if rank is None else rank
        if num_replicas is None or rank is None:
            missing = " and ".join(n for n, v in (("num_replicas", num_replicas), ("rank", rank))
                                   if v is None)
            raise RuntimeError(f"DistributedSampler: pass {missing} explicitly, or call "
                               f"onnxgrad.distributed.init_process_group() first to read them "
                               f"from the process group")
        if rank >= num_replicas or rank < 0:
            raise ValueError(f"Invalid rank {rank}, rank should be in the interval "
                             f"[0, {num_replicas - 1}]")
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.drop_last = drop_last
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.drop_last and n % self.num_replicas != 0:
            # Split to the nearest length that is evenly divisible, so every rank gets the same.
            self.num_samples = math.ceil((n - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.shuffle = shuffle
        self.seed = seed

    def __iter__(self) -> Iterator[T_co]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            indices = Generator().manual_seed(self.seed + self.epoch)._permutation(n)
        else:
            indices = list(range(n))
        if not self.drop_last:
            padding_size = self.total_size - len(indices)
            if padding_size <= len(indices):
                indices += indices[:padding_size]
            else:
                indices += (indices * math.ceil(padding_size / len(indices)))[:padding_size]
        else:
            indices = indices[: self.total_size]
        assert len(indices) == self.total_size
        indices = indices[self.rank: self.total_size: self.num_replicas]
        assert len(indices) == self.num_samples
        return iter(indices)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shuffle to draw (all ranks must agree on it)."""
        self.epoch = epoch
