"""``onnxgrad.models``: torchvision's structure and names, init, weight files, the tutorial, and
the issue's bad-input errors (with the layer or key named in each message)."""
from __future__ import annotations

import builtins
import math
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnxgrad.models import (
    load_weights,
    mlp,
    read_state,
    resnet18,
    resnet34,
    resnet50,
    save_weights,
)
from onnxgrad.runtime.checkpoint import CheckpointError
from onnxgrad.tracer import autograd

import onnxgrad as og
from onnxgrad import nn

# torchvision's state_dict key counts (parameters + running_mean/var/num_batches_tracked).
KEY_COUNTS = {"resnet18": 122, "resnet34": 218, "resnet50": 320}
PARAM_COUNTS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
SAMPLE_KEYS = {
    "resnet18": [("conv1.weight", (64, 3, 7, 7)), ("bn1.running_var", (64,)),
                 ("layer1.0.conv1.weight", (64, 64, 3, 3)), ("layer1.1.bn2.bias", (64,)),
                 ("layer2.0.downsample.0.weight", (128, 64, 1, 1)),
                 ("layer2.0.downsample.1.num_batches_tracked", ()),
                 ("layer4.1.conv2.weight", (512, 512, 3, 3)), ("fc.weight", (1000, 512)),
                 ("fc.bias", (1000,))],
    "resnet34": [("layer3.5.conv2.weight", (256, 256, 3, 3)),
                 ("layer4.0.downsample.1.running_mean", (512,)), ("fc.weight", (1000, 512))],
    "resnet50": [("layer1.0.conv3.weight", (256, 64, 1, 1)),
                 ("layer1.0.downsample.0.weight", (256, 64, 1, 1)),
                 ("layer2.0.conv2.weight", (128, 128, 3, 3)),  # V1.5: the stride is here
                 ("layer4.2.bn3.running_var", (2048,)), ("fc.weight", (1000, 2048))],
}
BUILDERS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


@pytest.fixture(scope="module")
def r18():
    og.manual_seed(0)
    return resnet18()


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_state_dict_matches_torchvision(name: str) -> None:
    model = BUILDERS[name]()
    sd = model.state_dict()
    assert len(sd) == KEY_COUNTS[name]
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    for key, shape in SAMPLE_KEYS[name]:
        assert sd[key].shape == shape, key
    assert sd["bn1.num_batches_tracked"].dtype == np.int64
    try:
        from torch_reference import torch_resnet
    except ImportError:  # no torch: the hard-coded figures above are the check
        return
    reference = torch_resnet(name).state_dict()
    # Same keys, same order, same shapes: a torchvision state dict loads 1:1.
    assert list(sd) == list(reference)
    assert [tuple(t.shape) for t in sd.values()] == [tuple(t.shape) for t in reference.values()]


def test_module_tree_matches_torchvision(r18) -> None:
    torch_reference = pytest.importorskip("torch_reference")
    ours = [(n, type(m).__name__) for n, m in r18.named_modules()]
    theirs = [(n, type(m).__name__) for n, m in torch_reference.torch_resnet("resnet18")
              .named_modules()]
    assert ours == theirs
    assert isinstance(r18.layer1[0].conv1, nn.Conv2d)
    assert r18.layer1[0].downsample is None and isinstance(r18.layer2[0].downsample[1],
                                                           nn.BatchNorm2d)
    text = repr(r18)
    assert "(maxpool): MaxPool2d(kernel_size=3, stride=2, padding=1" in text
    assert "(fc): Linear(in_features=512, out_features=1000, bias=True)" in text


