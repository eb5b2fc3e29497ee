"""``og.save`` / ``og.load`` in PyTorch's own format (``.pth``, ``.pt``, file objects).

Checked against PyTorch both ways: what ``torch.save`` writes, ``og.load`` reads (state dicts
of Linear, Conv2d, BatchNorm2d and resnet18 give the same outputs in onnxgrad; optimizer states
resume the same), and what ``og.save`` writes, ``torch.load(weights_only=True)`` reads. A pickle
asking for anything but tensor data is refused, naming the global, and never run.
"""
from __future__ import annotations

import io
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from onnxgrad.runtime.checkpoint import CheckpointError

import onnxgrad as og
from onnxgrad.serialization import UnsafeCheckpointError

torch = pytest.importorskip("torch")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def _np(t: og.Tensor) -> np.ndarray:
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _torch_tensor(dtype: torch.dtype, shape: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


# --------------------------------------------------------------------------- torch -> og
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_tensors_of_every_dtype_load(tmp_path: Path, dtype: torch.dtype) -> None:
    state = {"t": _torch_tensor(dtype), "scalar": _torch_tensor(dtype, ()),
             "empty": _torch_tensor(dtype, (0, 3))}
    torch.save(state, tmp_path / "t.pth")
    loaded = og.load(tmp_path / "t.pth")
    for key, value in state.items():
        assert loaded[key].dtype == value.numpy().dtype, key
        assert loaded[key].shape == tuple(value.shape), key
        np.testing.assert_array_equal(loaded[key].numpy(), value.numpy())


def test_bfloat16_loads_as_float32_with_a_warning(tmp_path: Path) -> None:
    t = torch.randn(4, 5).to(torch.bfloat16)
    torch.save({"b": t}, tmp_path / "b.pt")
    with pytest.warns(UserWarning, match="bfloat16 tensors are loaded as float32"):
        loaded = og.load(tmp_path / "b.pt")
    assert loaded["b"].dtype == np.float32
    np.testing.assert_array_equal(loaded["b"].numpy(), t.float().numpy())


def test_views_offsets_and_shared_storages(tmp_path: Path) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    views = {"base": base, "t": base.t(), "slice": base[1:, 2:5], "step": base[::2, ::3],
             "row": base[2], "expand": torch.arange(3.0).expand(4, 3),
             "permute": torch.arange(24).reshape(2, 3, 4).permute(2, 0, 1)}
    torch.save(views, tmp_path / "v.pth")
    loaded = og.load(tmp_path / "v.pth")
    for key, value in views.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value.contiguous().numpy())
    # Views of one storage load as separate tensors (onnxgrad tensors own their data).
    with zipfile.ZipFile(tmp_path / "v.pth") as z:
        assert sum("/data/" in n for n in z.namelist()) == 3  # base, expand, permute


def test_containers_numbers_strings_and_file_objects() -> None:
    obj = {"list": [1, 2.5, "s", None, True, b"\x00\xff"], "tuple": (1, (2, 3)),
           "od": OrderedDict(a=torch.ones(2)), "set": {1, 2}, "big": 2**70, "neg": -5,
           "float": float("inf"), 7: "int key", "nested": {"t": [torch.zeros(1)]}}
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    loaded = og.load(buf)
    assert loaded["list"] == [1, 2.5, "s", None, True, b"\x00\xff"]
    assert loaded["tuple"] == (1, (2, 3)) and loaded["set"] == {1, 2}
    assert type(loaded["od"]) is OrderedDict and loaded["od"]["a"].tolist() == [1.0, 1.0]
    assert loaded["big"] == 2**70 and loaded["neg"] == -5 and loaded["float"] == float("inf")
    assert loaded[7] == "int key" and loaded["nested"]["t"][0].shape == (1,)


