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
