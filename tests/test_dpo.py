"""Preference tuning (finetune.task=dpo): the loss and rewards against a direct computation, the reference (a frozen
copy, or the base with LoRA adapters off), pairs and their cutting, a CLI run, and exact resume."""

import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from conftest import invoke, sets
from llmctl import loading
from llmctl.commands import training as training_cmd
from llmctl.config import FinetuneConfig
from llmctl.data import Examples, chat_examples, pad_batch
from llmctl.data.preferences import cut_pair, pair
from llmctl.errors import LlmctlError
from llmctl.lora import adapters_off, apply_lora
from llmctl.preference import dpo_terms, frozen_reference

WORDS = ["king", "queen", "lord", "duke", "love", "night", "sword", "crown"]


def pairs_file(path, n=48):
    """n plain-text pairs: a short prompt, a chosen and a rejected continuation."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"the {WORDS[i % 8]} and the {WORDS[(i * 3 + 1) % 8]}",
                                "chosen": " were good", "rejected": " were foul"}) + "\n")
    return path


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tiny_batch(tok):
    """Two pairs of different lengths, padded as the training loop pads them."""
    rows = [("the king", " was good", " was foul and dark"), ("a night of love", " ends", " never ends")]
    chosen, rejected = Examples([], []), Examples([], [])
    for prompt, c, r in rows:
        sc, sr = pair({"prompt": prompt, "chosen": c, "rejected": r}, tok, FinetuneConfig(), None, "t")
        for ex, (ids, lab) in ((chosen, sc), (rejected, sr)):
            ex.ids.append(ids)
            ex.targets.append(lab)
    return pad_batch(Examples(chosen.ids, chosen.targets, rejected=rejected), [0, 1], tok.pad_id, "preference")


def direct_logp(logits, labels, i):
    """log pi(answer) of sequence i, token by token (each token's float32 log-probability, added up exactly)."""
    total = 0.0
    for t in range(labels.shape[1]):
        if labels[i, t] != -100:
            total += float(torch.log_softmax(logits[i, t], -1)[labels[i, t]])
    return torch.tensor(total, dtype=torch.float64)


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_loss_and_rewards_equal_a_direct_computation(tiny_run, loss_type, smoothing):
    loaded = loading.load_model(tiny_run, "cpu")
    policy, ref = loaded.model, loading.load_model(tiny_run, "cpu").model
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    batch = tiny_batch(loaded.tokenizer)
    x, y = batch["input_ids"], batch["labels"]
    assert x.shape[0] == 4 and (y[:, :7] == -100).all()  # chosen, chosen, rejected, rejected; prompts unlabelled
    with torch.no_grad():
        pl, rl = policy(x), ref(x)
    beta = 0.3
    got = dpo_terms(pl, rl, y, loss_type, beta, smoothing)
    for i in range(2):
        lp = [direct_logp(pl, y, j) for j in (i, i + 2)]
        lr = [direct_logp(rl, y, j) for j in (i, i + 2)]
        if loss_type == "ipo":  # IPO compares length-averaged log-probabilities
            n = [(y[j] != -100).sum() for j in (i, i + 2)]
            lp, lr = [a / k for a, k in zip(lp, n)], [a / k for a, k in zip(lr, n)]
        rc, rr = beta * (lp[0] - lr[0]), beta * (lp[1] - lr[1])
        m = (lp[0] - lr[0]) - (lp[1] - lr[1])
        loss = ((m - 1 / (2 * beta)) ** 2 if loss_type == "ipo"
                else -(1 - smoothing) * F.logsigmoid(beta * m) - smoothing * F.logsigmoid(-beta * m))
        for k, want in (("loss", loss), ("reward_chosen", rc), ("reward_rejected", rr), ("margin", rc - rr),
                        ("accuracy", float(rc > rr))):
            assert got[k][i].item() == pytest.approx(float(want), abs=1e-6), k
        kl = 0.0
        for j in (i, i + 2):
            for t in range(y.shape[1]):
                if y[j, t] != -100:
                    p, q = torch.log_softmax(pl[j, t], -1), torch.log_softmax(rl[j, t], -1)
                    kl += float((p.exp() * (p - q)).sum()) / 2
        assert got["kl"][i].item() == pytest.approx(kl, abs=1e-6) and kl > 0
    # the logits of the answer tokens alone (the head skips prompts and padding, as training runs it): the same terms
    with torch.no_grad():
        answers = y != -100
        sel = dpo_terms(policy(x, only=answers), ref(x, only=answers), y, loss_type, beta, smoothing)
    for k in got:
        torch.testing.assert_close(sel[k], got[k], rtol=0, atol=1e-6)
    # the policy against itself: no reward, no KL, the loss is log 2 (sigmoid)
    same = dpo_terms(pl, pl, y, "sigmoid", beta)
    assert same["margin"].abs().max() == 0 and same["kl"].abs().max() < 1e-6
    assert same["loss"][0].item() == pytest.approx(0.6931472, abs=1e-6)


def test_under_lora_the_reference_is_the_base_with_adapters_off(tiny_run):
    base = loading.load_model(tiny_run, "cpu").model
    model = loading.load_model(tiny_run, "cpu").model.train()  # (dropout 0: train mode computes as eval)
    reference = frozen_reference(model, lora=True)  # decided before the adapters exist, as the plan builds it
    apply_lora(model, ["attn.qkv", "mlp.fc"], 2, 4.0, 0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    x = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, tuned = base(x), model(x)
        assert not torch.allclose(tuned, want)  # the adapters change the model...
        assert torch.equal(reference(x), want)  # ...the reference is the base exactly
        with adapters_off(model):
            assert torch.equal(model(x), want)
        assert torch.equal(model(x), tuned)  # and they are back on after
    assert model.training  # (the reference ran in eval mode and restored the mode)
    assert sum(p.numel() for p in model.parameters()) < 1.1 * sum(p.numel() for p in base.parameters())


def test_with_full_finetuning_the_reference_is_a_frozen_copy_of_the_start(tiny_run):
    model = loading.load_model(tiny_run, "cpu").model
    x = torch.randint(0, 60, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = model(x)
        reference = frozen_reference(model, lora=False)
        for p in model.parameters():
            p.add_(0.1)
        assert torch.equal(reference(x), start) and not torch.allclose(model(x), start)


def test_pairs_label_the_answers_only_and_chat_rows_render_with_the_template(tiny_run):
    loaded = loading.load_model(tiny_run, "cpu")
    tok, ft = loaded.tokenizer, FinetuneConfig()
    (ci, cl), (ri, rl) = pair({"prompt": "ab", "chosen": "cd", "rejected": "e"}, tok, ft, None, "t")
    assert ci == tok.encode("abcd") + [tok.eos_id] and ri == tok.encode("abe") + [tok.eos_id]
    assert cl == [-100, -100, *tok.encode("cd"), tok.eos_id] and rl == [-100, -100, *tok.encode("e"), tok.eos_id]

    chat = chat_examples(loaded.cfg, tok)
    user, good, bad = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"},
                       {"role": "assistant", "content": "bad"})
    want = chat.example("messages", [user, good], "t"), chat.example("messages", [user, bad], "t")
    assert pair({"prompt": [user], "chosen": [good], "rejected": [bad]}, tok, ft, chat, "t") == want
    assert pair({"prompt": "hi", "chosen": "good", "rejected": [bad]}, tok, ft, chat, "t") == want
    assert pair({"chosen": [user, good], "rejected": [user, bad]}, tok, ft, chat, "t") == want  # implicit prompt
    # an earlier answer inside the prompt is context, not learned
    earlier = [user, {"role": "assistant", "content": "so"}, user]
    (ids, labels), _ = pair({"prompt": earlier, "chosen": [good], "rejected": [bad]}, tok, ft, chat, "t")
    full_ids, full_labels = chat.example("messages", earlier + [good], "t")
    first = next(i for i, x in enumerate(labels) if x != -100)
    assert ids == full_ids and labels[first:] == full_labels[first:] and full_labels[:first] != [-100] * first
    with pytest.raises(LlmctlError, match="t: chosen and rejected are identical"):
        pair({"prompt": "a", "chosen": [good], "rejected": [good]}, tok, ft, chat, "t")
    with pytest.raises(LlmctlError, match="no prompt"):
        pair({"chosen": "a", "rejected": "b"}, tok, ft, chat, "t")


def test_a_long_pair_keeps_the_prompts_end_and_the_answers_starts():
    prompt, chosen, rejected = list(range(100, 120)), list(range(10)), list(range(30, 36))
    c = (prompt + chosen, [-100] * 20 + chosen)
    r = (prompt + rejected, [-100] * 20 + rejected)
    assert cut_pair(c, r, 40) == (c, r, False)
    (ci, cl), (ri, rl), cut = cut_pair(c, r, 16)  # the longer answer (10) would leave 6: the prompt keeps 16 // 2
    assert cut and ci == prompt[-8:] + chosen[:8] and cl == [-100] * 8 + chosen[:8]
    assert ri == prompt[-8:] + rejected and rl == [-100] * 8 + rejected
    (ci, _), _, _ = cut_pair(c, r, 26)  # room for the whole answers: the prompt keeps what is left
    assert ci == prompt[-16:] + chosen


DPO = ["finetune.task=dpo", "train.max_steps=20", "train.batch_size=4", "train.lr=1e-3", "train.warmup_steps=2",
       "train.log_interval=5", "train.eval_interval=10", "train.dtype=float32", "data.val_fraction=0.25"]


def test_a_dpo_run_through_the_cli_raises_accuracy_and_margin(runner, tiny_run, tmp_path):
    data = pairs_file(tmp_path / "pairs.jsonl")
    out = tmp_path / "dpo"
    r = invoke(runner, "finetune", "--from", tiny_run, *sets(*DPO, f"data.path={data}", "finetune.method=lora",
                                                             "finetune.lora_rank=4", "train.lr=1e-2"),
               "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    rows = metrics(out)
    train = [m for m in rows if "loss" in m]
    val = [m for m in rows if "val_loss" in m]
    for k in ("reward_chosen", "reward_rejected", "margin", "accuracy", "kl"):
        assert k in train[-1] and f"val_{k}" in val[-1]
    assert train[0]["margin"] == 0 and train[0]["accuracy"] == 0 and train[0]["loss"] == pytest.approx(0.693147)
    assert train[-1]["margin"] > 0.1 and train[-1]["accuracy"] == 1.0 and train[-1]["kl"] > 0
    assert val[-1]["val_margin"] > val[0]["val_margin"] > 0 and val[-1]["val_accuracy"] == 1.0
    assert val[-1]["val_loss"] < val[0]["val_loss"] < 0.6931
    meta = json.loads((out / (out / "latest").read_text().strip() / "meta.json").read_text())
    assert meta["task"] == "dpo" and meta["method"] == "lora"
    r = invoke(runner, "infer", "--ckpt", out, "--prompt", "the king and the lord", "-n", "6", "--temperature", "0")
    assert r.exit_code == 0, r.output
    r = invoke(runner, "eval", "--ckpt", out)  # its measures are the run's own: eval says where they are
    assert r.exit_code == 2 and "preference-tuned" in r.stderr and "metrics.jsonl" in r.stderr
    # the dry run counts each pair as its two sequences, chosen and rejected
    r = invoke(runner, "finetune", "--from", tiny_run, *sets(*DPO, f"data.path={data}"), "--out", tmp_path / "never",
               "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["rows_per_batch"] == 2 * 4 and report["tokens_per_step"] == 2 * 4 * 32  # (TINY's block_size)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_dpo_run_resumes_exactly(tiny_run, tmp_path, method):
    """Full finetuning: the reference stays the starting checkpoint when a resumed run loads its own weights; LoRA:
    the base with the resumed adapters off."""
    args = [*DPO, f"data.path={pairs_file(tmp_path / 'pairs.jsonl')}", "train.max_steps=10", "train.log_interval=1",
            "train.eval_interval=5", "model.dropout=0.1", f"finetune.method={method}", "finetune.lora_dropout=0.1"]
    training_cmd.finetune(None, args, tiny_run, tmp_path / "full")

    def stop_at_4(state):
        if state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(LlmctlError) as e:
        training_cmd.finetune(None, args, tiny_run, tmp_path / "part", on_step=stop_at_4)
    assert e.value.status == 143
    training_cmd.finetune(None, args, tiny_run, tmp_path / "part", resume=True)
    timing = ("time", "tokens_per_sec", "val_seconds")
    strip = lambda rows: [{k: v for k, v in m.items() if k not in timing} for m in rows]  # noqa: E731
    assert strip(metrics(tmp_path / "part")) == strip(metrics(tmp_path / "full"))
    assert len([m for m in metrics(tmp_path / "full") if "margin" in m]) == 10
