"""``og.autograd.Function``: a forward and a user-written backward, traced into ONNX nodes, so the
custom gradient runs in eager backward, in compiled steps and in their exported files."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxgrad.runtime.metadata import DATA_INPUTS

import onnxgrad as og
from onnxgrad import nn

torch = pytest.importorskip("torch")


def _functions(lib, Function):
    """The same three custom functions written for PyTorch and for onnxgrad."""

    class Exp(Function):
        @staticmethod
        def forward(ctx, x):
            y = lib.exp(x)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return g * y

    class MyReLU(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clamp(min=0)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (x > 0).to(g.dtype) if hasattr(g, "to") else g * (x > 0)

    class StraightThrough(Function):
        """Rounds in the forward; the gradient passes through where |x| <= 1 (clipped STE)."""

        @staticmethod
        def forward(ctx, x, scale):
            ctx.save_for_backward(x)
            ctx.scale = scale
            return lib.round(x * scale) / scale

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            mask = (x.abs() <= 1.0).to(g.dtype) if hasattr(g, "to") else (x.abs() <= 1.0)
            return g * mask, None

    return Exp, MyReLU, StraightThrough


def _og_cast_mask(mask, like):
    return mask.type(like.dtype) if hasattr(mask, "type") else mask


@pytest.fixture(scope="module")
def pairs():
    return _functions(torch, torch.autograd.Function), _functions(og, og.autograd.Function)


def _round_available() -> bool:
    return hasattr(og, "round")


@pytest.mark.parametrize("which", [0, 1, 2], ids=["exp", "relu", "straight_through"])
def test_custom_function_matches_torch(pairs, which: int) -> None:
    if which == 2 and not _round_available():
        pytest.skip("og.round is not there yet (tracer/math_ops.py)")
    tfn, ofn = pairs[0][which], pairs[1][which]
    rng = np.random.default_rng(which)
    a = rng.uniform(-1.5, 1.5, (3, 4))
    u = rng.standard_normal((3, 4))
    args = (4.0,) if which == 2 else ()
    x = og.tensor(a, requires_grad=True)
    y = ofn.apply(x * 1.5, *args)
    (y * og.tensor(u)).sum().backward()
    xt = torch.tensor(a, requires_grad=True)
    yt = tfn.apply(xt * 1.5, *args)
    (yt * torch.tensor(u)).sum().backward()
    np.testing.assert_allclose(y.detach().numpy(), yt.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy(), rtol=1e-12)
    assert y.grad_fn.name() == yt.grad_fn.name() == f"{ofn.__name__}Backward"


def test_straight_through_estimator_without_round() -> None:
    class Sign(og.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return (x > 0).type(x.dtype) * 2.0 - 1.0 if hasattr(x, "type") else \
                og.where(x > 0, og.ones_like(x), -og.ones_like(x))

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return og.where(x.abs() <= 1.0, g, og.zeros_like(g))

    class TSign(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.where(x > 0, 1.0, -1.0).to(x.dtype)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return torch.where(x.abs() <= 1.0, g, torch.zeros_like(g))

    a = np.array([-2.0, -0.5, 0.3, 1.7])
    x = og.tensor(a, requires_grad=True)
    y = Sign.apply(x)
    (y * og.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    xt = torch.tensor(a, requires_grad=True)
    yt = TSign.apply(xt)
    (yt * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    np.testing.assert_allclose(y.detach().numpy(), yt.detach().numpy())
    np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy())


def test_several_inputs_and_outputs_ctx_attributes_and_none_gradients() -> None:
    class MulAdd(og.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, alpha):
            ctx.save_for_backward(a, b)
            ctx.alpha = alpha
            assert ctx.needs_input_grad == (True, False, False)
            return a * b, a + alpha * b

        @staticmethod
        def backward(ctx, g_prod, g_sum):
            _, b = ctx.saved_tensors
            return g_prod * b + g_sum, None, None

    a = og.tensor([1.0, 2.0], requires_grad=True)
    b = og.tensor([3.0, 5.0])
    p, s = MulAdd.apply(a, b, 2.0)
    assert p.tolist() == [3.0, 10.0] and s.tolist() == [7.0, 12.0]
    (p.sum() * 2 + s.sum()).backward()
    assert a.grad.tolist() == [7.0, 11.0]
    a.grad = None
    p, s = MulAdd.apply(a, b, 2.0)
    assert p.grad_fn.name() == s.grad_fn.name() == "MulAddBackward"
    (acc, _), (none, _) = p.grad_fn.next_functions  # tensor inputs only, as PyTorch's
    assert acc.variable is a and none is None
    p.sum().backward()  # the unused output's gradient is materialized as zeros
    assert a.grad.tolist() == [3.0, 5.0]


def test_mark_non_differentiable_and_no_grad() -> None:
    class SortVals(og.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            idx = og.argsort(x) if hasattr(og, "argsort") else og.tensor([0, 1, 2])
            mask = x > 0
            ctx.mark_non_differentiable(mask)
            return x * 2, mask, idx

        @staticmethod
        def backward(ctx, g, g_mask, g_idx):
            return g * 2

    x = og.tensor([1.0, -1.0, 2.0], requires_grad=True)
    y, mask, _ = SortVals.apply(x)
    assert y.requires_grad and not mask.requires_grad
    y.sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]
    with og.no_grad():
        y, _, _ = SortVals.apply(x)
    assert not y.requires_grad and y.grad_fn is None


def test_double_backward_through_a_custom_function_matches_torch(pairs) -> None:
    (texp, *_), (oexp, *_) = pairs
    a = np.array([0.2, -0.4, 1.1])
    x = og.tensor(a, requires_grad=True)
    (g,) = og.autograd.grad((oexp.apply(x) * x).sum(), x, create_graph=True)
    (h,) = og.autograd.grad(g.sum(), x)
    xt = torch.tensor(a, requires_grad=True)
    (gt,) = torch.autograd.grad((texp.apply(xt) * xt).sum(), xt, create_graph=True)
    (ht,) = torch.autograd.grad(gt.sum(), xt)
    np.testing.assert_allclose(g.detach().numpy(), gt.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(h.numpy(), ht.numpy(), rtol=1e-12)


def test_setup_context_style() -> None:
    class Square(og.autograd.Function):
        @staticmethod
        def forward(x):
            return x * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    x = og.tensor([3.0, -1.0], requires_grad=True)
    Square.apply(x).sum().backward()
    assert x.grad.tolist() == [6.0, -2.0]


# --------------------------------------------------------------------------- compiled, exported
class _Clip(og.autograd.Function):
    """A gradient-clipping identity: forward is x, backward clips the gradient to [-0.05, 0.05]."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g.clamp(-0.05, 0.05)