def test_init_follows_torchvision(r18) -> None:
    w = r18.layer4[1].conv2.weight.detach().numpy()
    std = math.sqrt(2.0 / (512 * 3 * 3))  # kaiming_normal_, mode fan_out, relu gain
    assert abs(w.std() / std - 1) < 0.02 and abs(w.mean()) < 3 * std / math.sqrt(w.size)
    assert np.all(r18.layer1[0].bn2.weight.detach().numpy() == 1)
    assert np.all(r18.layer1[0].bn2.bias.detach().numpy() == 0)
    assert np.all(r18.bn1.running_var.numpy() == 1)
    fc = r18.fc.weight.detach().numpy()
    assert np.abs(fc).max() <= 1 / math.sqrt(512) and fc.std() > 0.5 / math.sqrt(3 * 512)
    og.manual_seed(0)
    again = resnet18()
    assert np.array_equal(again.conv1.weight.detach().numpy(), r18.conv1.weight.detach().numpy())
    zero = resnet18(num_classes=10, zero_init_residual=True)
    assert np.all(zero.layer2[1].bn2.weight.detach().numpy() == 0)


def test_mlp_structure() -> None:
    model = mlp(4, (8, 6), 3)
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        ("0.weight", (8, 4)), ("0.bias", (8,)), ("2.weight", (6, 8)), ("2.bias", (6,)),
        ("4.weight", (3, 6)), ("4.bias", (3,))]
    assert [type(m).__name__ for m in mlp(4, 8, 3, dropout=0.5)] == [
        "Linear", "ReLU", "Dropout", "Linear"]
    assert len(mlp(4, (), 3)) == 1
    assert mlp(4, 8, 3)(og.rand(5, 4)).shape == (5, 3)
    with pytest.raises(ValueError, match="positive ints"):
        mlp(4, (0,), 3)


def test_resnet_forward_shapes() -> None:
    model = resnet18(num_classes=7).eval()
    assert model(og.rand(2, 3, 32, 32)).shape == (2, 7)
    assert resnet50(num_classes=5).eval()(og.rand(1, 3, 32, 32)).shape == (1, 5)


# --------------------------------------------------------------------------- weight files
def _perturbed(model: nn.Module) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    state = {}
    for k, t in model.state_dict().items():
        a = t.numpy()
        state[k] = (a + rng.standard_normal(a.shape).astype(a.dtype) if a.dtype.kind == "f"
                    else a + 3)
    return state


