"""Finetuning tasks end to end: classification, LoRA, instruction tuning, freezing, early stopping."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHAKESPEARE, SHARED, TINY, invoke, sets
from llmctl import checkpoint as ckpt
from llmctl import loading
from llmctl.commands import training as training_cmd
from llmctl.errors import LlmctlError

SST2 = SHARED / "sst2"


@pytest.fixture(scope="module")
def sst_small(tmp_path_factory):
    """400 training phrases and 60 dev sentences, in SST-2's own layouts (train: sentence, dev: content)."""
    d = tmp_path_factory.mktemp("sst")
    train = (SST2 / "train.tsv").read_text().splitlines()
    dev = (SST2 / "dev.tsv").read_text().splitlines()
    (d / "train.tsv").write_text("\n".join(train[:401]) + "\n")
    (d / "dev.tsv").write_text("\n".join(dev[:61]) + "\n")
    return d


def cls_sets(sst, *extra):
    return sets(f"data.path={sst / 'train.tsv'}", "data.text_column=sentence", "eval.text_column=content",
                "finetune.task=classification", "train.max_steps=12", "train.batch_size=8", "train.warmup_steps=2",
                "train.eval_interval=6", "train.best_metric=accuracy", "train.dtype=float32", "train.log_interval=1",
                *extra)


