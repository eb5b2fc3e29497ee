"""``onnxgrad.distributed`` and ``og.nn.parallel.DistributedDataParallel`` under ``mpiexec``.

The multi-process tests launch ``mpiexec -n N python worker.py`` (the worker is written from
this file) and compare what the ranks saved: DDP training with batch B on each of N ranks must
give the parameters of one process training on the combined batch N*B, on every rank. They skip
when the ``distributed`` extra (mpi4py and an MPI launcher) is not installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import onnxgrad as og
import onnxgrad.distributed as dist
from onnxgrad.distributed.collectives import Collectives, LocalCollectives
from onnxgrad.utils import data as ogdata

WORKER = textwrap.dedent('''
    import sys
    import numpy as np
    import onnxgrad as og
    import onnxgrad.distributed as dist
    import onnxgrad.nn.functional as F

    out = sys.argv[1]
    dist.init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    B, STEPS = 4, 4
    saved = {"world": np.array(world), "out": np.array(out)}

    def mlp(seed):
        og.manual_seed(seed)
        return og.nn.Sequential(og.nn.Linear(5, 8), og.nn.Tanh(), og.nn.Linear(8, 3))

    def data(step):
        rng = np.random.default_rng(100 + step)
        x = rng.standard_normal((B * world, 5)).astype(np.float32)
        y = rng.integers(0, 3, B * world)
        return x, y

    for name, make_opt in (("sgd", lambda p: og.optim.SGD(p, lr=0.1, momentum=0.9)),
                           ("adamw", lambda p: og.optim.AdamW(p, lr=0.01))):
        # Ranks seed differently: DDP must broadcast rank 0's initial parameters.
        ddp = og.nn.parallel.DistributedDataParallel(mlp(rank))
        ref = mlp(0)  # one process, the combined batch
        assert ddp.module is not ref
        opt, ref_opt = make_opt(ddp.parameters()), make_opt(ref.parameters())
        for step in range(STEPS):
            x, y = data(step)
            mine = slice(rank * B, (rank + 1) * B)
            opt.zero_grad()
            loss = F.cross_entropy(ddp(og.tensor(x[mine])), og.tensor(y[mine]))
            loss.backward()
            opt.step()
            ref_opt.zero_grad()
            F.cross_entropy(ref(og.tensor(x)), og.tensor(y)).backward()
            ref_opt.step()
        for (k, p), q in zip(ddp.module.named_parameters(), ref.parameters()):
            saved[f"{name}.ddp.{k}"] = p.detach().numpy()
            saved[f"{name}.ref.{k}"] = q.detach().numpy()
        saved[f"{name}.reduce_count"] = np.array(ddp.reduce_count)
        if rank == 0:  # state is replicated: rank 0 writes, any world size resumes
            og.save(ddp.module.state_dict(), f"{out}/{name}.ckpt")
        dist.barrier()

    # no_sync: two micro-batches accumulated locally, averaged at the second backward.
    ddp = og.nn.parallel.DistributedDataParallel(mlp(rank))
    ref = mlp(0)
    x, y = data(0)
    halves = [slice(rank * B, rank * B + B // 2), slice(rank * B + B // 2, (rank + 1) * B)]
    with ddp.no_sync():
        F.cross_entropy(ddp(og.tensor(x[halves[0]])), og.tensor(y[halves[0]])).backward()
    saved["nosync.count_inside"] = np.array(ddp.reduce_count)
    F.cross_entropy(ddp(og.tensor(x[halves[1]])), og.tensor(y[halves[1]])).backward()
    saved["nosync.count_after"] = np.array(ddp.reduce_count)
    for part in range(2):
        rows = np.concatenate([np.arange(r * B, (r + 1) * B)[part * (B // 2):(part + 1) * (B // 2)]
                               for r in range(world)])
        F.cross_entropy(ref(og.tensor(x[rows])), og.tensor(y[rows])).backward()
    for (k, p), q in zip(ddp.module.named_parameters(), ref.parameters()):
        saved[f"nosync.ddp.{k}"] = p.grad.numpy()
        saved[f"nosync.ref.{k}"] = q.grad.numpy()

    # Tensor collectives, PyTorch's API.
    t = og.tensor([1.0, 2.0]) * (rank + 1)
    dist.all_reduce(t)
    saved["all_reduce"] = t.numpy()
    m = og.tensor([float(rank)])
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    saved["all_reduce_max"] = m.numpy()
    b = og.tensor([float(rank), 7.0])
    dist.broadcast(b, src=world - 1)
    saved["broadcast"] = b.numpy()
    parts = [og.zeros(2, dtype=og.int64) for _ in range(world)]
    dist.all_gather(parts, og.tensor([rank, 10 * rank]))
    saved["all_gather"] = np.stack([p.numpy() for p in parts])
    sampler = og.utils.data.DistributedSampler(range(10), shuffle=True, seed=3)
    saved["sampler"] = np.array(list(sampler))
    saved["sampler_meta"] = np.array([sampler.num_replicas, sampler.rank])

    # A compiled training step of a DDP model with several processes must refuse, not skip
    # averaging; a compiled forward is fine.
    ddp = og.nn.parallel.DistributedDataParallel(mlp(0))
    forward = og.compile(lambda x: ddp(x).sum())
    saved["compiled_forward"] = forward(og.tensor(x[:2])).detach().numpy()
    saved["eager_forward"] = ddp(og.tensor(x[:2])).sum().detach().numpy()

    def train(x):
        loss = ddp(x).sum()
        loss.backward()
        return loss

    try:
        og.compile(train)(og.tensor(x[:2]))
        saved["compile_error"] = np.array("none")
    except Exception as exc:
        saved["compile_error"] = np.array(f"{type(exc).__name__}: {exc}")
    dist.barrier()
    np.savez(f"{out}/rank{rank}.npz", **saved)
    dist.destroy_process_group()
''')

FAILING = textwrap.dedent('''
    import time
    import numpy as np
    import onnxgrad.distributed as dist

    dist.init_process_group()
    if dist.get_rank() == 1:
        raise ValueError("rank 1 fails on purpose")
    dist.get_collectives().all_reduce(np.ones(3))  # would wait forever for rank 1
    time.sleep(60)
''')


def _mpiexec() -> str:
    pytest.importorskip("mpi4py", reason="the distributed extra is not installed "
                        "(pip install 'onnxgrad[distributed]')")
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec found (pip install 'onnxgrad[distributed]')")
    return found


def _launch(tmp_path: Path, source: str, n: int, timeout: float = 120
            ) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(source)
    return subprocess.run([_mpiexec(), "-n", str(n), sys.executable, str(script), str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> list[dict[str, np.ndarray]]:
    n = request.param
    tmp = tmp_path_factory.mktemp(f"ddp{n}")
    done = _launch(tmp, WORKER, n)
    assert done.returncode == 0, done.stdout + done.stderr
    return [dict(np.load(tmp / f"rank{r}.npz")) for r in range(n)]


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_ddp_equals_one_process_at_combined_batch(ranks: list[dict], opt: str) -> None:
    keys = [k for k in ranks[0] if k.startswith(f"{opt}.ddp.")]
    assert len(keys) == 4  # two Linear layers' weight and bias
    for saved in ranks:
        for k in keys:
            ref = saved[k.replace(".ddp.", ".ref.")]
            np.testing.assert_allclose(saved[k], ref, rtol=1e-5, atol=1e-6, err_msg=k)
            # Replicas are identical, bit for bit (same averaged gradients, same update).
            np.testing.assert_array_equal(saved[k], ranks[0][k], err_msg=k)
        assert int(saved[f"{opt}.reduce_count"]) == 4  # one all-reduce round per step


def test_checkpoint_from_several_ranks_resumes_in_one_process(ranks: list[dict]) -> None:
    ckpt = Path(str(ranks[0]["out"])) / "sgd.ckpt"
    model = og.nn.Sequential(og.nn.Linear(5, 8), og.nn.Tanh(), og.nn.Linear(8, 3))
    model.load_state_dict(og.load(ckpt))
    for k, p in model.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), ranks[1][f"sgd.ddp.{k}"], err_msg=k)


def test_ddp_no_sync_accumulates_then_averages(ranks: list[dict]) -> None:
    for saved in ranks:
        assert int(saved["nosync.count_inside"]) == 0
        assert int(saved["nosync.count_after"]) == 1
        for k in [k for k in saved if k.startswith("nosync.ddp.")]:
            np.testing.assert_allclose(saved[k], saved[k.replace(".ddp.", ".ref.")],
                                       rtol=1e-5, atol=1e-6, err_msg=k)


def test_tensor_collectives(ranks: list[dict]) -> None:
    n = len(ranks)
    total = n * (n + 1) / 2
    for r, saved in enumerate(ranks):
        np.testing.assert_array_equal(saved["all_reduce"], [total, 2 * total])
        np.testing.assert_array_equal(saved["all_reduce_max"], [n - 1])
        np.testing.assert_array_equal(saved["broadcast"], [n - 1, 7.0])
        np.testing.assert_array_equal(saved["all_gather"], [[q, 10 * q] for q in range(n)])
        assert saved["all_gather"].dtype == np.int64


def test_sampler_defaults_to_process_group(ranks: list[dict]) -> None:
    n = len(ranks)
    shards = [saved["sampler"] for saved in ranks]
    for r, saved in enumerate(ranks):
        assert saved["sampler_meta"].tolist() == [n, r]
        expected = list(ogdata.DistributedSampler(range(10), num_replicas=n, rank=r, seed=3))
        assert saved["sampler"].tolist() == expected
    covered = np.concatenate(shards)
    assert set(covered.tolist()) == set(range(10)) and len(covered) == n * -(-10 // n)


def test_compiled_ddp_step_refuses_with_several_processes(ranks: list[dict]) -> None:
    for saved in ranks:
        message = str(saved["compile_error"])
        assert message.startswith("TraceError") and "not supported yet" in message, message
        assert "DistributedDataParallel with" in message
        np.testing.assert_allclose(saved["compiled_forward"], saved["eager_forward"], rtol=1e-6)


MISMATCH = textwrap.dedent('''
    import onnxgrad as og
    import onnxgrad.distributed as dist

    dist.init_process_group()
    width = 4 if dist.get_rank() == 0 else 5
    try:
        og.nn.parallel.DistributedDataParallel(og.nn.Linear(3, width))
    except RuntimeError as exc:
        print(f"rank {dist.get_rank()}: {exc}", flush=True)
''')


def test_mismatched_models_are_named_on_every_rank(tmp_path: Path) -> None:
    done = _launch(tmp_path, MISMATCH, 2, timeout=60)
    assert done.returncode == 0, done.stderr
    for r in range(2):
        assert f"rank {r}: DDP expects same model across all ranks" in done.stdout


def test_a_failing_rank_ends_the_job(tmp_path: Path) -> None:
    done = _launch(tmp_path, FAILING, 2, timeout=60)
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stderr


# --------------------------------------------------------------------------- one process
@pytest.fixture
def group():
    dist.init_process_group(backend="local")
    yield
    dist.destroy_process_group()


def test_not_initialized_errors() -> None:
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="Default process group has not been initialized"):
        dist.get_rank()
    with pytest.raises(ValueError, match="Default process group has not been initialized"):
        og.nn.parallel.DistributedDataParallel(og.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend 'nccl' is not available"):
        dist.init_process_group("nccl")


def test_single_process_group(group: None) -> None:
    assert dist.is_initialized() and dist.get_backend() == "local"
    assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
    with pytest.raises(RuntimeError, match="twice"):
        dist.init_process_group()
    assert isinstance(dist.get_collectives(), Collectives)
    t = og.tensor([1.0, 2.0], requires_grad=True)
    dist.all_reduce(t)
    dist.broadcast(t, 0)
    assert t.tolist() == [1.0, 2.0] and t.is_leaf and t.requires_grad
    with pytest.raises(ValueError, match="src 1"):
        dist.broadcast(t, 1)
    with pytest.raises(ValueError, match="unknown reduce op"):
        LocalCollectives().all_reduce(np.zeros(2), "mean")
    sampler = ogdata.DistributedSampler(range(5), shuffle=False)
    assert list(sampler) == [0, 1, 2, 3, 4]


def test_ddp_single_process_trains_and_compiles_as_the_module(group: None) -> None:
    og.manual_seed(0)
    model = og.nn.Linear(3, 2)
    ref = og.nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    ddp = og.nn.parallel.DistributedDataParallel(model)
    assert ddp.module is model
    assert [k for k, _ in ddp.named_parameters()] == ["module.weight", "module.bias"]
    x = og.randn(4, 3)
    def make_step(m: og.nn.Module):
        opt = og.optim.SGD(m.parameters(), lr=0.5)

        @og.compile
        def step(x: og.Tensor) -> og.Tensor:
            opt.zero_grad()
            loss = (m(x) ** 2).mean()
            loss.backward()
            opt.step()
            return loss

        return step

    for m in (ddp, ref):
        step = make_step(m)
        for _ in range(3):
            step(x)
    np.testing.assert_allclose(model.weight.detach().numpy(), ref.weight.detach().numpy(),
                               rtol=1e-6)


# --------------------------------------------------------------------------- onnxgrad launch
def test_launch_runs_the_script_on_n_processes(tmp_path: Path) -> None:
    _mpiexec()
    from onnxgrad.__main__ import main

    script = tmp_path / "hello.py"
    script.write_text("import sys\n"
                      "import onnxgrad.distributed as dist\n"
                      "dist.init_process_group()\n"
                      "r, n = dist.get_rank(), dist.get_world_size()\n"
                      "open(sys.argv[1] + f'/rank{r}.txt', 'w').write(f'{r} {n} {sys.argv[2:]}')\n")
    assert main(["launch", "-n", "2", str(script), str(tmp_path), "--lr", "0.1"]) == 0
    for r in range(2):
        assert (tmp_path / f"rank{r}.txt").read_text() == f"{r} 2 ['--lr', '0.1']"


def test_launch_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from onnxgrad.__main__ import main

    script = tmp_path / "s.py"
    script.write_text("")
    assert main(["launch", "-n", "2", str(tmp_path / "missing.py")]) == 2
    assert "missing.py: no such file" in capsys.readouterr().err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mpi4py" else find_spec(name, *a))
    assert main(["launch", "-n", "2", str(script)]) == 2
    err = capsys.readouterr().err
    assert "mpi4py is not installed" in err and "onnxgrad[distributed]" in err


# --------------------------------------------------------------------------- after-backward hook
def test_post_backward_hook_sees_the_leaves_of_every_backward_path() -> None:
    from onnxgrad.tracer.autograd import register_post_backward_hook

    seen: list[list[int]] = []
    w = og.tensor([1.0, 2.0], requires_grad=True)
    b = og.tensor([0.5], requires_grad=True)
    unused = og.tensor([3.0], requires_grad=True)
    ids = {id(w): "w", id(b): "b", id(unused): "unused"}
    handle = register_post_backward_hook(lambda leaves: seen.append(
        sorted(ids[id(t)] for t in leaves if id(t) in ids)))
    try:
        (w * 2 + b).sum().backward()  # the session path
        assert seen == [["b", "w"]] and w.grad.tolist() == [2.0, 2.0]
        (w * w).sum().backward(create_graph=True)  # the replay path
        assert seen[-1] == ["w"]
        y = w * 3
        y.retain_grad()  # a non-leaf's gradient: replay path too
        y.sum().backward()
        assert seen[-1] == ["w"]

        def step(x: og.Tensor) -> og.Tensor:
            loss = (x * b).sum()
            loss.backward()
            return loss

        og.compile(step)(og.tensor([1.0, 1.0]))  # traced: called while tracing, not after
        assert seen[-1] == ["b"] and len(seen) == 4
    finally:
        handle.remove()
    (w * 2).sum().backward()
    assert len(seen) == 4  # removed


def test_processes_started_together_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under mpiexec each process's ONNX Runtime gets cores / local ranks threads that do not
    # spin (runtime/session.py); outside a launcher, ONNX Runtime's defaults.
    from onnxgrad.runtime import session

    monkeypatch.delenv("MPI_LOCALNRANKS", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    assert session.processes_on_this_machine() == 1
    assert session.session_options().intra_op_num_threads == 0  # ORT's default: all cores
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    opts = session.session_options()
    assert opts.intra_op_num_threads == max(1, (os.cpu_count() or 1) // 2)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
