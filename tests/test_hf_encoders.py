"""Encoders against transformers: BERT and ModernBERT (masked-LM and sequence-classification heads) built by
transformers with random weights, run by llmctl's own forward on a padded batch; export -> import round trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import invoke
from llmctl.config import Config
from llmctl.errors import LlmctlError
from llmctl.heads import Classifier
from llmctl.hf import from_hf_weights, head_to_hf, load_dir, split_head, to_hf_weights, to_model_config, write_dir
from llmctl.hf.encoders import to_hf_config
from llmctl.model import Transformer

transformers = pytest.importorskip("transformers")

V, T = 97, 12
SIZES = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, max_position_embeddings=32)
BERT = dict(SIZES, num_hidden_layers=2, intermediate_size=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
# four layers: global, local, local, global; windows of +-2 positions, shorter than the padded batch
MODERNBERT = dict(SIZES, num_hidden_layers=4, intermediate_size=48, local_attention=4, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)


def _hf(cls_name: str, **extra):
    """A transformers model with random weights, every tensor (norms and biases too) moved off its init."""
    family = "ModernBert" if cls_name.startswith("ModernBert") else "Bert"
    conf = getattr(transformers, f"{family}Config")(**(MODERNBERT if family == "ModernBert" else BERT), **extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(conf).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, T), generator=g)
    lengths = torch.tensor([T, 7, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return ids * mask, lengths, mask  # padding id 0 after each text


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "ModernBertForMaskedLM"])
def test_masked_lm_logits_match_transformers(cls_name, tmp_path):
    hf = _hf(cls_name)
    hf.save_pretrained(tmp_path)
    imported = load_dir(tmp_path)
    m = imported.cfg.model
    assert (m.causal, m.mlm_head, m.hf_architecture) == (False, True, cls_name)
    model = Transformer(m).eval()
    model.load_state_dict(imported.weights, strict=False)
    ids, lengths, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = model(ids, segments=1 - mask)  # padding is a segment of its own
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("cls_name,pooling", [("BertForSequenceClassification", "cls"),
                                              ("ModernBertForSequenceClassification", "cls"),
                                              ("ModernBertForSequenceClassification", "mean")])
def test_classifier_logits_match_transformers(cls_name, pooling):
    extra = {"classifier_pooling": pooling} if cls_name.startswith("Modern") else {}
    hf = _hf(cls_name, num_labels=3, **extra)
    conf = {**hf.config.to_dict(), "architectures": [cls_name]}
    m = to_model_config(conf, "config.json")
    assert (m.mlm_head, m.pooler) == (False, "tanh" if cls_name.startswith("Bert") else "mlm")
    encoder, head = split_head(hf.state_dict(), m)
    backbone = Transformer(m)
    backbone.load_state_dict(from_hf_weights(encoder, m, "hf"), strict=False)
    clf = Classifier(backbone, 3, pooling).eval()
    clf.load_head_state(head)
    ids, lengths, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        got = clf(ids, lengths)
    assert (got - want).abs().max().item() < 1e-4
    # export -> import: the same tensors, bit for bit
    ours = {**to_hf_weights(backbone.state_dict(), m, "ours"), **head_to_hf(clf.head_state(), m)}
    m2 = to_model_config(to_hf_config(m, classes=3, pooling=pooling), "exported")
    assert m2 == m
    encoder2, head2 = split_head(ours, m2)
    again = from_hf_weights(encoder2, m2, "exported")
    for k, v in backbone.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(again[k], v), k
    assert all(torch.equal(head2[k], v) for k, v in clf.head_state().items())


@pytest.mark.parametrize("cls_name", ["BertModel", "ModernBertModel"])
def test_bare_encoders_import_with_the_same_hidden_states(cls_name, tmp_path):
    hf = _hf(cls_name)
    hf.save_pretrained(tmp_path)
    imported = load_dir(tmp_path)
    assert not imported.cfg.model.mlm_head
    assert any("pooler" in w for w in imported.warnings) == (cls_name == "BertModel")
    model = Transformer(imported.cfg.model).eval()
    model.load_state_dict(imported.weights, strict=False)
    ids, lengths, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model.hidden(ids, segments=1 - mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "ModernBertForMaskedLM"])
def test_export_import_round_trip_is_bit_identical(cls_name, tmp_path):
    hf = _hf(cls_name)
    hf.save_pretrained(tmp_path / "hf")
    first = load_dir(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    write_dir(tmp_path / "out", Config(model=first.cfg.model), first.weights, None, "test")
    second = load_dir(tmp_path / "out")
    assert second.cfg.model == first.cfg.model
    assert set(second.weights) == set(first.weights)
    assert all(torch.equal(second.weights[k], v) for k, v in first.weights.items())
    # and transformers reads the export as the same model
    again = getattr(transformers, cls_name).from_pretrained(tmp_path / "out").eval()
    ids, _, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, want)


@pytest.mark.parametrize("change,needle", [
    ({"hidden_act": "gelu_new"}, "hidden_act"),
    ({"is_decoder": True}, "is_decoder"),
])
def test_bert_configs_llmctl_cannot_represent_are_refused(change, needle):
    conf = {**BERT, "architectures": ["BertForMaskedLM"], "model_type": "bert", **change}
    with pytest.raises(LlmctlError, match=needle):
        to_model_config(conf, "config.json")


def test_modernbert_with_mixed_biases_is_refused():
    conf = {**MODERNBERT, "architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert",
            "num_hidden_layers": 3, "mlp_bias": True}
    with pytest.raises(LlmctlError, match="mlp_bias"):
        to_model_config(conf, "config.json")


def test_a_decoder_with_encoder_switches_is_not_exported_as_a_decoder():
    m = to_model_config({**BERT, "architectures": ["BertForMaskedLM"], "model_type": "bert"}, "config.json")
    with pytest.raises(LlmctlError, match="causal"):
        to_hf_config(dataclasses.replace(m, causal=True))


def test_cli_imports_and_exports_an_encoder_classifier(runner, tmp_path):
    hf = _hf("ModernBertForSequenceClassification", num_labels=2, classifier_pooling="mean",
             id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    hf.save_pretrained(tmp_path / "hf")
    r = invoke(runner, "import", "hf", tmp_path / "hf", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    r = invoke(runner, "export", "--ckpt", tmp_path / "run", "--format", "hf", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert again.config.id2label == {0: "neg", 1: "pos"} and again.config.classifier_pooling == "mean"
    ids, _, mask = _batch()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits,
                           hf(input_ids=ids, attention_mask=mask).logits)
