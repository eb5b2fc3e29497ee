"""``onnxgrad demo``: PyTorch's autograd tutorial, run on ONNX."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    import onnxgrad as og

    a = og.tensor([2., 3.], requires_grad=True)
    b = og.tensor([6., 4.], requires_grad=True)
    Q = 3 * a**3 - b**2
    Q.backward(gradient=og.tensor([1., 1.]))
    print(9 * a**2 == a.grad)
    print(-2 * b == b.grad)
    return 0
