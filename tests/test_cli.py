"""The CLI end to end, and the shared table of bad inputs (every row: exit 2, a named problem, no traceback)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SHAKESPEARE, TINY, disk_fills_on_second_shard, encoder_run, invoke, sets
from llmctl.rundir import read_status


def test_end_to_end_prepare_pretrain_finetune_infer_eval(tmp_path, runner, tiny_run):
    r = invoke(runner, "prepare", *sets(*TINY), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["train_tokens"] == 1_003_854

    status = read_status(tiny_run)
    assert status["status"] == "finished" and status["step"] == status["steps"] == status["max_steps"]
    rows = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens", "time"} <= set(rows[0]) and any("val_loss" in x for x in rows)
    assert (tiny_run / "config.yaml").exists() and (tiny_run / "tokenizer.json").exists()

    corpus = tmp_path / "sonnets.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:20000])
    ft = tmp_path / "ft"
    r = invoke(runner, "finetune", "--from", tiny_run, *sets(f"data.path={corpus}", "train.max_steps=5",
               "train.batch_size=2", "train.dtype=float32"), "--out", ft, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["steps"] == 5 and summary["val_loss"] is not None
    assert (ft / "latest").read_text().strip() == "step-0000005"
    meta = json.loads((ft / "step-0000005" / "meta.json").read_text())
    assert meta["kind"] == "finetune" and meta["step"] == 5

    r = invoke(runner, "infer", "--ckpt", ft, "--prompt", "ROMEO:", "--max-new-tokens", "40", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) > 30
    again = invoke(runner, "infer", "--ckpt", ft, "--prompt", "ROMEO:", "--max-new-tokens", "40", "--seed", "1")
    assert again.stdout == r.stdout

    r = invoke(runner, "eval", "--ckpt", tiny_run, "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert {"loss", "perplexity", "bits_per_byte"} <= set(m)
    assert m["tokens"] == 111_539 and abs(m["perplexity"] - 2.718281828 ** m["loss"]) < 1e-6
    r = invoke(runner, "eval", "--ckpt", tiny_run, "--data", corpus)
    assert r.exit_code == 0 and "bits_per_byte" in r.stdout


def test_config_show(runner):
    r = invoke(runner, "config", "show", "-c", ROOT / "configs/shakespeare-char.yaml", "--set", "train.lr=5e-4")
    assert r.exit_code == 0, r.output
    assert "arch: llama" in r.stdout and "lr: 0.0005" in r.stdout


def test_closed_stdout_stops_quietly():
    """`llmctl ... | head` closes the pipe early: exit like a Unix tool (141), no 'unexpected error' line."""
    import os
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "llmctl", "config", "show", "-c",
                            str(ROOT / "configs/shakespeare-char.yaml")],
                           stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert r.returncode == 141 and r.stderr == "", r.stderr


def test_python_m_and_help():
    out = subprocess.run([sys.executable, "-m", "llmctl", "pretrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout and "--set" in out.stdout


def test_finetune_config_disagreeing_with_checkpoint(runner, tiny_run, tmp_path):
    r = invoke(runner, "finetune", "--from", tiny_run, "--set", "model.n_layer=3", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "model.n_layer" in r.stderr and "checkpoint" in r.stderr


# ----------------------------------------------------------------------------------------------------------------
# The bad-input table. Each case: (id, setup(tmp, tiny_run) -> args, words the message must contain[, environment
# variables {NAME: value}, or a function(monkeypatch) that injects a fault]).


def _file(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def _corrupt(tmp: Path, run: Path) -> Path:
    import shutil

    dst = tmp / "corrupt"
    shutil.copytree(run, dst)
    ckpt = dst / (dst / "latest").read_text().strip()
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    return dst


LLAMA_JSON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 40}


def _hf_dir(tmp: Path, weights: str = "none", **fields) -> Path:
    """A transformers-style directory: config.json (LLAMA_JSON with `fields`; None drops a key) and, if asked,
    weights: "full", "missing-tensor" (one left out), "wrong-shape" (one a column short) or "pickle" (a
    pytorch_model.bin holding an object)."""
    import json as _json

    d = tmp / "hfmodel"
    d.mkdir()
    cfg = {k: v for k, v in {**LLAMA_JSON, **fields}.items() if v is not None}
    (d / "config.json").write_text(_json.dumps(cfg))
    if weights in ("full", "missing-tensor", "wrong-shape"):
        from safetensors.torch import save_file

        from llmctl import hf
        from llmctl.model import Transformer

        m = hf.to_model_config(cfg)
        tensors = hf.to_hf_weights(Transformer(m).state_dict(), m, "test")
        if weights == "missing-tensor":
            tensors.pop("model.layers.0.self_attn.k_proj.weight")
        elif weights == "wrong-shape":
            tensors["model.layers.0.mlp.up_proj.weight"] = (
                tensors["model.layers.0.mlp.up_proj.weight"][:, :-1].contiguous())
        save_file(tensors, str(d / "model.safetensors"))
    elif weights == "pickle":
        import datetime

        import torch

        torch.save({"model.embed_tokens.weight": datetime.datetime.now()}, d / "pytorch_model.bin")
    return d


def _bare_import(tmp: Path, run: Path) -> Path:
    """tiny_run exported without its tokenizer, then imported: a checkpoint with no tokenizer.json."""
    from llmctl import checkpoint as ckpt_io
    from llmctl import hf
    from llmctl.commands.interop import import_hf
    from llmctl.config import from_dict

    ck = ckpt_io.load(run)
    (tmp / "bare").mkdir()
    hf.write_dir(tmp / "bare", from_dict(ck.config), ck.weights(), None, str(ck.path))
    import_hf(str(tmp / "bare"), tmp / "imported")
    return tmp / "imported"


BAD = [
    ("malformed-yaml", lambda t, r: ["pretrain", "-c", _file(t, "c.yaml", "model: [1, 2\n"), "--out", t / "o"],
     ["not valid YAML", "line"]),
    ("unknown-key", lambda t, r: ["pretrain", "-c", _file(t, "c.yaml", "train:\n  lrr: 1\n"), "--out", t / "o"],
     ["train.lrr", "did you mean", "train.lr"]),
    ("wrong-type", lambda t, r: ["pretrain", *sets("train.batch_size=big"), "--out", t / "o"],
     ["train.batch_size", "integer"]),
    ("n_embd-not-divisible",
     lambda t, r: ["pretrain", *sets(*TINY, "model.n_embd=30", "model.n_head=4"), "--out", t / "o"],
     ["n_embd", "divisible"]),
    ("negative-lr", lambda t, r: ["pretrain", *sets(*TINY, "train.lr=-1"), "--out", t / "o"], ["train.lr", "positive"]),
    ("missing-config-file", lambda t, r: ["pretrain", "-c", t / "nope.yaml", "--out", t / "o"],
     ["config file not found"]),
    ("missing-data-file", lambda t, r: ["pretrain", *sets(*TINY, f"data.path={t / 'missing.txt'}"), "--out", t / "o"],
     ["data.path", "does not exist"]),
    ("empty-corpus", lambda t, r: ["pretrain", *sets(*TINY, f"data.path={_file(t, 'e.txt', '')}"), "--out", t / "o"],
     ["empty"]),
    ("corpus-shorter-than-block",
     lambda t, r: ["pretrain", *sets(*TINY, f"data.path={_file(t, 's.txt', 'tiny text')}"), "--out", t / "o"],
     ["block_size"]),
    ("missing-checkpoint", lambda t, r: ["infer", "--ckpt", t / "no-run", "--prompt", "hi"], ["checkpoint not found"]),
    ("checkpoint-fails-manifest", lambda t, r: ["infer", "--ckpt", _corrupt(t, r), "--prompt", "hi"],
     ["model.safetensors", "sha256"]),
    ("eval-corrupt-checkpoint", lambda t, r: ["eval", "--ckpt", _corrupt(t, r)], ["sha256"]),
    ("out-exists", lambda t, r: ["pretrain", *sets(*TINY), "--out", r],
     ["already holds a run", "--resume", "--overwrite"]),
    ("resume-and-overwrite", lambda t, r: ["pretrain", *sets(*TINY), "--out", r, "--resume", "--overwrite"],
     ["contradict"]),
    ("resume-not-a-run", lambda t, r: ["pretrain", *sets(*TINY), "--out", _nonrun(t), "--resume"],
     ["holds no llmctl run"]),
    ("prompt-too-long", lambda t, r: ["infer", "--ckpt", r, "--prompt", "x" * 100],
     ["100 tokens", "context is 32", "--truncate"]),
    ("max-new-tokens-zero", lambda t, r: ["infer", "--ckpt", r, "--prompt", "hi", "--max-new-tokens", "0"],
     ["--max-new-tokens"]),
    ("max-new-tokens-negative", lambda t, r: ["infer", "--ckpt", r, "--prompt", "hi", "--max-new-tokens", "-3"],
     ["--max-new-tokens"]),
    ("empty-prompt-file", lambda t, r: ["infer", "--ckpt", r, "--prompt-file", _file(t, "p.txt", "  \n")], ["empty"]),
    ("missing-prompt-file", lambda t, r: ["infer", "--ckpt", r, "--prompt-file", t / "nope.txt"],
     ["--prompt-file", "does not exist"]),
    ("no-prompt", lambda t, r: ["infer", "--ckpt", r], ["no prompt"]),
    ("eval-missing-data", lambda t, r: ["eval", "--ckpt", r, "--data", t / "nope.txt"], ["does not exist"]),
    ("bad-override-syntax", lambda t, r: ["config", "show", "--set", "train.lr"], ["KEY=VALUE"]),
    ("finetune-missing-base", lambda t, r: ["finetune", "--from", t / "nope", "--out", t / "o"],
     ["checkpoint not found"]),
    ("unknown-option", lambda t, r: ["pretrain", "--nope"], ["No such option"]),
    ("resume-from-missing", lambda t, r: ["pretrain", *sets(*TINY), "--resume-from", t / "nope", "--out", t / "o"],
     ["checkpoint not found"]),
    ("eval-batch-size-zero", lambda t, r: ["eval", "--ckpt", r, "--batch-size", "0"], ["--batch-size"]),
    ("negative-temperature", lambda t, r: ["infer", "--ckpt", r, "--prompt", "hi", "--temperature", "-1"],
     ["--temperature"]),
    ("top-p-above-one", lambda t, r: ["infer", "--ckpt", r, "--prompt", "hi", "--top-p", "2"], ["--top-p"]),
    ("prompt-and-prompt-file",
     lambda t, r: ["infer", "--ckpt", r, "--prompt", "a", "--prompt-file", _file(t, "p.txt", "b")],
     ["either --prompt or --prompt-file"]),
    ("config-show-missing-file", lambda t, r: ["config", "show", "-c", t / "nope.yaml"], ["config file not found"]),
    ("prepare-missing-data", lambda t, r: ["prepare", "--set", f"data.path={t / 'nope.txt'}"], ["does not exist"]),
    ("prepare-no-data-path", lambda t, r: ["prepare"], ["data.path is not set"]),
    ("tokenizer-path-missing", lambda t, r: ["prepare", *sets(*TINY, f"tokenizer.path={t / 'tok.json'}")],
     ["tokenizer file not found"]),
    ("tokenizer-file-invalid",
     lambda t, r: ["prepare", *sets(*TINY, f"tokenizer.path={_file(t, 'tok.json', '{oops')}")],
     ["not a valid tokenizer.json"]),
    ("vocab-smaller-than-tokenizer", lambda t, r: ["pretrain", *sets(*TINY, "model.vocab_size=10"), "--out", t / "o"],
     ["model.vocab_size=10", "tokenizer"]),
    ("finetune-without-from", lambda t, r: ["finetune", "--out", t / "o"], ["--from"]),
    ("checkpoint-is-a-file", lambda t, r: ["eval", "--ckpt", _file(t, "ck.bin", "x")], ["must be a directory"]),
    ("not-an-llmctl-checkpoint", lambda t, r: ["infer", "--ckpt", _foreign(t), "--prompt", "hi"],
     ["not an llmctl checkpoint"]),
    ("out-is-a-file", lambda t, r: ["pretrain", *sets(*TINY), "--out", _file(t, "o.txt", "x")], ["is a file"]),
    ("overwrite-non-run-dir", lambda t, r: ["pretrain", *sets(*TINY), "--out", _nonrun(t), "--overwrite"],
     ["does not look like an llmctl run"]),
    ("bad-dtype-choice", lambda t, r: ["pretrain", *sets(*TINY, "train.dtype=fp8"), "--out", t / "o"],
     ["train.dtype", "one of"]),
    ("device-unavailable", lambda t, r: ["pretrain", *sets(*TINY, "train.device=cuda"), "--out", t / "o"], ["CUDA"]),
    ("cls-missing-label-column", lambda t, r: ["finetune", "--from", r, *sets("finetune.task=classification",
     "data.path=" + str(_file(t, "c.tsv", "stars\tsentence\n1\tgood\n0\tbad\n")), "data.text_column=sentence"),
     "--out", t / "o"],
     ["no column 'label'", "data.label_column"]),
    ("cls-empty-text", lambda t, r: ["finetune", "--from", r, *sets("finetune.task=classification",
     "data.path=" + str(_file(t, "c.tsv", "label\tsentence\n1\tgood\n0\t \n")), "data.text_column=sentence"),
     "--out", t / "o"],
     ["row 2", "empty text"]),
    ("cls-unseen-label-at-eval", lambda t, r: ["eval", "--ckpt", _classifier(t, r), "--data",
     _file(t, "d.tsv", "label\tcontent\n1\tgood\n7\tbad\n"), "--text-column", "content"],
     ["'7'", "not one the model was trained on"]),
    ("lora-target-matches-nothing", lambda t, r: ["finetune", "--from", r, *sets(f"data.path={SHAKESPEARE}",
     "finetune.method=lora", "finetune.lora_targets=[attn.q_proj]"), "--out", t / "o"],
     ["attn.q_proj", "matches no layer"]),
    ("adapter-base-mismatch",
     lambda t, r: ["infer", "--ckpt", _adapter(t, r), "--base", _retrained(t, r), "--prompt", "hi"],
     ["does not match adapter"]),
    ("instruct-bad-jsonl-line", lambda t, r: ["finetune", "--from", r, *sets("finetune.task=instruct",
     "data.path=" + str(_file(t, "i.jsonl", '{"prompt": "a", "response": "b"}\n{oops\n'))), "--out", t / "o"],
     ["line 2", "not valid JSON"]),
    ("instruct-unknown-layout", lambda t, r: ["finetune", "--from", r, *sets("finetune.task=instruct",
     "data.path=" + str(_file(t, "i.jsonl", '{"question": "a", "answer": "b"}\n'))), "--out", t / "o"],
     ["expected fields", "question"]),
    ("instruct-messages-without-an-answer", lambda t, r: ["finetune", "--from", r, *sets("finetune.task=instruct",
     "data.path=" + str(_file(t, "m.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n'))), "--out", t / "o"],
     ["m.jsonl:1", "no assistant message", "add the assistant's answer"]),
    ("dpo-row-without-rejected", lambda t, r: ["finetune", "--from", r, *sets("finetune.task=dpo",
     "data.path=" + str(_file(t, "p.jsonl", '{"prompt": "a", "chosen": "good"}\n'))), "--out", t / "o"],
     ["p.jsonl:1", "needs fields chosen and rejected", "rejected missing"]),
    ("dpo-row-without-chosen", lambda t, r: ["finetune", "--from", r, *sets("finetune.task=dpo",
     "data.path=" + str(_file(t, "p.jsonl", '{"prompt": "a", "rejected": "bad"}\n'))), "--out", t / "o"],
     ["p.jsonl:1", "chosen missing"]),
    ("dpo-identical-chosen-and-rejected", lambda t, r: ["finetune", "--from", r, *sets("finetune.task=dpo",
     "data.path=" + str(_file(t, "p.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                                             '{"prompt": "a", "chosen": "same", "rejected": "same"}\n'))),
     "--out", t / "o"],
     ["p.jsonl:2", "chosen and rejected are identical", "remove the row"]),
    ("dpo-beta-not-positive", lambda t, r: ["finetune", "--from", r, *sets("finetune.task=dpo", "finetune.beta=0"),
     "--out", t / "o"], ["finetune.beta", "must be positive"]),
    ("dpo-label-smoothing-with-ipo", lambda t, r: ["finetune", "--from", r, *sets("finetune.task=dpo",
     "finetune.dpo_loss=ipo", "finetune.label_smoothing=0.1"), "--out", t / "o"],
     ["finetune.label_smoothing applies to dpo_loss=sigmoid only"]),
    ("dpo-packing", lambda t, r: ["finetune", "--from", r, *sets("finetune.task=dpo", "finetune.packing=true"),
     "--out", t / "o"], ["finetune.packing", "not packed"]),
    ("grpo-reward-does-not-import", lambda t, r: ["finetune", "--from", r, *sets(*_grpo(t), "finetune.reward="
     "no_such_reward_module:score"), "--out", t / "o"],
     ["finetune.reward 'no_such_reward_module:score'", "no module named 'no_such_reward_module'"]),
    ("grpo-reward-file-lacks-the-function", lambda t, r: ["finetune", "--from", r, *sets(*_grpo(t), "finetune.reward="
     + str(_file(t, "rw.py", "def other(prompts, completions, **kw):\n    return [0.0] * len(completions)\n"))
     + ":score"), "--out", t / "o"], ["rw.py has no function 'score'"]),
    ("grpo-classifier-reward-unknown-label", lambda t, r: ["finetune", "--from", r, *sets(*_grpo(t),
     f"finetune.reward=classifier:{_classifier(t, r)}:positive"), "--out", t / "o"],
     ["the classifier has no label 'positive'", "its labels are 0, 1"]),
    ("grpo-group-size-1", lambda t, r: ["finetune", "--from", r, *sets(*_grpo(t), "finetune.group_size=1"),
     "--out", t / "o"], ["finetune.group_size", "at least 2 per prompt"]),
    ("grpo-greedy", lambda t, r: ["finetune", "--from", r, *sets(*_grpo(t), "generate.temperature=0"),
     "--out", t / "o"], ["generate.temperature=0", "nothing to compare"]),
    ("grpo-without-reward", lambda t, r: ["finetune", "--from", r, *sets(*_grpo(t)[:-1]), "--out", t / "o"],
     ["finetune.task=grpo needs a reward"]),
    ("grpo-prompt-row-without-prompt", lambda t, r: ["finetune", "--from", r, *sets(*_grpo(t)[:-1],
     "finetune.reward=math:fsum", "data.path=" + str(_file(t, "q.jsonl", '{"question": "a"}\n'))), "--out", t / "o"],
     ["q.jsonl:1", "needs a 'prompt' column", "finetune.prompt_field"]),
    ("eval-reward-without-prompts", lambda t, r: ["eval", "--ckpt", r, "--reward", "math:fsum"],
     ["--reward and --prompts go together"]),
    ("data-column-missing",
     lambda t, r: ["prepare", *sets(*TINY, "data.path=" + str(_file(t, "d.jsonl", '{"body": "x"}')))],
     ["no column 'text'", "data.text_column"]),
    # Hugging Face import / export
    ("import-unsupported-architecture", lambda t, r: ["import", "hf", _hf_dir(t, architectures=["FalconForCausalLM"],
     model_type="falcon"), "--out", t / "o"], ["unsupported architecture FalconForCausalLM", "Qwen3ForCausalLM"]),
    ("import-remote-code", lambda t, r: ["import", "hf", _hf_dir(t, architectures=["MiniCPMForCausalLM"],
     model_type="minicpm", auto_map={"AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"}),
     "--out", t / "o"], ["MiniCPMForCausalLM", "trust_remote_code", "LlamaForCausalLM"]),
    ("import-rope-scaling",
     lambda t, r: ["import", "hf", _hf_dir(t, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "--out", t / "o"], ["rope_scaling", "'dynamic' is not supported", "llama3"]),
    ("import-rope-parameters-scaling", lambda t, r: ["import", "hf", _hf_dir(t, rope_parameters={
     "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0]}), "--out", t / "o"],
     ["rope_parameters", "'longrope' is not supported"]),
    ("import-mlp-bias-differs",
     lambda t, r: ["import", "hf", _hf_dir(t, attention_bias=True, mlp_bias=False), "--out", t / "o"],
     ["mlp_bias", "attention_bias"]),
    ("import-odd-head-dim", lambda t, r: ["import", "hf", _hf_dir(t, head_dim=5), "--out", t / "o"],
     ["head_dim", "even head size"]),
    ("import-hidden-act", lambda t, r: ["import", "hf", _hf_dir(t, hidden_act="gelu"), "--out", t / "o"],
     ["hidden_act", "gelu"]),
    ("import-gpt2-activation",
     lambda t, r: ["import", "hf", _hf_dir(t, architectures=["GPT2LMHeadModel"], model_type="gpt2",
     n_embd=32, n_layer=1, n_head=4, activation_function="relu"), "--out", t / "o"], ["activation_function", "relu"]),
    ("import-missing-field", lambda t, r: ["import", "hf", _hf_dir(t, hidden_size=None), "--out", t / "o"],
     ["hidden_size"]),
    ("import-missing-config", lambda t, r: ["import", "hf", t, "--out", t / "o"], ["no config.json"]),
    ("import-not-a-directory", lambda t, r: ["import", "hf", t / "nope", "--out", t / "o"], ["not a directory"]),
    ("import-missing-weights", lambda t, r: ["import", "hf", _hf_dir(t), "--out", t / "o"],
     ["no weights", "model.safetensors"]),
    ("import-missing-tensor", lambda t, r: ["import", "hf", _hf_dir(t, weights="missing-tensor"), "--out", t / "o"],
     ["lacks tensor", "k_proj"]),
    ("import-wrong-shape", lambda t, r: ["import", "hf", _hf_dir(t, weights="wrong-shape"), "--out", t / "o"],
     ["up_proj.weight", "(48, 31)", "(48, 32)"]),
    ("import-pickled-object", lambda t, r: ["import", "hf", _hf_dir(t, weights="pickle"), "--out", t / "o"],
     ["pytorch_model.bin", "cannot be loaded safely"]),
    ("import-out-exists", lambda t, r: ["import", "hf", _hf_dir(t, weights="full"), "--out", r],
     ["not empty", "--overwrite"]),
    ("import-tokenizer-too-big", lambda t, r: ["import", "hf", _hf_dir(t, weights="full"), "--out", t / "o",
     "--tokenizer", r / "tokenizer.json"], ["tokens but the model only 40"]),
    ("infer-imported-without-tokenizer", lambda t, r: ["infer", "--ckpt", _bare_import(t, r), "--prompt", "hi"],
     ["no tokenizer", "--tokenizer"]),
    ("eval-imported-without-data",
     lambda t, r: ["eval", "--ckpt", _bare_import(t, r), "--tokenizer", r / "tokenizer.json"],
     ["no data.path", "--data"]),
    ("export-unknown-format", lambda t, r: ["export", "--ckpt", r, "--format", "onnx", "--out", t / "o"],
     ["--format", "onnx"]),
    ("export-out-not-empty", lambda t, r: ["export", "--ckpt", r, "--out", _file(t, "x", "").parent],
     ["not empty", "--overwrite"]),
    ("export-classifier", lambda t, r: ["export", "--ckpt", _classifier(t, r), "--out", t / "o"],
     ["classification checkpoint", "language models and encoder classifiers only"]),
    ("export-missing-checkpoint", lambda t, r: ["export", "--ckpt", t / "nope", "--out", t / "o"],
     ["checkpoint not found"]),
]


def _grpo(tmp: Path) -> list[str]:
    """GRPO settings with a prompts file (the reward last)."""
    return ["finetune.task=grpo", "data.path=" + str(_file(tmp, "prompts.jsonl", '{"prompt": "a"}\n' * 4)),
            "finetune.reward=math:fsum"]


def _classifier(tmp: Path, run: Path) -> Path:
    from llmctl.commands import training as training_cmd

    data = _file(tmp, "train.tsv", "label\tsentence\n" + "".join(f"{i % 2}\tword {i}\n" for i in range(40)))
    out = tmp / "cls"
    training_cmd.finetune(None, ["finetune.task=classification", f"data.path={data}", "data.text_column=sentence",
                             "train.max_steps=2", "train.dtype=float32"], run, out)
    return out


def _windowed_llama(tmp: Path) -> Path:
    """A tiny llama-flavour checkpoint with a byte-level BPE tokenizer and a sliding window shorter than its
    context (Mistral v0.1's kind: llama.cpp's llama would attend past the window)."""
    from llmctl import checkpoint as ckpt_io
    from llmctl.config import Config
    from llmctl.config.model import ModelConfig
    from llmctl.model import Transformer
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["to be or not to be " * 50], 300)
    cfg = Config(model=ModelConfig(arch="llama", n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=300,
                                   sliding_window=8))
    cfg.tokenizer.kind = "bpe"
    ckpt_io.save(tmp / "windowed", 0, Transformer(cfg.model).state_dict(), cfg.to_yaml(), tok.to_str())
    return tmp / "windowed"


def _other_tokenizer_draft(tmp: Path, run: Path) -> Path:
    """A draft of the run's vocabulary size with another character tokenizer (the run's characters, shifted by one
    code point: the same count, other tokens)."""
    from llmctl import checkpoint as ckpt_io
    from llmctl.config import Config
    from llmctl.loading import load_model
    from llmctl.model import Transformer
    from llmctl.tokenizer import Tokenizer

    ours = load_model(run, "cpu")
    chars = [ours.tokenizer.decode([i]) for i in range(ours.cfg.model.vocab_size)]
    tok = Tokenizer.train_char(["".join(chr(ord(c[0]) + 1) if c else "" for c in chars)])
    assert tok.vocab_size == ours.cfg.model.vocab_size
    cfg = Config(model=ours.cfg.model)
    ckpt_io.save(tmp / "other-draft", 0, Transformer(cfg.model).state_dict(), cfg.to_yaml(), tok.to_str())
    return tmp / "other-draft"


def _adapter(tmp: Path, run: Path) -> Path:
    from llmctl.commands import training as training_cmd

    out = tmp / "adapter"
    training_cmd.finetune(None,
                      [f"data.path={SHAKESPEARE}", "finetune.method=lora", "train.max_steps=2", "train.dtype=float32"],
                      run, out)
    return out


def _retrained(tmp: Path, run: Path) -> Path:
    from llmctl.commands import training as training_cmd

    out = tmp / "retrained"
    training_cmd.finetune(None, [f"data.path={SHAKESPEARE}", "train.max_steps=1", "train.dtype=float32"], run, out)
    return out


def _foreign(tmp: Path) -> Path:
    d = tmp / "foreign"
    d.mkdir()
    (d / "meta.json").write_text('{"format": "something-else"}')
    return d


def _nonrun(tmp: Path) -> Path:
    d = tmp / "precious"
    d.mkdir()
    (d / "thesis.tex").write_text("do not delete")
    return d


BAD += [
    ("input-malformed-jsonl",
     lambda t, r: ["infer", "--ckpt", r, "--input", _file(t, "in.jsonl", '{"prompt": "a"}\n{"prompt": \n'),
     "--output", t / "out.jsonl"], ["line 2", "not valid JSON"]),
    ("input-empty-file",
     lambda t, r: ["infer", "--ckpt", r, "--input", _file(t, "in.txt", "\n\n"), "--output", t / "out.jsonl"],
     ["holds no prompts"]),
    ("input-prompt-too-long",
     lambda t, r: ["infer", "--ckpt", r, "--input", _file(t, "in.txt", "ok\n" + "x" * 100 + "\n"),
     "--output", t / "out.jsonl"], ["row 2", "100 tokens", "--truncate"]),
    ("input-missing-prompt-field",
     lambda t, r: ["infer", "--ckpt", r, "--input", _file(t, "in.jsonl", '{"text": 1}\n')], ["line 1", "prompt"]),
    ("bad-quantize", lambda t, r: ["infer", "--ckpt", r, "--prompt", "a", "--quantize", "int4"], ["--quantize"]),
    ("output-without-input", lambda t, r: ["infer", "--ckpt", r, "--prompt", "a", "--output", t / "o.jsonl"],
     ["--output goes with --input"]),
    ("bad-compile-setting", lambda t, r: ["pretrain", *sets(*TINY, "generate.compile=sometimes"), "--out", t / "o"],
     ["generate.compile", "auto, true, false", "sometimes"]),
    ("compile-with-cpu-int8", lambda t, r: ["infer", "--ckpt", r, "--prompt", "a", "--quantize", "int8", "--compile"],
     ["--compile does not apply to int8", "--quantize none"]),
]


def _meta_edited(tmp: Path, run: Path, **fields) -> Path:
    """A copy of `run` whose latest checkpoint's meta.json has `fields` changed."""
    import shutil

    dst = tmp / "edited"
    shutil.copytree(run, dst)
    meta = dst / (dst / "latest").read_text().strip() / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), **fields}))
    return dst