def test_classification_finetune_eval_and_infer(runner, tiny_run, sst_small, tmp_path):
    out = tmp_path / "cls"
    r = invoke(runner, "finetune", "--from", tiny_run, *cls_sets(sst_small), "--out", out, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["steps"] == 12
    held_out = invoke(runner, "eval", "--ckpt", out, "--json")  # the validation slice the run held out
    assert held_out.exit_code == 0, held_out.output
    assert json.loads(held_out.stdout)["accuracy"] == pytest.approx(summary["accuracy"])
    meta = json.loads((ckpt.read_latest(out) / "meta.json").read_text())
    assert meta["task"] == "classification" and "head.safetensors" in meta["files"]

    r = invoke(runner, "eval", "--ckpt", out, "--data", sst_small / "dev.tsv", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["examples"] == 60 and set(m["per_class"]) == {"0", "1"}
    matrix = m["confusion"]["matrix"]
    assert sum(map(sum, matrix)) == 60 and m["accuracy"] == pytest.approx((matrix[0][0] + matrix[1][1]) / 60)
    assert m["macro_f1"] == pytest.approx(sum(c["f1"] for c in m["per_class"].values()) / 2)
    r = invoke(runner, "eval", "--ckpt", out, "--data", sst_small / "dev.tsv")
    assert r.exit_code == 0 and "confusion matrix" in r.stdout and "macro_f1" in r.stdout

    r = invoke(runner, "infer", "--ckpt", out, "--prompt", "a gorgeous , witty film", "--json")
    res = json.loads(r.stdout)
    assert res["label"] in ("0", "1") and sum(res["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    texts = tmp_path / "texts.txt"
    texts.write_text("a gorgeous film\nboring and flat\n")
    r = invoke(runner, "infer", "--ckpt", out, "--input", texts, "--output", tmp_path / "labels.jsonl")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in rows] == ["a gorgeous film", "boring and flat"] and all("label" in x for x in rows)


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_lora_adapter_small_resumable_and_tied_to_its_base(tiny_run, sst_small, tmp_path):
    args = [*cls_sets(sst_small, "finetune.method=lora", "finetune.lora_rank=2", "finetune.lora_targets=[attn.qkv]",
                      "finetune.lora_dropout=0.1", "train.save_interval=4")][1::2]  # the --set values
    full = tmp_path / "full"
    training_cmd.finetune(None, args, tiny_run, full)
    latest = ckpt.read_latest(full)
    assert "adapter.safetensors" in json.loads((latest / "meta.json").read_text())["files"]
    assert not (latest / "model.safetensors").exists()
    adapter = (latest / "adapter.safetensors").stat().st_size
    base = (ckpt.read_latest(tiny_run) / "model.safetensors").stat().st_size
    assert adapter < 0.10 * base
    assert set(load_file(str(latest / "adapter.safetensors"))) == {
        f"blocks.{i}.attn.qkv.lora_{x}" for i in (0, 1) for x in "ab"}

    part = tmp_path / "part"

    def stop(state):
        if state.step == 5:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(LlmctlError) as e:
        training_cmd.finetune(None, args, tiny_run, part, on_step=stop)
    assert e.value.status == 143
    training_cmd.finetune(None, args, tiny_run, part, resume=True)
    assert losses(part) == losses(full) and len(losses(full)) == 12

    loaded = loading.load_model(full, "cpu")  # infer/eval apply the adapter on the recorded base
    assert loaded.classifier is not None

    other = tmp_path / "other-base"  # same shape, different weights: must be refused
    shutil.copytree(tiny_run, other)
    training_cmd.finetune(None, [f"data.path={SHARED / 'tinyshakespeare.txt'}", "train.max_steps=1",
                                 "train.dtype=float32"],
                      tiny_run, tmp_path / "retrained")
    with pytest.raises(LlmctlError, match="does not match adapter"):
        loading.load_model(full, "cpu", base=tmp_path / "retrained")


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory, runner):
    """A tiny char model with a 256-token context, long enough for the instruction template."""
    out = tmp_path_factory.mktemp("runs") / "ctx256"
    r = invoke(runner, "pretrain", *sets(*TINY, "model.block_size=256", "train.max_steps=10"), "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    return out


def test_instruct_lowers_response_loss_and_chats(chat_base, tmp_path, runner):
    from llmctl.data import eval_batches, instruct_examples
    from llmctl.evaluate import lm_metrics

    seed = SHARED / "instruct" / "seed_tasks.jsonl"
    out = tmp_path / "sft"
    r = invoke(runner, "finetune", "--from", chat_base, *sets(f"data.path={seed}", "finetune.task=instruct",
               "train.max_steps=30", "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=3",
               "train.dtype=float32", "train.eval_interval=10"), "--out", out, "--quiet", "--json")
    assert r.exit_code == 0, r.output

    def response_loss(run):
        loaded = loading.load_model(run, "cpu")
        ex = instruct_examples(str(seed), loaded.cfg.data, loaded.tokenizer, 256, loaded.cfg.finetune)
        return lm_metrics(loaded.model, eval_batches(ex, range(len(ex.ids)), "instruct", loaded.tokenizer.pad_id, 16),
                          torch.device("cpu"))["loss"]

    assert response_loss(out) < response_loss(chat_base) - 0.1

    r = invoke(runner, "eval", "--ckpt", out, "--json")
    assert r.exit_code == 0 and "response_loss" in json.loads(r.stdout)

    p = subprocess.run([sys.executable, "-m", "llmctl", "infer", "--ckpt", str(out), "--chat", "--max-new-tokens", "20",
                        "--seed", "0"], input="Say something nice.\n/reset\nWhat is 2+2?\n/exit\n",
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) >= 2 and "Traceback" not in p.stderr


def test_chat_sft_on_a_messages_jsonl_lowers_the_answer_loss(chat_base, tmp_path, runner):
    """`finetune.task: instruct` on conversations (OpenAI messages and ShareGPT rows, multi-turn) through the CLI:
    the loss on the assistant turns falls, and `eval` measures the same examples."""
    from llmctl.data import chat_examples, eval_batches, instruct_examples
    from llmctl.evaluate import lm_metrics

    names = ["Ann", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal"]
    rows = [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": f"Who is {n}?"},
                          {"role": "assistant", "content": f"{n} is kind."},
                          {"role": "user", "content": "And then?"},
                          {"role": "assistant", "content": "Then we rest."}]}
            for n in names]
    rows += [{"conversations": [{"from": "human", "value": f"Greet {n}."}, {"from": "gpt", "value": f"Hello, {n}!"}]}
             for n in names]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "chat-sft"
    r = invoke(runner, "finetune", "--from", chat_base, *sets(f"data.path={data}", "finetune.task=instruct",
               "train.max_steps=25", "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=3",
               "train.dtype=float32", "train.eval_interval=25"), "--out", out, "--quiet")
    assert r.exit_code == 0, r.output

    def answer_loss(run):
        loaded = loading.load_model(run, "cpu")
        ex = instruct_examples(str(data), loaded.cfg.data, loaded.tokenizer, 256, loaded.cfg.finetune,
                               chat=chat_examples(loaded.cfg, loaded.tokenizer))
        assert len(ex.ids) == len(rows) and ex.truncated == 0
        return lm_metrics(loaded.model, eval_batches(ex, range(len(ex.ids)), "instruct", loaded.tokenizer.pad_id, 16),
                          torch.device("cpu"))["loss"]

    before, after = answer_loss(chat_base), answer_loss(out)
    assert after < before - 0.5, (before, after)
    r = invoke(runner, "eval", "--ckpt", out, "--data", data, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["response_loss"] == pytest.approx(after, rel=1e-4)


def test_freezing_and_early_stopping(tiny_run, tmp_path):
    out = tmp_path / "frozen"
    args = [f"data.path={SHARED / 'tinyshakespeare.txt'}", "train.max_steps=40", "train.eval_interval=5",
            "train.eval_batches=2", "finetune.freeze_blocks=1", "finetune.freeze_embeddings=true",
            "train.dtype=float32",
            "train.best_mode=max", "train.patience=2"]  # "max" on a falling loss: no eval ever improves on the first
    summary = training_cmd.finetune(None, args, tiny_run, out)
    assert summary["stopped_early"] and summary["steps"] == 15
    before = load_file(str(ckpt.read_latest(tiny_run) / "model.safetensors"))
    after = load_file(str(ckpt.read_latest(out) / "model.safetensors"))
    assert torch.equal(before["wte.weight"], after["wte.weight"])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.0."))
    assert not torch.equal(before["blocks.1.mlp.fc.weight"], after["blocks.1.mlp.fc.weight"])


# ------------------------------------------------------------------------------------------------------------------
# Distillation (finetune.task=distill)

DISTILL = [f"data.path={SHAKESPEARE}", "train.max_steps=8", "train.log_interval=1", "train.eval_interval=4",
           "train.eval_batches=2", "train.warmup_steps=2", "train.dtype=float32"]


def test_distill_loss_is_the_kl_to_the_teacher_plus_weighted_cross_entropy(tiny_run):
    import torch.nn.functional as F

    from llmctl.tasks import distill_loss

    loaded = loading.load_model(tiny_run, "cpu")
    model, n = loaded.model, loaded.tokenizer.vocab_size  # the KL runs over the tokenizer's tokens
    other = loading.load_model(tiny_run, "cpu").model
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    ce = F.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten())
    # a teacher equal to the student: the KL term is zero, what is left is (1 - alpha) x cross-entropy
    assert distill_loss(model, 0.75, 2.0, n)(model, batch).item() == pytest.approx(0.25 * ce.item(), abs=1e-6)
    # against another teacher: T^2 x KL at temperature T, by hand
    s = F.log_softmax(model(batch["input_ids"])[..., :n] / 2.0, -1)
    t = F.log_softmax(other(batch["input_ids"])[..., :n] / 2.0, -1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    got = distill_loss(other, 1.0, 2.0, n)(model, batch).item()
    assert got == pytest.approx(4.0 * kl.item(), rel=1e-5) and got > 0


def test_distill_with_alpha_0_equals_ordinary_finetuning_step_for_step(tiny_run, tmp_path):
    training_cmd.finetune(None, DISTILL, tiny_run, tmp_path / "lm")
    training_cmd.finetune(None, [*DISTILL, "finetune.task=distill", f"finetune.teacher={tiny_run}",
                             "finetune.distill_alpha=0"], tiny_run, tmp_path / "kd")
    assert losses(tmp_path / "kd") == losses(tmp_path / "lm") and len(losses(tmp_path / "lm")) == 8
    a = load_file(ckpt.read_latest(tmp_path / "lm") / "model.safetensors")
    b = load_file(ckpt.read_latest(tmp_path / "kd") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((ckpt.read_latest(tmp_path / "kd") / "meta.json").read_text())
    assert meta["task"] == "distill" and meta["teacher"] == str(tiny_run)


def test_a_distill_run_resumes_bit_identically(tiny_run, tmp_path):
    import os
    import signal

    args = [*DISTILL, "finetune.task=distill", f"finetune.teacher={tiny_run}", "finetune.distill_alpha=0.7",
            "finetune.distill_temperature=2", "model.dropout=0.1"]
    training_cmd.finetune(None, args, tiny_run, tmp_path / "full")

    def stop_at_5(state):
        if state.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(LlmctlError) as e:
        training_cmd.finetune(None, args, tiny_run, tmp_path / "part", on_step=stop_at_5)
    assert e.value.status == 143
    training_cmd.finetune(None, args, tiny_run, tmp_path / "part", resume=True)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_a_fresh_student_of_another_shape_distils_with_the_teachers_tokenizer(tiny_run, runner, tmp_path):
    out = tmp_path / "fresh"
    r = invoke(runner, "finetune", *sets(*DISTILL, "finetune.task=distill", f"finetune.teacher={tiny_run}",
                                         "finetune.distill_alpha=1", "model.n_layer=1", "model.n_embd=16",
                                         "model.n_head=2", "model.block_size=32"), "--out", out, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 8
    ck = ckpt.load(out)
    assert ck.config["model"]["n_embd"] == 16 and ck.tokenizer_json() == ckpt.load(tiny_run).tokenizer_json()
    dry = invoke(runner, "finetune", "--from", tiny_run, *sets(*DISTILL, "finetune.task=distill",
                                                               f"finetune.teacher={tiny_run}"), "--dry-run", "--json")
    report = json.loads(dry.stdout)
    assert report["teacher_parameters"] > 0 and report["memory"]["teacher"] > 0
    assert report["flops_per_token"] == 3 * (report["flops_per_token_forward"] - report["teacher_flops_per_token"]) \
        + report["teacher_flops_per_token"]


# ------------------------------------------------------------------------------------------------------------------
# Packed documents (data.document_mask)


@pytest.fixture(scope="module")
def speeches(tmp_path_factory):
    """Tiny Shakespeare's first 60,000 characters as a JSONL of documents, one per speech (about 250)."""
    d = tmp_path_factory.mktemp("speeches")
    rows = [s for s in SHAKESPEARE.read_text()[:60_000].split("\n\n") if s.strip()]
    (d / "speeches.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in rows))
    return d / "speeches.jsonl"


def test_a_document_masked_batch_loss_is_the_loss_of_each_document_alone(speeches):
    import numpy as np
    import torch.nn.functional as F

    from llmctl.config import DataConfig, ModelConfig, TokenizerConfig
    from llmctl.data import LMBatches, document_starts, prepare
    from llmctl.model import Transformer
    from llmctl.train import lm_loss

    td = prepare(DataConfig(path=str(speeches), document_mask=True), TokenizerConfig())
    starts, _ = document_starts(td)
    tokens, eos = np.asarray(td.train), td.tokenizer.eos_id
    assert (tokens[starts[1:]] == eos).all() and (tokens == eos).sum() == len(starts) - 1  # each <eos> opens one
    batch = LMBatches(td.train, 64, 4, 1, seed=0, starts=starts).get(0)[0]
    assert (batch["segments"][:, 0] == 0).all() and batch["segments"].max() > 0  # rows that pack several speeches
    assert (batch["input_ids"][:, 0] == td.tokenizer.eos_id).sum() >= 2  # most rows open with a document's <eos>
    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="llama", n_layer=2, n_head=2, n_embd=32, block_size=64,
                                    vocab_size=td.tokenizer.vocab_size)).eval()
    total, count = 0.0, 0
    for ids, labels, seg in zip(batch["input_ids"], batch["labels"], batch["segments"]):
        for s in seg.unique():
            keep = seg == s
            logits = model(ids[keep][None])[0]
            total += F.cross_entropy(logits, labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert lm_loss(model, batch).item() == pytest.approx(total / count, rel=1e-5)


def test_pretraining_on_packed_documents_learns_and_validates_with_segments(speeches, tmp_path):
    out = tmp_path / "doc"
    training_cmd.pretrain(None, [*TINY, f"data.path={speeches}", "data.document_mask=true", "train.max_steps=10",
                                 "train.eval_interval=5", "train.log_interval=5"], out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
