"""``onnxgrad.utils.data`` and ``og.Generator`` against ``torch.utils.data``.

Everything that does not depend on the random stream is compared with PyTorch exactly (batches,
collated types and dtypes, lengths, DistributedSampler's split, error types and messages); the
shuffled orders cannot be PyTorch's (another generator), so they are checked for what they must
be: permutations, reproducible with a seed, different across seeds and epochs.
"""
from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import onnxgrad as og
from onnxgrad.utils import data as ogdata

torch = pytest.importorskip("torch")
tdata = torch.utils.data

Point = collections.namedtuple("Point", ["x", "y"])


def _plain(value: Any) -> Any:
    """A batch with its tensors as NumPy arrays (og's and torch's alike), keeping containers."""
    if isinstance(value, og.Tensor):
        return ("tensor", value.numpy())
    if isinstance(value, torch.Tensor):
        return ("tensor", value.numpy())
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return (type(value).__name__, [_plain(v) for v in value])
    if isinstance(value, dict):
        return (type(value).__name__, {k: _plain(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_plain(v) for v in value])
    return ("value", value)


def _assert_same(ours: Any, theirs: Any) -> None:
    a, b = _plain(ours), _plain(theirs)
    _compare(a, b)


def _compare(a: Any, b: Any) -> None:
    assert a[0] == b[0], (a, b)
    if a[0] == "tensor":
        assert a[1].dtype == b[1].dtype and a[1].shape == b[1].shape, (a[1], b[1])
        np.testing.assert_array_equal(a[1], b[1])
    elif isinstance(a[1], dict):
        assert list(a[1]) == list(b[1])
        for k in a[1]:
            _compare(a[1][k], b[1][k])
    elif isinstance(a[1], list):
        assert len(a[1]) == len(b[1])
        for x, y in zip(a[1], b[1]):
            _compare(x, y)
    else:
        assert a[1] == b[1] and type(a[1]) is type(b[1])


def _both(make: Callable[[Any], Any]) -> tuple[Any, Any]:
    return make(ogdata), make(tdata)


def _same_error(make: Callable[[Any], Any]) -> None:
    """``make(lib)`` raises the same exception type and message under onnxgrad and PyTorch."""
    with pytest.raises(Exception) as theirs:
        make(tdata)
    with pytest.raises(type(theirs.value)) as ours:
        make(ogdata)
    assert str(ours.value) == str(theirs.value)


# --------------------------------------------------------------------------- collate
SAMPLES = {
    "floats": [1.5, 2.0, -3.25],
    "ints": [1, 2, 3],
    "bools": [True, False, True],
    "ints and a float": [1, 2.5, 3],
    "strings": ["a", "bc", "d"],
    "bytes": [b"a", b"b", b"c"],
    "numpy float32": [np.full((2, 3), i, np.float32) for i in range(3)],
    "numpy int32": [np.arange(4, dtype=np.int32) + i for i in range(3)],
    "numpy uint8 images": [np.full((1, 2, 2), i, np.uint8) for i in range(3)],
    "numpy scalars": [np.float32(i) for i in range(3)],
    "numpy int64 scalars": [np.int64(i) for i in range(3)],
    "numpy bool scalars": [np.bool_(i % 2) for i in range(3)],
    "tuples": [(np.ones(2, np.float32) * i, i) for i in range(3)],
    "lists": [[i, float(i), "s"] for i in range(3)],
    "dicts": [{"image": np.full(3, i, np.float64), "label": i, "name": str(i)}
              for i in range(3)],
    "ordered dicts": [collections.OrderedDict(b=i, a=[i, i]) for i in range(3)],
    "namedtuples": [Point(i, np.float32(i)) for i in range(3)],
    "nested": [{"pair": (i, [i * 1.0]), "meta": {"id": i}} for i in range(3)],
}


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_default_collate_matches_torch(kind: str) -> None:
    batch = SAMPLES[kind]
    ours = ogdata.default_collate(batch)
    theirs = tdata.default_collate(batch)
    _assert_same(ours, theirs)


def test_default_collate_of_tensors_stacks_them_and_keeps_gradients() -> None:
    rows = [og.tensor(np.arange(3, dtype=np.float32) + i) for i in range(4)]
    batch = ogdata.default_collate(rows)
    assert isinstance(batch, og.Tensor) and batch.shape == (4, 3)
    np.testing.assert_array_equal(batch.numpy(), np.arange(3) + np.arange(4)[:, None])
    w = og.ones(3, requires_grad=True)
    stacked = ogdata.default_collate([w * 2, w * 3])
    stacked.sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), np.full(3, 5.0, np.float32))
    with pytest.raises(og.ShapeError, match="stack expects each tensor to be equal size"):
        ogdata.default_collate([og.ones(2), og.ones(3)])