NULL_MODEL = ["model: in", "is empty (null)", "give it keys, or remove the line"]

BAD += [
    ("meta-format-version-not-int",
     lambda t, r: ["infer", "--ckpt", _meta_edited(t, r, format_version="abc"), "--prompt", "hi"],
     ["meta.json", "format_version must be an integer", "'abc'", "use another checkpoint"]),
    ("meta-step-not-int", lambda t, r: ["eval", "--ckpt", _meta_edited(t, r, step="thirty")],
     ["meta.json", "step must be a non-negative integer", "set it to 30"]),
    # a null section is the same error everywhere, with or without a --set for that section
    ("model-null-config-show",
     lambda t, r: ["config", "show", "-c", _file(t, "c.yaml", "model:\ntrain:\n  lr: 1e-3\n")], NULL_MODEL),
    ("model-null-config-show-with-set", lambda t, r: ["config", "show", "-c", _file(t, "c.yaml", "model: null\n"),
     "--set", "model.n_layer=2"], NULL_MODEL),
    ("model-null-pretrain-with-set", lambda t, r: ["pretrain", "-c", _file(t, "c.yaml", "model: null\n"), *sets(*TINY),
     "--out", t / "o"], NULL_MODEL),
    ("model-null-finetune-with-set", lambda t, r: ["finetune", "--from", r, "-c", _file(t, "c.yaml", "model:\n"),
     "--set", "model.n_layer=2", "--out", t / "o"], NULL_MODEL),
]


