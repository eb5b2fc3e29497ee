"""Rules for linear algebra and neural-network ops."""
from __future__ import annotations

from ..builder import dims
from . import attr, rule


def _swap_last(b, x, rank):
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return b.op("Transpose", x, perm=perm)


@rule("MatMul")
def matmul(b, node, grads, needs):
    a, w = node.inputs
    g = grads[0]
    ad, wd = dims(a), dims(w)
    # Promote 1-D operands to matrices as MatMul itself does, then undo it on the gradients.
    a2, w2 = a, w
    if len(ad) == 1:
        a2 = b.op("Unsqueeze", a, b.ints([0]))
        g = b.op("Unsqueeze", g, b.ints([-2]))
    if len(wd) == 1:
        w2 = b.op("Unsqueeze", w, b.ints([1]))
        g = b.op("Unsqueeze", g, b.ints([-1]))
    a2d = [1] + ad if len(ad) == 1 else ad
    w2d = wd + [1] if len(wd) == 1 else wd
    rank = max(len(a2d), len(w2d))
    out_batch = _broadcast(a2d[:-2], w2d[:-2])
    da = dw = None
    if needs[0]:
        da = b.op("MatMul", g, _swap_last(b, w2, len(w2d)))
        da = b.sum_to(da, out_batch + a2d[-2:], a2d)
        if len(ad) == 1:
            da = b.op("Reshape", da, b.ints([-1]))
    if needs[1]:
        dw = b.op("MatMul", _swap_last(b, a2, len(a2d)), g)
        dw = b.sum_to(dw, out_batch + w2d[-2:], w2d)
        if len(wd) == 1:
            dw = b.op("Reshape", dw, b.ints([-1]))
    del rank
    return [da, dw]


def _broadcast(x, y):
    n = max(len(x), len(y))
    x = [1] * (n - len(x)) + list(x)
    y = [1] * (n - len(y)) + list(y)
    return [a if b_ == 1 else b_ for a, b_ in zip(x, y)]


@rule("Gemm")
def gemm(b, node, grads, needs):
    a, w = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    g = grads[0]
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)
    ga = g if alpha == 1.0 else b.op("Mul", g, b.const_like(alpha, g))
    da = dw = dc = None
    if needs[0]:
        # A' = op(A): dA' = g B'^T; express with Gemm's transpose flags instead of Transpose nodes.
        da = (b.op("Gemm", w, ga, transA=tb, transB=1) if ta
              else b.op("Gemm", ga, w, transA=0, transB=1 - tb))
    if needs[1]:
        dw = (b.op("Gemm", ga, a, transA=1, transB=ta) if tb
              else b.op("Gemm", a, ga, transA=1 - ta, transB=0))
    if c is not None and needs[2]:
        gc = g if beta == 1.0 else b.op("Mul", g, b.const_like(beta, g))
        dc = b.sum_to(gc, dims(node.outputs[0]), dims(c))
    return [da, dw] + ([dc] if c is not None else [])


@rule("Softmax")
def softmax(b, node, grads, needs):
    y = node.outputs[0]
    axis = attr(node, "axis", -1)
    gy = b.op("Mul", grads[0], y)
    # dx = y * (g - sum(g * y)) written as g*y - y*sum(g*y), PyTorch's _softmax_backward_data.
    s = b.op("ReduceSum", gy, b.ints([axis]), keepdims=1)
    return [b.op("Sub", gy, b.op("Mul", y, s))]


@rule("LogSoftmax")
def log_softmax(b, node, grads, needs):
    y = node.outputs[0]
    axis = attr(node, "axis", -1)
    g = grads[0]
    s = b.op("ReduceSum", g, b.ints([axis]), keepdims=1)
    return [b.op("Sub", g, b.op("Mul", b.op("Exp", y), s))]
