"""Time the compiled training step of the GPT decoder against PyTorch eager, interleaved.

``onnxgrad.models.gpt`` (4 layers, 256 wide, 4 heads, 128 tokens, batch 8, vocabulary 512, tied
``lm_head``) with ``og.optim.AdamW`` compiled by ``og.compile``, against the same model in PyTorch
(``tests/torch_reference_transformer.py``, same initial weights) with ``torch.optim.AdamW``, eager.
Each framework runs in a worker process of its own (ONNX Runtime's and PyTorch's spinning threads
would starve each other in one process, see benchmarks/compiled_step.py); the driver asks them in
turn for blocks of steps, alternating who goes first, and prints the median step time of each and
the ratio onnxgrad / PyTorch (below 1.0: onnxgrad is faster).

    python benchmarks/gpt_step.py                 # ~1-2 min on 2 cores
    python benchmarks/gpt_step.py --rounds 4 --block 2 --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # workers.py, beside this script
from workers import Worker, answer

CONFIG = {"vocab_size": 512, "n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 128}
BATCH, TOKENS = 8, 128
ADAMW = {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
WARMUP = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (BATCH, TOKENS)
    return (rng.integers(0, CONFIG["vocab_size"], shape),
            rng.integers(0, CONFIG["vocab_size"], shape))


def _onnxgrad(weights: str, threads: int) -> tuple[Any, dict[str, Any]]:
    import onnxruntime as ort
    from onnxgrad.models import gpt

    import onnxgrad as og

    if threads:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from compiled_step import use_session_options
        use_session_options(threads=threads)
    og.manual_seed(0)
    model = gpt(**CONFIG)
    og.save(model.state_dict(), weights)
    opt = og.optim.AdamW(model.parameters(), **ADAMW)
    F = og.nn.functional

    @og.compile
    def step(x, y):
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss

    x, y = (og.tensor(a) for a in _data())
    start = time.perf_counter()
    float(step(x, y))
    report = {"first_call_s": time.perf_counter() - start,
              "version": f"onnxruntime {ort.__version__}"}
    return (lambda: float(step(x, y))), report


def _torch(weights: str, threads: int) -> tuple[Any, dict[str, Any]]:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from torch_reference_transformer import GPT

    # NOTE: onnxgrad's sessions keep subnormals (PyTorch's default); PyTorch flushes them here,
    # which can only make its side faster.
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(threads)
    model = GPT(**CONFIG)
    with np.load(weights) as state:
        model.load_state_dict({k: torch.from_numpy(state[k]) for k in state.files})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    x, y = (torch.from_numpy(a) for a in _data())

    def one() -> float:
        opt.zero_grad()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.item()

    one()
    return one, {"version": f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads"}


def serve(framework: str, weights: str, threads: int) -> None:
    one, report = (_onnxgrad if framework == "onnxgrad" else _torch)(weights, threads)
    report["loss"] = one()
    for _ in range(WARMUP):
        one()
    answer({"step": one}, report)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help="threads per framework (0: all)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=2, help="steps per block")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.weights, args.threads)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "initial.npz")
        def start(framework: str) -> Worker:
            return Worker(__file__, [framework, "--weights", weights, "--threads",
                                     str(args.threads)], framework)

        workers = [start("onnxgrad")]  # writes the initial weights
        workers.append(start("torch"))
        try:
            for r in range(args.rounds):
                k = r % 2
                for w in workers[k:] + workers[:k]:
                    time.sleep(0.2)  # the other worker's threads stop spinning
                    w.block(args.block)
        finally:
            for w in workers:
                w.close()
    og_w, pt_w = workers
    og_med, pt_med = statistics.median(og_w.times), statistics.median(pt_w.times)
    print(f"GPT decoder {CONFIG['n_layer']} layers x {CONFIG['n_embd']} wide, batch {BATCH} x "
          f"{TOKENS} tokens, vocabulary {CONFIG['vocab_size']}, AdamW "
          f"({len(og_w.times)} steps each, interleaved)")
    print(f"  onnxgrad compiled: {og_med * 1e3:8.1f} ms/step  (first call "
          f"{og_w.report['first_call_s']:.1f} s; {og_w.report['version']}; "
          f"step-2 loss {og_w.report['loss']:.5f})")
    print(f"  PyTorch eager:     {pt_med * 1e3:8.1f} ms/step  ({pt_w.report['version']}; "
          f"step-2 loss {pt_w.report['loss']:.5f})")
    print(f"  ratio onnxgrad / PyTorch: {og_med / pt_med:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
