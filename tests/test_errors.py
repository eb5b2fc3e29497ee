"""Bad input fails early and clearly: before ONNX Runtime sees anything, naming what is wrong
(both shapes, the ONNX op type) and, for traced code, the user's source line.

Lines that should be quoted in a message end with a ``# <- marker`` comment: the tracer quotes
the user's line verbatim, so finding the marker in the message proves the right line is named.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxgrad.passes import NoGradientRule, gradient_graph
from onnxgrad.runtime import OPSET
from onnxgrad.runtime import session as ort_session
from onnxgrad.tracer import autograd
from onnxgrad.tracer.ops import ShapeError
from onnxgrad.tracer.tensor import emit

import onnxgrad as og

# The module whose `emit` runs eager kernels (tracer/values.py).
values_module = importlib.import_module("onnxgrad.tracer.values")

@contextlib.contextmanager
def ort_forbidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inside the block, any eager kernel or session (cached or new) fails the test."""

    def reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("ONNX Runtime was reached before the error was raised")

    with monkeypatch.context() as m:
        m.setattr(values_module, "run_node", reached)
        m.setattr(autograd, "make_session", reached)
        # No cached kernel or plan either.
        m.setattr(ort_session, "_kernels", ort_session._LRU(1, 1))
        m.setattr(ort_session, "_plans", ort_session._LRU(1, 1))
        m.setattr(ort_session.ort, "InferenceSession", reached)
        yield


def quotes_this_file(message: str, marker: str) -> bool:
    return "test_errors.py:" in message and marker in message


