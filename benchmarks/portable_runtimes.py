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

Needs nothing of onnxgrad to run the files (only to make them): the loops use each runtime's own
API, ``json`` for the metadata and ``safetensors.numpy`` (or onnxgrad's reader) for the state.
A runtime that is not installed is listed as such; pip install openvino tract onnx2torch tinygrad.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
PASS = 1e-4  # the issue's tolerance where a runtime's float32 kernels differ


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


# --------------------------------------------------------------------------- reading the files
def read_file(path: Path) -> tuple[onnx.ModelProto, dict[str, str], dict[str, np.ndarray]]:
    """The model, its metadata, and the first step's state: the state file (portable) or the
    defaults of the state inputs (default format)."""
    model = onnx.load(path)
    meta = {p.key: p.value for p in model.metadata_props}
    if "onnxgrad.state_file" in meta:
        state_path = path.parent / meta["onnxgrad.state_file"]
        try:
            from safetensors.numpy import load_file
            state = load_file(str(state_path))
        except ImportError:
            from onnxgrad.runtime.portable import read_safetensors
            state = read_safetensors(state_path)
    else:
        data = set(json.loads(meta["onnxgrad.data_inputs"]))
        inputs = {i.name for i in model.graph.input} - data
        state = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                 if t.name in inputs}
    return model, meta, state


# --------------------------------------------------------------------------- the runtimes
def _ort(path: Path, model: onnx.ModelProto) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds)))


def _reference(path: Path, model: onnx.ModelProto) -> Run:
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    names = [o.name for o in model.graph.output]
    return lambda feeds: dict(zip(names, evaluator.run(None, feeds)))


def _openvino(path: Path, model: onnx.ModelProto) -> Run:
    import openvino as ov

    core = ov.Core()
    # NOTE: f32 explicitly: on CPUs with bf16 support OpenVINO's default precision is bf16.
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    names = [o.name for o in model.graph.output]
    ports = [compiled.output(name) for name in names]
    request = compiled.create_infer_request()

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = request.infer(feeds)
        return {name: np.array(results[port]) for name, port in zip(names, ports)}
    return run


def _tract(path: Path, model: onnx.ModelProto) -> Run:
    import tract

    runnable = tract.onnx().load(str(path)).into_model().into_runnable()
    inputs = [i.name for i in model.graph.input]
    names = [o.name for o in model.graph.output]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # NOTE: not np.ascontiguousarray, which makes 0-d scalars (lr) 1-d.
        outs = runnable.run([np.array(feeds[name], order="C") for name in inputs])
        return {name: out.to_numpy() for name, out in zip(names, outs)}
    return run


def _onnx2torch(path: Path, model: onnx.ModelProto) -> Run:
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception:  # noqa: BLE001 - absent, or built for another torch
            # NOTE: onnx2torch imports torchvision for its NMS and RoiAlign converters only;
            # a stand-in lets the others load where no matching torchvision installs.
            stub = types.ModuleType("torchvision")
            stub.ops = types.ModuleType("torchvision.ops")
            stub.ops.roi_align = None
            sys.modules["torchvision"] = stub
            sys.modules["torchvision.ops"] = stub.ops
    import torch
    from onnx2torch import convert

    module = convert(model)
    inputs = [i.name for i in model.graph.input]
    names = [o.name for o in model.graph.output]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outs = module(*[torch.from_numpy(np.array(feeds[name])) for name in inputs])
        outs = outs if isinstance(outs, (tuple, list)) else [outs]
        return {name: out.numpy() for name, out in zip(names, outs)}
    return run


def _tinygrad(path: Path, model: onnx.ModelProto) -> Run:
    from tinygrad.nn.onnx import OnnxRunner

    runner = OnnxRunner(str(path))
    fed = set(runner.graph_inputs)  # NOTE: inputs with an initializer are not feedable there

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = runner({k: v for k, v in feeds.items() if k in fed})
        return {name: value.numpy() for name, value in outs.items()}
    return run


RUNTIMES: dict[str, Callable[[Path, onnx.ModelProto], Run]] = {
    "ort": _ort, "reference": _reference, "openvino": _openvino, "tract": _tract,
    "onnx2torch": _onnx2torch, "tinygrad": _tinygrad,
}
IMPORTS = {"ort": "onnxruntime", "reference": "onnx.reference", "openvino": "openvino",
           "tract": "tract", "onnx2torch": "onnx2torch", "tinygrad": "tinygrad"}


