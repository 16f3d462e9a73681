"""`llmctl eval --tasks` (lm-evaluation-harness on llmctl's own model) against lm-eval's own HF backend on the
exported directory of the same checkpoint: per-example loglikelihoods within 1e-4, the same accuracy, identical
generations, and the same rolling loglikelihoods. The tasks are local YAMLs in tests/lm_eval_tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, SHAKESPEARE, TINY, invoke, sets

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
TASKS = ROOT / "tests" / "lm_eval_tasks"
NAMES = ["shakespeare_next_line", "shakespeare_complete", "shakespeare_rolling"]
TOL = 1e-4


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, runner) -> Path:
    """A small byte-level BPE llama (the context fits the generation task's prompt plus its 16 new tokens)."""
    root = tmp_path_factory.mktemp("runs")
    corpus = root / "shakespeare-300k.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:300_000])
    out = root / "bpe"
    r = invoke(runner, "pretrain", *sets(*TINY, f"data.path={corpus}", "model.arch=llama", "model.n_head=4",
                                          "model.n_kv_head=2", "model.n_embd=64", "model.block_size=96",
                                          "tokenizer.kind=bpe", "tokenizer.vocab_size=400", "train.max_steps=60",
                                          "train.eval_interval=0"), "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def both(bpe_run, runner, tmp_path_factory) -> tuple[dict, dict]:
    """(llmctl eval --tasks --json, lm_eval's hf backend on the export), each with log_samples."""
    r = invoke(runner, "eval", "--ckpt", bpe_run, "--tasks", ",".join(NAMES), "--include-path", TASKS,
               "--log-samples", "--limit", "24", "--batch-size", "8", "--json")
    assert r.exit_code == 0, r.output
    ours = json.loads(r.stdout)
    export = tmp_path_factory.mktemp("export") / "hf"
    assert invoke(runner, "export", "--ckpt", bpe_run, "--out", export).exit_code == 0
    from llmctl.harness import task_manager  # (lm-eval's index of its tasks, made once)

    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},dtype=float32", tasks=NAMES,
                                     task_manager=task_manager(str(TASKS)), log_samples=True, limit=24,
                                     batch_size=8, device="cpu")
    return ours, theirs


def _by_doc(samples: list[dict]) -> dict[int, dict]:
    return {s["doc_id"]: s for s in samples}


def test_multiple_choice_loglikelihoods_and_accuracy_equal_the_hf_backend(both):
    ours, theirs = both
    a, b = _by_doc(ours["samples"]["shakespeare_next_line"]), _by_doc(theirs["samples"]["shakespeare_next_line"])
    assert sorted(a) == sorted(b) and len(a) == 24
    worst = 0.0
    for d in a:
        la = [float(x[0]) for x in a[d]["filtered_resps"]]
        lb = [float(x[0]) for x in b[d]["filtered_resps"]]
        assert len(la) == len(lb) == 4
        worst = max(worst, *(abs(x - y) for x, y in zip(la, lb)))
    assert worst < TOL
    acc = ours["results"]["shakespeare_next_line"]["acc,none"]
    assert acc == theirs["results"]["shakespeare_next_line"]["acc,none"]


def test_generations_are_identical_to_the_hf_backend(both):
    ours, theirs = both
    a, b = _by_doc(ours["samples"]["shakespeare_complete"]), _by_doc(theirs["samples"]["shakespeare_complete"])
    texts = {d: a[d]["filtered_resps"][0] for d in a}
    assert texts == {d: b[d]["filtered_resps"][0] for d in b}
    assert len(set(texts.values())) > 1 and all("\n" not in t for t in texts.values())  # stopped at the newline
    assert ours["results"]["shakespeare_complete"]["exact_match,none"] == \
        theirs["results"]["shakespeare_complete"]["exact_match,none"]


def test_rolling_loglikelihoods_equal_the_hf_backend(both):
    ours, theirs = both
    a, b = _by_doc(ours["samples"]["shakespeare_rolling"]), _by_doc(theirs["samples"]["shakespeare_rolling"])
    worst = max(abs(float(a[d]["filtered_resps"][0]) - float(b[d]["filtered_resps"][0])) for d in a)
    assert sorted(a) == sorted(b) and worst < TOL, worst  # (each a sum over a few hundred tokens)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["shakespeare_rolling"][metric] == pytest.approx(
            theirs["results"]["shakespeare_rolling"][metric], rel=1e-5)


def test_results_are_saved_in_the_run_and_shown_by_runs(both, bpe_run, runner):
    ours, _ = both
    saved = Path(ours["saved"])
    assert saved.parent == bpe_run / "evals" and saved.name.endswith("shakespeare_rolling.json")
    assert json.loads(saved.read_text())["results"] == ours["results"]
    r = invoke(runner, "runs", bpe_run.parent, "--json")
    assert r.exit_code == 0, r.output
    row = next(x for x in json.loads(r.stdout)["runs"] if x["name"] == "bpe")
    assert row["evals"]["shakespeare_next_line/acc,none"] == ours["results"]["shakespeare_next_line"]["acc,none"]
    r = invoke(runner, "runs", bpe_run.parent)
    assert "shakespeare_" in r.stdout


