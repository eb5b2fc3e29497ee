"""``onnxgrad demo``: PyTorch's autograd tutorial on real data, run as standard ONNX.

1. trains a small network on scikit-learn's handwritten digits with one compiled training step
   (forward, gradients and the SGD-momentum update in one ONNX model), then reports held-out
   accuracy;
2. runs the tutorial's resnet18 step once, eagerly;
3. exports the digits training step, loops 3 steps of its portable export in every ONNX
   runtime installed (``onnxgrad verify``: the reference evaluator always, OpenVINO, tract...
   where installed) against ONNX Runtime, and prints its summary.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxgrad demo",
        description="Train a network on handwritten digits with a compiled ONNX training step, "
        "export it and verify it in another runtime.")
    parser.add_argument("--out", default="onnxgrad-demo", metavar="DIR",
                        help="folder for the exported step and its pictures (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=800,
                        help="training steps of batch --batch (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--min-accuracy", type=float, default=0.95,
                        help="fail (exit 1) below this held-out accuracy (default: %(default)s)")
    parser.add_argument("--skip-resnet", action="store_true",
                        help="skip the tutorial's resnet18 step")
    return parser


def _load_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # the `demo` extra

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    test = order[:360]
    train = order[360:]
    return x[train], y[train], x[test], y[test]


class _Progress:
    """A one-line progress bar on a terminal; a line every 10% otherwise."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width = total, width
        self.tty = sys.stdout.isatty()
        self.next_report = 0

    def update(self, done: int, loss: float) -> None:
        frac = done / self.total
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        text = f"  [{bar}] step {done:4d}/{self.total}  loss {loss:.4f}"
        if self.tty:
            print("\r" + text, end="" if done < self.total else "\n", flush=True)
        elif done >= self.next_report or done == self.total:
            print(text, flush=True)
            self.next_report = done + max(1, self.total // 10)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        print("onnxgrad demo: error: --steps and --batch must be positive", file=sys.stderr)
        return 2
    try:
        x_train, y_train, x_test, y_test = _load_digits(args.seed)
    except ModuleNotFoundError:
        print("onnxgrad demo: error: the demo needs scikit-learn: pip install 'onnxgrad[demo]'",
              file=sys.stderr)
        return 2
    import onnxgrad as og
    from onnxgrad.models import mlp

    F = og.nn.functional
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Train on digits with one compiled step.
    print(f"1. Training a 64-128-64-10 network on {len(x_train)} handwritten digits "
          f"(8x8), one compiled ONNX step per batch of {args.batch}")
    og.manual_seed(args.seed)
    model = mlp(64, (128, 64), 10)
    optim = og.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    @og.compile
    def train_step(data, labels):
        optim.zero_grad()
        loss = F.cross_entropy(model(data), labels)
        loss.backward()
        optim.step()
        return loss

    rng = np.random.default_rng(args.seed)
    batch = min(args.batch, len(x_train))
    per_epoch = len(x_train) // batch
    progress = _Progress(args.steps)
    start = time.perf_counter()
    order = rng.permutation(len(x_train))
    for step in range(args.steps):
        k = step % per_epoch
        if k == 0 and step:
            order = rng.permutation(len(x_train))
        idx = order[k * batch:(k + 1) * batch]
        loss = train_step(og.tensor(x_train[idx]), og.tensor(y_train[idx]))
        if step % 10 == 0 or step == args.steps - 1:
            progress.update(step + 1, loss.item())
    seconds = time.perf_counter() - start
    print(f"  {args.steps} steps in {seconds:.2f} s ({seconds / args.steps * 1e3:.2f} ms/step, "
          f"traced {train_step.traces}x)")

    model.eval()
    predict = og.compile(model)
    logits = predict(og.tensor(x_test))
    accuracy = float((logits.numpy().argmax(1) == y_test).mean())
    print(f"  held-out accuracy: {accuracy * 100:.1f}% on {len(x_test)} digits")
    model.train()

    # 2. The tutorial's resnet18 step, eagerly.
    if not args.skip_resnet:
        from onnxgrad.models import resnet18

        print("2. The autograd tutorial's resnet18 step (eager, every op an ONNX node)")
        start = time.perf_counter()
        net = resnet18()
        data, labels = og.rand(1, 3, 64, 64), og.rand(1, 1000)
        prediction = net(data)
        tutorial_loss = (prediction - labels).sum()
        tutorial_loss.backward()
        og.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9).step()
        print(f"  loss {tutorial_loss.item():.2f}; forward, backward (one ONNX Runtime run) and "
              f"SGD step (one run) in {time.perf_counter() - start:.2f} s")

    # 3. Export the digits step and check it in another runtime.
    path = out / "digits_train_step.onnx"
    train_step.export(path)
    print(f"3. Exported the training step to {path} ({path.stat().st_size / 1e3:.0f} kB)")
    agree = _verify(out, train_step, x_train, y_train, batch)
    from onnxgrad.inspector import load_model, to_dot
    from onnxgrad.runtime.files import atomic_write

    atomic_write(out / "digits_train_step.txt", str(og.inspect(path)).encode())
    atomic_write(out / "digits_train_step.dot", to_dot(load_model(path)).encode())
    print(og.summary(path))
    print(f"Files in {out}/: digits_train_step.onnx (the step), .txt (one line per node), "
          f".dot (picture: onnxgrad inspect {path} --svg step.svg)")
    ok = accuracy >= args.min_accuracy and agree
    if not ok:
        print(f"onnxgrad demo: FAILED: accuracy {accuracy * 100:.1f}% (needed "
              f"{args.min_accuracy * 100:.0f}%), runtimes {'agree' if agree else 'disagree'}",
              file=sys.stderr)
    return 0 if ok else 1


def _verify(out: Path, train_step, x: np.ndarray, y: np.ndarray, batch: int) -> bool:
    """3 steps of the portable export in every runtime installed, against ONNX Runtime."""
    from onnxgrad import verify

    path = out / "digits_train_step.portable.onnx"
    train_step.export(path, portable=True)
    step = verify.read_step(path)
    batches = [dict(zip(step.data_inputs, (x[i * batch:(i + 1) * batch],
                                            y[i * batch:(i + 1) * batch]))) for i in range(3)]
    rows = verify.verify(step, list(verify.RUNTIMES), batches)
    print(f"  its portable export ({path.name} + its .safetensors), 3 steps in each ONNX runtime "
          f"installed, against ONNX Runtime (onnxgrad verify):")
    print("\n".join(f"    {line}" for line in verify.format_table(rows, verify.TOLERANCE)
                    .splitlines()))
    return all(row.ok(verify.TOLERANCE) for row in rows if row.installed and row.runs) and \
        any(row.runtime == "reference" and row.ok(verify.TOLERANCE) for row in rows)


if __name__ == "__main__":
    sys.exit(main())
