"""DenseNet written in og.nn trains like torchvision's.

As tests/test_models_mobile.py (whose helpers this uses): PyTorch's weights are loaded into the
og.nn model with load_state_dict (the keys are torchvision's), then both take three SGD-momentum
steps on the same batches, onnxgrad's as one compiled step; compared after every step: the loss;
after the last: every parameter, BatchNorm statistic and momentum buffer (rtol 1e-4, with the
floor documented there). Small DenseNets train in training mode (batch statistics); densenet121
itself trains with its BatchNorms in eval mode (see the NOTE on that test).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference_densenet as ref
from onnxgrad.models.densenet import _DenseLayer
from test_models_mobile import (
    CLASSES,
    RTOL,
    _batches,
    _check,
    _load,
    _with_trained_statistics,
)

import onnxgrad as og
from onnxgrad import models, nn

# NOTE: batch 2 at 64x64 puts 2x16x16 values per channel into the first block's BatchNorms and
# 2x4x4 or more into the last; after three training-mode steps both PyTorch float32 and onnxgrad
# agree with PyTorch float64 to 6e-6 of each tensor's largest entry (measured, 2 seeds each),
# but for norm0 (below), so 1e-4 is a real bound, not float32 luck.
SMALL_SHAPE = (2, 3, 64, 64)
SMALL = {  # name: DenseNet arguments (growth_rate, block_config, num_init_features, bn_size)
    "k8-3x2": (8, (3, 2), 16, 4),
    "k6-2x2x2-bn2": (6, (2, 2, 2), 12, 2),
}
# NOTE: norm0's weight gradient is 0 but for BatchNorm's eps: relu0 and pool0 scale with it,
# and every consumer of pool0's channels is a training-mode BatchNorm (norm1 of each layer of
# the first block, the transition through the concatenation), which undoes a per-channel scale;
# so w * dL/dw + b * dL/db = 0 per channel, and at w = 1, b = 0, dL/dw = 0. In float64 it is
# 3e-7 / 2e-6 (k8 / k6) where norm0.bias's is 1.5e-4 / 2e-3: its momentum is weight decay
# (2.7e-4) plus float32 noise, up to 1e-7 off float64 in PyTorch and onnxgrad alike (measured).
# A floor of 1e-6 still catches any real gradient, which would be of the bias's size.
NORM0_FLOOR = {"features.norm0.weight": 1e-6}


def _small(module: object, name: str, **kwargs: object) -> object:
    growth, blocks, init, bn_size = SMALL[name]
    return module.DenseNet(growth, blocks, init, bn_size, num_classes=CLASSES, **kwargs)


@pytest.mark.parametrize("name", list(SMALL))
def test_small_densenet_trains_like_torchvision(name: str) -> None:
    """Three compiled training-mode steps: batch statistics, running statistics updated, the
    dense blocks' concatenations and their gradients' split back to every earlier layer."""
    torch.manual_seed(0)
    _check(_small(models, name), _small(ref, name), _batches(0, SMALL_SHAPE), name,
           floors=NORM0_FLOOR)


# NOTE: densenet121 trains here with eval-mode BatchNorm (trained running statistics; every
# weight still trains), 2x3x32x32, seed 3. Its float32 gradients are otherwise a coin toss
# against float64, PyTorch's own included: one ReLU input of millions within float32 noise of 0
# lands on the other side and moves its layer's gradient by percents. Measured against PyTorch
# float64 in training mode at 2x3x96x96 (one step, seeds 0-6): PyTorch float32 flipped a ReLU
# input at 4 seeds and onnxgrad at 6 (e.g. denseblock4.denselayer16.norm2 at seed 1: float64
# -3.1e-6, PyTorch float32 -1.3e-5, onnxgrad +1.9e-5), each time 2-42% off on that layer's
# gradients; without a flip, either agrees with float64 to 4.3e-5, and the BatchNorm outputs are
# as close on both sides (mean |float32 - float64| 3.5e-6). In eval mode at 2x3x32x32 over three
# steps (seeds 0-4), PyTorch float32 was 0.1-24% off at 3 seeds and onnxgrad at 1; at seed 3
# both agree with float64 to 1e-6. The small DenseNets above cover training mode. Eval-mode
# BatchNorm needs no values per channel, so 32x32 (1x1 maps in the last block) keeps this fast.
def test_densenet121_trains_like_torchvision() -> None:
    torch.manual_seed(3)
    reference = _with_trained_statistics(ref.densenet121(CLASSES), 3)
    _check(models.densenet121(CLASSES), reference, _batches(3, (2, 3, 32, 32)), "densenet121",
           train=False)


def test_eval_forward_with_trained_statistics() -> None:
    """Eval mode (running statistics as a trained net has them) with dropout configured, which
    eval mode switches off."""
    torch.manual_seed(2)
    reference = _with_trained_statistics(_small(ref, "k8-3x2", drop_rate=0.2), 2).eval()
    model = _small(models, "k8-3x2", drop_rate=0.2).eval()
    _load(model, reference)
    x = np.random.default_rng(2).standard_normal(SMALL_SHAPE).astype(np.float32)
    with og.no_grad():
        ours = model(og.tensor(x)).numpy()
    with torch.no_grad():
        theirs = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=1e-5 * np.abs(theirs).max())


def test_drop_rate_drops_new_features() -> None:
    """``drop_rate`` is F.dropout on each layer's new features in training mode only: zeros at
    about that rate, survivors scaled by 1 / (1 - p)."""
    og.manual_seed(0)
    layer = _DenseLayer(16, growth_rate=8, bn_size=4, drop_rate=0.5)
    plain = copy.deepcopy(layer)
    plain.drop_rate = 0.0
    x = og.randn(4, 16, 12, 12)
    with og.no_grad():
        dropped, kept = layer(x).numpy(), plain(x).numpy()
        assert np.array_equal(layer.eval()(x).numpy(), plain.eval()(x).numpy())
    live = kept != 0
    assert abs((dropped[live] == 0).mean() - 0.5) < 0.03
    survivors = live & (dropped != 0)
    np.testing.assert_allclose(dropped[survivors], 2 * kept[survivors], rtol=1e-6)


def test_module_tree_and_state_dict_match_torchvision() -> None:
    ours, theirs = models.densenet121(), ref.densenet121()
    assert ([(n, type(m).__name__) for n, m in ours.named_modules()]
            == [(n, type(m).__name__) for n, m in theirs.named_modules()])
    assert ([(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
            == [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()])
    assert sum(p.detach().numpy().size for p in ours.parameters()) == 7978856  # torchvision's
    assert repr(ours) == repr(theirs)
    for builder, features, head in [(models.densenet161, 2208, 1000),
                                    (models.densenet169, 1664, 1000),
                                    (models.densenet201, 1920, 5)]:
        model = builder(head)
        assert (model.classifier.in_features, model.classifier.out_features) == (features, head)


def test_init_follows_torchvision() -> None:
    og.manual_seed(0)
    model = models.densenet121()
    conv = model.features.denseblock3.denselayer24.conv1.weight.detach().numpy()  # 128x992x1x1
    std = math.sqrt(2.0 / 992)  # kaiming_normal_'s defaults: fan_in, gain sqrt(2)
    assert abs(conv.std() / std - 1) < 0.02 and abs(conv.mean()) < 3 * std / math.sqrt(conv.size)
    assert np.all(model.features.norm5.weight.detach().numpy() == 1)
    assert np.all(model.features.transition2.norm.bias.detach().numpy() == 0)
    fc = model.classifier.weight.detach().numpy()  # nn.Linear's default: U(+-1/sqrt(1024))
    assert np.abs(fc).max() <= 1 / 32 and fc.std() > 0.5 / math.sqrt(3 * 1024)
    assert np.all(model.classifier.bias.detach().numpy() == 0)


def test_weights_file_with_torchvision_keys(tmp_path: Path) -> None:
    """A weights file loads by path and decides the head size; torchvision's published DenseNet
    checkpoints name layers ``norm.1`` for ``norm1``, and load as torchvision loads them."""
    reference = ref.densenet121(7)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    # Those checkpoints predate num_batches_tracked, which loads as 0 (as in PyTorch).
    old = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
           for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "densenet121.npz"
    np.savez(path, **old)
    model = models.densenet121(weights=str(path))
    assert model.classifier.out_features == 7
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)
    with pytest.raises(RuntimeError, match="cannot download"):
        models.densenet121(pretrained=True)
    with pytest.raises(TypeError, match="memory_efficient"):
        models.densenet121(memory_efficient=True)  # recomputation is not implemented
    assert isinstance(model.features.denseblock1, nn.ModuleDict)
