"""Hugging Face BERT, DistilBERT, GPT-2, T5, Whisper and ViT built from tiny configs (random
weights, nothing downloaded), exported by both of PyTorch's ONNX exporters, trained 3 steps through
``OnnxModule`` and ``og.compile`` like PyTorch's own SGD-momentum training (losses and parameters
to 1e-4).

The default (dynamo) exporter is used as the README documents for training: ``optimize=False``.
Its optimizer folds parameter-dependent subgraphs that do not depend on the inputs into new
constants (ViT's class token expanded to the batch, DistilBERT's position-embedding lookup), so an
optimized file trains another parametrization; ``test_optimized_dynamo_export_folds_parameters``
pins down that this is the exporter's doing.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from onnx import numpy_helper

import onnxgrad as og
import onnxgrad.nn.functional as F

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = {"rtol": 1e-4, "atol": 1e-6}
B = 2


class _Spec:
    """One model: how to build it, its example inputs (NumPy), its input names and its loss."""

    def __init__(self, build: Callable[[], Any], inputs: Callable[[np.random.Generator], list],
                 names: list[str], target: Callable[[np.random.Generator, Any], np.ndarray],
                 loss: str) -> None:
        self.build, self.inputs, self.names = build, inputs, names
        self.target, self.loss = target, loss


def _eager(cfg: Any) -> Any:
    cfg._attn_implementation = "eager"
    return cfg


def _mask(rng: np.random.Generator, t: int) -> np.ndarray:
    mask = np.ones((B, t), np.int64)
    mask[1, t - 2:] = 0  # padding in the second sequence: the attention masks matter
    return mask


def _distilbert() -> Any:
    cfg = transformers.DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2,
                                        hidden_dim=64, max_position_embeddings=16, dropout=0.0,
                                        attention_dropout=0.0, seq_classif_dropout=0.0)
    return transformers.DistilBertModel(_eager(cfg))


def _t5() -> Any:
    cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                num_decoder_layers=1, num_heads=2,
                                relative_attention_num_buckets=8,
                                relative_attention_max_distance=16, dropout_rate=0.0,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(_eager(cfg))


def _whisper() -> Any:
    cfg = transformers.WhisperConfig(
        vocab_size=60, num_mel_bins=8, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_source_positions=8, max_target_positions=16, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1, tie_word_embeddings=False)
    return transformers.WhisperForConditionalGeneration(_eager(cfg))


def _vit() -> Any:
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, num_labels=5)
    return transformers.ViTForImageClassification(_eager(cfg))


def _bert() -> Any:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)
    return transformers.BertForSequenceClassification(_eager(cfg))


def _gpt2() -> Any:
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(_eager(cfg))


# NOTE: token ids start above 0 where the embedding has padding_idx=0 (DistilBERT, Whisper):
# PyTorch's backward skips that row, which a plain ONNX Gather cannot record.
SPECS = {
    "distilbert": _Spec(
        _distilbert, lambda r: [r.integers(1, 50, (B, 8)), _mask(r, 8)],
        ["input_ids", "attention_mask"],
        lambda r, out: r.standard_normal(out.shape).astype(np.float32), "mse"),
    "t5": _Spec(
        _t5, lambda r: [r.integers(0, 50, (B, 8)), _mask(r, 8), r.integers(0, 50, (B, 6))],
        ["input_ids", "attention_mask", "decoder_input_ids"],
        lambda r, out: r.integers(0, 50, out.shape[:-1]), "cross_entropy"),
    "whisper": _Spec(
        _whisper, lambda r: [r.standard_normal((B, 8, 16)).astype(np.float32),
                             r.integers(3, 60, (B, 6))],
        ["input_features", "decoder_input_ids"],
        lambda r, out: r.integers(0, 60, out.shape[:-1]), "cross_entropy"),
    "bert": _Spec(
        _bert, lambda r: [r.integers(1, 50, (B, 8)), _mask(r, 8)],
        ["input_ids", "attention_mask"],
        lambda r, out: r.integers(0, 3, out.shape[:-1]), "cross_entropy"),
    "gpt2": _Spec(
        _gpt2, lambda r: [r.integers(0, 50, (B, 8)), _mask(r, 8)],
        ["input_ids", "attention_mask"],
        lambda r, out: r.integers(0, 50, out.shape[:-1]), "cross_entropy"),
    "vit": _Spec(
        _vit, lambda r: [r.standard_normal((B, 3, 16, 16)).astype(np.float32)],
        ["pixel_values"], lambda r, out: r.integers(0, 5, out.shape[:-1]), "cross_entropy"),
}


class _Wrap(torch.nn.Module):
    """The model called with named inputs, its first output returned (logits or hidden states)."""

    def __init__(self, model: Any, names: list[str]) -> None:
        super().__init__()
        self.m, self.names = model, names

    def forward(self, *args: Any) -> Any:
        return self.m(**dict(zip(self.names, args)), return_dict=False)[0]


def _model(kind: str) -> _Wrap:
    torch.manual_seed(0)
    spec = SPECS[kind]
    model = spec.build()
    with torch.no_grad():
        # Distinct values everywhere: the TorchScript exporter merges initializers of equal
        # values (every zero bias, every LayerNorm weight), which would make the mapping from
        # file initializers back to PyTorch parameters ambiguous.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return _Wrap(model, spec.names)


def _tied(model: _Wrap) -> bool:
    """Whether two modules of the model share one parameter (T5's lm_head is always its shared
    embedding in transformers 5, whatever the config says)."""
    return len(list(model.named_parameters())) < len(list(
        model.named_parameters(remove_duplicate=False)))


def _export(model: _Wrap, example: list[np.ndarray], exporter: str) -> bytes:
    args = tuple(torch.from_numpy(a) for a in example)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            buf = io.BytesIO()
            # NOTE: the TorchScript exporter's constant folding stores the Transpose of a tied
            # Linear weight as a new initializer, untying it from the embedding it shares (the
            # file would train two tensors where PyTorch trains one): tied models export
            # without it, the Transpose stays a node and the tie stays.
            torch.onnx.export(model, args, buf, dynamo=False, opset_version=17,
                              input_names=model.names, output_names=["out"],
                              do_constant_folding=not _tied(model))
            return buf.getvalue()
        pytest.importorskip("onnxscript")
        program = torch.onnx.export(model, args, dynamo=True, optimize=exporter == "dynamo",
                                    input_names=model.names, output_names=["out"],
                                    verbose=False)
        return program.model_proto.SerializeToString()


def parameter_map(data: bytes, model: Any,
                   frozen: bool = False) -> dict[str, tuple[str, bool]]:
    """File initializer -> (PyTorch parameter, stored transposed), by exact initial value; the
    frozen parameters (``requires_grad=False``) too when ``frozen``.

    NOTE: the TorchScript exporter folds the Transpose of a Linear weight into a new initializer
    named ``onnx::MatMul_*``; the dynamo exporter keeps the parameter's name.
    """
    import onnx

    theirs = {n: p.detach().numpy() for n, p in model.named_parameters()
              if p.requires_grad or frozen}
    mapping: dict[str, tuple[str, bool]] = {}
    for init in onnx.load_from_string(data).graph.initializer:
        value = numpy_helper.to_array(init)
        for name, p in theirs.items():
            if value.shape == p.shape and np.array_equal(value, p):
                mapping[init.name] = (name, False)
            elif value.ndim == 2 and value.T.shape == p.shape and np.array_equal(value.T, p):
                mapping[init.name] = (name, True)
    # Each parameter exactly once: none missing (folded into a constant), none untied.
    assert sorted(n for n, _ in mapping.values()) == sorted(theirs), "unmapped parameters"
    return mapping


def assert_trained_like(ours: og.nn.OnnxModule, model: Any,
                        mapping: dict[str, tuple[str, bool]], **tol: float) -> None:
    """Each of PyTorch's trained parameters equals ours, through ``parameter_map``'s mapping."""
    trained = {ours.initializer_names.get(n, n): p.detach().numpy()
               for n, p in ours.named_parameters()}
    for init_name, (name, transposed) in mapping.items():
        expected = model.get_parameter(name).detach().numpy()
        actual = trained[init_name].T if transposed else trained[init_name]
        np.testing.assert_allclose(actual, expected, **tol, err_msg=f"{init_name} ({name})")


def _loss_og(kind: str, out: og.Tensor, y: og.Tensor) -> og.Tensor:
    if SPECS[kind].loss == "mse":
        return F.mse_loss(out, y)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _loss_torch(kind: str, out: Any, y: Any) -> Any:
    if SPECS[kind].loss == "mse":
        return torch.nn.functional.mse_loss(out, y)
    return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo-unoptimized"])
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_hugging_face_export_trains_like_pytorch(kind: str, exporter: str) -> None:
    spec = SPECS[kind]
    rng = np.random.default_rng(0)
    model = _model(kind)
    data = _export(model, spec.inputs(rng), exporter)
    mapping = parameter_map(data, model)
    with warnings.catch_warnings():  # the opset conversion to onnxgrad's: expected here
        warnings.simplefilter("ignore", UserWarning)
        default = og.nn.OnnxModule(data)
        # What trains by default is exactly the model's parameters: a file cannot say which
        # PyTorch froze (Whisper's sinusoidal encoder positions), so those are named.
        assert sorted(default.initializer_names.get(n, n)
                      for n, _ in default.named_parameters()) == \
            sorted(parameter_map(data, model, frozen=True))
        ours = og.nn.OnnxModule(data, parameters=list(mapping))
    opt = og.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    model.train()
    t_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                            momentum=0.9)

    @og.compile
    def step(y, *inputs):
        opt.zero_grad()
        loss = _loss_og(kind, ours(*inputs), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        inputs = spec.inputs(rng)
        with torch.no_grad():
            shape = model(*(torch.from_numpy(a) for a in inputs)).shape
        y = spec.target(rng, np.empty(shape, np.float32))
        loss = float(step(og.tensor(y), *(og.tensor(a) for a in inputs)))
        t_opt.zero_grad()
        t_loss = _loss_torch(kind, model(*(torch.from_numpy(a) for a in inputs)),
                             torch.from_numpy(y))
        t_loss.backward()
        t_opt.step()
        np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-4)
    assert_trained_like(ours, model, mapping, **TOL)


def test_optimized_dynamo_export_folds_parameters_into_constants() -> None:
    """Why the tests above export with ``optimize=False`` (as the README says for training): the
    dynamo exporter's optimizer folds ViT's class token, expanded to the example's batch, into a
    new constant, so the file has no ``cls_token`` to train and trains per-sample copies."""
    rng = np.random.default_rng(0)
    model = _model("vit")
    data = _export(model, SPECS["vit"].inputs(rng), "dynamo")
    import onnx

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(data).graph.initializer}
    cls = model.m.vit.embeddings.cls_token.detach().numpy()
    assert "m.vit.embeddings.cls_token" not in inits
    assert any(v.shape == (B, *cls.shape[1:]) and np.array_equal(v, np.broadcast_to(cls, v.shape))
               for v in inits.values())
    with pytest.raises(AssertionError, match="unmapped parameters"):
        parameter_map(data, model)
