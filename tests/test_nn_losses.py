"""The losses of ``og.nn`` against PyTorch: every option and reduction, values and gradients
(input, target where PyTorch differentiates it), float32 and float64, functional and module
forms, reprs and state dicts; and the label range check, eager and inside compiled steps."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnxgrad as og
from onnxgrad import nn

DTYPES = [np.float32, np.float64]
REDUCTIONS = ["mean", "sum", "none"]


def _tol(dtype) -> dict[str, float]:
    return {"rtol": 2e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}


def _compare(ours: Any, theirs: Any, inputs: list[np.ndarray], grads: list[bool], dtype,
             seed: int = 3) -> None:
    """Call both with the same inputs; compare outputs and the gradients of ``grads`` inputs
    under a random upstream gradient."""
    xo = [og.tensor(a, requires_grad=g) for a, g in zip(inputs, grads)]
    xt = [torch.tensor(a, requires_grad=g) for a, g in zip(inputs, grads)]
    yo, yt = ours(*xo), theirs(*xt)
    tol = _tol(dtype)
    np.testing.assert_allclose(yo.detach().numpy(), yt.detach().numpy(), **tol, err_msg="value")
    assert yo.dtype == np.dtype(dtype)
    u = np.random.default_rng(seed).standard_normal(tuple(yt.shape)).astype(dtype)
    yo.backward(og.tensor(u))
    yt.backward(torch.from_numpy(u))
    for i, (a, b, g) in enumerate(zip(xo, xt, grads)):
        if g:
            np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), **tol,
                                       err_msg=f"gradient of input {i}")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- class indices
CLASS_CASES = [
    # (input shape, target shape)
    ((6, 4), (6,)),
    ((3, 4, 5), (3, 5)),        # N-d: (N, C, d1)
    ((2, 3, 2, 3), (2, 2, 3)),  # (N, C, d1, d2)
    ((4,), ()),                 # unbatched
]


def _labels(shape: tuple[int, ...], classes: int, ignore: int | None, seed: int = 1) -> np.ndarray:
    labels = _rng(seed).integers(0, classes, size=shape)
    if ignore is not None and labels.size > 1:
        labels.reshape(-1)[::3] = ignore  # some ignored, never all
    return labels.astype(np.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("shape", "tshape"), CLASS_CASES, ids=["2d", "3d", "4d", "unbatched"])
@pytest.mark.parametrize("options", [
    {}, {"weight": True}, {"ignore_index": 1}, {"ignore_index": -100, "ignore": -100},
    {"label_smoothing": 0.2}, {"weight": True, "ignore_index": 2, "label_smoothing": 0.15}],
    ids=["plain", "weight", "ignore1", "ignore-100", "smoothing", "all"])
def test_cross_entropy_and_nll_class_indices(shape, tshape, reduction, dtype, options) -> None:
    classes = shape[1] if len(shape) > 1 else shape[0]
    ignore = options.get("ignore", options.get("ignore_index"))
    labels = _labels(tshape, classes, ignore)
    x = _rng().standard_normal(shape).astype(dtype)
    weight = _rng(5).uniform(0.5, 2.0, classes).astype(dtype) if options.get("weight") else None
    kw: dict[str, Any] = {"reduction": reduction}
    if "ignore_index" in options:
        kw["ignore_index"] = options["ignore_index"]
    smoothing = options.get("label_smoothing", 0.0)

    def make(lib):
        w = None if weight is None else lib.tensor(weight)
        return (lib.nn.CrossEntropyLoss(weight=w, label_smoothing=smoothing, **kw),
                lib.nn.NLLLoss(weight=w, **kw))

    (ce_o, nll_o), (ce_t, nll_t) = make(og), make(torch)
    lo, lt = og.tensor(labels), torch.tensor(labels)
    _compare(lambda x: ce_o(x, lo), lambda x: ce_t(x, lt), [x], [True], dtype)
    if smoothing == 0:
        _compare(lambda x: nll_o(x, lo), lambda x: nll_t(x, lt), [x], [True], dtype)
    assert repr(ce_o) == repr(ce_t) and repr(nll_o) == repr(nll_t)
    assert list(ce_o.state_dict()) == list(ce_t.state_dict())


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3), (4,)], ids=["2d", "3d", "unbatched"])
@pytest.mark.parametrize("options", [{}, {"weight": True}, {"label_smoothing": 0.3},
                                     {"weight": True, "label_smoothing": 0.1}],
                         ids=["plain", "weight", "smoothing", "both"])
def test_cross_entropy_class_probabilities(shape, reduction, dtype, options) -> None:
    classes = shape[1] if len(shape) > 1 else shape[0]
    x = _rng().standard_normal(shape).astype(dtype)
    p = _rng(2).uniform(0, 1, shape).astype(dtype)
    p /= p.sum(axis=1 if len(shape) > 1 else 0, keepdims=True)
    weight = _rng(5).uniform(0.5, 2.0, classes).astype(dtype) if options.get("weight") else None
    smoothing = options.get("label_smoothing", 0.0)

    def fn(lib):
        w = None if weight is None else lib.tensor(weight)
        return lambda x, t: lib.nn.functional.cross_entropy(
            x, t, weight=w, reduction=reduction, label_smoothing=smoothing)

    # PyTorch differentiates the target too.
    _compare(fn(og), fn(torch), [x, p], [True, True], dtype)


def test_all_labels_ignored_gives_nan_as_pytorch() -> None:
    x = _rng().standard_normal((3, 4)).astype(np.float32)
    t = np.full(3, -100)
    ours = nn.functional.cross_entropy(og.tensor(x), og.tensor(t))
    theirs = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(t))
    assert np.isnan(ours.item()) and np.isnan(theirs.item())


# --------------------------------------------------------------------------- elementwise losses
def _pointwise(name: str, x: np.ndarray, t: np.ndarray, dtype, grads=(True, True), **kw) -> None:
    ours = getattr(nn, name)(**{k: og.tensor(v) if isinstance(v, np.ndarray) else v
                                for k, v in kw.items()})
    theirs = getattr(torch.nn, name)(**{k: torch.tensor(v) if isinstance(v, np.ndarray) else v
                                        for k, v in kw.items()})
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _compare(ours, theirs, [x, t], list(grads), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("name", "extra"), [
    ("MSELoss", {}), ("L1Loss", {}), ("SmoothL1Loss", {}), ("SmoothL1Loss", {"beta": 0.5}),
    ("SmoothL1Loss", {"beta": 0.0}), ("HuberLoss", {}), ("HuberLoss", {"delta": 0.3})],
    ids=["mse", "l1", "smoothl1", "smoothl1-beta", "smoothl1-beta0", "huber", "huber-delta"])
def test_regression_losses(name, extra, reduction, dtype) -> None:
    x = _rng().standard_normal((4, 5)).astype(dtype) * 2
    t = _rng(1).standard_normal((4, 5)).astype(dtype)
    _pointwise(name, x, t, dtype, reduction=reduction, **extra)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss"])
def test_elementwise_weight(name: str, reduction: str, dtype) -> None:
    x = _rng().standard_normal((4, 5)).astype(dtype) * 2
    t = _rng(1).standard_normal((4, 5)).astype(dtype)
    w = _rng(2).uniform(0.1, 2.0, (4, 5)).astype(dtype)

    def fn(lib):
        return lambda x, t, w: getattr(lib.nn.functional, name)(x, t, reduction=reduction,
                                                                weight=w)

    _compare(fn(og), fn(torch), [x, t, w], [True, True, True], dtype)
    with pytest.raises(ValueError, match="Weights and input must have the same size"):
        getattr(nn.functional, name)(og.tensor(x), og.tensor(t), weight=og.ones(5))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
def test_bce_loss(weighted, reduction, dtype) -> None:
    x = _rng().uniform(0.02, 0.98, (4, 3)).astype(dtype)
    t = _rng(1).uniform(0, 1, (4, 3)).astype(dtype)
    kw = {"weight": _rng(2).uniform(0.5, 2, 3).astype(dtype)} if weighted else {}
    _pointwise("BCELoss", x, t, dtype, reduction=reduction, **kw)


def test_bce_loss_clamps_log_at_minus_100() -> None:
    x = np.array([0.0, 1.0, 0.5, 1e-45], np.float32)
    t = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
    ours = nn.functional.binary_cross_entropy(og.tensor(x), og.tensor(t), reduction="none")
    theirs = torch.nn.functional.binary_cross_entropy(torch.tensor(x), torch.tensor(t),
                                                      reduction="none")
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6)
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        nn.functional.binary_cross_entropy(og.tensor([1.5]), og.tensor([1.0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", ["", "weight", "pos_weight", "both"])
def test_bce_with_logits_loss(options, reduction, dtype) -> None:
    # Large logits and exact zeros: the log-sum-exp form stays finite with exact gradients.
    x = np.concatenate([_rng().standard_normal(9) * 3, [0.0, 60.0, -60.0]]).astype(dtype)
    x = x.reshape(4, 3)
    t = _rng(1).uniform(0, 1, (4, 3)).astype(dtype)
    kw = {}
    if options in ("weight", "both"):
        kw["weight"] = _rng(2).uniform(0.5, 2, 3).astype(dtype)
    if options in ("pos_weight", "both"):
        kw["pos_weight"] = _rng(3).uniform(0.5, 3, 3).astype(dtype)
    _pointwise("BCEWithLogitsLoss", x, t, dtype, reduction=reduction, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS + ["batchmean"])
@pytest.mark.parametrize("target", ["probs", "with-zero", "log"])
def test_kl_div_loss(target, reduction, dtype) -> None:
    x = np.log(_rng().dirichlet(np.ones(4), 3)).astype(dtype)
    t = _rng(1).dirichlet(np.ones(4), 3).astype(dtype)
    grads = (True, True)
    if target == "with-zero":
        # xlogy: a zero target contributes 0. (Its gradient there is nan in PyTorch and finite
        # here: not compared.)
        t[0, 1] = 0.0
        grads = (True, False)
    if target == "log":
        t = np.log(t)
    with pytest.warns(UserWarning) if reduction == "mean" else _nothing():
        _pointwise("KLDivLoss", x, t, dtype, grads, reduction=reduction,
                   log_target=target == "log")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# --------------------------------------------------------------------------- errors and legacy
def test_bad_reduction_and_arguments() -> None:
    x = og.rand(2, 3)
    with pytest.raises(ValueError, match="'avg' is not a valid value for reduction"):
        nn.MSELoss(reduction="avg")(x, x)
    with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0"):
        nn.functional.cross_entropy(x, og.tensor([0, 1]), label_smoothing=1.5)
    with pytest.raises(ValueError, match="beta"):
        nn.functional.smooth_l1_loss(x, x, beta=-1.0)
    with pytest.raises(og.ShapeError, match=r"Expected input batch_size \(2\) to match target "
                                            r"batch_size \(3\)"):
        nn.functional.cross_entropy(x, og.tensor([0, 1, 2]))
    with pytest.raises(og.ShapeError, match="weight tensor should be defined either for all 3"):
        nn.functional.nll_loss(x, og.tensor([0, 1]), weight=og.ones(2))
    with pytest.raises(TypeError, match="class indices"):
        nn.functional.nll_loss(x, og.rand(2))


def test_legacy_size_average_and_reduce() -> None:
    x, t = og.rand(3, 2), og.rand(3, 2)
    with pytest.warns(UserWarning, match="size_average and reduce"):
        loss = nn.MSELoss(size_average=False)
    assert loss.reduction == "sum"
    with pytest.warns(UserWarning):
        assert nn.L1Loss(reduce=False).reduction == "none"
    np.testing.assert_allclose(loss(x, t).item(), ((x - t) ** 2).sum().item(), rtol=1e-6)


# --------------------------------------------------------------------------- label range checks
@pytest.mark.parametrize("bad", [-1, 5, 3])
def test_label_out_of_range_eager(bad: int) -> None:
    x = og.rand(3, 3, requires_grad=True)
    with pytest.raises(IndexError, match=rf"Target {bad} is out of bounds"):
        nn.functional.cross_entropy(x, og.tensor([0, bad, 1]))
    with pytest.raises(IndexError, match=rf"Target {bad} is out of bounds"):
        nn.NLLLoss()(x, og.tensor([0, 1, bad]))
    # The ignore_index itself is no error, even out of range.
    nn.functional.cross_entropy(x, og.tensor([0, -1, 1]), ignore_index=-1)


def _model_and_step(compiled: bool):
    og.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = og.optim.SGD(model.parameters(), lr=0.1)

    def step(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return model, (og.compile(step) if compiled else step)


@pytest.mark.parametrize("bad", [-1, 3, 7])
def test_label_out_of_range_in_compiled_step_is_not_hidden_by_the_trace(bad: int) -> None:
    model, step = _model_and_step(compiled=True)
    x = og.tensor(_rng().standard_normal((4, 4)).astype(np.float32))
    good = og.tensor([0, 1, 2, 1])
    step(x, good)  # traced with good labels
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    with pytest.raises(IndexError, match=rf"Target {bad} is out of bounds: class indices must "
                                         rf"be in \[0, 3\)"):
        step(x, og.tensor([0, bad, 2, 1]))
    assert step.traces == 1  # the same trace ran and its check fired
    for k, v in model.state_dict().items():  # the failed step changed nothing
        np.testing.assert_array_equal(v.numpy(), before[k])
    # Its zero_grad ran, its backward did not: no gradient, as the eager step leaves it.
    assert all(p.grad is None for p in model.parameters())
    eager_model, eager_step = _model_and_step(compiled=False)
    eager_step(x, good)
    with pytest.raises(IndexError):
        eager_step(x, og.tensor([0, bad, 2, 1]))
    assert all(p.grad is None for p in eager_model.parameters())
    # Later good steps run on as the eager ones do.
    for _ in range(2):
        np.testing.assert_allclose(step(x, good).item(), eager_step(x, good).item(), rtol=1e-6)
    for (k, a), b in zip(model.state_dict().items(), eager_model.state_dict().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, err_msg=k)


def test_label_checks_run_before_the_step_or_after_it_on_two_buffers() -> None:
    """Labels that are the call's data are checked before the step runs, so the state can be
    written over in place (one buffer each). Labels the step computes from its state are
    checked after the run, which a failure undoes: the state keeps its two buffers."""
    _, step = _model_and_step(compiled=True)
    x = og.tensor(_rng().standard_normal((4, 4)).astype(np.float32))
    step(x, og.tensor([0, 1, 2, 1]))
    assert step.last.runner.in_place == set(step.last.runner.state)

    og.manual_seed(0)
    lin = nn.Linear(4, 3)
    shift = og.tensor([0, 0, 0, 0])  # read by the step: state
    opt = og.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)

    @og.compile
    def shifted(x, y):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(x), y + shift)
        loss.backward()
        opt.step()
        return loss

    shifted(x, og.tensor([0, 1, 2, 1]))
    assert not shifted.last.runner.in_place
    before = {k: v.numpy().copy() for k, v in lin.state_dict().items()}
    momentum = [opt.state[p]["momentum_buffer"].numpy().copy() for p in lin.parameters()]
    shift.copy_(og.tensor([0, 5, 0, 0]))
    with pytest.raises(IndexError, match="Target 6 is out of bounds"):
        shifted(x, og.tensor([0, 1, 2, 1]))
    for k, v in lin.state_dict().items():  # the failed run was undone
        np.testing.assert_array_equal(v.numpy(), before[k])
    for p, m in zip(lin.parameters(), momentum):
        np.testing.assert_array_equal(opt.state[p]["momentum_buffer"].numpy(), m)


def test_label_out_of_range_in_training_step(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 3],
                           _rng().standard_normal(12).astype(np.float32).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
                              [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    step = og.training_step(model, lr=0.1)
    x = _rng().standard_normal((2, 4)).astype(np.float32)
    step(x, np.array([0, 2]))
    before = {k: np.array(v) for k, v in step.state_dict().items()}
    with pytest.raises(IndexError, match="Target 3 is out of bounds"):
        step(x, np.array([3, 0]))
    for k, v in step.state_dict().items():
        np.testing.assert_array_equal(np.asarray(v), before[k])


def test_label_check_reports_the_first_bad_label_of_a_large_batch() -> None:
    model = nn.Linear(2, 3)
    step = og.compile(lambda x, y: nn.functional.cross_entropy(model(x), y))
    x = og.rand(100, 2)
    labels = np.zeros(100, np.int64)
    step(x, og.tensor(labels))
    labels[70], labels[90] = 9, -4
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        step(x, og.tensor(labels))
    labels[70] = -100  # the ignore_index: fine; the next bad one is reported
    with pytest.raises(IndexError, match="Target -4 is out of bounds"):
        step(x, og.tensor(labels))
    assert step.traces == 1
