"""Randomness inside graphs is state: reproducible, portable, resumable (tracer/random_stream.py)."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator
from onnxgrad.runtime.session import make_session
from onnxgrad.tracer import random_stream

import onnxgrad as og

F = og.nn.functional


def _mask(p: float, shape: tuple[int, ...] = (64, 256)) -> np.ndarray:
    return F.dropout(og.ones(*shape), p).numpy()


def test_manual_seed_fixes_the_masks_and_the_stream_moves_on() -> None:
    og.manual_seed(5)
    a, b = _mask(0.3), _mask(0.3)
    og.manual_seed(5)
    assert np.array_equal(_mask(0.3), a)
    assert np.array_equal(_mask(0.3), b)
    assert not np.array_equal(a, b)
    og.manual_seed(6)
    assert not np.array_equal(_mask(0.3), a)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masks_have_dropouts_statistics(p: float) -> None:
    og.manual_seed(0)
    m = _mask(p, (256, 512))
    kept = m > 0
    n = kept.size
    assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(m[kept], np.float32(1 / (1 - p)))
    # neighbours (lanes of one draw, and rows drawn in turn) are uncorrelated
    flat = kept.ravel().astype(np.float64) - kept.mean()
    for lag in (1, 2, 512):
        corr = (flat[:-lag] * flat[lag:]).mean() / flat.var()
        assert abs(corr) < 5 / np.sqrt(n), (lag, corr)


def test_uniform_bits_are_uniform() -> None:
    bits = random_stream._bits_np(123, 2**32 - 1000, 1 << 16)  # across the high word too
    counts = np.bincount(bits >> np.uint32(28), minlength=16)
    expected = bits.size / 16
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 40  # 15 degrees of freedom: p < 1e-3 of a false alarm


def _model_and_step(seed_model: int = 0):
    og.manual_seed(seed_model)
    model = og.nn.Sequential(og.nn.Linear(8, 32), og.nn.ReLU(), og.nn.Dropout(0.5),
                             og.nn.Linear(32, 1))
    opt = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(x):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        return loss
    return model, opt, step


def _batches(n: int) -> list[og.Tensor]:
    return [og.tensor(np.random.default_rng(i).standard_normal((4, 8), dtype=np.float32))
            for i in range(n)]


def test_compiled_step_draws_the_eager_masks_bit_for_bit() -> None:
    m1, _, eager = _model_and_step()
    m2, _, plain = _model_and_step()
    compiled = og.compile(plain)
    og.manual_seed(11)
    want = [eager(x).item() for x in _batches(4)]
    og.manual_seed(11)
    got = [compiled(x).item() for x in _batches(4)]
    assert got == want
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert np.array_equal(p.detach().numpy(), q.detach().numpy())
    # the stream advanced alike
    og.manual_seed(11)
    for x in _batches(4):
        eager(x)
    state_eager = og.get_rng_state().numpy()
    og.manual_seed(11)
    for x in _batches(4):
        compiled(x)
    assert np.array_equal(og.get_rng_state().numpy(), state_eager)


def test_offsets_across_the_high_word_match_in_graph_and_eager() -> None:
    og.set_rng_state([77, 2**32 - 100])
    eager = _mask(0.5, (8, 64))
    og.set_rng_state([77, 2**32 - 100])
    compiled = og.compile(lambda x: F.dropout(x, 0.5))
    assert np.array_equal(compiled(og.ones(8, 64)).numpy(), eager)


def test_onnxruntime_and_the_reference_evaluator_draw_the_same_masks() -> None:
    compiled = og.compile(lambda x: F.dropout(x, 0.3))
    program = compiled.trace(og.ones(16, 16))
    model = program.model
    onnx.checker.check_model(model, full_check=True)
    feeds = {"x": np.ones((16, 16), np.float32), "rng.seed": np.asarray(9, np.int64),
             "rng.offset": np.asarray(2**33 + 5, np.int64)}
    names = [o.name for o in model.graph.output]
    ort = dict(zip(names, make_session(model).run(None, feeds)))
    ref = dict(zip(names, ReferenceEvaluator(model).run(None, feeds)))
    assert set(ort) == {"output", "rng.offset.new"}
    for name in names:
        assert np.array_equal(ort[name], ref[name]), name
    assert ort["rng.offset.new"] == 2**33 + 5 + 256
    og.set_rng_state([9, 2**33 + 5])
    assert np.array_equal(_mask(0.3, (16, 16)), ort["output"])  # eager: the same bits


def test_resuming_from_a_checkpoint_with_dropout_is_bit_identical(tmp_path) -> None:
    batches = _batches(6)
    model, opt, step = _model_and_step()
    compiled = og.compile(step)
    og.manual_seed(3)
    straight = [compiled(x).item() for x in batches]
    final = [p.detach().numpy().copy() for p in model.parameters()]

    model, opt, step = _model_and_step()
    compiled = og.compile(step)
    og.manual_seed(3)
    first = [compiled(x).item() for x in batches[:3]]
    og.save({"model": model.state_dict(), "opt": opt.state_dict(),
             "rng": og.get_rng_state()}, tmp_path / "ckpt.npz")
    og.manual_seed(999)  # a new process would start elsewhere

    model, opt, step = _model_and_step(seed_model=1)
    ckpt = og.load(tmp_path / "ckpt.npz")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    og.set_rng_state(ckpt["rng"])
    compiled = og.compile(step)
    rest = [compiled(x).item() for x in batches[3:]]
    assert first + rest == straight
    for p, q in zip(model.parameters(), final):
        assert np.array_equal(p.detach().numpy(), q)


def test_deepcopied_models_share_the_one_stream() -> None:
    m = og.nn.Dropout(0.5)
    og.manual_seed(1)
    a = m(og.ones(100)).numpy()
    og.manual_seed(1)
    b = copy.deepcopy(m)(og.ones(100)).numpy()
    assert np.array_equal(a, b)


def test_bad_state_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[seed, offset\]"):
        og.set_rng_state([1.5])


# --------------------------------------------------------------------------- og.rand and friends
def _draws(n: int = 2) -> list[og.Tensor]:
    """One of each random factory, then the stream's next uniform values."""
    return [og.rand(3, 5), og.randn(2, 7), og.randint(-4, 9, (11,)), og.randperm(9),
            og.rand(4, dtype=og.float64), og.randn(3, dtype=og.float64),
            og.randint(0, 2**40, (5,)), og.rand(6, dtype=og.float16), og.randperm(5, dtype=og.int32)]


