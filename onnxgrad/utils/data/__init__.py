"""``onnxgrad.utils.data``: datasets, samplers and ``DataLoader``, as ``torch.utils.data``.

Everything runs in the main process: ``num_workers=0`` is the normal case and other values
load in-process with a warning. Batches are collated into ``og.Tensor`` by
:func:`default_collate` (PyTorch's rules: numbers become int64, float64 or bool tensors, NumPy
arrays keep their dtype, tuples become lists, dicts and namedtuples keep their type).

NOTE: shuffled orders (``shuffle=True``, ``RandomSampler``, ``random_split``,
``DistributedSampler(shuffle=True)``) are reproducible with ``og.manual_seed`` or an
``og.Generator``, but are not PyTorch's orders for the same seed: the generators differ (see
``onnxgrad.random``).
"""
from __future__ import annotations

from .collate import default_collate, default_convert
from .dataloader import DataLoader, get_worker_info
from .dataset import (
    ChainDataset,
    ConcatDataset,
    Dataset,
    IterableDataset,
    Subset,
    TensorDataset,
    random_split,
)
from .distributed import DistributedSampler
from .sampler import (
    BatchSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

__all__ = [
    "BatchSampler", "ChainDataset", "ConcatDataset", "DataLoader", "Dataset",
    "DistributedSampler", "IterableDataset", "RandomSampler", "Sampler", "SequentialSampler",
    "Subset", "SubsetRandomSampler", "TensorDataset", "WeightedRandomSampler", "default_collate",
    "default_convert", "get_worker_info", "random_split",
]