def test_default_convert_matches_torch() -> None:
    for value in [np.ones((2, 2), np.float32), np.int64(4), (np.zeros(2), "s"),
                  {"a": np.arange(3), "b": [np.float64(1.0)]}, Point(np.ones(1), 2), 3, "x"]:
        _assert_same(ogdata.default_convert(value), tdata.default_convert(value))


@pytest.mark.parametrize("batch", [[object(), object()], [[1, 2], [3]],
                                   [np.array(["a"]), np.array(["b"])], [None, None]],
                         ids=["object", "ragged", "numpy strings", "none"])
def test_default_collate_errors_match_torch(batch: list[Any]) -> None:
    _same_error(lambda lib: lib.default_collate(batch))


# --------------------------------------------------------------------------- datasets
def _tensors(lib: Any, n: int = 10) -> tuple[Any, Any]:
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = np.arange(n) % 3
    if lib is tdata:
        return torch.from_numpy(x), torch.from_numpy(y)
    return og.tensor(x), og.tensor(y)


def test_tensor_dataset_matches_torch() -> None:
    ours, theirs = _both(lambda lib: lib.TensorDataset(*_tensors(lib)))
    assert len(ours) == len(theirs) == 10
    for i in (0, 3, -1, np.int64(2), slice(2, 5), [1, 4]):
        _assert_same(ours[i], theirs[i])
    _same_error(lambda lib: lib.TensorDataset(*_tensors(lib))[10])
    _same_error(lambda lib: lib.TensorDataset(*_tensors(lib))[-11])
    _same_error(lambda lib: lib.TensorDataset(*_tensors(lib), *_tensors(lib, 4)))