def test_the_table_shows_each_metric_with_its_stderr(bpe_run, runner):
    r = invoke(runner, "eval", "--ckpt", bpe_run, "--tasks", "shakespeare_next_line", "--include-path", TASKS,
               "--limit", "8")
    assert r.exit_code == 0, r.output
    assert "shakespeare_next_line" in r.stdout and "acc" in r.stdout and "stderr" in r.stdout


def test_tasks_without_the_extra_is_one_line(runner, tiny_run, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    r = invoke(runner, "eval", "--ckpt", tiny_run, "--tasks", "shakespeare_rolling")
    assert r.exit_code == 2 and "pip install 'llmctl[eval]'" in r.stderr and "Traceback" not in r.output


def test_lm_evals_local_completions_client_against_serve_equals_eval_tasks(both, bpe_run, runner, tmp_path,
                                                                          monkeypatch):
    """lm-eval's own OpenAI client (`local-completions`: token-id prompts, echo, logprobs 1, max_tokens 1) against
    `llmctl serve` on the same checkpoint gives `llmctl eval --tasks`'s log-likelihoods and accuracy."""
    pytest.importorskip("openai")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    from test_server import KEY, Server

    from llmctl.harness import task_manager

    export = tmp_path / "hf"
    assert invoke(runner, "export", "--ckpt", bpe_run, "--out", export).exit_code == 0
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    ours, _ = both
    r = invoke(runner, "eval", "--ckpt", bpe_run, "--tasks", "shakespeare_rolling_short", "--include-path", TASKS,
               "--log-samples", "--json")
    assert r.exit_code == 0, r.output
    rolling = json.loads(r.stdout)
    from llmctl.tokenizer import Tokenizer

    eot = Tokenizer.from_file(bpe_run / "tokenizer.json").eos_id  # the prefix of a rolling window, as llmctl's
    with Server(bpe_run, "--dtype", "float32", "--no-compile", key_file=key_file) as s:
        # max_length: the model's context (the rolling task's documents fit one window)
        args = (f"base_url={s.url}/v1/completions,model=bpe,tokenizer_backend=huggingface,tokenizer={export},"
                f"max_length=96,num_concurrent=1,max_retries=1,tokenized_requests=True,custom_prefix_token_id={eot}")
        theirs = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                         tasks=["shakespeare_next_line", "shakespeare_rolling_short"],
                                         task_manager=task_manager(str(TASKS)), log_samples=True,
                                         limit=24)
        # local-chat-completions: a generate_until task end to end through /v1/chat/completions (the chat template
        # of a base model: llmctl's instruction template; `truncate` keeps a long prompt's last tokens)
        chat = lm_eval.simple_evaluate(model="local-chat-completions",
                                       model_args=f"base_url={s.url}/v1/chat/completions,model=bpe,max_retries=1",
                                       tasks=["shakespeare_complete"], apply_chat_template=True,
                                       gen_kwargs="truncate=True", task_manager=task_manager(str(TASKS)),
                                       log_samples=True, limit=8)
        answered = s.metrics()['llmctl_requests_total{endpoint="/v1/chat/completions",status="200"}']
        assert s.stop() == 0
    texts = [x["filtered_resps"][0] for x in chat["samples"]["shakespeare_complete"]]
    assert answered == 8 and len(texts) == 8 and all("\n" not in t for t in texts)  # (may be empty: a tiny model)
    assert 0 <= chat["results"]["shakespeare_complete"]["exact_match,none"] <= 1
    a = _by_doc(rolling["samples"]["shakespeare_rolling_short"])
    b = _by_doc(theirs["samples"]["shakespeare_rolling_short"])
    assert sorted(a) == sorted(b) and len(a) == 24
    worst = max(abs(float(a[d]["filtered_resps"][0]) - float(b[d]["filtered_resps"][0])) for d in a)
    assert worst < TOL, worst
    a, b = _by_doc(ours["samples"]["shakespeare_next_line"]), _by_doc(theirs["samples"]["shakespeare_next_line"])
    assert sorted(a) == sorted(b) and len(a) == 24
    worst = max(abs(float(x[0]) - float(y[0])) for d in a
                for x, y in zip(a[d]["filtered_resps"], b[d]["filtered_resps"], strict=True))
    assert worst < TOL, worst
    assert ours["results"]["shakespeare_next_line"]["acc,none"] == \
        theirs["results"]["shakespeare_next_line"]["acc,none"]