# tensor-parallel layouts, checked before the process group is joined; the env is what torchrun would set
TORCHRUN_3 = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3"}
TORCHRUN_2 = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
BAD += [
    ("tp-without-torchrun", lambda t, r: ["pretrain", *sets(*TINY, "train.parallel=tp"), "--out", t / "o"],
     ["train.parallel=tp", "launch with torchrun"]),
    ("tp-size-not-dividing-world", lambda t, r: ["pretrain", *sets(*TINY, "train.parallel=tp", "train.tp_size=2"),
     "--out", t / "o"], ["train.tp_size=2 does not divide the 3 processes"], TORCHRUN_3),
    ("tp-heads-not-dividing", lambda t, r: ["pretrain", *sets(*TINY, "model.n_head=1", "train.parallel=tp"),
     "--out", t / "o"], ["model.n_head=1 is not divisible by train.tp_size=2"], TORCHRUN_2),
    ("tp-kv-heads-not-dividing", lambda t, r: ["pretrain", *sets(*TINY, "model.arch=llama", "model.n_head=4",
     "model.n_kv_head=1", "train.parallel=tp"), "--out", t / "o"], ["model.n_kv_head=1 is not divisible"], TORCHRUN_2),
    ("fsdp-tp-without-tp-size", lambda t, r: ["pretrain", *sets(*TINY, "train.parallel=fsdp_tp"), "--out", t / "o"],
     ["fsdp_tp needs train.tp_size"], TORCHRUN_2),
    ("fsdp-tp-no-fsdp-dimension", lambda t, r: ["pretrain", *sets(*TINY, "train.parallel=fsdp_tp", "train.tp_size=2"),
     "--out", t / "o"], ["leaves no FSDP dimension"], TORCHRUN_2),
    ("tp-size-with-ddp", lambda t, r: ["pretrain", *sets(*TINY, "train.tp_size=2"), "--out", t / "o"],
     ["train.tp_size=2 applies to train.parallel=tp or fsdp_tp"]),
    ("tp-lora", lambda t, r: ["finetune", "--from", r, *sets(f"data.path={SHAKESPEARE}", "finetune.method=lora",
     "train.parallel=tp"), "--out", t / "o"], ["does not shard LoRA adapters"], TORCHRUN_2),
    ("tp-qk-norm", lambda t, r: ["pretrain", *sets(*TINY, "model.arch=llama", "model.qk_norm=true",
     "train.parallel=tp"), "--out", t / "o"], ["does not sum the gradient of model.qk_norm"], TORCHRUN_2),
]


