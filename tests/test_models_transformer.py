"""The GPT decoder and the ViT of ``onnxgrad.models``: PyTorch parity of compiled training
(AdamW, 3 steps), the exported step looped in plain onnxruntime, and Hugging Face GPT-2 / BERT
exported to ONNX and trained through ``OnnxModule``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnxgrad.models import gpt, vit

import onnxgrad as og
import onnxgrad.nn.functional as F

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"vocab_size": 40, "n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 12}


def _batches(n: int, b: int = 3, t: int = 10, vocab: int = 40) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(7)
    return [(rng.integers(0, vocab, (b, t)), rng.integers(0, vocab, (b, t))) for _ in range(n)]


def _gpt_pair(tie_weights: bool = True):
    from torch_reference_transformer import GPT
    og.manual_seed(0)
    ours = gpt(**CONFIG, tie_weights=tie_weights)
    theirs = GPT(**CONFIG, tie_weights=tie_weights)
    state = ours.state_dict()
    assert list(state) == list(theirs.state_dict())
    theirs.load_state_dict({k: torch.tensor(v.numpy()) for k, v in state.items()})
    return ours, theirs


def _og_step(model, opt):
    def step(x, y):
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss

    return og.compile(step)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_gpt_trains_compiled_with_adamw_like_pytorch(tie_weights):
    ours, theirs = _gpt_pair(tie_weights)
    kw = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.95)}
    step = _og_step(ours, og.optim.AdamW(ours.parameters(), **kw))
    t_opt = torch.optim.AdamW(theirs.parameters(), **kw)
    for x, y in _batches(3):
        loss = float(step(og.tensor(x), og.tensor(y)))
        t_opt.zero_grad()
        logits = theirs(torch.tensor(x))
        t_loss = F_torch().cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         torch.tensor(y).reshape(-1))
        t_loss.backward()
        t_opt.step()
        np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-4)
    theirs_state = theirs.state_dict()
    for name, value in ours.state_dict().items():
        actual, expected = value.numpy(), theirs_state[name].detach().numpy()
        if name.endswith("c_attn.bias"):
            # NOTE: the key third of c_attn.bias has a zero gradient in exact arithmetic (it adds
            # a per-query constant to the scores, which softmax cancels), so both frameworks move
            # it from 0 by rounding noise only, which Adam normalizes: it must stay near 0.
            e = CONFIG["n_embd"]
            assert np.abs(actual[e:2 * e]).max() < 1e-4 > np.abs(expected[e:2 * e]).max()
            actual, expected = np.delete(actual, np.s_[e:2 * e]), np.delete(expected,
                                                                            np.s_[e:2 * e])
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6, err_msg=name)
    assert len(list(ours.parameters())) == len(list(theirs.parameters()))


def F_torch():  # torch.nn.functional, imported lazily with torch
    return torch.nn.functional


def test_gpt_exported_step_loops_in_plain_onnxruntime(tmp_path):
    from test_compile import _documented_loop
    og.manual_seed(0)
    model = gpt(**CONFIG)
    step = _og_step(model, og.optim.AdamW(model.parameters(), lr=1e-2))
    batches = _batches(4)
    step(*(og.tensor(a) for a in batches[0]))
    step.export(tmp_path / "train_step.onnx")
    np.savez(tmp_path / "batches.npz", *[a for batch in batches[1:] for a in batch])
    losses = [float(step(*(og.tensor(a) for a in batch))) for batch in batches[1:]]
    prelude = ("import numpy as np\n"
               "with np.load('batches.npz') as f:\n"
               "    arrays = [f[f'arr_{i}'] for i in range(len(f.files))]\n"
               "batches = list(zip(arrays[0::2], arrays[1::2]))\n")
    epilogue = "np.savez('trained.npz', **state)\n"
    done = subprocess.run([sys.executable, "-c", prelude + _documented_loop() + epilogue],
                          check=False, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [float(line) for line in done.stdout.split()]
    np.testing.assert_allclose(printed, losses, rtol=1e-5, atol=1e-6)
    with np.load(tmp_path / "trained.npz") as trained:
        # The tied lm_head.weight is one parameter, exported once, under wte's name.
        assert "lm_head.weight" not in trained.files
        for name, value in model.named_parameters():
            np.testing.assert_allclose(trained[name], value.detach().numpy(), rtol=1e-5,
                                       atol=1e-6, err_msg=name)


def test_vit_trains_like_torchvision_layout():
    from torch_reference_transformer import VisionTransformer
    og.manual_seed(0)
    cfg = {"image_size": 16, "patch_size": 4, "num_layers": 2, "num_heads": 2, "hidden_dim": 16,
           "mlp_dim": 32, "num_classes": 5}
    ours, theirs = vit(**cfg), VisionTransformer(**cfg)
    state = ours.state_dict()
    assert list(state) == list(theirs.state_dict())
    rng = np.random.default_rng(0)
    # torchvision zero-initialises the head: give it values so every gradient is exercised.
    ours.heads.head.weight = og.nn.Parameter(rng.standard_normal((5, 16)).astype(np.float32) * 0.1)
    theirs.load_state_dict({k: torch.tensor(v.numpy()) for k, v in ours.state_dict().items()})
    opt = og.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    t_opt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)

    @og.compile
    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(ours(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
        y = rng.integers(0, 5, 4)
        loss = float(step(og.tensor(x), og.tensor(y)))
        t_opt.zero_grad()
        t_loss = F_torch().cross_entropy(theirs(torch.tensor(x)), torch.tensor(y))
        t_loss.backward()
        t_opt.step()
        np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-4)
    theirs_state = theirs.state_dict()
    for name, value in ours.state_dict().items():
        np.testing.assert_allclose(value.numpy(), theirs_state[name].numpy(), rtol=1e-4,
                                   atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------- Hugging Face files
def _hf_model(kind: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=64, n_layer=2,
                                      n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        cfg._attn_implementation = "eager"
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=128,
                                      max_position_embeddings=16, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        cfg._attn_implementation = "eager"
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    with torch.no_grad():
        # Distinct values everywhere: the TorchScript exporter merges initializers of equal
        # values (every zero bias, every LayerNorm weight), which would make the mapping from
        # file initializers back to PyTorch parameters ambiguous.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _export(model, b: int, t: int) -> bytes:
    import io

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            # NOTE: an explicit attention mask: without one, transformers 5 looks for packed
            # sequences with torch.diff, which the TorchScript exporter cannot export.
            return self.m(input_ids=ids, attention_mask=mask, return_dict=False)[0]

    buf = io.BytesIO()
    ids = torch.zeros(b, t, dtype=torch.int64)
    torch.onnx.export(Wrap(model), (ids, torch.ones(b, t, dtype=torch.int64)), buf,
                      dynamo=False, opset_version=17, input_names=["ids", "mask"],
                      output_names=["out"])
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hugging_face_export_trains_through_onnx_module_like_pytorch(kind):
    import warnings
    model = _hf_model(kind)
    b, t = 2, 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = _export(model, b, t)
    model.train()
    from test_hf_exports import assert_trained_like, parameter_map  # needs transformers

    mapping = parameter_map(data, model)
    # NOTE: parameters named explicitly: by default every float initializer would train,
    # scalar constants included (see the report).
    with warnings.catch_warnings():  # opset 17 converted to onnxgrad's 21: expected here
        warnings.simplefilter("ignore")
        ours = og.nn.OnnxModule(data, parameters=list(mapping))
    opt = og.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    t_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    mask = np.ones((b, t), dtype=np.int64)

    def og_loss(out, y):
        if kind == "gpt2":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.mse_loss(out, y)

    @og.compile
    def step(ids, m, y):
        opt.zero_grad()
        loss = og_loss(ours(ids, m), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        # NOTE: no padding token (id 0) for BERT: its word embedding has padding_idx=0, which
        # PyTorch's backward honours but an ONNX file cannot record (a plain Gather), so the
        # imported model would train that row where PyTorch does not.
        ids = rng.integers(1 if kind == "bert" else 0, 50, (b, t))
        y = (rng.integers(0, 50, (b, t)) if kind == "gpt2"
             else rng.standard_normal((b, t, 64)).astype(np.float32))
        loss = float(step(og.tensor(ids), og.tensor(mask), og.tensor(y)))
        t_opt.zero_grad()
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    return_dict=False)[0]
        t_loss = (F_torch().cross_entropy(out.reshape(-1, out.shape[-1]),
                                          torch.tensor(y).reshape(-1)) if kind == "gpt2"
                  else F_torch().mse_loss(out, torch.tensor(y)))
        t_loss.backward()
        t_opt.step()
        np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-4)
    assert_trained_like(ours, model, mapping, rtol=1e-4, atol=1e-6)


def test_gpt_loads_a_hugging_face_gpt2_state_dict():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    ours = gpt(**CONFIG)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    result = ours.load_state_dict(state, strict=False)
    assert not result.missing_keys, result.missing_keys
    assert ours.lm_head.weight is ours.transformer.wte.weight  # still tied after loading
    ids = np.random.default_rng(0).integers(0, 40, (2, 10))
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), attention_mask=torch.ones(2, 10),
                      return_dict=False)[0].numpy()
    with og.no_grad():
        np.testing.assert_allclose(ours(og.tensor(ids)).numpy(), expected, rtol=1e-4, atol=1e-5)
