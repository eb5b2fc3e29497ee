"""Time the compiled training step against PyTorch eager, interleaved, in one run.

For each configuration (resnet18 at 1x3x64x64, 8x3x64x64 and 4x3x224x224, an MLP 784-256-256-10
at batch 64, and mobilenet_v2, efficientnet_b0 and densenet121 at 8x3x96x96) onnxgrad's compiled
step and PyTorch's eager step (same architecture, same initial weights, SGD with momentum,
cross-entropy) each run in a worker process of their own; the driver asks them in turn for a block
of steps (the other one idles meanwhile), alternating who goes first, and reports the median
step time of each and the ratio onnxgrad / PyTorch (below 1.0: onnxgrad is faster). It also
reports onnxgrad's trace+compile time (its first call less one step) and the ONNX Runtime session
creation within it, and each worker's peak resident memory (VmHWM: native allocations of ONNX
Runtime and PyTorch included).

NOTE: one process per framework, not both in one: ONNX Runtime's intra-op threads spin after each
run, and so do PyTorch's OpenMP threads; sharing a process (and 2 cores) they starve each other.
Measured here on the MLP, interleaved step by step in one process: PyTorch 720 ms per step next
to spinning ONNX Runtime threads, 1.4 ms without spinning. Separate processes measure each
framework as a user runs it.

    python benchmarks/compiled_step.py                     # every configuration (~3 min, 2 cores)
    python benchmarks/compiled_step.py --config r18-1x64   # one: r18-1x64, r18-8x64, r18-4x224,
                                                           # mlp, mnv2-8x96 (mobilenet_v2),
                                                           # effb0-8x96 (efficientnet_b0),
                                                           # dn121-8x96 (densenet121)
    python benchmarks/compiled_step.py --threads 1         # both frameworks on one thread
    python benchmarks/compiled_step.py --options r18-8x64  # session options against each other
    python benchmarks/compiled_step.py --profile r18-8x64  # where the compiled step's time goes
    onnxgrad bench ...                                     # the same, as a CLI verb

Both frameworks flush denormals to zero. On a shared machine timings are noisy: blocks in turn
keep the ratio fair, medians keep it stable.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # workers.py, beside this script
from workers import Worker, answer

# name: (kind, input shape, classes, rounds, steps per block)
CONFIGS: dict[str, tuple[str, tuple[int, ...], int, int, int]] = {
    "r18-1x64": ("resnet18", (1, 3, 64, 64), 1000, 8, 4),
    "r18-8x64": ("resnet18", (8, 3, 64, 64), 1000, 8, 2),
    "r18-4x224": ("resnet18", (4, 3, 224, 224), 1000, 5, 1),
    "mlp": ("mlp", (64, 784), 10, 10, 10),
    # torchvision's mobilenet_v2 (og: onnxgrad.models, PyTorch: tests/torch_reference_mobile.py)
    "mnv2-8x96": ("mobilenet_v2", (8, 3, 96, 96), 1000, 6, 2),
    # torchvision's efficientnet_b0 (depthwise, squeeze-excitation, SiLU, stochastic depth)
    "effb0-8x96": ("efficientnet_b0", (8, 3, 96, 96), 1000, 6, 2),
    # torchvision's densenet121 (concatenations; PyTorch: tests/torch_reference_densenet.py).
    # NOTE: its last block runs on 3x3 maps at 96x96 (as mnv2/effb0's last stages do), 72 values
    # per BatchNorm channel at batch 8: small but not degenerate; 224 would be 5.4x the work.
    "dn121-8x96": ("densenet121", (8, 3, 96, 96), 1000, 6, 2),
}
# The PyTorch reference module of each torchvision model (tests/<file>.py), by kind.
TORCH_REFERENCES = {"mobilenet_v2": "torch_reference_mobile",
                    "efficientnet_b0": "torch_reference_mobile",
                    "densenet121": "torch_reference_densenet"}
LR, MOMENTUM = 0.01, 0.9
WARMUP = 2


def _maxrss_mb() -> float:
    """This process's peak resident memory in MiB.

    NOTE: Linux's VmHWM, not getrusage's ru_maxrss, which keeps the parent's peak across
    fork + exec: every worker would report at least the driver's memory.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _data(config: str) -> tuple[np.ndarray, np.ndarray]:
    _, shape, classes, _, _ = CONFIGS[config]
    rng = np.random.default_rng(0)
    return rng.standard_normal(shape, dtype=np.float32), rng.integers(0, classes, shape[0])


