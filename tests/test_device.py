"""Devices: og.device, og.cuda, og.accelerator, device= on factories, .to/.cpu/.cuda, Module.to.

The rule (tracer/device.py): one compute device per process, ONNX Runtime's execution providers;
``cuda`` requests fail where ONNX Runtime has no CUDAExecutionProvider, as PyTorch's CPU build.
"""
from __future__ import annotations

import pickle

import numpy as np
import onnxruntime as ort
import pytest

import onnxgrad as og

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only answers")


# --------------------------------------------------------------------------- og.device
@pytest.mark.parametrize("spec", ["cpu", "cuda", "cuda:0", "cuda:1", "cpu:0", "meta"])
def test_device_parses_as_torch(spec: str) -> None:
    torch = pytest.importorskip("torch")
    mine, theirs = og.device(spec), torch.device(spec)
    assert (mine.type, mine.index) == (theirs.type, theirs.index)
    assert repr(mine) == repr(theirs)
    assert str(mine) == str(theirs)


@pytest.mark.parametrize("spec", ["foo", "CUDA", "cuda:-1", "cuda:x", " cpu", "cuda:01"])
def test_bad_device_strings_raise_torchs_error(spec: str) -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(RuntimeError) as theirs:
        torch.device(spec)
    with pytest.raises(RuntimeError) as mine:
        og.device(spec)
    assert str(mine.value) == str(theirs.value)


def test_device_forms_equality_and_hash() -> None:
    assert og.device("cuda", 0) == og.device("cuda:0") == og.device(og.device("cuda:0"))
    assert og.device("cuda") != og.device("cuda:0")  # no index is not index 0, as PyTorch
    assert og.device("cpu") != "cpu"  # PyTorch 2.13: a device never equals a string
    assert og.device(0) == og.device("cuda:0")
    assert len({og.device("cpu"), og.device("cpu"), og.device("cuda")}) == 2
    assert repr(og.device("cuda", 0)) == "device(type='cuda', index=0)"
    assert pickle.loads(pickle.dumps(og.device("cuda:0"))) == og.device("cuda:0")
    with pytest.raises(RuntimeError, match="Device index must not be negative"):
        og.device("cuda", -1)
    with pytest.raises(RuntimeError, match="must not include an index"):
        og.device("cuda:0", 1)
    with pytest.raises(TypeError, match="invalid combination of arguments"):
        og.device(3.5)


# --------------------------------------------------------------------------- availability
def test_cuda_and_accelerator_follow_onnxruntime() -> None:
    assert og.cuda.is_available() is HAS_CUDA
    assert og.cuda.device_count() == (1 if HAS_CUDA else 0)
    assert og.accelerator.is_available() is HAS_CUDA
    expected = og.device("cuda") if HAS_CUDA else None
    assert og.accelerator.current_accelerator() == expected
    og.cuda.manual_seed(0)  # ignored without CUDA, as PyTorch
    og.cuda.manual_seed_all(0)


@cpu_only
def test_tensors_live_on_cpu() -> None:
    torch = pytest.importorskip("torch")
    t = og.ones(2)
    assert t.device == og.device("cpu")
    assert repr(t.device) == repr(torch.ones(2).device) == "device(type='cpu')"
    assert not t.is_cuda and t.get_device() == torch.ones(2).get_device() == -1


CUDA_USES = {
    "zeros": lambda: og.zeros(2, device="cuda"),
    "randn": lambda: og.randn(2, 3, device="cuda:0"),
    "full": lambda: og.full((2,), 1.0, device=og.device("cuda")),
    "tensor": lambda: og.tensor([1.0], device="cuda"),
    "arange": lambda: og.arange(3, device="cuda"),
    "linspace": lambda: og.linspace(0, 1, 3, device="cuda"),
    "zeros_like": lambda: og.zeros_like(og.ones(2), device="cuda"),
    "to": lambda: og.ones(2).to("cuda"),
    "to-kw": lambda: og.ones(2).to(device="cuda", dtype=og.float64),
    "cuda()": lambda: og.ones(2).cuda(),
    "type": lambda: og.ones(2).type("torch.cuda.FloatTensor"),
    "module": lambda: og.nn.Linear(2, 2).to("cuda"),
    "module.cuda()": lambda: og.nn.Linear(2, 2).cuda(),
    "current_device": lambda: og.cuda.current_device(),
}


