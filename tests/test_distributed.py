"""``onnxgrad.distributed`` and ``og.nn.parallel.DistributedDataParallel`` under ``mpiexec``.

The multi-process tests launch ``mpiexec -n N python worker.py`` (the worker is written from
this file) and compare what the ranks saved: DDP training with batch B on each of N ranks must
give the parameters of one process training on the combined batch N*B, on every rank. They skip
when the ``distributed`` extra (mpi4py and an MPI launcher) is not installed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

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

    # A compiled forward of a DDP model (no backward: no collective in the step).
    ddp = og.nn.parallel.DistributedDataParallel(mlp(0))
    forward = og.compile(lambda x: ddp(x).sum())
    saved["compiled_forward"] = forward(og.tensor(x[:2])).detach().numpy()
    saved["eager_forward"] = ddp(og.tensor(x[:2])).sum().detach().numpy()
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


def test_compiled_ddp_forward(ranks: list[dict]) -> None:
    for saved in ranks:
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


# --------------------------------------------------------------------------- compiled steps
# Compiled DDP steps with several processes (tracer/split.py): two models with the all-reduce of
# the packed gradient buckets between them. Each rank trains the same models compiled, eagerly
# with DDP, and (the reference) in one process on the combined batch.
COMPILED = textwrap.dedent('''
    import sys
    import numpy as np
    import onnxgrad as og
    import onnxgrad.distributed as dist
    import onnxgrad.nn.functional as F
    from onnxgrad.distributed import StepMismatchError

    out = sys.argv[1]
    dist.init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    B, STEPS = 4, 5
    DDP = og.nn.parallel.DistributedDataParallel
    saved = {"out": np.array(out)}


    def mlp(seed):
        og.manual_seed(seed)
        return og.nn.Sequential(og.nn.Linear(5, 8), og.nn.Tanh(), og.nn.Linear(8, 3))


    def cnn(seed):
        og.manual_seed(seed)
        return og.nn.Sequential(og.nn.Conv2d(2, 3, 3, padding=1), og.nn.BatchNorm2d(3),
                                og.nn.ReLU(), og.nn.Flatten(), og.nn.Linear(3 * 4 * 4, 3))


    def data(step, shape=(5,)):
        rng = np.random.default_rng(100 + step)
        x = rng.standard_normal((B * world, *shape)).astype(np.float32)
        return x, rng.integers(0, 3, B * world)


    def mine(a, b=B):
        return og.tensor(a[rank * B:rank * B + b])


    def compiled_step(model, opt):
        @og.compile
        def step(x, y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss
        return step


    def eager_step(model, opt, x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss


    OPTS = {"sgd": lambda p: og.optim.SGD(p, lr=0.1, momentum=0.9),
            "adamw": lambda p: og.optim.AdamW(p, lr=0.01)}
    for net, make, shape in (("mlp", mlp, (5,)), ("cnn", cnn, (2, 4, 4))):
        for name, make_opt in OPTS.items():
            key = f"{net}.{name}"
            # Ranks seed differently: DDP must broadcast rank 0's initial parameters.
            ddp, eager, ref = DDP(make(rank)), DDP(make(rank)), make(0)
            opt, eager_opt, ref_opt = (make_opt(m.parameters()) for m in (ddp, eager, ref))
            step = compiled_step(ddp, opt)
            for s in range(STEPS):
                x, y = data(s, shape)
                saved[f"{key}.loss.{s}"] = step(mine(x), mine(y)).numpy()
                saved[f"{key}.eager_loss.{s}"] = eager_step(eager, eager_opt, mine(x), mine(y)).detach().numpy()
                eager_step(ref, ref_opt, og.tensor(x), og.tensor(y))
                if s == 2 and key == "mlp.sgd" and rank == 0:
                    # State is replicated: rank 0 writes (atomically), any world size resumes.
                    og.save({"model": ddp.module.state_dict(), "opt": opt.state_dict()},
                            f"{out}/resume.pt")
            for tag, m in (("compiled", ddp.module), ("eager", eager.module), ("ref", ref)):
                for k, v in m.state_dict().items():
                    saved[f"{key}.{tag}.{k}"] = v.numpy()
            saved[f"{key}.kind"] = np.array(type(step.last).__name__)
            saved[f"{key}.traces"] = np.array(step.traces)
            saved[f"{key}.reduce_count"] = np.array(ddp.reduce_count)
            saved[f"{key}.buckets"] = np.array(ddp.bucket_count)

    # Averaging turned off (an all-reduce that does nothing): the replicas diverge from the
    # combined batch, so the comparisons above can fail.
    ddp, ref = DDP(mlp(0)), mlp(0)


    class NoAverage:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def all_reduce(self, buffer, op="sum"):
            return buffer


    object.__setattr__(ddp, "_collectives", NoAverage(ddp._collectives))
    opt, ref_opt = OPTS["sgd"](ddp.parameters()), OPTS["sgd"](ref.parameters())
    step = compiled_step(ddp, opt)
    for s in range(2):
        x, y = data(s)
        step(mine(x), mine(y))
        eager_step(ref, ref_opt, og.tensor(x), og.tensor(y))
    for k, v in ddp.module.state_dict().items():
        saved[f"noavg.compiled.{k}"] = v.numpy()
        saved[f"noavg.ref.{k}"] = ref.state_dict()[k].numpy()

    # Gradient accumulation: a compiled backward inside no_sync() accumulates locally, the next
    # synchronized one averages the sums (as eager DDP).
    results = {}
    for tag in ("compiled", "eager"):
        ddp = DDP(mlp(rank))
        opt = OPTS["sgd"](ddp.parameters())

        def accumulate(x, y):
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            return loss

        def update(x, y):
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        if tag == "compiled":
            accumulate, update = og.compile(accumulate), og.compile(update)
        for s in range(3):
            x, y = data(s)
            with ddp.no_sync():
                accumulate(mine(x, B // 2), mine(y, B // 2))
            update(og.tensor(x[rank * B + B // 2:(rank + 1) * B]),
                   og.tensor(y[rank * B + B // 2:(rank + 1) * B]))
        for k, v in ddp.module.state_dict().items():
            saved[f"nosync.{tag}.{k}"] = v.numpy()
        saved[f"nosync.{tag}.reduce_count"] = np.array(ddp.reduce_count)

    # Export of a distributed step: rank 0 writes both files after two steps; the steps after it
    # are what the plain onnxruntime + mpi4py loop must reproduce.
    ddp = DDP(cnn(rank))
    opt = OPTS["sgd"](ddp.parameters())
    step = compiled_step(ddp, opt)
    for s in range(5):
        x, y = data(s, (2, 4, 4))
        if s == 2:
            if rank == 0:
                step.export(f"{out}/step.onnx")
            dist.barrier()
        if s >= 2:
            np.savez(f"{out}/data{rank}.{s}.npz", x=x[rank * B:(rank + 1) * B],
                     y=y[rank * B:(rank + 1) * B])
        saved[f"export.loss.{s}"] = step(mine(x), mine(y)).numpy()
    for k, v in ddp.module.state_dict().items():
        saved[f"export.onnxgrad.{k}"] = v.numpy()
    if rank == 0:  # the other export formats split the same way
        step.export(f"{out}/portable.onnx", portable=True)
        step.export(f"{out}/dynamic.onnx", dynamic_batch=True)

    # Mismatched steps across ranks are named on every rank before any all-reduce.
    ddp = DDP(mlp(0))
    opt = OPTS["sgd"](ddp.parameters())
    step = compiled_step(ddp, opt)
    x, y = data(0)
    try:
        n = B - 1 if rank == 1 else B
        step(mine(x, n), mine(y, n))
        saved["mismatch.shape"] = np.array("none")
    except StepMismatchError as exc:
        saved["mismatch.shape"] = np.array(str(exc))
    loss_fn = F.cross_entropy if rank == 0 else (lambda z, t: F.cross_entropy(z * 2, t))


    @og.compile
    def other(x, y):
        opt.zero_grad()
        loss = loss_fn(ddp(x), y)
        loss.backward()
        opt.step()
        return loss


    try:
        other(mine(x), mine(y))
        saved["mismatch.graph"] = np.array("none")
    except StepMismatchError as exc:
        saved["mismatch.graph"] = np.array(str(exc))
    saved["mismatch.after"] = step(mine(x), mine(y)).detach().numpy()  # the ranks are still in step
    dist.barrier()
    np.savez(f"{out}/rank{rank}.npz", **saved)
    dist.destroy_process_group()
''')

# The exported two-file step looped with plain onnxruntime and mpi4py: no onnxgrad import.
PLAIN_LOOP = textwrap.dedent('''
    import json
    import sys

    import numpy as np
    import onnxruntime as ort
    from mpi4py import MPI

    out = sys.argv[1]
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()

    # --- the README loop: two files, the all-reduce of the buckets between them
    grads = ort.InferenceSession(f"{out}/step.onnx", providers=["CPUExecutionProvider"])
    meta = json.loads(grads.get_modelmeta().custom_metadata_map["onnxgrad.allreduce"])
    update = ort.InferenceSession(f"{out}/{meta['files']['update']}",
                                  providers=["CPUExecutionProvider"])
    feeds_for, data_inputs = {}, None
    for session in (grads, update):
        custom = session.get_modelmeta().custom_metadata_map
        feeds_for.update(json.loads(custom["onnxgrad.state"]))  # state output -> input next step
    data_inputs = json.loads(grads.get_modelmeta().custom_metadata_map["onnxgrad.data_inputs"])
    state = {}  # step 0 runs on the defaults in the files


    def run(session, values):
        names = [i.name for i in session.get_inputs() + session.get_overridable_initializers()]
        outputs = [o.name for o in session.get_outputs()]
        return dict(zip(outputs, session.run(outputs, {n: values[n] for n in names if n in values})))


    saved = {}
    for s in range(2, 5):
        batch = np.load(f"{out}/data{rank}.{s}.npz")
        for name in meta["broadcast_from_rank0"]:  # BatchNorm statistics: rank 0's, as DDP
            if name in state:
                comm.Bcast(state[name], root=0)
        values = {**dict(zip(data_inputs, (batch["x"], batch["y"]))), **state}
        results = run(grads, values)
        for bucket in meta["buckets"]:  # the averaged gradients
            comm.Allreduce(MPI.IN_PLACE, results[bucket["name"]])
            results[bucket["name"]] /= world
        results.update(run(update, {**values, **results}))
        state = {feeds_for[name]: results[name] for name in feeds_for}
        saved[f"loss.{s}"] = results["output"]
    # ---
    for name, value in state.items():
        saved[f"state.{name}"] = value
    np.savez(f"{out}/plain{rank}.npz", **saved)
''')


@pytest.fixture(scope="module", params=[2, 3])
def compiled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> list[dict[str, np.ndarray]]:
    n = request.param
    tmp = tmp_path_factory.mktemp(f"compiled{n}")
    done = _launch(tmp, COMPILED, n, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return [dict(np.load(tmp / f"rank{r}.npz")) for r in range(n)]


def _state(saved: dict, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_compiled_ddp_step_equals_eager_ddp(compiled: list[dict], net: str, opt: str) -> None:
    key = f"{net}.{opt}"
    for saved in compiled:
        assert str(saved[f"{key}.kind"]) == "SplitProgram" and int(saved[f"{key}.traces"]) == 1
        assert int(saved[f"{key}.reduce_count"]) == 5 and int(saved[f"{key}.buckets"]) == 1
        mine, eager = _state(saved, f"{key}.compiled."), _state(saved, f"{key}.eager.")
        assert len(mine) == (4 if net == "mlp" else 9)
        for k, v in mine.items():
            # The same kernels, the same all-reduce: bit-identical to eager DDP.
            np.testing.assert_array_equal(v, eager[k], err_msg=k)
            if "running_" not in k:  # BatchNorm statistics are local, as DDP's
                np.testing.assert_array_equal(v, compiled[0][f"{key}.compiled.{k}"], err_msg=k)
        for s in range(5):
            np.testing.assert_array_equal(saved[f"{key}.loss.{s}"], saved[f"{key}.eager_loss.{s}"])


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_compiled_ddp_step_equals_one_process_at_combined_batch(compiled: list[dict],
                                                               opt: str) -> None:
    for saved in compiled:
        mine, ref = _state(saved, f"mlp.{opt}.compiled."), _state(saved, f"mlp.{opt}.ref.")
        for k, v in mine.items():
            np.testing.assert_allclose(v, ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_compiled_ddp_without_averaging_diverges(compiled: list[dict]) -> None:
    # The check above fails when the all-reduce does not average: the ranks' data differ.
    for saved in compiled:
        mine, ref = _state(saved, "noavg.compiled."), _state(saved, "noavg.ref.")
        assert max(np.abs(v - ref[k]).max() for k, v in mine.items()) > 1e-3


def test_compiled_no_sync_accumulates_then_averages(compiled: list[dict]) -> None:
    for saved in compiled:
        mine, eager = _state(saved, "nosync.compiled."), _state(saved, "nosync.eager.")
        assert int(mine.pop("reduce_count")) == int(eager.pop("reduce_count")) == 3
        for k, v in mine.items():
            np.testing.assert_array_equal(v, eager[k], err_msg=k)


def test_mismatched_compiled_steps_are_named_on_every_rank(compiled: list[dict]) -> None:
    for r, saved in enumerate(compiled):
        shape, graph = str(saved["mismatch.shape"]), str(saved["mismatch.graph"])
        assert "do not run the same DistributedDataParallel step" in shape, shape
        if r == 1:
            assert "input 'x' is float32[3, 5] on rank 1 but float32[4, 5] on rank 0" in shape
        else:
            assert "input 'x' is float32[4, 5] on rank" in shape and "float32[3, 5]" in shape
        assert "the traced graphs differ" in graph, graph
        # Every rank raised at the same point: the next step runs in step on all of them.
        assert np.isfinite(saved["mismatch.after"])


def test_exported_step_loops_in_plain_onnxruntime_with_mpi(compiled: list[dict]) -> None:
    import onnx

    out = Path(str(compiled[0]["out"]))
    model = onnx.load(out / "step.onnx")
    meta = {p.key: p.value for p in model.metadata_props}
    layout = json.loads(meta["onnxgrad.allreduce"])
    assert layout["files"] == {"gradients": "step.onnx", "update": "step.update.onnx"}
    assert [b["name"] for b in layout["buckets"]] == ["bucket.0"]
    params = layout["buckets"][0]["parameters"]
    assert params[0] == {"parameter": "module.4.bias", "shape": [3], "offset": 0, "numel": 3}
    assert sum(p["numel"] for p in params) == layout["buckets"][0]["numel"] == 210
    assert sorted(layout["broadcast_from_rank0"]) == [
        "module.1.num_batches_tracked", "module.1.running_mean", "module.1.running_var"]
    update = onnx.load(out / "step.update.onnx")
    assert "bucket.0" in {i.name for i in update.graph.input}
    assert "bucket.0" in {o.name for o in model.graph.output}
    done = _launch(out, PLAIN_LOOP, len(compiled), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for r, saved in enumerate(compiled):
        plain = dict(np.load(out / f"plain{r}.npz"))
        for s in range(2, 5):
            np.testing.assert_array_equal(plain[f"loss.{s}"], saved[f"export.loss.{s}"])
        for k, v in _state(saved, "export.onnxgrad.").items():
            np.testing.assert_array_equal(plain[f"state.module.{k}"], v, err_msg=k)


def test_exported_step_other_formats(compiled: list[dict]) -> None:
    import onnx

    out = Path(str(compiled[0]["out"]))
    for stem in ("portable", "dynamic"):
        gradients, update = onnx.load(out / f"{stem}.onnx"), onnx.load(out / f"{stem}.update.onnx")
        meta = json.loads({p.key: p.value for p in gradients.metadata_props}
                          ["onnxgrad.allreduce"])
        assert meta["files"] == {"gradients": f"{stem}.onnx", "update": f"{stem}.update.onnx"}
        assert "bucket.0" in {i.name for i in update.graph.input}
    assert (out / "portable.safetensors").exists() and (out / "portable.update.safetensors").exists()
    x = next(i for i in onnx.load(out / "dynamic.onnx").graph.input if i.name == "x")
    assert x.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_compiled_checkpoint_resumes_with_another_world_size(compiled: list[dict]) -> None:
    # Saved by rank 0 after 3 compiled steps on N ranks; 2 more compiled steps in one process
    # at the combined batch give the parameters of the one-process run of 5 steps.
    import onnxgrad.nn.functional as F

    n = len(compiled)
    out = Path(str(compiled[0]["out"]))
    model = og.nn.Sequential(og.nn.Linear(5, 8), og.nn.Tanh(), og.nn.Linear(8, 3))
    opt = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoint = og.load(out / "resume.pt")
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])

    @og.compile
    def step(x: og.Tensor, y: og.Tensor) -> og.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for s in (3, 4):
        rng = np.random.default_rng(100 + s)
        x = rng.standard_normal((4 * n, 5)).astype(np.float32)
        step(og.tensor(x), og.tensor(rng.integers(0, 3, 4 * n)))
    ref = _state(compiled[0], "mlp.sgd.ref.")
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v.numpy(), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


UNCAUGHT_MISMATCH = textwrap.dedent('''
    import time
    import onnxgrad as og
    import onnxgrad.distributed as dist

    dist.init_process_group()
    ddp = og.nn.parallel.DistributedDataParallel(og.nn.Linear(3, 2))
    opt = og.optim.SGD(ddp.parameters(), lr=0.1)

    @og.compile
    def step(x):
        opt.zero_grad()
        loss = ddp(x).sum()
        loss.backward()
        opt.step()
        return loss

    step(og.randn(4 + dist.get_rank(), 3))  # raises on every rank: MPI aborts the job
    time.sleep(60)
''')


def test_mismatched_compiled_steps_end_the_job(tmp_path: Path) -> None:
    done = _launch(tmp_path, UNCAUGHT_MISMATCH, 2, timeout=60)
    assert done.returncode != 0
    assert "StepMismatchError" in done.stderr and "input 'x' is float32[" in done.stderr


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


# --------------------------------------------------------------------------- split steps, one process
class _TwinCollectives(LocalCollectives):
    """A world of two identical processes simulated by one: the average of equal buffers is the
    buffer, so a split step must give what the unsplit step gives (runs without MPI)."""

    world_size = 2

    def __init__(self) -> None:
        self.calls: list[str] = []

    def all_reduce(self, buffer: np.ndarray, op: str = "sum") -> np.ndarray:
        self.calls.append(f"all_reduce {buffer.size}")
        return buffer

    def broadcast(self, buffer: np.ndarray, src: int = 0) -> np.ndarray:
        self.calls.append(f"broadcast {buffer.size}")
        return buffer

    def all_gather(self, buffer: np.ndarray) -> np.ndarray:
        self.calls.append("all_gather")
        return np.stack([buffer, buffer])


def test_split_step_in_one_process_equals_the_unsplit_step(group: None) -> None:
    import onnxgrad.nn.functional as F

    def make() -> og.nn.Module:
        og.manual_seed(0)
        return og.nn.Sequential(og.nn.Conv2d(1, 2, 3), og.nn.BatchNorm2d(2), og.nn.ReLU(),
                                og.nn.Flatten(), og.nn.Linear(8, 3))

    from onnxgrad.nn.parallel import _buckets

    twin = _TwinCollectives()
    ddp = og.nn.parallel.DistributedDataParallel(make(), bucket_cap_mb=1e-4)  # 3 buckets
    object.__setattr__(ddp, "_collectives", twin)
    plain = make()
    rng = np.random.default_rng(0)
    xs = [og.tensor(rng.standard_normal((4, 1, 4, 4)).astype(np.float32)) for _ in range(3)]
    y = og.tensor([0, 1, 2, 0])
    losses = {}

    def make_step(model: og.nn.Module) -> Any:
        opt = og.optim.AdamW(model.parameters(), lr=0.01)

        @og.compile
        def step(x: og.Tensor, y: og.Tensor) -> og.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            for p in model.parameters():  # the update model reads a forward value
                p.grad = p.grad * (1 + loss.detach())
            og.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            return loss

        return step

    for tag, model in (("split", ddp), ("plain", plain)):
        step = make_step(model)
        losses[tag] = [step(x, y).detach().numpy() for x in xs]
        assert type(step.last).__name__ == ("SplitProgram" if tag == "split" else "Program")
    np.testing.assert_allclose(losses["split"], losses["plain"], rtol=1e-6)
    for (k, a), b in zip(ddp.module.state_dict().items(), plain.state_dict().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)
        if k.endswith("weight"):
            grad = dict(ddp.module.named_parameters())[k].grad
            np.testing.assert_allclose(grad.numpy(), dict(plain.named_parameters())[k]
                                       .grad.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)
    # Per step: the same-step check, rank 0's BatchNorm buffers (one message per dtype), then
    # one all-reduce per bucket.
    per_step = twin.calls[:len(twin.calls) // 3]
    assert per_step[0] == "all_gather" and per_step[1:3] == ["broadcast 4", "broadcast 1"]
    buckets = _buckets(list(ddp.module.parameters()), ddp.bucket_cap_bytes)
    assert len(buckets) == 3 and sum(len(b) for b in buckets) == 6
    assert [c for c in per_step if c.startswith("all_reduce")] == [
        f"all_reduce {sum(p.numel() for p in b)}" for b in buckets]
    assert ddp.reduce_count == 3 and ddp.bucket_count == 3


def test_split_model_pass() -> None:
    import onnx
    from onnx import TensorProto, helper
    from onnxgrad.passes.split import SplitError, split_model

    def v(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [2])

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["g"]),
         helper.make_node("Neg", ["x"], ["f"]),            # made in A, read by B only
         helper.make_node("Add", ["g.avg", "f"], ["u"]),
         helper.make_node("Sub", ["w", "u"], ["w.new"])],
        "step", [v("x"), v("w"), v("g.avg")], [v("g"), v("w.new")], value_info=[v("f"), v("u")])
    model = helper.make_model(graph)
    a, b, links = split_model(model, {"g.avg": "g"})
    assert [n.op_type for n in a.graph.node] == ["Mul"]
    assert [n.op_type for n in b.graph.node] == ["Neg", "Add", "Sub"]  # Neg feeds B only
    assert [i.name for i in b.graph.input] == ["g", "x", "w"] and links == ["g"]
    assert [o.name for o in a.graph.output] == ["g"]
    onnx.checker.check_model(a, full_check=True)
    onnx.checker.check_model(b, full_check=True)
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["x", "g.avg"], ["g"])], "bad", [v("x"), v("g.avg")], [v("g")]))
    with pytest.raises(SplitError, match="depends on an averaged bucket"):
        split_model(bad, {"g.avg": "g"})