# --------------------------------------------------------------------------- the two steps
def use_session_options(level: str = "extended", threads: int = 0, spin: bool = True,
                        arena: bool = True, pattern: bool | None = None,
                        profile: str | None = None) -> list[Any]:
    """Make the compiled step's session (not the eager kernels) with these options;
    ``profile``: ONNX Runtime's profile file prefix. Returns the sessions made, as made."""
    import onnxruntime as ort
    from onnxgrad.runtime import session as session_module
    from onnxgrad.runtime import step as step_module

    made: list[ort.InferenceSession] = []

    def make(model_bytes: bytes, optimized: str | None = None) -> ort.InferenceSession:
        options = session_module.session_options(level=level)
        if profile is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile
        options.intra_op_num_threads = threads
        if optimized is not None:  # where the runner reads the graph that runs
            options.optimized_model_filepath = optimized
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = arena
        if pattern is not None:
            options.enable_mem_pattern = pattern
        made.append(ort.InferenceSession(model_bytes, options,
                                         providers=session_module.get_providers()))
        return made[-1]

    step_module.make_session = make
    return made


def onnxgrad_step(config: str) -> tuple[Any, Callable[[np.ndarray, np.ndarray], Any]]:
    """(model, compiled step) for ``config``; nothing is traced until the first call."""
    import onnxgrad as og
    from onnxgrad import models

    kind, _, classes, _, _ = CONFIGS[config]
    og.manual_seed(0)
    if kind == "mlp":
        model = models.mlp(784, [256, 256], 10)
    else:  # resnet18 and the torchvision models: onnxgrad.models' builder of that name
        model = getattr(models, kind)(num_classes=classes)
    optim = og.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    @og.compile
    def step(x, y):
        optim.zero_grad()
        loss = og.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
        return loss

    return model, step


def torch_step(config: str, weights: str | None) -> Callable[[Any, Any], Any]:
    import torch
    from torch import nn

    # NOTE: onnxgrad's sessions keep subnormals (PyTorch's default); PyTorch flushes them here,
    # which can only make its side faster.
    torch.set_flush_denormal(True)
    kind, _, classes, _, _ = CONFIGS[config]
    torch.manual_seed(0)
    model = _torch_resnet18(classes) if kind == "resnet18" else nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if kind in TORCH_REFERENCES:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "tests"))
        reference = importlib.import_module(TORCH_REFERENCES[kind])
        model = getattr(reference, kind)(classes)
    if weights is not None:
        with np.load(weights) as state:
            model.load_state_dict({k: torch.from_numpy(state[k]) for k in state.files})
    model.train()
    optim = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step(x, y):
        optim.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
        return loss.detach()

    return step


def _torch_resnet18(classes: int):
    """torchvision's resnet18 module tree (same state-dict keys), from torch.nn alone."""
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class ResNet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            widths = [64, 128, 256, 512]
            for i, w in enumerate(widths):
                cin = widths[max(i - 1, 0)]
                setattr(self, f"layer{i + 1}",
                        nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet18()


# --------------------------------------------------------------------------- workers
def _parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``onnxgrad`` / ``torch``, optionally ``:level=all,threads=1,spin=0,arena=0,pattern=0``."""
    framework, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = value if key == "level" else int(value)
    return framework, options


def serve(spec: str, config: str, weights: str) -> None:
    """A worker: build, report, then run blocks of steps on request until told to quit.

    The onnxgrad worker writes its initial weights to ``weights`` before training, and the
    torch worker loads them from there.
    """
    framework, options = _parse_spec(spec)
    x, y = _data(config)
    report: dict[str, Any] = {"base_mb": _maxrss_mb()}
    if framework == "onnxgrad":
        import onnxruntime as ort
        from onnxgrad.tracer import compile as compile_module

        import onnxgrad as og

        use_session_options(options.get("level", "extended"), options.get("threads", 0),
                            bool(options.get("spin", 1)), bool(options.get("arena", 1)),
                            None if "pattern" not in options else bool(options["pattern"]))
        session_time = [0.0]
        runner_cls = compile_module.StepRunner

        class TimedRunner(runner_cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                start = time.perf_counter()
                super().__init__(*args, **kwargs)
                session_time[0] += time.perf_counter() - start

        compile_module.StepRunner = TimedRunner
        model, step = onnxgrad_step(config)
        if weights:
            og.save(model.state_dict(), weights)  # a plain .npz: what torch loads
        start = time.perf_counter()
        float(step(x, y))
        report["first_call_s"] = time.perf_counter() - start
        report["session_s"] = session_time[0]
        report["version"] = f"onnxruntime {ort.__version__}"

        def one() -> None:
            float(step(x, y))  # reading the loss: the step has finished
    else:
        import torch

        if "threads" in options:
            torch.set_num_threads(options["threads"])
        t_step = torch_step(config, weights or None)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        report["version"] = f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads"

        def one() -> None:
            float(t_step(tx, ty))
    for _ in range(WARMUP):
        one()
    answer({"step": one}, report)
    print(json.dumps({"peak_mb": _maxrss_mb()}), flush=True)


def compare(config: str, specs: list[str], rounds: int, block: int) -> dict[str, dict[str, Any]]:
    """Run each contender in its own worker, blocks in turn; returns each one's figures."""
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "initial.npz")
        workers = []
        try:
            for spec in specs:  # the first (onnxgrad) writes the weights the others load
                workers.append(Worker(__file__, [spec, "--config", config, "--weights",
                                                 weights], spec))
            for r in range(rounds):
                k = r % len(workers)  # who goes first rotates
                for w in workers[k:] + workers[:k]:
                    time.sleep(0.2)  # the other worker's threads stop spinning before this block
                    w.block(block)
        finally:
            results = {}
            for w in workers:
                try:
                    peak = w.close(answers=True)["peak_mb"]
                except Exception:
                    w.proc.kill()
                    raise
                median = statistics.median(w.times) if w.times else float("nan")
                results[w.name] = {**w.report, "median_s": median, "peak_mb": peak,
                                   "steps": len(w.times)}
    return results