# --------------------------------------------------------------------------- the loop
def loop(run: Run, meta: dict[str, str], state: dict[str, np.ndarray],
         batches: list[tuple[np.ndarray, ...]]) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """The README's loop: feed data and state, feed each state output back to its input."""
    feeds_for = json.loads(meta["onnxgrad.state"])
    data_inputs = json.loads(meta["onnxgrad.data_inputs"])
    results, times = [], []
    for batch in batches:
        start = time.perf_counter()
        out = run({**state, **dict(zip(data_inputs, batch))})
        times.append(time.perf_counter() - start)
        state = {**state, **{feeds_for[name]: out[name] for name in feeds_for}}
        results.append(out)
    return results, times


def difference(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]
               ) -> tuple[float, str]:
    """The largest ``max |x - ort| / max |ort|`` over every output of every step, and where."""
    worst, where = 0.0, ""
    for k, (a, b) in enumerate(zip(got, want)):
        for name, ref in b.items():
            if name not in a:
                return float("inf"), f"step {k}: {name} missing"
            x, y = np.asarray(a[name], np.float64), np.asarray(ref, np.float64)
            if x.shape != y.shape:
                return float("inf"), f"step {k}: {name} shape {x.shape} != {y.shape}"
            scale = max(float(np.max(np.abs(y))) if y.size else 0.0, 1e-30)
            d = float(np.max(np.abs(x - y))) / scale if y.size else 0.0
            if not np.isfinite(d) or d > worst:
                worst, where = (d if np.isfinite(d) else float("inf")), f"step {k}: {name}"
    return worst, where


def check(runtime: str, path: Path, want: list[dict[str, np.ndarray]] | None,
          batches: list[tuple[np.ndarray, ...]]) -> dict[str, object]:
    row: dict[str, object] = {"runtime": runtime, "loads": False, "runs": False}
    model, meta, state = read_file(path)
    try:
        run = RUNTIMES[runtime](path, model)
        row["loads"] = True
        got, times = loop(run, meta, state, batches)
        row["runs"] = True
    except Exception as exc:  # noqa: BLE001 - every runtime fails its own way: report it
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}" \
            if str(exc).strip() else type(exc).__name__
        if "--trace" in sys.argv:
            traceback.print_exc()
        return row
    row["ms"] = 1e3 * float(np.mean(times[1:] if len(times) > 1 else times))
    row["results"] = got
    if want is not None:
        row["diff"], row["where"] = difference(got, want)
        row["first"], _ = difference(got[:1], want[:1])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn,cnn-nobn",
                        help="comma-separated: mlp, cnn, cnn-nobn, resnet18")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--formats", default="default,portable")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trace", action="store_true", help="print each failure's traceback")
    args = parser.parse_args(argv)
    runtimes = [r for r in args.runtimes.split(",") if r]
    if "tinygrad" in runtimes and "DEV" not in os.environ and shutil.which("clang") is None:
        # NOTE: tinygrad's CPU device compiles with clang; without it, its Python emulator
        # (slow, but the same ONNX semantics) runs the graph. Read when tinygrad is imported.
        os.environ["DEV"] = "PYTHON"
    available = {}
    for name in runtimes:
        try:
            __import__(IMPORTS[name])
            available[name] = True
        except Exception as exc:  # noqa: BLE001
            available[name] = f"not installed ({type(exc).__name__})"
            if name == "onnx2torch":  # it imports torchvision at once; _onnx2torch stubs it
                available[name] = True
    print(f"{'model':<10} {'format':<9} {'runtime':<11} {'loads':<6} {'runs':<5} "
          f"{'step 1 diff':>11} {'max rel diff':>12} {'ms/step':>9}  verdict")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, (make, shape, classes) in _models(args.models.split(",")).items():
            folder = Path(tmp) / model_name
            folder.mkdir()
            files = export_both(make, shape, classes, folder)
            batches = _batches(shape, classes, args.steps + 1)[1:]
            for fmt in args.formats.split(","):
                base = check("ort", files[fmt], None, batches)
                want = base.get("results")
                for runtime in runtimes:
                    if available[runtime] is not True:
                        print(f"{model_name:<10} {fmt:<9} {runtime:<11} {available[runtime]}")
                        continue
                    row = base if runtime == "ort" else check(runtime, files[fmt], want, batches)
                    diff = row.get("diff", 0.0 if runtime == "ort" and row["runs"] else None)
                    ok = row["runs"] and diff is not None and diff <= PASS
                    verdict = "pass" if ok else (row.get("error") or
                                                 f"differs at {row.get('where')}")
                    failures += not ok
                    print(f"{model_name:<10} {fmt:<9} {runtime:<11} {row['loads']!s:<6} "
                          f"{row['runs']!s:<5} "
                          f"{'' if 'first' not in row else format(row['first'], '.1e'):>11} "
                          f"{'' if diff is None else f'{diff:.1e}':>12} "
                          f"{row.get('ms', float('nan')):9.1f}  {verdict}", flush=True)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