def test_subset_concat_and_random_split_match_torch() -> None:
    ours, theirs = _both(lambda lib: lib.TensorDataset(*_tensors(lib)))
    sub = (ogdata.Subset(ours, [4, 1, 7]), tdata.Subset(theirs, [4, 1, 7]))
    assert len(sub[0]) == 3
    _assert_same(sub[0][1], sub[1][1])
    cat = (ours + sub[0], theirs + sub[1])
    assert isinstance(cat[0], ogdata.ConcatDataset) and len(cat[0]) == len(cat[1]) == 13
    for i in (0, 9, 10, 12, -1, -13):
        _assert_same(cat[0][i], cat[1][i])
    _same_error(lambda lib: lib.ConcatDataset([lib.TensorDataset(*_tensors(lib))])[-11])
    _same_error(lambda lib: lib.ConcatDataset([]))
    for lengths in ([3, 7], [0.3, 0.7], [0.5, 0.25, 0.25], [0.33, 0.33, 0.34], [1, 1, 8]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = ogdata.random_split(range(10), lengths,
                                        generator=og.Generator().manual_seed(0))
            expected = tdata.random_split(range(10), lengths)
        assert [len(p) for p in parts] == [len(p) for p in expected]
        assert sorted(i for p in parts for i in p) == list(range(10))
    with pytest.warns(UserWarning, match="Length of split at index 1 is 0"):
        ogdata.random_split(range(3), [1.0, 0.0])
    _same_error(lambda lib: lib.random_split(range(10), [3, 3]))
    _same_error(lambda lib: lib.random_split(range(10), [1.5, -0.5]))


def test_random_split_follows_its_generator() -> None:
    def split(seed: int) -> list[list[int]]:
        return [list(p) for p in ogdata.random_split(range(20), [0.5, 0.5],
                                                     generator=og.Generator().manual_seed(seed))]

    assert split(1) == split(1) != split(2)
    og.manual_seed(5)
    first = [list(p) for p in ogdata.random_split(range(20), [10, 10])]
    og.manual_seed(5)
    assert [list(p) for p in ogdata.random_split(range(20), [10, 10])] == first


class _Squares(ogdata.IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter([(i, i * i) for i in range(self.n)])

    def __len__(self) -> int:
        return self.n


class _TorchSquares(tdata.IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter([(i, i * i) for i in range(self.n)])

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_iterable_dataset_batches_match_torch(batch_size: int | None, drop_last: bool) -> None:
    if batch_size is None and drop_last:
        return
    ours = ogdata.DataLoader(_Squares(7), batch_size=batch_size, drop_last=drop_last)
    theirs = tdata.DataLoader(_TorchSquares(7), batch_size=batch_size, drop_last=drop_last)
    assert len(ours) == len(theirs)
    got, expected = list(ours), list(theirs)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        _assert_same(a, b)
    chain = ogdata.ChainDataset([_Squares(2), _Squares(3)])
    assert list(chain) == [(0, 0), (1, 1), (0, 0), (1, 1), (2, 4)] and len(chain) == 5


# --------------------------------------------------------------------------- the loader
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 10, 16])
def test_sequential_batches_match_torch(batch_size: int, drop_last: bool) -> None:
    ours, theirs = _both(lambda lib: lib.DataLoader(lib.TensorDataset(*_tensors(lib)),
                                                    batch_size=batch_size, drop_last=drop_last))
    assert len(ours) == len(theirs)
    got, expected = list(ours), list(theirs)
    assert len(got) == len(expected) == len(theirs)
    for a, b in zip(got, expected):
        _assert_same(a, b)


def test_samplers_batch_samplers_and_collate_fn_match_torch() -> None:
    def loaders(lib: Any) -> list[Any]:
        ds = lib.TensorDataset(*_tensors(lib))
        seq = lib.SequentialSampler(ds)
        return [lib.DataLoader(ds, sampler=[9, 0, 4]),
                lib.DataLoader(ds, batch_size=2, sampler=seq),
                lib.DataLoader(ds, batch_sampler=[[1, 2], [8], [0, 5, 6]]),
                lib.DataLoader(ds, batch_sampler=lib.BatchSampler(seq, 4, drop_last=True)),
                lib.DataLoader(ds, batch_size=None),
                lib.DataLoader(ds, batch_size=3, collate_fn=lambda b: [len(b), b[0][1]]),
                lib.DataLoader(list(zip(range(5), "abcde")), batch_size=2),
                lib.DataLoader([{"x": np.ones(2) * i, "y": i} for i in range(5)], batch_size=2)]

    for ours, theirs in zip(*_both(loaders)):
        assert len(ours) == len(theirs)
        got, expected = list(ours), list(theirs)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            _assert_same(a, b)
    for lib in (ogdata, tdata):
        assert list(lib.BatchSampler(range(10), 3, False)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8],
                                                               [9]]
        assert len(lib.BatchSampler(range(10), 3, True)) == 3


def test_shuffle_is_a_reproducible_permutation() -> None:
    ds = ogdata.TensorDataset(og.arange(50))

    def epoch(loader: ogdata.DataLoader) -> list[int]:
        return [i for (batch,) in loader for i in batch.tolist()]

    loader = ogdata.DataLoader(ds, batch_size=8, shuffle=True,
                               generator=og.Generator().manual_seed(3))
    first, second = epoch(loader), epoch(loader)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second and first != list(range(50))  # a new order each epoch
    again = ogdata.DataLoader(ds, batch_size=8, shuffle=True,
                              generator=og.Generator().manual_seed(3))
    assert epoch(again) == first and epoch(again) == second
    other = ogdata.DataLoader(ds, batch_size=8, shuffle=True,
                              generator=og.Generator().manual_seed(4))
    assert epoch(other) != first
    # Without a generator the global seed decides, as in PyTorch.
    og.manual_seed(11)
    plain = epoch(ogdata.DataLoader(ds, batch_size=8, shuffle=True))
    og.manual_seed(11)
    assert epoch(ogdata.DataLoader(ds, batch_size=8, shuffle=True)) == plain