# --------------------------------------------------------------------------- reports
def run(configs: list[str], threads: int | None, rounds: int | None) -> int:
    og_spec = "onnxgrad" if threads is None else f"onnxgrad:threads={threads}"
    pt_spec = "torch" if threads is None else f"torch:threads={threads}"
    rows = []
    for config in configs:
        _, _, _, n_rounds, block = CONFIGS[config]
        res = compare(config, [og_spec, pt_spec], rounds or n_rounds, block)
        og, pt = res[og_spec], res[pt_spec]
        rows.append((config, og, pt))
        print(f"  {config}: ratio {og['median_s'] / pt['median_s']:.2f}", file=sys.stderr,
              flush=True)
    print(f"onnxgrad compiled step ({rows[0][1]['version']}) vs {rows[0][2]['version']} eager, "
          f"{os.cpu_count()} CPUs; median of steps run in blocks, in turn")
    print(f"{'config':<11}{'steps':>6}{'onnxgrad ms':>13}{'pytorch ms':>12}{'ratio':>7}"
          f"{'trace+compile s':>17}{'(session s)':>12}{'peak MB og':>12}{'peak MB pt':>12}")
    for config, og, pt in rows:
        print(f"{config:<11}{og['steps']:>6}{og['median_s'] * 1e3:>13.1f}"
              f"{pt['median_s'] * 1e3:>12.1f}{og['median_s'] / pt['median_s']:>7.2f}"
              f"{og['first_call_s'] - og['median_s']:>17.2f}{og['session_s']:>12.2f}"
              f"{og['peak_mb']:>12.0f}{pt['peak_mb']:>12.0f}")
    print("ratio = onnxgrad / PyTorch (below 1: onnxgrad faster). trace+compile = first call less "
          "one step; (session s) = ONNX Runtime's session creation within it. Peak MB = peak "
          f"resident memory of each worker (Python and NumPy alone: {rows[0][1]['base_mb']:.0f} "
          "MB).")
    return 0


def options(config: str, rounds: int | None) -> int:
    """The compiled step under each session-option variant, against PyTorch."""
    variants = {
        "onnxgrad": "extended (default)",
        "onnxgrad:level=basic": "basic",
        "onnxgrad:level=all": "all (adds NCHWc layouts)",
        "onnxgrad:threads=1": "extended, 1 intra-op thread",
        "onnxgrad:spin=0": "extended, no thread spinning",
        "onnxgrad:arena=0": "extended, no memory arena",
        "onnxgrad:pattern=0": "extended, no memory pattern",
        "onnxgrad:pattern=1": "extended, memory pattern",
    }
    _, _, _, n_rounds, block = CONFIGS[config]
    res = compare(config, [*variants, "torch"], rounds or n_rounds, block)
    pt = res["torch"]["median_s"]
    print(f"session options, {config}: median step, ratio to PyTorch "
          f"({res['torch']['version']}), peak memory")
    for spec, label in variants.items():
        med = res[spec]["median_s"]
        print(f"  {label:<30}{med * 1e3:9.1f} ms   ratio {med / pt:5.2f}"
              f"{res[spec]['peak_mb']:9.0f} MB")
    print(f"  {'PyTorch eager':<30}{pt * 1e3:9.1f} ms{'':13}{res['torch']['peak_mb']:9.0f} MB")
    return 0


