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
