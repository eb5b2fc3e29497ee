"""Loop exported training steps in every ONNX runtime installed and compare with ONNX Runtime.

For each model (an MLP, a small CNN with and without BatchNorm, resnet18 at 8x3x64x64) one step is
trained with onnxgrad, then written in both formats (the default single file, and
``portable=True``: state in a safetensors file). Each runtime installed (onnxruntime, the
reference evaluator, OpenVINO, tract, onnx2torch, tinygrad) loads the file and loops 3 steps
knowing only the file, its metadata and (portable) the state file, feeding every state output
back as the metadata says. Printed per runtime, model and format: whether it loads, whether it
runs, the largest difference to ONNX Runtime running the same file over the 3 steps' outputs and
state (``max |x - ort| / max |ort|`` per tensor), and the time per step (the mean of steps 2-3).

    python benchmarks/portable_runtimes.py                    # mlp, cnn, cnn-nobn (~1 min)
    python benchmarks/portable_runtimes.py --models resnet18  # the resnet too (minutes)
    python benchmarks/portable_runtimes.py --runtimes ort,openvino,tract

The runtime adapters, the loop and the comparison are ``onnxgrad.verify``'s (``onnxgrad verify
FILE`` runs them on one file): each loop uses only its runtime's own API, the file's metadata and
its state. A runtime that is not installed is listed as such; pip install openvino tract
onnx2torch tinygrad.
"""
from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxgrad.verify import RUNTIMES, TOLERANCE, read_step, verify


# --------------------------------------------------------------------------- the models
def _models(names: list[str]) -> dict[str, tuple[Callable, tuple[int, ...], int]]:
    from onnxgrad.models import mlp, resnet18

    import onnxgrad as og
    from onnxgrad import nn

    def cnn(bn: bool) -> Callable:
        def make():
            layers = [nn.Conv2d(3, 8, 3, padding=1, bias=not bn)]
            layers += [nn.BatchNorm2d(8)] if bn else []
            layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                       nn.Flatten(), nn.Linear(8 * 4 * 4, 10)]
            return nn.Sequential(*layers)
        return make

    table = {
        "mlp": (lambda: mlp(32, [64, 64], 10), (8, 32), 10),
        "cnn": (cnn(True), (4, 3, 8, 8), 10),
        "cnn-nobn": (cnn(False), (4, 3, 8, 8), 10),
        "resnet18": (lambda: resnet18(num_classes=10), (8, 3, 64, 64), 10),
    }
    og.manual_seed(0)
    return {name: table[name] for name in names}


def _batches(shape: tuple[int, ...], classes: int, count: int) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(shape, dtype=np.float32), rng.integers(0, classes, shape[0]))
            for _ in range(count)]


def export_both(make: Callable, shape: tuple[int, ...], classes: int, folder: Path
                ) -> dict[str, Path]:
    import onnxgrad as og

    model = make()
    optim = og.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    @og.compile
    def step(x, y):
        optim.zero_grad()
        loss = og.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
        return loss

    step(*_batches(shape, classes, 1)[0])
    step.export(folder / "default.onnx")
    step.export(folder / "portable.onnx", portable=True)
    return {"default": folder / "default.onnx", "portable": folder / "portable.onnx"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn,cnn-nobn",
                        help="comma-separated: mlp, cnn, cnn-nobn, resnet18")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--formats", default="default,portable")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    runtimes = [r for r in args.runtimes.split(",") if r]
    print(f"{'model':<10} {'format':<9} {'runtime':<11} {'loads':<6} {'runs':<5} "
          f"{'step 1 diff':>11} {'max rel diff':>12} {'ms/step':>9}  verdict")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, (make, shape, classes) in _models(args.models.split(",")).items():
            folder = Path(tmp) / model_name
            folder.mkdir()
            files = export_both(make, shape, classes, folder)
            for fmt in args.formats.split(","):
                step = read_step(files[fmt])
                batches = [dict(zip(step.data_inputs, batch))
                           for batch in _batches(shape, classes, args.steps + 1)[1:]]
                for row in verify(step, runtimes, batches):
                    if not row.installed:
                        print(f"{model_name:<10} {fmt:<9} {row.runtime:<11} {row.error}")
                        continue
                    ok = row.ok(TOLERANCE)
                    diff = max(row.diffs) if row.diffs else None
                    where = next((f"step {k + 1}: {row.worst[k]}"
                                  for k, d in enumerate(row.diffs) if d > TOLERANCE), "")
                    verdict = "pass" if ok else (row.error or f"differs at {where}")
                    failures += not ok
                    print(f"{model_name:<10} {fmt:<9} {row.runtime:<11} {row.loads!s:<6} "
                          f"{row.runs!s:<5} "
                          f"{'' if not row.diffs else format(row.diffs[0], '.1e'):>11} "
                          f"{'' if diff is None else f'{diff:.1e}':>12} "
                          f"{1e3 * row.seconds:9.1f}  {verdict}", flush=True)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