def profile(config: str, runs: int) -> int:
    """ONNX Runtime's own profile of the compiled step: kernel time by op type and by origin.

    NOTE: the session the runner makes, run by the step itself: the graph with the runner's
    edits (gradients written before their Reshape, in-place ties), bound to its buffers."""
    from onnxgrad.runtime.metadata import ORIGIN

    made = use_session_options(profile=os.path.join(tempfile.gettempdir(), f"onnxgrad_{config}"))
    x, y = _data(config)
    _, step = onnxgrad_step(config)
    float(step(x, y))  # warm-up, left out of the figures
    origin = {n.name: next((p.value for p in n.metadata_props if p.key == ORIGIN), "?")
              for n in step.last.model.graph.node}
    start = time.perf_counter()
    for _ in range(runs):
        float(step(x, y))
    wall = (time.perf_counter() - start) / runs
    path = made[-1].end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.unlink(path)
    model_runs = [e for e in events if e.get("name") == "model_run"]
    first_timed = model_runs[1]["ts"] if len(model_runs) > 1 else 0
    by_op: dict[str, float] = defaultdict(float)
    by_origin: dict[str, float] = defaultdict(float)
    by_both: dict[tuple[str, str], float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    for e in events:
        if (e.get("cat") != "Node" or not e["name"].endswith("_kernel_time")
                or e["ts"] < first_timed):
            continue
        op = e["args"].get("op_name", "?")
        where = origin.get(e["name"][: -len("_kernel_time")], "fused")  # ORT renames fusions
        by_op[op] += e["dur"]
        by_origin[where] += e["dur"]
        by_both[(op, where)] += e["dur"]
        nodes[op] += 1
    total = sum(by_op.values())
    print(f"profile {config}: {wall * 1e3:.1f} ms per run (wall), {total / runs / 1e3:.1f} ms "
          f"in kernels, over {runs} runs")
    print(f"  {'op type':<22}{'ms/run':>9}{'share':>8}{'nodes':>7}")
    for op, dur in sorted(by_op.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {op:<22}{dur / runs / 1e3:9.2f}{dur / total:8.1%}{nodes[op] // runs:7d}")
    print(f"  {'origin':<22}{'ms/run':>9}{'share':>8}")
    for where, dur in sorted(by_origin.items(), key=lambda kv: -kv[1]):
        print(f"  {where:<22}{dur / runs / 1e3:9.2f}{dur / total:8.1%}")
    print("  top (op type, origin):")
    for (op, where), dur in sorted(by_both.items(), key=lambda kv: -kv[1])[:10]:
        print(f"    {op:<22}{where:<10}{dur / runs / 1e3:9.2f} ms{dur / total:8.1%}")
    # What ONNX Runtime's convolution and matrix-product kernels alone take: a step cannot run
    # faster than that on this provider, whatever the rest of the graph does.
    products = sum(dur for op, dur in by_op.items() if op in PRODUCTS)
    print(f"  convolutions and matrix products ({', '.join(sorted(PRODUCTS & set(by_op)))}): "
          f"{products / runs / 1e3:.1f} ms/run, {products / total:.1%} of the kernel time")
    return 0


#: ONNX Runtime's kernels that compute convolutions and matrix products (ONNX's and the ones its
#: fusions make), in the forward pass and the gradient formulations alike.
PRODUCTS = frozenset({"Conv", "FusedConv", "ConvTranspose", "Col2Im", "MatMul", "FusedMatMul",
                      "Gemm", "FusedGemm"})


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="onnxgrad bench" if argv is not None else None,
        description="Time onnxgrad's compiled training step against PyTorch eager "
        "(interleaved, medians, ratio), with trace+compile time and peak memory.")
    parser.add_argument("--config", action="append", choices=list(CONFIGS),
                        help="a configuration to run (repeatable; default: all)")
    parser.add_argument("--rounds", type=int, help="blocks of steps per framework "
                        "(default: per configuration, fewer for 224x224)")
    parser.add_argument("--threads", type=int, help="intra-op threads for both frameworks "
                        "(default: each framework's own)")
    parser.add_argument("--options", choices=list(CONFIGS), metavar="CONFIG",
                        help="compare session options (optimization level, threads, spinning, "
                        "memory arena)")
    parser.add_argument("--profile", choices=list(CONFIGS), metavar="CONFIG",
                        help="profile the compiled step with ONNX Runtime's profiler")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--weights", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.config[0], args.weights)
        return 0
    if args.profile:
        return profile(args.profile, args.rounds or 5)
    if importlib.util.find_spec("torch") is None:  # not imported: the driver stays small
        print("onnxgrad bench: error: the comparison needs PyTorch (pip install torch)",
              file=sys.stderr)
        return 2
    if args.options:
        return options(args.options, args.rounds)
    return run(args.config or list(CONFIGS), args.threads, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