@cpu_only
@pytest.mark.parametrize("use", list(CUDA_USES), ids=list(CUDA_USES))
def test_cuda_without_a_gpu_raises_what_torch_users_catch(use: str) -> None:
    with pytest.raises(AssertionError, match="CUDAExecutionProvider") as info:
        CUDA_USES[use]()
    assert isinstance(info.value, RuntimeError)  # PyTorch's CUDA build says RuntimeError
    assert "onnxruntime-gpu" in str(info.value)


def test_torch_program_device_idiom_runs() -> None:
    # The tutorials' idiom: pick a device, move the model and the data, compute.
    device = (og.accelerator.current_accelerator().type if og.accelerator.is_available()
              else "cpu")
    model = og.nn.Linear(3, 2).to(device)
    x = og.randn(4, 3, device=device)
    y = model(x.to(device))
    assert y.device == x.device == og.device(device) or HAS_CUDA
    assert y.shape == (4, 2)


def test_other_device_types_are_refused() -> None:
    with pytest.raises(RuntimeError, match="cpu or cuda"):
        og.zeros(2, device="meta")
    with pytest.raises(RuntimeError, match="cpu or cuda"):
        og.ones(2).to("mps")


# --------------------------------------------------------------------------- Tensor.to
def test_to_returns_self_when_nothing_changes_as_torch() -> None:
    torch = pytest.importorskip("torch")
    t, tt = og.ones(2), torch.ones(2)
    for args, kwargs in [(("cpu",), {}), ((og.device("cpu"),), {}), ((og.float32,), {}),
                         (("cpu", og.float32), {}), ((), {"dtype": og.float32}),
                         ((), {"device": "cpu"}), ((og.zeros(1),), {})]:
        targs = tuple(_torchify(torch, a) for a in args)
        tkwargs = {k: _torchify(torch, v) for k, v in kwargs.items()}
        assert (t.to(*args, **kwargs) is t) == (tt.to(*targs, **tkwargs) is tt) is True
    assert t.to(og.float32, copy=True) is not t
    assert tt.to(torch.float32, copy=True) is not tt


def _torchify(torch, value):
    if isinstance(value, og.dtype):
        return getattr(torch, str(value).split(".")[1])
    if isinstance(value, og.device):
        return torch.device(str(value))
    if isinstance(value, og.Tensor):
        return torch.as_tensor(value.numpy())
    return value


def test_to_casts_records_and_keeps_gradients() -> None:
    x = og.tensor([1.5, -2.0], requires_grad=True)
    y = x.to(og.float64)
    assert y.dtype == og.float64 and y.grad_fn is not None
    z = x.to("cpu", og.float64)
    w = x.to(og.zeros(1, dtype=og.float64))
    (y.sum() + z.sum() * 2 + w.sum() * 3).backward()
    np.testing.assert_array_equal(x.grad.numpy(), [6.0, 6.0])
    c = x.to(copy=True)
    assert c is not x and c.grad_fn is not None
    assert x.to(np.float64).dtype == og.float64  # NumPy dtypes keep working
    assert og.tensor([1.7]).to(og.int64).tolist() == [1]
    assert x.to("cpu", non_blocking=True) is x
    assert x.to(og.float64, True).dtype == og.float64  # to(dtype, non_blocking)


def test_to_bad_arguments() -> None:
    t = og.ones(2)
    with pytest.raises(RuntimeError, match="Invalid device string: 'float32'"):
        t.to("float32")  # a string is a device, as PyTorch
    with pytest.raises(RuntimeError, match="Expected one of cpu, cuda"):
        t.to("double")
    with pytest.raises(TypeError, match="neither a device nor a dtype"):
        t.to(3.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'dtyp'"):
        t.to(dtyp=og.float64)


def test_cpu_returns_self() -> None:
    t = og.ones(2)
    assert t.cpu() is t


# --------------------------------------------------------------------------- Module.to
def test_module_to_device_and_dtype() -> None:
    model = og.nn.Sequential(og.nn.Linear(3, 4), og.nn.Flatten(), og.nn.BatchNorm2d(4))
    weight = model[0].weight
    assert model.to("cpu") is model and model[0].weight is weight
    assert model.to(og.device("cpu"), og.float64) is model
    assert model[0].weight.dtype == og.float64 and model[0].weight is weight
    assert model[2].running_mean.dtype == og.float64
    assert model[2].num_batches_tracked.dtype == og.int64  # integers stay, as PyTorch
    model.to(dtype=og.float32)
    assert model[0].weight.dtype == og.float32
    model.to(og.zeros(1, dtype=og.float64))
    assert model[0].weight.dtype == og.float64
    assert model.cpu() is model
    assert model.half()[0].weight.dtype == og.float16
    with pytest.raises(TypeError, match="floating point"):
        model.to(og.int64)