def _without_torchao(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` raises ImportError, as when not installed


def _with_torchao(monkeypatch) -> None:
    pytest.importorskip("torchao")


QLORA = [f"data.path={SHAKESPEARE}", "finetune.method=qlora"]
BAD += [
    ("qlora-tp", lambda t, r: ["finetune", "--from", r, *sets(*QLORA, "train.parallel=tp"), "--out", t / "o"],
     ["finetune.method=qlora: train.parallel=tp does not split NF4 base weights", "train.parallel=ddp"]),
    ("qlora-without-torchao", lambda t, r: ["finetune", "--from", r, *sets(*QLORA), "--out", t / "o"],
     ["through torchao, which is not installed", "pip install 'llmctl[qlora]'"], _without_torchao),
    # tiny_run's weights (32 wide) are smaller than one NF4 scaler block
    ("qlora-nothing-quantizable", lambda t, r: ["finetune", "--from", r, *sets(*QLORA), "--out", t / "o"],
     ["none of the 8 adapted linear layers has a weight NF4 can store", "finetune.method=lora"], _with_torchao),
    ("gpu-memory-not-a-size", lambda t, r: ["pretrain", *sets(*TINY), "--out", t / "o", "--dry-run",
                                            "--gpu-memory", "lots"],
     ["--gpu-memory: 'lots' is not a memory size", "24GB"]),
    ("gpu-memory-without-dry-run", lambda t, r: ["pretrain", *sets(*TINY), "--out", t / "o", "--gpu-memory", "24GB"],
     ["--gpu-memory sizes the dry run's memory estimate: add --dry-run"]),
]


# a model's own chat template (tokenizer.chat_template) that refuses a conversation, or does not parse
REFUSING = "{{ raise_exception('Conversation roles must alternate\nuser/assistant/user/assistant') }}"
CHAT_ROWS = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
BAD += [
    ("template-raises", lambda t, r: ["finetune", "--from", r, *sets(f"data.path={_file(t, 'm.jsonl', CHAT_ROWS)}",
     "finetune.task=instruct"), "--set", f"tokenizer.chat_template={REFUSING}", "--out", t / "o"],
     ["the chat template refused the conversation: Conversation roles must alternate user/assistant/user/assistant"]),
    ("template-syntax-error", lambda t, r: ["finetune", "--from", r, *sets(
     f"data.path={_file(t, 'm.jsonl', CHAT_ROWS)}", "finetune.task=instruct"), "--set",
     "tokenizer.chat_template={% if %}", "--out", t / "o"], ["the chat template has a syntax error on line 1"]),
]


TASKS = ROOT / "tests" / "lm_eval_tasks"
BAD += [
    ("eval-unknown-task",
     lambda t, r: ["eval", "--ckpt", r, "--tasks", "shakespeare_next_lin", "--include-path", TASKS],
     ["no task named 'shakespeare_next_lin'", "did you mean shakespeare_next_line"]),
    ("eval-tasks-on-a-classifier", lambda t, r: ["eval", "--ckpt", _classifier(t, r), "--tasks", "shakespeare_rolling",
     "--include-path", TASKS], ["--tasks runs lm-eval on language models", "is a classifier"]),
    ("eval-tasks-with-data", lambda t, r: ["eval", "--ckpt", r, "--tasks", "x", "--data", SHAKESPEARE],
     ["--tasks and --data are exclusive"]),
    ("eval-limit-without-tasks", lambda t, r: ["eval", "--ckpt", r, "--limit", "5"], ["go with --tasks"]),
    ("eval-include-path-missing", lambda t, r: ["eval", "--ckpt", r, "--tasks", "x", "--include-path", t / "nope"],
     ["--include-path", "is not a directory"]),
    ("gguf-char-tokenizer", lambda t, r: ["export", "--ckpt", r, "--format", "gguf", "--out", t / "m.gguf"],
     ["byte-level BPE tokenizer", "'char'", "tokenizer.kind=bpe"]),
    ("gguf-bad-outtype", lambda t, r: ["export", "--ckpt", r, "--format", "gguf", "--outtype", "q4_k", "--out",
     t / "m.gguf"], ["--outtype 'q4_k' is not supported", "f32, f16, q8_0"]),
    ("gguf-out-is-a-directory", lambda t, r: ["export", "--ckpt", r, "--format", "gguf", "--out", t],
     ["is a directory", "model.gguf"]),
    ("gguf-sliding-window", lambda t, r: ["export", "--ckpt", _windowed_llama(t), "--format", "gguf", "--out",
     t / "m.gguf"], ["llama.cpp's llama architecture has no sliding window", "model.sliding_window=8 is shorter "
                     "than the context, 32", "export --format hf"]),
    ("export-unknown-format", lambda t, r: ["export", "--ckpt", r, "--format", "onnx", "--out", t / "x"],
     ["--format 'onnx' is not supported", "hf, gguf"]),
]


def _other_tokenizer(tmp: Path) -> Path:
    """A run whose char tokenizer was trained on other text (so its tokenizer differs from tiny_run's)."""
    from llmctl.commands import training as training_cmd

    data = _file(tmp, "other.txt", "abcdefgh " * 400)
    out = tmp / "other"
    training_cmd.pretrain(None, [*TINY, f"data.path={data}", "train.max_steps=2", "train.eval_interval=0"], out)
    return out


MALFORMED = '{"text": "a"}\n{oops\n'


def _parquet_folder(tmp: Path, corrupt: bool = False, empty: bool = False) -> Path:
    """A folder of two parquet shards; the second with a damaged row group, or an empty text column."""
    import datasets

    d = tmp / "pq"
    d.mkdir()
    datasets.Dataset.from_dict({"text": ["one doc", "two doc"]}).to_parquet(str(d / "a.parquet"))
    datasets.Dataset.from_dict({"text": ["" if empty else "three doc"] * 4}).to_parquet(str(d / "b.parquet"))
    if corrupt:  # overwrite the column data, keep the footer: the file opens, its row group does not decode
        raw = bytearray((d / "b.parquet").read_bytes())
        raw[4:40] = b"\xff" * 36
        (d / "b.parquet").write_bytes(bytes(raw))
    if empty:
        (d / "a.parquet").unlink()
    return d


BAD += [
    # streaming data preparation
    ("data-folder-without-shards", lambda t, r: ["prepare", "--set", f"data.path={(t / 'none').mkdir() or t / 'none'}"],
     ["has no .txt, .jsonl", "files"]),
    ("data-corrupt-parquet-shard", lambda t, r: ["prepare", "--set", f"data.path={_parquet_folder(t, corrupt=True)}"],
     ["b.parquet", "row group 0", "corrupt"]),
    ("data-gz-not-gzip", lambda t, r: ["prepare", "--set", f"data.path={_file(t, 'd.jsonl.gz', '{}')}"],
     ["d.jsonl.gz is named .gz but is not gzip data"]),
    ("data-glob-matches-nothing", lambda t, r: ["prepare", "--set", f"data.path={t}/*.parquet"],
     ["matches no file"]),
    ("data-empty-text-column", lambda t, r: ["prepare", "--set", f"data.path={_parquet_folder(t, empty=True)}"],
     ["holds no text", "text column is empty"]),
    ("data-not-utf8", lambda t, r: ["prepare", "--set", f"data.path={_bytes(t, 'l.txt', 'olé'.encode('latin-1'))}"],
     ["l.txt is not UTF-8 text", "offset 2"]),
    ("data-malformed-jsonl-row", lambda t, r: ["prepare", "--set", f"data.path={_file(t, 'm.jsonl', MALFORMED)}"],
     ["m.jsonl line 2 is not valid JSON"]),
    ("data-disk-full-mid-shard", lambda t, r: ["prepare", *sets(f"data.path={SHAKESPEARE}", "tokenizer.kind=char",
     "data.shard_tokens=300000", f"data.cache_dir={t / 'cache'}")],
     ["the disk is full while writing token shards", "(1 complete)", "run the same command again", "resumes"],
     disk_fills_on_second_shard),
    ("pretrain-memory-preflight",
     lambda t, r: ["pretrain", *sets(*TINY, "model.block_size=100000", "model.dropout=0.1"), "--out", t / "o"],
     ["per device", "activations of 4 x 100000 tokens", "lower model.block_size", "train.allow_oversubscribe"]),
]


def _cache_without_starts(tmp: Path) -> list:
    """A corpus of documents prepared into a cache, then its document starts removed (as an older llmctl left it)."""
    from llmctl.config import DataConfig, TokenizerConfig
    from llmctl.data import prepare

    corpus = _file(tmp, "docs.jsonl", "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)))
    td = prepare(DataConfig(path=str(corpus), cache_dir=str(tmp / "cache")), TokenizerConfig())
    for f in td.dir.glob("*.starts"):
        f.unlink()
    return sets(*TINY, f"data.path={corpus}", f"data.cache_dir={tmp / 'cache'}", "data.document_mask=true")


BAD += [
    ("document-mask-on-a-cache-without-boundaries", lambda t, r: ["pretrain", *_cache_without_starts(t), "--out",
     t / "o"], ["data.document_mask", "records no document boundaries", "delete that folder", "rebuild it"]),
]


def _bytes(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


DISTILL = ("finetune.task=distill", f"data.path={SHAKESPEARE}", "train.max_steps=2")
BAD += [
    # compression: llmctl prune and finetune.task=distill
    ("prune-larger-than-parent", lambda t, r: ["prune", "--ckpt", r, "--set", "model.n_embd=64", "--out", t / "p"],
     ["model.n_embd=64 is larger than the parent's 32", "pruning only removes"]),
    ("prune-heads-not-divisible-by-kv-heads",
     lambda t, r: ["prune", "--ckpt", r, "--set", "model.n_head=1", "--set", "model.n_kv_head=2", "--out", t / "p"],
     ["model.n_head=1 is not divisible by model.n_kv_head=2"]),
    ("prune-target-below-one-layer", lambda t, r: ["prune", "--ckpt", r, "--target-params", "100", "--out", t / "p"],
     ["--target-params 100 is below what one layer needs"]),
    ("prune-calibration-shorter-than-a-block",
     lambda t, r: ["prune", "--ckpt", r, "--data", _file(t, "short.txt", "ROMEO: hi"), "--set", "model.n_layer=1",
                   "--out", t / "p"], ["calibration text has", "fewer than one block", "give more text"]),
    ("prune-gpt2-heads-without-n-embd", lambda t, r: ["prune", "--ckpt", r, "--set", "model.n_head=1", "--out",
     t / "p"], ["GPT-2 flavour has no separate head size", "model.n_embd = model.n_head x 16"]),
    ("prune-non-shape-key", lambda t, r: ["prune", "--ckpt", r, "--set", "model.dropout=0.1", "--out", t / "p"],
     ["changes only the shape", "model.dropout"]),
    ("prune-nothing-asked", lambda t, r: ["prune", "--ckpt", r, "--out", t / "p"], ["say what to keep"]),
    ("prune-a-classifier", lambda t, r: ["prune", "--ckpt", _classifier(t, r), "--set", "model.n_layer=1", "--out",
     t / "p"], ["is a classification checkpoint", "prune the language model"]),
    ("distill-teacher-is-a-classifier",
     lambda t, r: ["finetune", "--from", r, *sets(*DISTILL, f"finetune.teacher={_classifier(t, r)}"), "--out", t / "d"],
     ["finetune.teacher", "is a classification checkpoint", "language model"]),
    ("distill-teacher-with-another-tokenizer",
     lambda t, r: ["finetune", "--from", r, *sets(*DISTILL, f"finetune.teacher={_other_tokenizer(t)}"),
                   "--out", t / "d"], ["do not share a tokenizer", "tokenizer sha256", "other"]),
    ("distill-without-teacher", lambda t, r: ["finetune", "--from", r, *sets(*DISTILL), "--out", t / "d"],
     ["finetune.teacher: finetune.task=distill needs a teacher"]),
    ("distill-missing-teacher", lambda t, r: ["finetune", "--from", r, *sets(*DISTILL, f"finetune.teacher={t / 'no'}"),
     "--out", t / "d"], ["finetune.teacher", "checkpoint not found"]),
    ("distill-bad-alpha", lambda t, r: ["finetune", "--from", r, *sets(*DISTILL, f"finetune.teacher={r}",
     "finetune.distill_alpha=1.5"), "--out", t / "d"], ["finetune.distill_alpha: must be in [0, 1]"]),
    ("finetune-without-from", lambda t, r: ["finetune", "--set", f"data.path={SHAKESPEARE}", "--out", t / "d"],
     ["--from is required"]),
]


HELD: list = []  # sockets kept open while a case runs (a port in use)


def _port_in_use() -> int:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    HELD.append(sock)
    return sock.getsockname()[1]


BAD += [
    ("serve-missing-checkpoint", lambda t, r: ["serve", "--ckpt", t / "nope"], ["checkpoint not found"]),
    ("serve-corrupt-checkpoint", lambda t, r: ["serve", "--ckpt", _corrupt(t, r)], ["sha256"]),
    ("serve-port-in-use", lambda t, r: ["serve", "--ckpt", r, "--port", _port_in_use()],
     ["is in use", "pick another with --port"]),
    ("serve-public-without-key", lambda t, r: ["serve", "--ckpt", r, "--host", "0.0.0.0"],
     ["--host 0.0.0.0 is reachable from other machines", "--api-key-file", "--insecure"]),
    ("serve-empty-key-file", lambda t, r: ["serve", "--ckpt", r, "--api-key-file", _file(t, "key", "\n")],
     ["--api-key-file", "is empty"]),
    ("serve-missing-key-file", lambda t, r: ["serve", "--ckpt", r, "--api-key-file", t / "nokey"],
     ["--api-key-file", "does not exist"]),
    ("serve-model-setting", lambda t, r: ["serve", "--ckpt", r, "--set", "model.n_layer=3"],
     ["takes only serve.* and generate.* settings", "model come from the checkpoint"]),
    ("serve-draft-missing", lambda t, r: ["serve", "--ckpt", r, "--port", "0", "--draft", t / "nope"],
     ["--draft", "or give --draft prompt-lookup"]),
    ("serve-draft-classifier", lambda t, r: ["serve", "--ckpt", _classifier(t, r), "--port", "0", "--draft",
                                             "prompt-lookup"], ["--draft", "is a classifier", "drop --draft"]),
    ("serve-bad-slots", lambda t, r: ["serve", "--ckpt", r, "--set", "serve.slots=0"],
     ["serve.slots: must be at least 1"]),
    ("serve-unknown-key", lambda t, r: ["serve", "--ckpt", r, "-c", _file(t, "s.yaml", "serve:\n  slot: 4\n")],
     ["serve.slot"]),
    ("serve-bad-port", lambda t, r: ["serve", "--ckpt", r, "--port", "70000"], ["--port must be between 0 and 65535"]),
]

# speculative decoding (docs/inference.md#speculative-decoding)
BAD += [
    ("draft-other-vocabulary", lambda t, r: ["infer", "--ckpt", r, "--prompt", "hi", "--draft", _windowed_llama(t)],
     ["--draft", "vocabulary of 300 tokens", "the model's tokenizer"]),
    ("draft-other-tokenizer", lambda t, r: ["infer", "--ckpt", r, "--prompt", "hi", "--draft",
                                            _other_tokenizer_draft(t, r)],
     ["--draft", "has another tokenizer than the model", "trained with the model's tokenizer"]),
    ("draft-missing", lambda t, r: ["infer", "--ckpt", r, "--prompt", "hi", "--draft", t / "nope"],
     ["--draft", "checkpoint not found", "--draft prompt-lookup"]),
    ("draft-with-input", lambda t, r: ["infer", "--ckpt", r, "--input", _file(t, "p.txt", "hi\n"),
                                       "--draft", "prompt-lookup"], ["--draft goes with --prompt"]),
]

# encoders (docs/encoders.md)
BAD += [
    ("mlm-on-a-decoder", lambda t, r: ["pretrain", *sets(*TINY, "train.objective=mlm"), "--out", t / "o"],
     ["train.objective=mlm", "model.causal=false"]),
    ("clm-on-an-encoder", lambda t, r: ["pretrain", *sets(*TINY, "model.causal=false"), "--out", t / "o"],
     ["model.causal=false", "train.objective=mlm"]),
    ("encoder-generates", lambda t, r: ["infer", "--ckpt", encoder_run(), "--prompt", "hi"],
     ["is an encoder", "encoders classify, they do not generate"]),
    ("cls-pooling-on-a-decoder",
     lambda t, r: ["finetune", "--from", r, *sets("finetune.task=classification", "finetune.pooling=cls"),
                   "--out", t / "o"],
     ["finetune.pooling=cls", "encoders"]),
]


# pretraining to a target (issue 34)
BAD += [
    ("stop-at-loss-without-validation", lambda t, r: ["pretrain", *sets(*TINY, "train.stop_at_loss=1.5",
     "data.val_fraction=0"), "--out", t / "o"], ["train.stop_at_loss needs a validation split", "data.val_fraction"]),
    ("wsd-decay-longer-than-the-run", lambda t, r: ["pretrain", *sets(*TINY, "train.lr_schedule=wsd",
     "train.decay_steps=40"), "--out", t / "o"], ["WSD decay of 40 steps is longer than", "train.max_steps=30"]),
    ("wsd-decay-longer-than-the-steps-left", lambda t, r: ["pretrain", *sets(*TINY, "train.lr_schedule=wsd",
     "train.decay_steps=10", "train.max_steps=35"), "--resume-from", r, "--out", t / "o"],
     ["longer than the 5 steps left after the checkpoint at step 30", "train.max_steps to 40"]),
    ("muon-sharded", lambda t, r: ["pretrain", *sets(*TINY, "train.optimizer=muon", "train.parallel=fsdp"),
     "--out", t / "o"], ["train.optimizer=muon with train.parallel=fsdp", "Muon orthogonalises whole matrices"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case, runner, tiny_run, tmp_path, monkeypatch):
    _, make, words, *env = case
    args = make(tmp_path, tiny_run)  # builds any fixture runs first
    if env and callable(env[0]):  # a fault to inject (a full disk)
        env[0](monkeypatch)
    else:
        for key, value in (env[0] if env else {}).items():
            monkeypatch.setenv(key, value)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("status.json")}
    r = invoke(runner, *args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    for status in tmp_path.rglob("status.json"):  # the failed command left no run that claims success
        if before.get(status) != status.stat().st_mtime_ns:
            assert json.loads(status.read_text())["status"] != "finished"


# ----------------------------------------------------------------------------------------------------------------
# Bad input that warns: the command goes on (exit 0), one warning line on stderr names the problem, no traceback.
# Each case: (id, setup(tmp, tiny_run) -> (args, stdin or None), words the warning line must contain).

UNSEEN = "🙂☃"  # characters Tiny Shakespeare never has: the char tokenizer maps them to <unk>

WARN = [
    ("unseen-chars-prompt",
     lambda t, r: (["infer", "--ckpt", r, "--prompt", f"ROMEO: {UNSEEN}{UNSEEN[0]}", "-n", "5"], None),
     ["the prompt: 3 characters the tokenizer never saw", "became <unk>", "2 distinct: '🙂', '☃'"]),
    ("unseen-chars-prompt-json", lambda t, r: (["infer", "--ckpt", r, "--prompt", UNSEEN, "-n", "5", "--json"], None),
     ["the prompt: 2 characters"]),
    ("unseen-chars-prompt-file",
     lambda t, r: (["infer", "--ckpt", r, "--prompt-file", _file(t, "p.txt", f"JULIET {UNSEEN}"),
     "-n", "5"], None), ["the prompt: 2 characters", "'🙂', '☃'"]),
    ("unseen-chars-input-rows",
     lambda t, r: (["infer", "--ckpt", r, "--input", _file(t, "in.txt", f"ROMEO:\nhi {UNSEEN[0]}\n"
     f"ok {UNSEEN[1]}\n"), "-n", "3"], None), ["--input rows 2, 3: 2 characters", "'🙂', '☃'"]),
    ("unseen-chars-chat", lambda t, r: (["infer", "--ckpt", r, "--chat", "-n", "3"], f"hello {UNSEEN[0]}\n/exit\n"),
     ["your message: 1 character the tokenizer never saw", "'🙂'"]),
    ("unseen-chars-eval-data",
     lambda t, r: (["eval", "--ckpt", r, "--data", _file(t, "d.txt", SHAKESPEARE.read_text()[:3000]
     + f"\n{UNSEEN}\n")], None), ["--data", "d.txt: 2 characters the tokenizer never saw", "'🙂', '☃'"]),
]


@pytest.mark.parametrize("case", WARN, ids=[c[0] for c in WARN])
def test_bad_input_that_warns(case, runner, tiny_run, tmp_path):
    from llmctl.cli import app

    _, make, words = case
    args, stdin = make(tmp_path, tiny_run)
    r = runner.invoke(app, [str(a) for a in args], input=stdin, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "warning" not in r.stdout
    lines = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert len(lines) == 1, r.stderr  # one line, not wrapped
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_infer_input_file_batched_with_per_row_settings(runner, tiny_run, tmp_path):
    rows = [{"prompt": "ROMEO:", "max_new_tokens": 12, "temperature": 0},
            {"prompt": "JULIET:\nO", "max_new_tokens": 40, "temperature": 0, "stop": ["\n"]},
            {"prompt": "First", "max_new_tokens": 5, "temperature": 0.9, "seed": 3, "id": "x"}]
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    r = invoke(runner, "infer", "--ckpt", tiny_run, "--input", f, "--output", out,
               "--batch-size", "2", "--quantize", "none")
    assert r.exit_code == 0, r.output
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["prompt"] for g in got] == [r["prompt"] for r in rows] and got[2]["id"] == "x"
    assert got[0]["completion_tokens"] == 12 and got[0]["finish_reason"] == "length"
    # the stop string ends the row exactly where its unstopped greedy text has it (or the row runs to length)
    free = invoke(runner, "infer", "--ckpt", tiny_run, "--prompt", "JULIET:\nO", "-n", "40", "-t", "0",
                  "--quantize", "none")
    unstopped = free.stdout[len("JULIET:\nO"):].removesuffix("\n")
    if "\n" in unstopped:
        assert got[1]["finish_reason"] == "stop" and got[1]["completion"] == unstopped.split("\n")[0]
    else:
        assert got[1]["finish_reason"] == "length" and got[1]["completion"] == unstopped
    # the same greedy row alone, through --prompt, gives the same text
    one = invoke(runner, "infer", "--ckpt", tiny_run, "--prompt", "ROMEO:", "-n", "12", "-t", "0", "--quantize", "none")
    assert one.stdout == "ROMEO:" + got[0]["completion"] + "\n"
    plain = tmp_path / "prompts.txt"
    plain.write_text("ROMEO:\n\nJULIET:\n")
    r = invoke(runner, "infer", "--ckpt", tiny_run, "--input", plain, "-n", "4")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 2


def test_no_output_file_after_bad_input(runner, tiny_run, tmp_path):
    bad = _file(tmp_path, "in.txt", "ok\n" + "x" * 100 + "\n")
    r = invoke(runner, "infer", "--ckpt", tiny_run, "--input", bad, "--output", tmp_path / "out.jsonl")
    assert r.exit_code == 2 and not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob(".out.jsonl*"))


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_option_shows_its_default(runner):
    """`--help` of every command states each option's default (Typer hides None and False unless told)."""
    import typer.main

    from llmctl.cli import app

    group = typer.main.get_command(app)
    names = []
    for path, cmd in _commands(group):
        names.append(" ".join(path))
        for p in cmd.params:
            if p.name == "help" or p.required:
                continue
            shown = isinstance(p.show_default, str) or (p.show_default and p.default not in (None, False, []))
            assert shown, f"llmctl {' '.join(path)}: {p.opts} has no default in --help"
    assert {"pretrain", "finetune", "runs", "plot", "config show"} <= set(names)
    r = invoke(runner, "pretrain", "--help")
    assert "--dry-run" in r.stdout and "default: (off)" in r.stdout


def test_json_on_every_reporting_command():
    import typer.main

    from llmctl.cli import app

    for path, cmd in _commands(typer.main.get_command(app)):
        assert any("--json" in p.opts for p in cmd.params), f"llmctl {' '.join(path)} has no --json"
