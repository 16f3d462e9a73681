"""GRPO (finetune.task=grpo): advantages and loss against a hand computation, rollouts against `infer`, rewards that
misbehave, exact resume, a reward that rises, and `eval --reward`."""

import json
import math
import os
import signal

import pytest
import torch

from conftest import invoke, sets
from llmctl import loading
from llmctl.commands import inference as inference_cmd
from llmctl.commands import training as training_cmd
from llmctl.data import PromptRow
from llmctl.errors import LlmctlError
from llmctl.generate import Engine
from llmctl.grpo import group_advantages, grpo_terms
from llmctl.rewards import Reward, Rewards, load_rewards
from llmctl.rollouts import encode_prompts, sample
from llmctl.sampling import Sampling

WORDS = ["the king", "a night", "my lord", "the queen", "sweet love", "o duke", "fair sir", "good morrow"]

REWARDS = '''
import math

def count_e(prompts, completions, **columns):
    return [float(c.count("e")) for c in completions]

def boom(prompts, completions, n, **columns):
    if 3 in n:
        raise ValueError("no threes")
    return [0.0] * len(completions)

def short(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)

def nan_for_row_2(prompts, completions, n, **columns):
    return [math.nan if i == 2 else 1.0 for i in n]
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A prompts file (prompt and a column n) and a file of reward functions."""
    d = tmp_path_factory.mktemp("grpo")
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": WORDS[i % 8] + " ", "n": i}) + "\n")
    with open(d / "few.jsonl", "w") as f:
        for w in WORDS:
            f.write(json.dumps({"prompt": w + " "}) + "\n")
    (d / "rewards_fns.py").write_text(REWARDS)
    return d


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


GRPO = ["finetune.task=grpo", "finetune.group_size=4", "train.batch_size=2", "train.max_steps=4",
        "train.log_interval=1", "train.eval_interval=2", "train.warmup_steps=0", "train.dtype=float32",
        "generate.max_new_tokens=6", "data.val_fraction=0.125", "train.eval_batches=1", "eval.batch_size=2"]


def grpo_args(files, *more):
    return [*GRPO, f"data.path={files / 'prompts.jsonl'}", f"finetune.reward={files / 'rewards_fns.py'}:count_e",
            *more]


def test_advantages_and_loss_equal_a_hand_computation():
    rewards = torch.tensor([1.0, 2.0, 4.0, 1.0, 3.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    adv = group_advantages(rewards, 4)
    mean, std = 2.0, math.sqrt(((1 - 2) ** 2 + 0 + 2 ** 2 + 1) / 3)  # Bessel's correction, as TRL
    assert adv[:4].tolist() == pytest.approx([(r - mean) / (std + 1e-4) for r in (1, 2, 4, 1)], abs=1e-12)
    assert adv[4:].tolist() == [0.0] * 4  # a group of equal rewards teaches nothing
    assert group_advantages(rewards, 4, scale=False)[:4].tolist() == [-1.0, 0.0, 2.0, -1.0]

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g, requires_grad=True)
    labels = torch.tensor([[-100, 1, 3, -100], [-100, -100, 2, 4]])  # completion tokens only; padding -100
    a = torch.tensor([1.5, -0.5])
    ref = torch.randn(2, 4, generator=g) - 2
    old = torch.randn(2, 4, generator=g) * 0.3 - 1.6
    eps, beta = 0.2, 0.1
    out = grpo_terms(logits, labels, a, ref, old, eps, beta, temperature=0.7)
    want, n = 0.0, 0
    for i in range(2):
        for t in range(4):
            if labels[i, t] == -100:
                continue
            lp = float(torch.log_softmax(logits[i, t].detach() / 0.7, -1)[labels[i, t]])
            ratio = math.exp(lp - float(old[i, t]))
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            d = float(ref[i, t]) - lp
            want += -min(ratio * float(a[i]), clipped * float(a[i])) + beta * (math.exp(d) - d - 1)
            n += 1
    assert n == 4 and out["loss"].sum().item() / n == pytest.approx(want / n, abs=1e-6)

    # one update per generation: ratio == 1, yet the gradient is the policy gradient -A grad log pi (+ the KL's)
    out = grpo_terms(logits, labels, a, ref, None, eps, 0.0, temperature=1.0)
    (grad,) = torch.autograd.grad(out["loss"].sum(), logits)
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (want_grad,) = torch.autograd.grad(-(a[:, None] * lp * (labels != -100)).sum(), logits)
    assert torch.allclose(grad, want_grad, atol=1e-7) and grad.abs().sum() > 0

    # the logits of the completion tokens alone ((M, V), what forward(only=labels != -100) gives): the same terms
    # and, through them, the same gradient at those positions (none elsewhere)
    mask = labels != -100
    for old_lp in (old, None):
        full = grpo_terms(logits, labels, a, ref, old_lp, eps, beta, temperature=0.7)
        sel = grpo_terms(logits[mask], labels, a, ref, old_lp, eps, beta, temperature=0.7)
        for k in ("loss", "k3", "clipped", "mask"):
            torch.testing.assert_close(sel[k], full[k], rtol=0, atol=1e-6)
        (g_full,) = torch.autograd.grad(full["loss"].sum(), logits)
        (g_sel,) = torch.autograd.grad(sel["loss"].sum(), logits)
        torch.testing.assert_close(g_sel, g_full, rtol=0, atol=1e-7)


def test_rollouts_at_temperature_0_equal_infer(tiny_run):
    loaded = loading.for_inference(loading.load_model(tiny_run, "cpu"), "float32", "none", compile=False)
    prompts = ["ROMEO: ", "the king ", "O"]
    s = Sampling(max_new_tokens=10, temperature=0)
    infer = inference_cmd.complete_rows(loaded, [{"prompt": p} for p in prompts], s)
    rows = [PromptRow(p) for p in prompts]
    ids, cut = encode_prompts(loaded.cfg, loaded.tokenizer, rows, 10)
    got = sample(Engine(loaded.model, loaded.tokenizer), ids, s, 2, slots=4)
    assert cut == 0 and [c.text for c in got] == [r["completion"] for r in infer for _ in range(2)]
    for c in got:
        assert c.text == loaded.tokenizer.decode(c.ids[:len(c.ids) - (c.finish_reason == "eos")])


def test_a_reward_that_misbehaves_stops_with_one_line_naming_it_and_the_row(files, tiny_run, runner, tmp_path):
    path = files / "rewards_fns.py"
    rows = [f"{files / 'prompts.jsonl'}:{n + 1}" for n in range(4) for _ in range(2)]
    args = dict(prompts=["p"] * 8, completions=["x"] * 8, columns={"n": [n for n in range(4) for _ in range(2)]},
                rows=rows)
    for fn, words in (("boom", ["raised ValueError: no threes", "prompts.jsonl:4"]),
                      ("short", ["returned 7 values for the 8 completions", "prompts.jsonl:1 .. "]),
                      ("nan_for_row_2", ["returned nan", "prompts.jsonl:3"])):
        with pytest.raises(LlmctlError) as e:
            load_rewards(f"{path}:{fn}").score(**args)
        assert f"finetune.reward {path}:{fn}" in e.value.message and "\n" not in e.value.message
        for w in words:
            assert w in e.value.message, (w, e.value.message)
    with pytest.raises(LlmctlError, match="None is not allowed"):
        Rewards([Reward("f", lambda prompts, completions, **kw: [None] * len(completions))]).score(**args)
    # through the CLI: the run stops, exit 2, one line
    r = invoke(runner, "finetune", "--from", tiny_run, *sets(*grpo_args(files), f"finetune.reward={path}:boom",
                                                             "train.batch_size=8"), "--out", tmp_path / "o")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"finetune.reward {path}:boom raised ValueError: no threes on row" in r.stderr, r.stderr


def test_a_grpo_run_resumes_exactly(files, tiny_run, tmp_path):
    """Stopped in the middle of a generation's two updates (grpo_iterations 2): the resumed run trains on the
    checkpointed rollouts, then samples what the uninterrupted run sampled."""
    args = grpo_args(files, "finetune.grpo_iterations=2", "finetune.group_size=2", "model.dropout=0.1",
                     "train.lr=3e-3")
    training_cmd.finetune(None, args, tiny_run, tmp_path / "full")

    def stop_at_3(state):
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(LlmctlError) as e:
        training_cmd.finetune(None, args, tiny_run, tmp_path / "part", on_step=stop_at_3)
    assert e.value.status == 143
    training_cmd.finetune(None, args, tiny_run, tmp_path / "part", resume=True)
    timing = ("time", "tokens_per_sec", "gen_seconds", "train_seconds", "val_seconds")
    strip = lambda rows: [{k: v for k, v in m.items() if k not in timing} for m in rows]  # noqa: E731
    full = metrics(tmp_path / "full")
    assert strip(metrics(tmp_path / "part")) == strip(full)
    train = [m for m in full if "loss" in m]
    assert len(train) == 4 and [m["gen_seconds"] > 0 for m in train] == [True, False, True, False]
    for k in ("reward", "reward_std", "kl", "completion_len", "completion_len_max", "train_seconds"):
        assert k in train[-1]
    assert train[1]["kl"] > 0 and "val_reward" in full[-1] and "val_kl" in full[-1]


def test_reward_rises_on_a_learnable_reward_and_eval_measures_it(files, tiny_run, runner, tmp_path):
    out = tmp_path / "e"
    args = grpo_args(files, "train.max_steps=8", "train.lr=2e-2", "train.batch_size=4", "finetune.beta=0",
                     "train.eval_interval=0", "data.val_fraction=0")
    r = invoke(runner, "finetune", "--from", tiny_run, *sets(*args), "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    train = [m for m in metrics(out) if "loss" in m]
    first, last = (sum(m["reward"] for m in ms) / len(ms) for ms in (train[:3], train[-3:]))
    assert last > first + 0.3, (first, last)
    # eval --reward: the policy against its start (the default reference) and the start against itself
    spec = f"{files / 'rewards_fns.py'}:count_e"
    got = {}
    for ckpt, more in ((out, []), (tiny_run, ["--reference", tiny_run])):  # (the run's reference: where it started)
        r = invoke(runner, "eval", "--ckpt", ckpt, "--reward", spec, "--prompts", files / "few.jsonl", "--samples", "2",
                   "-n", "6", "--seed", "3", "--json", *more)
        assert r.exit_code == 0, r.output
        got[ckpt] = json.loads(r.stdout)
        assert set(got[ckpt]) == {"reward", "reward_std", "kl", "samples"} and got[ckpt]["samples"] == 16
    assert got[out]["reward"] > got[tiny_run]["reward"] and got[out]["kl"] > 0 and got[tiny_run]["kl"] == 0
    # a reference exported and imported again is the same model with the same tokenizer (Tokenizer.sha256 is
    # what the tokenizer is, not whether tokenizer_config.json now names its special tokens)
    assert invoke(runner, "export", "--ckpt", tiny_run, "--format", "hf", "--out", tmp_path / "hf").exit_code == 0
    assert invoke(runner, "import", "hf", tmp_path / "hf", "--out", tmp_path / "again", "--quiet").exit_code == 0
    r = invoke(runner, "eval", "--ckpt", tiny_run, "--reward", spec, "--prompts", files / "few.jsonl", "--samples",
               "2", "-n", "6", "--seed", "3", "--json", "--reference", tmp_path / "again")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == got[tiny_run]


def test_a_classifier_reward_is_the_probability_of_its_label(tiny_run, tmp_path):
    data = tmp_path / "train.tsv"
    data.write_text("label\tsentence\n" + "".join(f"{('neg', 'pos')[i % 2]}\tword {i}\n" for i in range(40)))
    training_cmd.finetune(None, ["finetune.task=classification", f"data.path={data}", "data.text_column=sentence",
                                 "train.max_steps=2", "train.dtype=float32"], tiny_run, tmp_path / "cls")
    rewards = load_rewards(f"classifier:{tmp_path / 'cls'}:pos")
    prompts = ["the king ", [{"role": "user", "content": "hi"}], "a "]
    completions = ["was good", [{"role": "assistant", "content": "sweet love"}], "night " * 40]  # (the last: cut)
    got, each = rewards.score(prompts, completions, {}, ["r1", "r2", "r3"])
    classifier = loading.load_model(tmp_path / "cls", "cpu")
    want = inference_cmd.classify_texts(classifier, ["the king was good", "sweet love", "a " + "night " * 40])
    assert got.tolist() == pytest.approx([w["probabilities"]["pos"] for w in want], abs=1e-6)
    assert list(each) == [f"classifier:{tmp_path / 'cls'}:pos"]


def test_the_dry_run_counts_every_completion_of_a_prompt(files, tiny_run, runner, tmp_path):
    """A GRPO micro-batch holds train.batch_size prompts x finetune.group_size completions: the dry run's tokens per
    step, activations and their label count those rows (as the preflight that refuses a run too big for the device)."""
    reports = {}
    for g in (2, 4):
        r = invoke(runner, "finetune", "--from", tiny_run, *sets(*grpo_args(files), f"finetune.group_size={g}"),
                   "--out", tmp_path / "never", "--dry-run", "--json")
        assert r.exit_code == 0, r.output
        reports[g] = json.loads(r.stdout)
    block = reports[4]["config"]["model"]["block_size"]
    assert reports[4]["rows_per_batch"] == 2 * 4 and reports[4]["tokens_per_step"] == 2 * 4 * block
    a2, a4 = (reports[g]["memory"] for g in (2, 4))
    assert a4["activations"] == 2 * a2["activations"] > 0 and a4["weights"] == a2["weights"]
    assert a4["activations_checkpointed"] == 2 * a2["activations_checkpointed"]
    r = invoke(runner, "finetune", "--from", tiny_run, *sets(*grpo_args(files)), "--out", tmp_path / "never",
               "--dry-run")
    assert f"{2 * 4 * block:,} (8 x {block})" in r.stdout and f"activations (8 x {block})" in r.stdout
    assert not (tmp_path / "never").exists()