def quotes_line_of(message: str, fn) -> bool:
    """Whether the message names the (one-line) function's source line, where the op ran."""
    return f"test_errors.py:{fn.__code__.co_firstlineno}: " in message


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow", "maximum", "lt", "eq"])
def test_broadcast_mismatch_names_both_shapes(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = og.ones(2, 3), og.ones(4)
    fn = {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "div": lambda: a / b,
          "pow": lambda: a ** b, "maximum": lambda: og.maximum(a, b), "lt": lambda: a < b,
          "eq": lambda: a == b}[op]
    with ort_forbidden(monkeypatch), pytest.raises(ShapeError) as info:
        fn()
    message = str(info.value)
    assert "[2, 3]" in message and "[4]" in message and "broadcast" in message
    assert quotes_line_of(message, fn), message


def test_broadcast_mismatch_in_where_and_expand(monkeypatch: pytest.MonkeyPatch) -> None:
    cond, x = og.ones(2, 3) > 0, og.ones(4)
    with ort_forbidden(monkeypatch):
        with pytest.raises(ShapeError, match=r"\[2, 3\].*\[4\]"):
            og.where(cond, x, 0.0)
        with pytest.raises(ShapeError, match=r"\[2, 3\].*\[4, 3\]"):
            og.ones(2, 3).expand(4, 3)


def test_broadcast_is_a_value_error() -> None:
    # ShapeError subclasses ValueError, so `except ValueError` code keeps working.
    with pytest.raises(ValueError):
        og.ones(2) + og.ones(3)


@pytest.mark.parametrize("left, right, numbers", [
    ((2, 3), (4, 5), "3 != 4"),
    ((3,), (4,), "3 != 4"),
    ((2, 3), (2,), "3 != 2"),
    ((5, 2, 3), (2, 4), "3 != 2"),
])
def test_matmul_inner_dimension_mismatch(left, right, numbers: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = og.ones(*left), og.ones(*right)
    with ort_forbidden(monkeypatch), pytest.raises(ShapeError) as info:
        a @ b  # <- matmul here
    message = str(info.value)
    assert "inner dimensions" in message and numbers in message
    assert str(list(left)) in message and str(list(right)) in message
    assert quotes_this_file(message, "# <- matmul here"), message


def test_matmul_batch_mismatch_and_0d(monkeypatch: pytest.MonkeyPatch) -> None:
    with ort_forbidden(monkeypatch):
        with pytest.raises(ShapeError, match=r"\[2\] and \[3\]"):
            og.ones(2, 2, 3) @ og.ones(3, 3, 4)
        with pytest.raises(ShapeError, match="at least 1 dimension"):
            og.ones(()) @ og.ones(3)


@pytest.mark.parametrize("make, error, pattern", [
    (lambda: og.ones(2, 3).reshape(4, 2), ShapeError, r"\[4, 2\] is invalid for input of size 6"),
    (lambda: og.cat([og.ones(2, 3), og.ones(2, 4)]), ShapeError, r"\[2, 3\].*\[2, 4\]"),
    (lambda: og.stack([og.ones(2, 3), og.ones(2, 4)]), ShapeError, r"\[2, 3\].*\[2, 4\]"),
    (lambda: og.ones(4).split([1, 2]), ShapeError, r"\[1, 2\] do not add up to 4"),
    (lambda: og.ones(2, 3)[2], IndexError, "index 2 is out of bounds for dimension 0 with size 2"),
    (lambda: og.ones(2, 3)[og.tensor([0, 5])], IndexError, "index 5 is out of bounds"),
    (lambda: og.ones(2, 3)[0, 0, 0], IndexError, "too many indices"),
    (lambda: og.ones(2, 3)[..., 0, ...], IndexError, "single ellipsis"),
    (lambda: og.ones(3)[og.tensor([True, False])], IndexError,
     r"The shape of the mask \[2\] at index 0 does not match the shape of the indexed tensor \[3\]"),
    (lambda: og.ones(2)[og.tensor([0.0])], IndexError, "long, int, byte or bool"),
    (lambda: og.ones(2, 3).sum(2), IndexError, r"dimension 2 out of range.*\[2, 3\]"),
    (lambda: og.ones(2, 3).permute(0, 0), ValueError, "not a permutation"),
    (lambda: og.ones(5).chunk(0), ValueError, "chunks"),
    (lambda: og.ones(2).clamp(), ValueError, "at least one of min and max"),
], ids=["reshape", "cat", "stack", "split", "index", "tensor-index", "too-many-indices",
        "two-ellipses", "bool-mask", "float-index", "dim", "permute", "chunk-0", "clamp"])
def test_other_shape_errors(make, error, pattern: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with ort_forbidden(monkeypatch), pytest.raises(error, match=pattern) as info:
        make()
    assert quotes_line_of(str(info.value), make), str(info.value)


# --------------------------------------------------------------------------- backward
def test_backward_on_non_scalar_needs_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    a = og.ones(3, requires_grad=True)
    y = a * 2
    with ort_forbidden(monkeypatch), pytest.raises(
            RuntimeError, match=r"^grad can be implicitly created only for scalar outputs"):
        y.backward()
    y.backward(gradient=og.ones(3))  # the graph is intact after the error
    assert a.grad.tolist() == [2.0, 2.0, 2.0]


def test_backward_gradient_of_wrong_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    a = og.ones(3, requires_grad=True)
    y = a * 2
    with ort_forbidden(monkeypatch), pytest.raises(
            RuntimeError, match=r"Mismatch in shape: grad_output\[0\] has a shape of \[2\] and "
                                r"output\[0\] has a shape of \[3\]"):
        y.backward(gradient=og.ones(2))


def test_backward_on_tensor_not_requiring_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    y = (og.ones(3) * 2).sum()
    with ort_forbidden(monkeypatch), pytest.raises(
            RuntimeError, match="element 0 of tensors does not require grad and does not have a "
                                "grad_fn"):
        y.backward()


def test_backward_gradient_count_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    a = og.ones(2, requires_grad=True)
    y, z = a * 2, a * 3
    with ort_forbidden(monkeypatch), pytest.raises(RuntimeError, match="2 tensors and 1 gradients"):
        og.tracer.backward([y, z], [og.ones(2)])


def test_recorded_op_without_rule_names_op_and_line(monkeypatch: pytest.MonkeyPatch) -> None:
    a = og.tensor([0.5, 1.0], requires_grad=True)
    y = og.Tensor(emit("Hardmax", [(a * 2)._v])[0])  # <- op without a rule
    loss = (y * 3).sum()
    with ort_forbidden(monkeypatch), pytest.raises(NoGradientRule) as info:
        loss.backward()
    message = str(info.value)
    assert "no gradient rule for ONNX op 'Hardmax'" in message
    assert quotes_this_file(message, "# <- op without a rule"), message
    assert isinstance(info.value, NotImplementedError)


def test_onnx_ir_graph_without_rule() -> None:
    # The pass works on any onnx_ir graph (an imported model), not only on recorded ones.
    x = ir.Value(name="x", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Hardmax", [x], num_outputs=1, name="the_hardmax")
    y = node.outputs[0]
    y.name, y.shape, y.type = "y", ir.Shape([3]), ir.TensorType(ir.DataType.FLOAT)
    seed = ir.Value(name="seed", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.FLOAT))
    with pytest.raises(NoGradientRule,
                       match=r"no gradient rule for ONNX op 'Hardmax' \(node the_hardmax\)"):
        gradient_graph([y], [seed], [x], opset=OPSET)


def test_op_off_the_gradient_path_needs_no_rule() -> None:
    # Only what reaches a requires_grad leaf is differentiated (the autodiff contract).
    a = og.tensor([0.5, 1.0], requires_grad=True)
    c = og.Tensor(emit("Hardmax", [og.tensor([0.1, 0.2])._v])[0])  # constant branch, no rule needed
    (a * c).sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), [0.0, 1.0], rtol=1e-6)


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("make, error, pattern", [
    (lambda: og.ones(2, 3) @ og.ones(3, 2, dtype=og.float64), TypeError,
     "same dtype, but got onnxgrad.float32 and onnxgrad.float64"),
    (lambda: og.ones(2, 3, dtype=og.int64) @ og.ones(3, 2), TypeError,
     "same dtype, but got onnxgrad.int64 and onnxgrad.float32"),
    (lambda: og.tensor([1, 2]).__iadd__(0.5), TypeError,
     "result type Float can't be cast to the desired output type Long"),
    (lambda: og.tensor([True]).__iadd__(1), TypeError,
     "result type Long can't be cast to the desired output type Bool"),
    (lambda: og.tensor([1, 2]).__imul__(og.tensor([1.5, 2.0], dtype=og.float64)), TypeError,
     "result type Double can't be cast to the desired output type Long"),
    (lambda: og.tensor([True]) - og.tensor([True]), TypeError, "two bool tensors"),
    (lambda: og.tensor([True]) - 1, TypeError, "with a bool tensor"),
    (lambda: -og.tensor([True]), TypeError, "Negation, the `-` operator, on a bool tensor"),
    (lambda: og.tensor([2]) ** -1, ValueError, "Integers to negative integer powers"),
    (lambda: og.where(og.ones(2), og.ones(2), og.ones(2)), TypeError, "condition must be a bool"),
    (lambda: og.tensor([1, 2]).mean(), TypeError, "floating point"),
], ids=["matmul-f32-f64", "matmul-int-float", "iadd-int-float", "iadd-bool-int",
        "imul-int-double", "sub-bools", "sub-bool-int", "neg-bool", "int-negative-power",
        "where-float-cond", "mean-int"])
def test_dtype_mixes_torch_refuses(make, error, pattern: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with ort_forbidden(monkeypatch), pytest.raises(error, match=pattern) as info:
        make()
    assert quotes_line_of(str(info.value), make), str(info.value)


def test_in_place_errors() -> None:
    a = og.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in "
                                           "an in-place operation") as info:
        a += 1  # <- in-place on a leaf
    assert quotes_this_file(str(info.value), "# <- in-place on a leaf")
    assert a.is_leaf and a.tolist() == [1.0, 1.0]
    t = og.ones(2)
    with pytest.raises(ShapeError, match=r"output with shape \[2\] doesn't match the broadcast "
                                         r"shape \[2, 2\]"):
        t += og.ones(2, 2)
    assert t.shape == (2,)


def test_ort_failure_names_op_shapes_and_line() -> None:
    # Anything that still gets past the checks fails with the op, the operands and the user's line.
    with pytest.raises(RuntimeError) as info:
        emit("MatMul", [og.ones(2, 3)._v, og.ones(2, 3)._v])  # <- bad raw node
    message = str(info.value)
    assert "MatMul(float32[2, 3], float32[2, 3])" in message
    assert quotes_this_file(message, "# <- bad raw node"), message


# --------------------------------------------------------------------------- the ONNX check hook
def test_every_ort_session_is_checked_as_standard_onnx() -> None:
    # conftest hooks runtime.make_session: a non-ai.onnx node must be refused before ORT loads it.
    import conftest
    from onnx import helper

    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node], "contrib",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, 2]) for n in "ab"],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    with pytest.raises(AssertionError, match="ai.onnx"):
        ort_session.make_session(model)
    before = len(conftest.checked_models)
    og.ones(1, 2, 3, 1, 2, 1).permute(5, 2, 0, 4, 3, 1)  # a kernel no other test makes
    assert len(conftest.checked_models) > before


