"""The CLI end to end, and the shared table of bad inputs (every row: exit 2, a named problem, no traceback)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SHAKESPEARE, TINY, invoke, sets
from llmctl.checkpoint import read_status


def test_end_to_end_prepare_pretrain_finetune_infer_eval(tmp_path, runner, tiny_run):
    r = invoke(runner, "prepare", *sets(*TINY), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["train_tokens"] == 1_003_854

    assert read_status(tiny_run)["status"] == "finished"
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
    meta = json.loads((ft / "latest").read_text().strip() and (ft / "step-0000005" / "meta.json").read_text())
    assert meta["kind"] == "finetune"

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


def test_python_m_and_help():
    out = subprocess.run([sys.executable, "-m", "llmctl", "pretrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout and "--set" in out.stdout


def test_finetune_config_disagreeing_with_checkpoint(runner, tiny_run, tmp_path):
    r = invoke(runner, "finetune", "--from", tiny_run, "--set", "model.n_layer=3", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "model.n_layer" in r.stderr and "checkpoint" in r.stderr


# ----------------------------------------------------------------------------------------------------------------
# The bad-input table. Each case: (id, setup(tmp, tiny_run) -> args, words the message must contain).


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
            tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:, :-1].contiguous()
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
    from llmctl.commands import import_hf
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
    ("n_embd-not-divisible", lambda t, r: ["pretrain", *sets(*TINY, "model.n_embd=30", "model.n_head=4"), "--out", t / "o"],
     ["n_embd", "divisible"]),
    ("negative-lr", lambda t, r: ["pretrain", *sets(*TINY, "train.lr=-1"), "--out", t / "o"], ["train.lr", "positive"]),
    ("missing-config-file", lambda t, r: ["pretrain", "-c", t / "nope.yaml", "--out", t / "o"], ["config file not found"]),
    ("missing-data-file", lambda t, r: ["pretrain", *sets(*TINY, f"data.path={t / 'missing.txt'}"), "--out", t / "o"],
     ["data.path", "does not exist"]),
    ("empty-corpus", lambda t, r: ["pretrain", *sets(*TINY, f"data.path={_file(t, 'e.txt', '')}"), "--out", t / "o"],
     ["empty"]),
    ("corpus-shorter-than-block", lambda t, r: ["pretrain", *sets(*TINY, f"data.path={_file(t, 's.txt', 'tiny text')}"), "--out", t / "o"],
     ["block_size"]),
    ("missing-checkpoint", lambda t, r: ["infer", "--ckpt", t / "no-run", "--prompt", "hi"], ["checkpoint not found"]),
    ("checkpoint-fails-manifest", lambda t, r: ["infer", "--ckpt", _corrupt(t, r), "--prompt", "hi"],
     ["model.safetensors", "sha256"]),
    ("eval-corrupt-checkpoint", lambda t, r: ["eval", "--ckpt", _corrupt(t, r)], ["sha256"]),
    ("out-exists", lambda t, r: ["pretrain", *sets(*TINY), "--out", r], ["already holds a run", "--resume", "--overwrite"]),
    ("resume-and-overwrite", lambda t, r: ["pretrain", *sets(*TINY), "--out", r, "--resume", "--overwrite"], ["contradict"]),
    ("resume-nothing", lambda t, r: ["pretrain", *sets(*TINY), "--out", t / "fresh", "--resume"], ["no run to continue"]),
    ("prompt-too-long", lambda t, r: ["infer", "--ckpt", r, "--prompt", "x" * 100], ["100 tokens", "context is 32", "--truncate"]),
    ("max-new-tokens-zero", lambda t, r: ["infer", "--ckpt", r, "--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    ("max-new-tokens-negative", lambda t, r: ["infer", "--ckpt", r, "--prompt", "hi", "--max-new-tokens", "-3"], ["--max-new-tokens"]),
    ("empty-prompt-file", lambda t, r: ["infer", "--ckpt", r, "--prompt-file", _file(t, "p.txt", "  \n")], ["empty"]),
    ("missing-prompt-file", lambda t, r: ["infer", "--ckpt", r, "--prompt-file", t / "nope.txt"], ["--prompt-file", "does not exist"]),
    ("no-prompt", lambda t, r: ["infer", "--ckpt", r], ["no prompt"]),
    ("eval-missing-data", lambda t, r: ["eval", "--ckpt", r, "--data", t / "nope.txt"], ["does not exist"]),
    ("bad-override-syntax", lambda t, r: ["config", "show", "--set", "train.lr"], ["KEY=VALUE"]),
    ("finetune-missing-base", lambda t, r: ["finetune", "--from", t / "nope", "--out", t / "o"], ["checkpoint not found"]),
    ("unknown-option", lambda t, r: ["pretrain", "--nope"], ["No such option"]),
    # Hugging Face import / export
    ("import-unsupported-architecture", lambda t, r: ["import", "hf", _hf_dir(t, architectures=["MistralForCausalLM"],
     model_type="mistral"), "--out", t / "o"], ["unsupported architecture", "MistralForCausalLM"]),
    ("import-rope-scaling", lambda t, r: ["import", "hf", _hf_dir(t, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "--out", t / "o"], ["rope_scaling", "cannot be represented"]),
    ("import-rope-parameters-scaling", lambda t, r: ["import", "hf", _hf_dir(t, rope_parameters={"rope_type": "yarn",
     "rope_theta": 1e4, "factor": 4.0}), "--out", t / "o"], ["rope_parameters.rope_type", "yarn"]),
    ("import-mlp-bias-differs", lambda t, r: ["import", "hf", _hf_dir(t, attention_bias=True, mlp_bias=False), "--out", t / "o"],
     ["mlp_bias", "attention_bias"]),
    ("import-head-dim", lambda t, r: ["import", "hf", _hf_dir(t, head_dim=16), "--out", t / "o"], ["head_dim=16"]),
    ("import-hidden-act", lambda t, r: ["import", "hf", _hf_dir(t, hidden_act="gelu"), "--out", t / "o"], ["hidden_act", "gelu"]),
    ("import-gpt2-activation", lambda t, r: ["import", "hf", _hf_dir(t, architectures=["GPT2LMHeadModel"], model_type="gpt2",
     n_embd=32, n_layer=1, n_head=4, activation_function="relu"), "--out", t / "o"], ["activation_function", "relu"]),
    ("import-missing-field", lambda t, r: ["import", "hf", _hf_dir(t, hidden_size=None), "--out", t / "o"], ["hidden_size"]),
    ("import-missing-config", lambda t, r: ["import", "hf", t, "--out", t / "o"], ["no config.json"]),
    ("import-not-a-directory", lambda t, r: ["import", "hf", t / "nope", "--out", t / "o"], ["not a directory"]),
    ("import-missing-weights", lambda t, r: ["import", "hf", _hf_dir(t), "--out", t / "o"], ["no weights", "model.safetensors"]),
    ("import-missing-tensor", lambda t, r: ["import", "hf", _hf_dir(t, weights="missing-tensor"), "--out", t / "o"],
     ["lacks tensor", "k_proj"]),
    ("import-wrong-shape", lambda t, r: ["import", "hf", _hf_dir(t, weights="wrong-shape"), "--out", t / "o"],
     ["up_proj.weight", "(48, 31)", "(48, 32)"]),
    ("import-pickled-object", lambda t, r: ["import", "hf", _hf_dir(t, weights="pickle"), "--out", t / "o"],
     ["pytorch_model.bin", "cannot be loaded safely"]),
    ("import-out-exists", lambda t, r: ["import", "hf", _hf_dir(t, weights="full"), "--out", r], ["not empty", "--overwrite"]),
    ("import-tokenizer-too-big", lambda t, r: ["import", "hf", _hf_dir(t, weights="full"), "--out", t / "o",
     "--tokenizer", r / "tokenizer.json"], ["tokens but the model only 40"]),
    ("infer-imported-without-tokenizer", lambda t, r: ["infer", "--ckpt", _bare_import(t, r), "--prompt", "hi"],
     ["no tokenizer", "--tokenizer"]),
    ("eval-imported-without-data", lambda t, r: ["eval", "--ckpt", _bare_import(t, r), "--tokenizer", r / "tokenizer.json"],
     ["no data.path", "--data"]),
    ("export-unknown-format", lambda t, r: ["export", "--ckpt", r, "--format", "onnx", "--out", t / "o"], ["--format", "onnx"]),
    ("export-out-not-empty", lambda t, r: ["export", "--ckpt", r, "--out", _file(t, "x", "").parent], ["not empty", "--overwrite"]),
    ("export-missing-checkpoint", lambda t, r: ["export", "--ckpt", t / "nope", "--out", t / "o"], ["checkpoint not found"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case, runner, tiny_run, tmp_path):
    _, make, words = case
    r = invoke(runner, *make(tmp_path, tiny_run))
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    for status in tmp_path.rglob("status.json"):  # no run directory that claims success
        assert json.loads(status.read_text())["status"] != "finished" or status.parent.name == "corrupt"