def test_random_samplers() -> None:
    gen = og.Generator().manual_seed(0)
    with_replacement = list(ogdata.RandomSampler(range(5), replacement=True, num_samples=40,
                                                 generator=gen))
    assert len(with_replacement) == 40 and set(with_replacement) <= set(range(5))
    long = list(ogdata.RandomSampler(range(5), num_samples=12, generator=gen))
    assert sorted(long[:5]) == sorted(long[5:10]) == list(range(5)) and len(long) == 12
    assert len(ogdata.RandomSampler(range(5), num_samples=12)) == 12
    sub = list(ogdata.SubsetRandomSampler([10, 20, 30, 40], generator=gen))
    assert sorted(sub) == [10, 20, 30, 40]
    weighted = list(ogdata.WeightedRandomSampler([0.0, 1.0, 0.0, 3.0], 30, generator=gen))
    assert set(weighted) == {1, 3} and len(weighted) == 30
    _same_error(lambda lib: lib.RandomSampler(range(5), replacement=1))
    _same_error(lambda lib: lib.RandomSampler(range(5), num_samples=0))
    _same_error(lambda lib: lib.BatchSampler(range(5), 0, False))
    _same_error(lambda lib: lib.BatchSampler(range(5), True, False))
    _same_error(lambda lib: lib.BatchSampler(range(5), 2, 1))
    _same_error(lambda lib: lib.WeightedRandomSampler([1.0, 2.0], 0))


BAD_LOADERS = {
    "negative workers": lambda lib: lib.DataLoader(range(4), num_workers=-1),
    "negative timeout": lambda lib: lib.DataLoader(range(4), timeout=-1),
    "prefetch without workers": lambda lib: lib.DataLoader(range(4), prefetch_factor=2),
    "persistent without workers": lambda lib: lib.DataLoader(range(4), persistent_workers=True),
    "sampler and shuffle": lambda lib: lib.DataLoader(range(4), sampler=[0], shuffle=True),
    "batch_sampler and batch_size": lambda lib: lib.DataLoader(range(4), batch_sampler=[[0]],
                                                               batch_size=2),
    "batch_sampler and drop_last": lambda lib: lib.DataLoader(range(4), batch_sampler=[[0]],
                                                              drop_last=True),
    "no batch and drop_last": lambda lib: lib.DataLoader(range(4), batch_size=None,
                                                         drop_last=True),
    "bad batch size": lambda lib: lib.DataLoader(range(4), batch_size=0),
    "iterable and shuffle": lambda lib: lib.DataLoader(
        (_Squares if lib is ogdata else _TorchSquares)(3), shuffle=True),
    "iterable and sampler": lambda lib: lib.DataLoader(
        (_Squares if lib is ogdata else _TorchSquares)(3), sampler=[0]),
    "set batch_size later": lambda lib: setattr(lib.DataLoader(range(4)), "batch_size", 2),
    "set dataset later": lambda lib: setattr(lib.DataLoader(range(4)), "dataset", []),
}


@pytest.mark.parametrize("case", list(BAD_LOADERS))
def test_loader_argument_errors_match_torch(case: str) -> None:
    _same_error(BAD_LOADERS[case])


def test_workers_run_in_process_with_a_warning_and_pin_memory_is_accepted() -> None:
    ds = ogdata.TensorDataset(og.arange(6))
    with pytest.warns(UserWarning, match=r"num_workers=2.*main process"):
        loader = ogdata.DataLoader(ds, batch_size=4, num_workers=2, pin_memory=True,
                                   persistent_workers=True, prefetch_factor=2)
    assert [b.tolist() for (b,) in loader] == [[0, 1, 2, 3], [4, 5]]
    assert ogdata.get_worker_info() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ogdata.DataLoader(ds, num_workers=0, pin_memory=True)