# --------------------------------------------------------------------------- factories and data
@pytest.mark.parametrize("make, error, pattern", [
    (lambda: og.tensor([[1, 2], [3]]), ValueError, r"expected sequence of length 2 at dim 1 \(got 1\)"),
    (lambda: og.tensor([[[1], [2, 3]]]), ValueError, r"expected sequence of length 1 at dim 2 \(got 2\)"),
    (lambda: og.tensor("abc"), TypeError, r"new\(\): invalid data type 'str'"),
    (lambda: og.zeros(2, -1), RuntimeError, r"negative dimension -1: \[2, -1\]"),
    (lambda: og.rand(-3), RuntimeError, r"negative dimension -3: \[-3\]"),
    (lambda: og.arange(0, 10, 0), RuntimeError, "step must be nonzero"),
    (lambda: og.arange(0, 10, -1), RuntimeError, "inconsistent with step sign"),
    (lambda: og.gather(og.ones(3, 4), 1, og.tensor([[9]])), RuntimeError,
     "index 9 is out of bounds for dimension 1 with size 4"),
    (lambda: og.gather(og.ones(3, 4), 0, og.tensor([[-1]])), RuntimeError,
     "index -1 is out of bounds for dimension 0 with size 3"),
], ids=["ragged", "ragged-deep", "str", "zeros-negative", "rand-negative", "arange-step-0",
        "arange-sign", "gather-high", "gather-negative"])
def test_bad_factory_and_index_data_gets_pytorchs_error(make, error, pattern: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with ort_forbidden(monkeypatch), pytest.raises(error, match=pattern) as info:
        make()
    assert "numpy" not in str(info.value).lower() and "onnxruntime" not in str(info.value).lower()


def test_backward_through_a_graph_whose_leaves_are_gone_runs_nothing() -> None:
    loss = (og.rand(3, requires_grad=True) * og.rand(3)).sum().exp()
    loss.backward()  # PyTorch: the gradient lands in a leaf no one holds
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
