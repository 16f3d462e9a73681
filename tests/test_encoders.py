"""Encoders: masked-language pretraining through the CLI, its masking rule, classification of encoder checkpoints
(finetune with LoRA, eval, infer), padding that real tokens never read."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import SHAKESPEARE, SHARED, encoder_run, invoke, sets
from llmctl.checkpoint import load
from llmctl.config import ModelConfig
from llmctl.data import classification_ids
from llmctl.errors import LlmctlError
from llmctl.mlm import Masking, mlm_loss
from llmctl.model import Transformer
from llmctl.tokenizer import Tokenizer

SST2 = SHARED / "sst2" / "train.tsv"


@pytest.fixture(scope="module")
def encoder() -> "Path":  # noqa: F821
    return encoder_run()


def test_mlm_run_has_encoder_tokens_and_masked_metrics(runner, encoder, tmp_path):
    tok = Tokenizer.from_str(load(encoder).tokenizer_json())
    assert None not in (tok.mask_id, tok.cls_id, tok.sep_id)
    rows = [json.loads(line) for line in (encoder / "metrics.jsonl").read_text().splitlines()]
    assert any("val_masked_accuracy" in row for row in rows)
    text = tmp_path / "some.txt"
    text.write_text(SHAKESPEARE.read_text()[:4000])
    r = invoke(runner, "eval", "--ckpt", encoder, "--data", text, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["objective"] == "mlm" and 0.0 <= out["masked_accuracy"] <= 1.0 and out["masked_loss"] > 0
    assert abs(out["masked_tokens"] / 4000 - 0.15) < 0.02  # (one token per character)


def test_masking_replaces_80_10_10_and_is_a_function_of_the_seed():
    m = Masking(mask_id=99, vocab=50, rate=0.15)
    ids = torch.full((64, 512), 7)
    a = m.apply(ids, [1, 2])
    chosen = a["labels"] != -100
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    assert (a["labels"][chosen] == 7).all() and (a["input_ids"][~chosen] == 7).all()
    x = a["input_ids"][chosen]
    masked, kept = (x == 99).float().mean().item(), (x == 7).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1 - 0.1 / 50) < 0.02  # (a random draw may be 7 too)
    assert torch.equal(m.apply(ids, [1, 2])["input_ids"], a["input_ids"])
    assert not torch.equal(m.apply(ids, [1, 3])["input_ids"], a["input_ids"])
    one = m.apply(torch.full((4, 3), 7), [0])["labels"]  # every row predicts at least one token
    assert ((one != -100).sum(1) >= 1).all()


def test_mlm_loss_on_the_masked_positions_alone_equals_the_full_logits_loss_and_gradients():
    """The head runs on the ~15% masked positions only (`only=`): the same loss and gradients as cross-entropy over
    the whole (B, T, V) logits with every other label -100."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", causal=False, n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=40,
                      norm="layernorm", bias=False, gate_activation="gelu", mlm_head=True, pooler="mlm")
    model = Transformer(cfg)
    batch = Masking(mask_id=39, vocab=39).apply(torch.randint(0, 39, (3, 32)), [5])
    sparse = mlm_loss(model, batch)
    g_sparse = torch.autograd.grad(sparse, list(model.parameters()))
    full = F.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    g_full = torch.autograd.grad(full, list(model.parameters()))
    torch.testing.assert_close(sparse, full, rtol=0, atol=1e-6)
    for a, b in zip(g_sparse, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    only = batch["labels"] != -100
    assert torch.equal(model(batch["input_ids"], only=only), model(batch["input_ids"])[only])


def test_encoder_texts_are_framed_by_cls_and_sep_and_need_them():
    tok = Tokenizer.train_char(["abc"])
    with pytest.raises(LlmctlError, match=r"\[CLS\] text \[SEP\]"):
        classification_ids(tok, ["ab"], 8, encoder=True)
    enc = tok.with_encoder_tokens()
    ids, cut = classification_ids(enc, ["ab", "abcabcabc"], 6, encoder=True)
    assert ids[0] == [enc.cls_id, *enc.encode("ab"), enc.sep_id] and cut == 1 and len(ids[1]) == 6
    assert classification_ids(enc, ["ab"], 6)[0][0] == [*enc.encode("ab"), enc.eos_id]  # a decoder's


@pytest.mark.parametrize("layout", ["bert", "modernbert"])
def test_padding_is_never_read_by_real_tokens(layout):
    kw = dict(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=40, causal=False, embed_norm=True,
              mlm_head=True)
    if layout == "bert":
        kw.update(norm_position="post", type_vocab_size=2)
    else:
        kw.update(arch="llama", norm="layernorm", gate_activation="gelu", sliding_window=4,
                  layer_types=["full", "sliding", "full"], rope_local_theta=10000.0)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**kw)).eval()
    ids = torch.randint(0, 40, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(ids)
        batch = model(padded, segments=(torch.arange(16) >= 9).long()[None])
    assert torch.allclose(batch[:, :9], alone, atol=1e-5)
    with torch.no_grad():  # without the segments the padding is read
        assert not torch.allclose(model(padded)[:, :9], alone, atol=1e-5)


def test_encoder_classifier_finetunes_with_lora_and_infers(runner, encoder, tmp_path):
    if not SST2.exists():
        pytest.skip(f"{SST2} is absent (the shared data is not checked out beside the repository)")
    rows = SST2.read_text().splitlines()[:121]
    data = tmp_path / "sst2.tsv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "cls"
    r = invoke(runner, "finetune", "--from", encoder, *sets(
        "finetune.task=classification", "finetune.method=lora", f"data.path={data}", "data.text_column=sentence",
        "train.max_steps=6", "train.eval_interval=3", "train.batch_size=8", "train.dtype=float32"),
        "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    cfg = load(out).config
    assert cfg["finetune"]["pooling"] is None and cfg["model"]["causal"] is False  # cls pooling: the default
    r = invoke(runner, "infer", "--ckpt", out, "--prompt", "a fine film", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["label"] in ("0", "1") and abs(sum(result["probabilities"].values()) - 1) < 1e-4