def _setup():
    og.manual_seed(1)
    model = nn.Linear(4, 3)
    return model, og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _step(model, opt, exp, x, t):
    opt.zero_grad()
    out = _Clip.apply(exp.apply(model(x) * 0.5))
    loss = ((out - t) ** 2).mean()
    loss.backward()
    opt.step()
    return loss


def test_custom_function_compiled_equals_eager_and_exports(pairs, tmp_path) -> None:
    exp = pairs[1][0]
    rng = np.random.default_rng(5)
    batches = [(og.tensor(rng.standard_normal((6, 4)).astype(np.float32)),
                og.tensor(rng.standard_normal((6, 3)).astype(np.float32))) for _ in range(4)]
    model, opt = _setup()
    eager = [_step(model, opt, exp, x, t).item() for x, t in batches]
    weights = model.weight.detach().numpy().copy()
    compiled_model, compiled_opt = _setup()
    step = og.compile(lambda x, t: _step(compiled_model, compiled_opt, exp, x, t))
    compiled = [step(x, t).item() for x, t in batches[:3]]
    np.testing.assert_allclose(compiled, eager[:3], rtol=1e-5, atol=1e-6)
    assert step.traces == 1
    ops = {n.op_type for n in step.last.model.graph.node}
    assert "Clip" in ops  # the user's backward is in the step as ONNX nodes

    path = tmp_path / "custom.onnx"
    step.export(path)
    exported = onnx.load(path)
    meta = {p.key: p.value for p in exported.metadata_props}
    data = json.loads(meta[DATA_INPUTS])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    x, t = batches[3]
    results = dict(zip(names, session.run(None, dict(zip(data, [x.numpy(), t.numpy()])))))
    np.testing.assert_allclose(results["output"], eager[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results["weight.new"], weights, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- bad input
def test_wrong_number_of_gradients() -> None:
    class Bad(og.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a * b

        @staticmethod
        def backward(ctx, g):
            return g

    a = og.tensor([1.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"function BadBackward returned an incorrect number "
                                           r"of gradients \(expected 2, got 1\)"):
        Bad.apply(a, a).sum().backward()


def test_gradient_of_wrong_shape() -> None:
    class Bad(og.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, g):
            return g.sum().reshape(1).expand(3) if g.shape != (3,) else og.ones(2)

    a = og.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with pytest.raises(RuntimeError, match=r"Function BadBackward returned an invalid gradient at "
                                           r"index 0 - got \[2\] but expected shape compatible "
                                           r"with \[3\]"):
        Bad.apply(a).sum().backward()


def test_backward_that_reads_values_or_unsaved_tensors_is_refused() -> None:
    class Peek(og.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2 if g.sum().item() > 0 else g

    a = og.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(og.TraceError, match="Peek.backward is traced into ONNX nodes, so it "
                                            "cannot read a tensor's value"):
        Peek.apply(a).sum().backward()

    class Unsaved(og.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.a = a
            return a * 2

        @staticmethod
        def backward(ctx, g):
            return g * ctx.a

    with pytest.raises(RuntimeError, match="ctx.save_for_backward"):
        Unsaved.apply(a * 1.0).sum().backward()
    with pytest.raises(TypeError, match="save_for_backward can only save variables"):
        class Saves(og.autograd.Function):
            @staticmethod
            def forward(ctx, a):
                ctx.save_for_backward(3)
                return a

        Saves.apply(a)
    with pytest.raises(RuntimeError, match="Legacy autograd function"):
        Peek()