def test_random_factories_draw_the_same_numbers_compiled_as_eagerly() -> None:
    og.manual_seed(3)
    eager = [[t.numpy() for t in _draws()] for _ in range(2)]
    og.manual_seed(3)
    compiled = og.compile(_draws)
    for step in range(2):  # the offset is state: the second call draws the next numbers
        for got, want in zip(compiled(), eager[step]):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got.numpy(), want)
    after = og.rand(8).numpy()  # eager code goes on where the compiled step left the stream
    og.manual_seed(3)
    for _ in range(2):
        _draws()
    assert np.array_equal(og.rand(8).numpy(), after)
    assert not np.array_equal(eager[0][0], eager[1][0])


def test_random_factories_have_their_distributions() -> None:
    og.manual_seed(0)
    assert og.rand(1).item() != 0.0  # seed 0 does not start the stream at zero
    u = og.rand(200_000).numpy()
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.005
    u64 = og.rand(1000, dtype=og.float64).numpy()
    assert np.any(u64 * 2**24 != np.floor(u64 * 2**24))  # float64 draws have 53 bits
    z = og.randn(200_000).numpy()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    assert abs(np.mean(np.abs(z) < 1.0) - 0.6827) < 0.005
    assert og.randn(10, dtype=og.float16).dtype == og.float16
    k = og.randint(-3, 4, (70_000,)).numpy()
    assert k.dtype == np.int64 and set(np.unique(k)) == set(range(-3, 4))
    assert np.all(np.abs(np.bincount(k + 3) / 10_000 - 1.0) < 0.06)
    wide = og.randint(2**35, 2**35 + 2**34, (10_000,)).numpy()
    assert wide.min() >= 2**35 and wide.max() < 2**35 + 2**34 and wide.max() - wide.min() > 2**33
    assert sorted(og.randperm(1000).tolist()) == list(range(1000))
    assert og.randperm(0).shape == (0,)


def test_an_exported_step_draws_its_random_values_alike_in_both_runtimes() -> None:
    compiled = og.compile(lambda x: x + og.randn(4, 8) * og.rand(4, 8) + og.randperm(8))
    model = compiled.trace(og.ones(4, 8)).model
    onnx.checker.check_model(model, full_check=True)
    feeds = {"x": np.ones((4, 8), np.float32), "rng.seed": np.asarray(5, np.int64),
             "rng.offset": np.asarray(2**32 - 7, np.int64)}
    names = [o.name for o in model.graph.output]
    ort = dict(zip(names, make_session(model).run(None, feeds)))
    ref = dict(zip(names, ReferenceEvaluator(model).run(None, feeds)))
    assert ort["rng.offset.new"] == ref["rng.offset.new"]
    # Uniform draws and the permutation are exact integer work; the normal draw's log, sqrt and
    # cos may differ in the last bit between runtimes' math libraries.
    np.testing.assert_allclose(ort["output"], ref["output"], rtol=1e-6, atol=1e-6)
    og.set_rng_state([5, 2**32 - 7])
    assert np.array_equal(compiled(og.ones(4, 8)).numpy(), ort["output"])


def test_random_factories_inside_compiled_functions_refuse_what_a_graph_cannot_hold() -> None:
    gen = og.Generator().manual_seed(1)
    with pytest.raises(og.TraceError, match=r"generator=.*inside a compiled function"):
        og.compile(lambda x: x + og.rand(3, generator=gen))(og.ones(3))
    with pytest.raises(og.TraceError, match=r"requires_grad=True\) inside a compiled function"):
        og.compile(lambda x: x + og.randn(3, requires_grad=True))(og.ones(3))
    a = og.rand(3, generator=og.Generator().manual_seed(1)).numpy()  # eagerly: NumPy's draws
    assert np.array_equal(a, og.rand(3, generator=og.Generator().manual_seed(1)).numpy())