def test_state_dicts_of_torch_modules_give_the_same_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pairs = [(torch.nn.Linear(5, 3), og.nn.Linear(5, 3), (4, 5)),
             (torch.nn.Conv2d(3, 4, 3, padding=1), og.nn.Conv2d(3, 4, 3, padding=1),
              (2, 3, 6, 6))]
    bn_t, bn_o = torch.nn.BatchNorm2d(4), og.nn.BatchNorm2d(4)
    bn_t(torch.randn(8, 4, 3, 3) * 3 + 1)  # running statistics and num_batches_tracked move
    bn_t.eval()
    bn_o.eval()
    pairs.append((bn_t, bn_o, (2, 4, 3, 3)))
    for i, (theirs, ours, shape) in enumerate(pairs):
        torch.save(theirs.state_dict(), tmp_path / f"m{i}.pth")
        state = og.load(tmp_path / f"m{i}.pth")
        ours.load_state_dict(state)
        x = np.random.default_rng(i).standard_normal(shape).astype(np.float32)
        expected = theirs(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(_np(ours(og.tensor(x))), expected, rtol=1e-5, atol=1e-5)
    assert bn_o.state_dict()["num_batches_tracked"].tolist() == 1


def test_resnet18_weights_saved_by_torch_load_into_og_models(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from torch_reference import torch_resnet
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    theirs = torch_resnet("resnet18", num_classes=10).eval()
    torch.save(theirs.state_dict(), tmp_path / "resnet18.pth")
    ours = og.models.resnet18(num_classes=10)
    ours.load_state_dict(og.load(tmp_path / "resnet18.pth", map_location="cpu",
                                 weights_only=True))
    ours.eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with og.no_grad():
        got = _np(ours(og.tensor(x)))
    np.testing.assert_allclose(got, theirs(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_torch_optimizer_state_resumes_the_same(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    t_model = torch.nn.Linear(4, 3)
    o_model = og.nn.Linear(4, 3)
    o_model.load_state_dict({k: v.detach().numpy() for k, v in t_model.state_dict().items()})
    kwargs = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.01}
    t_opt = getattr(torch.optim, name)(t_model.parameters(), **kwargs)
    x = torch.randn(6, 4)
    for _ in range(2):
        t_opt.zero_grad()
        (t_model(x) ** 2).sum().backward()
        t_opt.step()
    torch.save(t_model.state_dict(), tmp_path / "model.pt")
    torch.save(t_opt.state_dict(), tmp_path / "opt.pt")
    o_model.load_state_dict(og.load(tmp_path / "model.pt"))
    o_opt = getattr(og.optim, name)(o_model.parameters(), **kwargs)
    o_opt.load_state_dict(og.load(tmp_path / "opt.pt"))
    # One more step on both: the same result only if the momentum / moments were resumed.
    t_opt.zero_grad()
    (t_model(x) ** 2).sum().backward()
    t_opt.step()
    o_opt.zero_grad()
    (o_model(og.tensor(x.numpy())) ** 2).sum().backward()
    o_opt.step()
    np.testing.assert_allclose(_np(o_model.weight), t_model.weight.detach().numpy(),
                               rtol=1e-5, atol=1e-6)


def test_og_load_does_not_import_torch(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "w.pth")
    code = ("import sys, onnxgrad as og; sd = og.load(sys.argv[1]); "
            "assert 'torch' not in sys.modules; print(sd['w'].tolist())")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w.pth")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[1.0, 1.0, 1.0]"


# --------------------------------------------------------------------------- og -> torch
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ""])
def test_og_files_load_in_torch_with_weights_only(tmp_path: Path, suffix: str) -> None:
    model = og.nn.Sequential(og.nn.Conv2d(3, 4, 3), og.nn.BatchNorm2d(4))
    state = model.state_dict()
    path = tmp_path / f"model{suffix}"
    og.save(state, path)
    with zipfile.ZipFile(path) as z:  # storages aligned as torch aligns them (mmap)
        for info in z.infolist():
            if "/data/" in info.filename:
                assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0
    theirs = torch.load(path, weights_only=True)
    assert list(theirs) == list(state)
    for key, value in state.items():
        np.testing.assert_array_equal(theirs[key].numpy(), np.asarray(value.numpy()))
        assert theirs[key].dtype == torch.from_numpy(np.asarray(value.numpy())).dtype
    # The torch module takes it, and onnxgrad reads its own file back.
    torch_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch_model.load_state_dict(theirs)
    again = og.load(path)
    for key, value in state.items():
        np.testing.assert_array_equal(again[key].numpy(), value.numpy())
    torch.load(path, weights_only=True, mmap=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64, np.int32,
                                   np.int16, np.int8, np.uint8, np.bool_])
def test_og_tensors_of_every_dtype_round_trip_through_torch(dtype: type) -> None:
    array = (np.arange(12).reshape(3, 4) % 3).astype(dtype)
    obj = {"t": og.tensor(array), "np": array[::2], "0d": og.tensor(array[0, 1]),
           "empty": og.tensor(array[:0]), "n": np.float32(1.5), "i": np.int64(3),
           "mixed": [1, 2.5, "x", None, (True, b"by")], 3: OrderedDict(a=1)}
    buf = io.BytesIO()
    og.save(obj, buf)
    buf.seek(0)
    theirs = torch.load(buf, weights_only=True)
    np.testing.assert_array_equal(theirs["t"].numpy(), array)
    np.testing.assert_array_equal(theirs["np"].numpy(), array[::2])
    assert theirs["0d"].shape == () and theirs["empty"].shape == (0, 4)
    assert theirs["n"] == 1.5 and theirs["i"] == 3 and type(theirs["i"]) is int
    assert theirs["mixed"] == [1, 2.5, "x", None, (True, b"by")]
    assert theirs[3] == OrderedDict(a=1) and type(theirs[3]) is OrderedDict
    buf.seek(0)
    ours = og.load(buf)
    np.testing.assert_array_equal(ours["t"].numpy(), array)
    assert ours["mixed"] == [1, 2.5, "x", None, (True, b"by")]


def test_tied_tensors_share_one_storage_and_parameters_keep_requires_grad() -> None:
    lin = og.nn.Linear(3, 3)
    buf = io.BytesIO()
    og.save({"a": lin.weight, "b": lin.weight, "bias": lin.bias.detach()}, buf)
    buf.seek(0)
    theirs = torch.load(buf, weights_only=True)
    assert theirs["a"].data_ptr() == theirs["b"].data_ptr()
    assert theirs["a"].requires_grad and not theirs["bias"].requires_grad
    buf.seek(0)
    ours = og.load(buf)
    assert ours["a"].requires_grad and not ours["bias"].requires_grad


def test_og_optimizer_state_loads_in_torch(tmp_path: Path) -> None:
    model = og.nn.Linear(4, 2)
    opt = og.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(og.ones(3, 4)).sum().backward()
    opt.step()
    og.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    t_model = torch.nn.Linear(4, 2)
    t_model.load_state_dict(ckpt["model"])
    t_opt = torch.optim.SGD(t_model.parameters(), lr=0.1, momentum=0.9)
    t_opt.load_state_dict(ckpt["optim"])
    assert t_opt.state_dict()["param_groups"][0]["lr"] == 0.1
    buf = t_opt.state_dict()["state"][0]["momentum_buffer"]
    np.testing.assert_array_equal(buf.numpy(), opt.state_dict()["state"][0]["momentum_buffer"])


# --------------------------------------------------------------------------- refusals
class _Exploit:
    def __reduce__(self):  # what a malicious .pth holds: a call of os.system
        import os

        return (os.system, ("echo pwned > pwned.txt",))


def _zip_with_pickle(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("weights_only", [True, False])
def test_a_pickle_calling_os_system_is_refused_and_not_run(tmp_path: Path, weights_only: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    _zip_with_pickle(path, pickle.dumps({"w": _Exploit()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError) as info:
        og.load(path, weights_only=weights_only)
    message = str(info.value)
    assert "'posix.system'" in message or "'nt.system'" in message
    assert str(path) in message and "would run code" in message
    assert ("weights_only=False does not change this" in message) == (not weights_only)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not (tmp_path / "pwned.txt").exists()
    # The same pickle in a file object, and with protocol 4's STACK_GLOBAL.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps([_Exploit()], protocol=4))
    buf.seek(0)
    with pytest.raises(UnsafeCheckpointError, match=r"system"):
        og.load(buf)
    assert not (tmp_path / "pwned.txt").exists()


def test_a_whole_torch_module_is_refused_naming_its_class(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")
    with pytest.raises(UnsafeCheckpointError,
                       match=r"'torch\.nn\.modules\.linear\.Linear'.*state dicts"):
        og.load(tmp_path / "model.pth")


def test_legacy_format_loads(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = OrderedDict(w=base, t=base.t(), tail=base[1:, 2:], half=torch.ones(2).half(),
                        n=torch.tensor(5), b=torch.rand(3) > 2, bf=torch.ones(2).bfloat16())
    model = torch.nn.Linear(3, 2)
    torch.save({"state": state, "lin": model.state_dict(), "meta": [1, "x", (2.5,)]},
               tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.warns(UserWarning, match="bfloat16"):
        loaded = og.load(tmp_path / "old.pth")
    for key, value in state.items():
        np.testing.assert_array_equal(loaded["state"][key].numpy(),
                                      value.float().numpy() if key == "bf" else value.numpy())
    assert type(loaded["state"]) is OrderedDict and loaded["meta"] == [1, "x", (2.5,)]
    lin = og.nn.Linear(3, 2)
    lin.load_state_dict(loaded["lin"])
    np.testing.assert_array_equal(lin.weight.detach().numpy(), model.weight.detach().numpy())
    buf = io.BytesIO((tmp_path / "old.pth").read_bytes())
    assert og.load(buf)["meta"] == [1, "x", (2.5,)]
    data = (tmp_path / "old.pth").read_bytes()
    for cut in (20, len(data) // 2, len(data) - 3):
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            og.load(tmp_path / "cut.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth",
               _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        og.load(tmp_path / "module.pth")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="zip format only"):
        og.save({}, tmp_path / "x.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(TypeError, match=r"cannot save values of type object \(at a\.0\)"):
        og.save({"a": [object()]}, tmp_path / "x.pth")
    with pytest.raises(TypeError, match=r"arrays of dtype <U1 \(at s\)"):
        og.save({"s": np.array(["a"])}, tmp_path / "x.pth")
    with pytest.raises(TypeError, match=r"type Linear \(it has a state_dict\) \(at the top "
                                        r"level\).*save its state_dict\(\)"):
        og.save(og.nn.Linear(2, 2), tmp_path / "x.pth")
    with pytest.raises(TypeError, match="a path or a binary file object"):
        og.save({}, 3)
    assert not list(tmp_path.glob("x.pth*")) and not list(tmp_path.glob(".x.pth*"))