def _assert_state_equal(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    ours = model.state_dict()
    assert set(ours) == set(state)
    for k, v in state.items():
        assert ours[k].dtype == v.dtype and np.array_equal(ours[k].numpy(), v), k


def test_weights_roundtrip_npz(tmp_path, r18) -> None:
    state = _perturbed(r18)
    path = tmp_path / "resnet18.npz"
    np.savez(path, **state)  # a torchvision export would be written exactly like this
    model = resnet18(weights=str(path))
    _assert_state_equal(model, state)
    out = tmp_path / "again.npz"
    save_weights(model, out)
    assert set(read_state(out)) == set(state)
    _assert_state_equal(load_weights(resnet18(), out), state)
    # The head's size comes from the file when num_classes is not given.
    small = resnet18(num_classes=10)
    save_weights(small, tmp_path / "ten.npz")
    assert resnet18(weights=tmp_path / "ten.npz").fc.weight.shape == (10, 512)
    with pytest.raises(RuntimeError, match=r"fc\.weight.*\[1000, 512\].*\[10, 512\]"):
        resnet18(num_classes=1000, weights=tmp_path / "ten.npz")


def test_weights_roundtrip_safetensors(tmp_path) -> None:
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file

    model = mlp(4, 8, 3)
    state = _perturbed(model)
    save_file(state, str(tmp_path / "m.safetensors"))
    _assert_state_equal(mlp(4, 8, 3, weights=tmp_path / "m.safetensors"), state)
    save_weights(model, tmp_path / "out.safetensors")
    assert set(read_state(tmp_path / "out.safetensors")) == set(state)


def test_safetensors_missing_names_the_extra(tmp_path, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    for mod in [m for m in sys.modules if m.startswith("safetensors")]:
        monkeypatch.delitem(sys.modules, mod)
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ImportError, match=r"onnxgrad\[safetensors\]"):
        resnet18(weights=path)


def test_old_checkpoint_without_num_batches_tracked(tmp_path) -> None:
    bn_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = {k: v.numpy() for k, v in bn_model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    np.savez(tmp_path / "old.npz", **state)
    load_weights(bn_model, tmp_path / "old.npz")
    assert int(bn_model[1].num_batches_tracked.item()) == 0


def test_weights_file_errors(tmp_path) -> None:
    np.savez(tmp_path / "partial.npz", **{"conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
                                          "fc.weight": np.zeros((1000, 512), np.float32),
                                          "extra.weight": np.zeros(1, np.float32)})
    with pytest.raises(RuntimeError, match=r"missing keys: \[.*'bn1\.weight'.*unexpected keys: "
                                           r"\['extra\.weight'\]"):
        resnet18(weights=tmp_path / "partial.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        resnet18(weights=tmp_path / "nope.npz")
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        resnet18(weights=tmp_path / "w.pth")
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.npz, \.safetensors, \.pth"):
        resnet18(weights=tmp_path / "w.ckpt")


def test_weights_from_a_pth_state_dict(tmp_path) -> None:
    source = resnet18(num_classes=10)
    og.save(source.state_dict(), tmp_path / "resnet18.pth")  # PyTorch's own format
    model = resnet18(num_classes=10, weights=tmp_path / "resnet18.pth")
    for (k, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), k


@pytest.mark.parametrize("kwargs", [{"pretrained": True}, {"weights": "IMAGENET1K_V1"},
                                    {"weights": "DEFAULT"}])
def test_pretrained_cannot_download(kwargs) -> None:
    with pytest.raises(RuntimeError, match=r"cannot download.*local \.npz or \.safetensors") as e:
        resnet18(**kwargs)
    assert "np.savez('resnet18.npz'" in str(e.value)


# --------------------------------------------------------------------------- the tutorial
def test_seed_snippet_one_backward_run_one_step_run(monkeypatch) -> None:
    runs = {"n": 0}
    real_run = ort.InferenceSession.run
    real_bound = ort.InferenceSession.run_with_iobinding

    def counting_run(self, *args, **kwargs):
        runs["n"] += 1
        return real_run(self, *args, **kwargs)

    def counting_bound(self, *args, **kwargs):
        runs["n"] += 1
        return real_bound(self, *args, **kwargs)

    # The optimizer runs its session with IOBinding (parameters stay in runtime buffers).
    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", counting_bound)

    model = resnet18()
    data = og.rand(1, 3, 64, 64)
    labels = og.rand(1, 1000)
    prediction = model(data)
    loss = (prediction - labels).sum()
    before_runs = autograd.stats["backward_runs"]
    monkeypatch.setattr(ort.InferenceSession, "run", counting_run)
    loss.backward()
    assert runs["n"] == 1 and autograd.stats["backward_runs"] == before_runs + 1
    monkeypatch.setattr(ort.InferenceSession, "run", real_run)
    params = dict(model.named_parameters())
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params.values())
    before = {k: p.detach().numpy().copy() for k, p in params.items()}
    optim = og.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    monkeypatch.setattr(ort.InferenceSession, "run", counting_run)
    runs["n"] = 0
    optim.step()
    assert runs["n"] == 1
    monkeypatch.setattr(ort.InferenceSession, "run", real_run)
    for k, p in params.items():
        expected = before[k] - 1e-2 * p.grad.numpy()  # first momentum step: buf = grad
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-6, atol=1e-7,
                                   err_msg=k)
        assert not np.array_equal(p.detach().numpy(), before[k]) or not p.grad.numpy().any(), k
        np.testing.assert_array_equal(optim.state[p]["momentum_buffer"].numpy(), p.grad.numpy())
    # Train mode: every BatchNorm counted the batch and moved its running mean.
    assert int(model.layer3[1].bn1.num_batches_tracked.item()) == 1
    assert not np.all(model.bn1.running_mean.numpy() == 0)


# --------------------------------------------------------------------------- bad input
def test_conv_wrong_channels_names_the_layer() -> None:
    model = resnet18(num_classes=10)
    with pytest.raises(og.ShapeError, match=r"^conv1 \(Conv2d\(3, 64.*expected input \[1, 1, 32, "
                                            r"32\] to have 3 channels, but got 1"):
        model(og.rand(1, 1, 32, 32))
    # A stem with 32 channels feeds layer1.0.conv1, which expects 64: the message names it.
    model.conv1 = nn.Conv2d(3, 32, 7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(32)
    with pytest.raises(og.ShapeError, match=r"^layer1\.0\.conv1 \(Conv2d\(64, 64.*have 64 "
                                            r"channels, but got 32"):
        model(og.rand(1, 3, 32, 32))


def test_conv_wrong_rank_names_the_layer() -> None:
    model = resnet18(num_classes=10)
    with pytest.raises(og.ShapeError, match=r"^conv1 \(Conv2d.*3-D \(unbatched\) or 4-D .*got "
                                            r"2-D input of shape \[32, 32\]"):
        model(og.rand(32, 32))
    # With the stem replaced by identities, a 5-D input reaches layer1.0.conv1 first.
    for name in ("conv1", "bn1", "relu", "maxpool"):
        setattr(model, name, nn.Identity())
    with pytest.raises(og.ShapeError, match=r"^layer1\.0\.conv1 \(Conv2d\(64, 64.*got 5-D"):
        model(og.rand(1, 64, 1, 8, 8))


def test_conv_kernel_larger_than_input() -> None:
    with pytest.raises(og.ShapeError, match=r"kernel 7x7 .* larger than the padded input 4x4"):
        nn.Conv2d(3, 4, 7)(og.rand(1, 3, 4, 4))


def test_load_state_dict_errors() -> None:
    model = mlp(4, 8, 3)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"size mismatch for 2\.weight: expected shape \[3, 8\], "
                                           r"got \[3, 9\]"):
        model.load_state_dict({**state, "2.weight": np.zeros((3, 9), np.float32)})
    with pytest.raises(RuntimeError, match=r"missing keys: \['0\.bias'\]"):
        model.load_state_dict({k: v for k, v in state.items() if k != "0.bias"})
    with pytest.raises(RuntimeError, match=r"unexpected keys: \['5\.weight'\]"):
        model.load_state_dict({**state, "5.weight": np.zeros(1, np.float32)})
    result = model.load_state_dict({k: v for k, v in state.items() if k != "0.bias"},
                                   strict=False)
    assert result.missing_keys == ["0.bias"] and result.unexpected_keys == []


def test_sgd_errors() -> None:
    params = list(mlp(2, (), 1).parameters())
    with pytest.raises(ValueError, match="Invalid learning rate: -0.1"):
        og.optim.SGD(params, lr=-0.1)
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        og.optim.SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="empty parameter list"):
        og.optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        og.optim.SGD(mlp(2, (), 1).buffers(), lr=0.1)


def test_cross_entropy_target_errors() -> None:
    logits = og.rand(2, 3, requires_grad=True)
    with pytest.raises(IndexError, match=r"Target 3 is out of bounds.*\[0, 3\)"):
        nn.functional.cross_entropy(logits, og.tensor([0, 3]))
    with pytest.raises(IndexError, match=r"Target -1 is out of bounds"):
        nn.functional.cross_entropy(logits, og.tensor([-1, 0]))
    # A float target shaped as the input is class probabilities (PyTorch's); any other is an error.
    with pytest.raises(og.ShapeError, match="class indices must be integers"):
        nn.functional.cross_entropy(logits, og.rand(2))