def test_a_training_loop_over_a_dataloader() -> None:
    og.manual_seed(0)
    x = og.randn(32, 4)
    y = (x.numpy() @ np.array([1.0, -2.0, 0.5, 3.0], np.float32))[:, None]
    loader = ogdata.DataLoader(ogdata.TensorDataset(x, og.tensor(y)), batch_size=8,
                               shuffle=True, generator=og.Generator().manual_seed(0))
    model = og.nn.Linear(4, 1)
    opt = og.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        for xb, yb in loader:
            opt.zero_grad()
            loss = ((model(xb) - yb) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


# --------------------------------------------------------------------------- distributed
@pytest.mark.parametrize("n", [10, 11, 3])
@pytest.mark.parametrize("replicas", [1, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_sampler_splits_as_torch(n: int, replicas: int, drop_last: bool) -> None:
    for rank in range(replicas):
        ours, theirs = _both(lambda lib, rank=rank: lib.DistributedSampler(
            range(n), num_replicas=replicas, rank=rank, shuffle=False, drop_last=drop_last))
        assert len(ours) == len(theirs)
        assert list(ours) == list(theirs)
        shuffled = [ogdata.DistributedSampler(range(n), num_replicas=replicas, rank=rank,
                                              drop_last=drop_last, seed=7) for _ in range(2)]
        expected = tdata.DistributedSampler(range(n), num_replicas=replicas, rank=rank,
                                            drop_last=drop_last, seed=7)
        assert len(shuffled[0]) == len(expected) and len(list(shuffled[0])) == len(expected)
        assert list(shuffled[0]) == list(shuffled[1])  # the same order on every call (rank)


def test_distributed_shuffle_covers_the_dataset_and_follows_the_epoch() -> None:
    def epoch(e: int) -> list[int]:
        samplers = [ogdata.DistributedSampler(range(10), num_replicas=3, rank=r, seed=1)
                    for r in range(3)]
        for s in samplers:
            s.set_epoch(e)
        return [i for s in samplers for i in s]

    first = epoch(0)
    assert len(first) == 12 and set(first) == set(range(10))  # padded by repeating the start
    assert epoch(0) == first and epoch(1) != first


def test_distributed_sampler_errors() -> None:
    with pytest.raises(RuntimeError, match="pass num_replicas and rank explicitly"):
        ogdata.DistributedSampler(range(4))
    with pytest.raises(RuntimeError, match="pass rank explicitly"):
        ogdata.DistributedSampler(range(4), num_replicas=2)
    _same_error(lambda lib: lib.DistributedSampler(range(4), num_replicas=2, rank=2))
    _same_error(lambda lib: lib.DistributedSampler(range(4), num_replicas=2, rank=-1))


# --------------------------------------------------------------------------- Generator
def test_generator() -> None:
    g = og.Generator()
    assert g.initial_seed() == torch.Generator().initial_seed()
    assert g.manual_seed(123) is g and g.initial_seed() == 123
    assert og.Generator().manual_seed(-1).initial_seed() == \
        torch.Generator().manual_seed(-1).initial_seed()
    state = g.get_state()
    assert state.dtype == np.uint8 and state.ndim == 1
    first = g._permutation(10)
    g.set_state(state)
    assert g._permutation(10) == first and g.initial_seed() == 123
    seed = g.seed()
    assert g.initial_seed() == seed and isinstance(seed, int)
    with pytest.raises(RuntimeError, match="not a state that Generator.get_state returned"):
        g.set_state(og.tensor(np.array([1, 2], np.uint8)))
    with pytest.raises(RuntimeError, match="only device 'cpu'"):
        og.Generator("cuda")
    with pytest.raises(TypeError, match="generator must be an onnxgrad.Generator"):
        list(ogdata.RandomSampler(range(3), generator=torch.Generator()))
