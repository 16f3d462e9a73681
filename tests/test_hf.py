"""Hugging Face interoperability, checked against transformers itself (a test dependency, never a core one).

Import: random transformers models of several shapes -> `llmctl import hf` -> our logits equal theirs.
Export: our trained checkpoints -> `llmctl export --format hf` -> transformers' logits, greedy generation and
tokenizer equal ours. Round trips are bit-identical; a checkpoint without a tokenizer works once given one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import SHAKESPEARE, TINY, invoke, sets
from llmctl import checkpoint as ckpt_io
from llmctl import hf
from llmctl.generate import generate
from llmctl.loading import load_model

TOL = 1e-4  # max abs logit difference allowed in float32
PARAGRAPH = SHAKESPEARE.read_text()[2000:3200]  # several speeches: names, punctuation, line breaks


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add noise to every tensor, so norm weights are not all ones and biases not all zeros: a swapped or
    transposed tensor then changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _gpt2_tied():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=48, n_layer=2, n_head=4, n_positions=64, vocab_size=83, bos_token_id=0, eos_token_id=0))


def _gpt2_untied_gelu():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=3, n_head=2, n_positions=48, vocab_size=61, n_inner=101, activation_function="gelu",
        tie_word_embeddings=False, layer_norm_epsilon=1e-6, bos_token_id=0, eos_token_id=0))


def _llama_gqa():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=97, num_hidden_layers=2,
        vocab_size=71, max_position_embeddings=64, rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False))


def _llama_mqa_bias_tied():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=1, intermediate_size=80, num_hidden_layers=2,
        vocab_size=77, max_position_embeddings=64, rope_theta=1000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        attention_bias=True, mlp_bias=True))


def _llama_head_dim():
    """A head size that is not hidden_size / heads (what a head-pruned model has)."""
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=48, num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
        num_hidden_layers=2, vocab_size=67, max_position_embeddings=64, tie_word_embeddings=False))


def _save_bin(model, d: Path) -> None:
    """pytorch_model.bin as older transformers wrote it (a plain state dict)."""
    d.mkdir()
    model.config.to_json_file(d / "config.json")
    torch.save(model.state_dict(), d / "pytorch_model.bin")


# id -> (build, how it is saved)
SHAPES = {
    "gpt2-tied": (_gpt2_tied, lambda m, d: m.save_pretrained(d)),
    "gpt2-untied-gelu-odd-mlp-bin": (_gpt2_untied_gelu, _save_bin),
    "llama-gqa-untied-theta-odd-mlp-sharded": (_llama_gqa, lambda m, d: m.save_pretrained(d, max_shard_size="60KB")),
    "llama-mqa-bias-tied": (_llama_mqa_bias_tied, lambda m, d: m.save_pretrained(d)),
    "llama-head-dim": (_llama_head_dim, lambda m, d: m.save_pretrained(d)),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict:
    """One random transformers model per shape, saved to its own directory: id -> (model, dir)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, (build, save)) in enumerate(SHAPES.items()):
        torch.manual_seed(i)
        model = perturb(build(), seed=100 + i)
        save(model, root / name)
        out[name] = (model, root / name)
    return out


def _import(runner, src: Path, out: Path, *extra):
    r = invoke(runner, "import", "hf", src, "--out", out, *extra)
    assert r.exit_code == 0, r.output
    return r


@pytest.mark.parametrize("shape", list(SHAPES))
def test_import_logits_equal_transformers(shape, hf_models, runner, tmp_path):
    model, src = hf_models[shape]
    r = _import(runner, src, tmp_path / "run")
    assert "no tokenizer.json" in r.stderr  # imported with a warning, not refused
    ours = load_model(tmp_path / "run", "cpu", require_tokenizer=False).model
    c = ours.cfg
    cfg = model.config
    assert (c.vocab_size, c.n_layer, c.tied) == (cfg.vocab_size, cfg.num_hidden_layers, cfg.tie_word_embeddings)
    if c.arch == "llama":
        assert (c.kv_heads, c.hidden, c.rope_theta) == (cfg.num_key_value_heads, cfg.intermediate_size,
                                                        cfg.rope_parameters["rope_theta"])
    ids = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(ids).logits
        mine = ours(ids)
    assert theirs.abs().max() > 0.5  # not a degenerate comparison of near-zero logits
    assert (theirs - mine).abs().max().item() < TOL


@pytest.mark.parametrize("shape", list(SHAPES))
def test_round_trip_import_export_import_is_bit_identical(shape, hf_models, runner, tmp_path):
    _, src = hf_models[shape]
    _import(runner, src, tmp_path / "a")
    r = invoke(runner, "export", "--ckpt", tmp_path / "a", "--format", "hf", "--out", tmp_path / "exported")
    assert r.exit_code == 0, r.output
    _import(runner, tmp_path / "exported", tmp_path / "b")
    a, b = ckpt_io.load(tmp_path / "a"), ckpt_io.load(tmp_path / "b")
    wa, wb = a.weights(), b.weights()
    assert set(wa) == set(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k
    assert a.config == b.config
    # and the exported directory holds transformers' original tensors, bit for bit
    original = model_tensors(src)
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert set(exported) == {k for k in original if not (k == "lm_head.weight" and a.config["model"]["tie_embeddings"])}
    for k, t in exported.items():
        assert torch.equal(t, original[k]), k


def model_tensors(src: Path) -> dict:
    tensors, _ = hf.read_weights(src)
    return {k: v for k, v in tensors.items() if not k.endswith(hf.IGNORED_SUFFIXES)}


def test_import_reads_base_model_names_and_ignores_old_buffers(hf_models, runner, tmp_path):
    """The original gpt2 repository stores names without `transformer.` and the attention-mask buffers."""
    _, src = hf_models["gpt2-tied"]
    renamed = {k.removeprefix("transformer."): v for k, v in load_file(str(src / "model.safetensors")).items()}
    renamed["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    save_file(renamed, str(d / "model.safetensors"))
    _import(runner, src, tmp_path / "a")
    _import(runner, d, tmp_path / "b")
    wa, wb = ckpt_io.load(tmp_path / "a").weights(), ckpt_io.load(tmp_path / "b").weights()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------------------------------------------
# Export of our own trained checkpoints


def _train(runner, out: Path, *settings: str) -> Path:
    r = invoke(runner, "pretrain", *sets(*TINY, *settings), "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    return out


# Both are trained like tiny_run (30 steps) but from a wide initialisation (init_std 0.2): sharp, varied
# predictions, so greedy generation visits many tokens, at a fraction of the cost of training until it writes words.


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, runner) -> Path:
    """Llama flavour with everything export must carry: byte-level BPE, grouped-query attention, a vocabulary
    padded past the tokenizer (300 -> 320), a non-default RoPE base."""
    root = tmp_path_factory.mktemp("runs")
    corpus = root / "shakespeare-300k.txt"  # a slice keeps BPE training and tokenizing short
    corpus.write_text(SHAKESPEARE.read_text()[:300_000])
    return _train(runner, root / "llama", f"data.path={corpus}",
                  "model.arch=llama", "model.n_head=4", "model.n_kv_head=2", "model.n_embd=64", "model.block_size=64",
                  "model.vocab_multiple=64", "model.rope_theta=20000", "tokenizer.kind=bpe", "tokenizer.vocab_size=300",
                  "model.init_std=0.2", "train.eval_interval=0")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, runner) -> Path:
    """GPT-2 flavour without biases (export writes zeros), exact GELU, untied head, an 80-token context."""
    return _train(runner, tmp_path_factory.mktemp("runs") / "gpt2",
                  "model.bias=false", "model.activation=gelu", "model.tie_embeddings=false", "model.block_size=80",
                  "model.n_embd=48", "model.init_std=0.2", "train.eval_interval=0")


RUNS = ["tiny_run", "llama_run", "gpt2_run"]


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory, runner):
    """run fixture name -> (our loaded checkpoint, transformers model loaded from the export, export dir)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            run = request.getfixturevalue(name)
            out = tmp_path_factory.mktemp("export") / name
            r = invoke(runner, "export", "--ckpt", run, "--format", "hf", "--out", out)
            assert r.exit_code == 0, r.output
            theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
            cache[name] = (load_model(run, "cpu"), theirs, out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", RUNS)
def test_export_logits_and_greedy_generation_equal_ours(name, exported):
    loaded, theirs, out = exported(name)
    m = loaded.cfg.model
    assert theirs.config.model_type == m.arch and theirs.dtype == torch.float32
    assert theirs.config.vocab_size == m.vocab_size >= loaded.tokenizer.vocab_size
    ids = torch.randint(0, m.vocab_size, (2, m.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (theirs(ids).logits - loaded.model(ids)).abs().max().item()
    assert diff < TOL

    prompt = loaded.tokenizer.encode("First Citizen:\n")
    # 50 new tokens where the context allows it; tiny_run's is 32 tokens, and GPT-2 has no positions past it
    n = min(50, m.block_size - len(prompt))
    ours = list(generate(loaded.model, prompt, n, temperature=0, eos_id=None))
    theirs.generation_config.eos_token_id = None  # run the full length, as ours does with eos_id=None
    with torch.no_grad():
        got = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=n, do_sample=False)
    assert got[0, len(prompt):].tolist() == ours
    if name != "tiny_run":  # tiny_run greedily repeats one character; the two wide-init runs do not
        assert len(ours) == 50 and len(set(ours)) > 3


def test_export_gpt2_without_biases_writes_zero_biases(exported):
    loaded, _, out = exported("gpt2_run")
    tensors = load_file(str(out / "model.safetensors"))
    biases = [k for k in tensors if k.endswith(".bias")]
    assert len(biases) == 6 * loaded.cfg.model.n_layer + 1 and all(not tensors[k].any() for k in biases)
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == "gelu" and config["tie_word_embeddings"] is False
    assert "lm_head.weight" in tensors


@pytest.mark.parametrize("name", ["tiny_run", "llama_run"], ids=["char", "bpe"])
def test_exported_tokenizer_encodes_and_decodes_like_ours(name, exported):
    loaded, _, out = exported(name)
    ours = loaded.tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ids = theirs.encode(PARAGRAPH)
    assert ids == ours.encode(PARAGRAPH)
    assert theirs.decode(ids) == ours.decode(ids) == PARAGRAPH
    assert len(theirs) == ours.vocab_size
    assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eos_id, ours.pad_id)
    special = [ours.eos_id, *ids[:5], ours.pad_id]
    assert theirs.decode(special, skip_special_tokens=True) == ours.decode(special)


def test_export_merges_a_lora_adapter(tiny_run, runner, tmp_path):
    adapter = tmp_path / "adapter"
    r = invoke(runner, "finetune", "--from", tiny_run, *sets(f"data.path={SHAKESPEARE}", "finetune.method=lora",
               "train.max_steps=3", "train.lr=1e-2", "train.dtype=float32", "train.eval_interval=0"), "--out", adapter,
               "--quiet")
    assert r.exit_code == 0, r.output
    assert ckpt_io.ADAPTER in ckpt_io.load(adapter).meta["files"]
    r = invoke(runner, "export", "--ckpt", adapter, "--out", tmp_path / "exp")
    assert r.exit_code == 2 and "--merge-lora" in r.stderr  # merging is asked for, never implied
    assert invoke(runner, "export", "--ckpt", adapter, "--merge-lora", "--out", tmp_path / "exp").exit_code == 0
    assert invoke(runner, "export", "--ckpt", tiny_run, "--out", tmp_path / "base").exit_code == 0
    ours = load_model(adapter, "cpu").model  # base weights + adapter, unmerged
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp").eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, ours.cfg.block_size), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max().item() < TOL
    merged, base = (load_file(str(tmp_path / "exp" / "model.safetensors")),
                    load_file(str(tmp_path / "base" / "model.safetensors")))
    assert not torch.equal(merged["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])


def test_export_refuses_to_clobber_and_overwrites_an_earlier_export(runner, tiny_run, tmp_path):
    out = tmp_path / "x"
    assert invoke(runner, "export", "--ckpt", tiny_run, "--out", out).exit_code == 0
    r = invoke(runner, "export", "--ckpt", tiny_run, "--out", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = invoke(runner, "export", "--ckpt", tiny_run, "--out", out, "--overwrite", "--json")
    assert r.exit_code == 0 and "model.safetensors" in json.loads(r.stdout)["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints without a tokenizer; finetune from an import; hf:NAME; transformers stays optional


@pytest.fixture(scope="module")
def bare_hf_dir(tiny_run, tmp_path_factory) -> Path:
    """tiny_run written as a transformers directory without tokenizer files."""
    ck = ckpt_io.load(tiny_run)
    d = tmp_path_factory.mktemp("bare") / "model"
    d.mkdir()
    from llmctl.config import from_dict

    hf.write_dir(d, from_dict(ck.config), ck.weights(), None, str(ck.path))
    assert not (d / "tokenizer.json").exists()
    return d


def test_tokenizerless_import_needs_and_accepts_a_tokenizer(bare_hf_dir, tiny_run, runner, tmp_path):
    tok = tiny_run / "tokenizer.json"
    run = tmp_path / "bare"
    r = _import(runner, bare_hf_dir, run)
    assert "warning" in r.stderr and "--tokenizer" in r.stderr
    r = invoke(runner, "infer", "--ckpt", run, "--prompt", "ROMEO:")
    assert r.exit_code == 2 and "no tokenizer" in r.stderr and "--tokenizer" in r.stderr
    args = ["--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "20"]
    with_tok = invoke(runner, "infer", "--ckpt", run, "--tokenizer", tok, *args)
    original = invoke(runner, "infer", "--ckpt", tiny_run, *args)
    assert with_tok.exit_code == 0 and with_tok.stdout == original.stdout and len(original.stdout) > 20

    corpus = tmp_path / "c.txt"
    corpus.write_text(PARAGRAPH * 3)
    r = invoke(runner, "eval", "--ckpt", run, "--data", corpus, "--json")
    assert r.exit_code == 2 and "--tokenizer" in r.stderr
    r1 = invoke(runner, "eval", "--ckpt", run, "--tokenizer", tok, "--data", corpus, "--json")
    r2 = invoke(runner, "eval", "--ckpt", tiny_run, "--data", corpus, "--json")
    assert r1.exit_code == 0 and json.loads(r1.stdout)["loss"] == pytest.approx(json.loads(r2.stdout)["loss"], abs=1e-5)

    # the tokenizer can also be stored at import time; then nothing more is needed
    _import(runner, bare_hf_dir, tmp_path / "with", "--tokenizer", tok)
    assert invoke(runner, "infer", "--ckpt", tmp_path / "with", *args).stdout == original.stdout

    # finetune from the tokenizer-less import, with the tokenizer given through the config
    ft = tmp_path / "ft"
    r = invoke(runner, "finetune", "--from", run, *sets(f"data.path={corpus}", f"tokenizer.path={tok}",
               "train.max_steps=3", "train.batch_size=2", "train.dtype=float32", "train.eval_interval=0"),
               "--out", ft, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 3 and ckpt_io.load(ft).has_tokenizer
    r = invoke(runner, "finetune", "--from", run, *sets(f"data.path={corpus}"), "--out", tmp_path / "ft2")
    assert r.exit_code == 2 and "tokenizer.path" in r.stderr

    r = invoke(runner, "export", "--ckpt", run, "--out", tmp_path / "exp")
    assert r.exit_code == 0 and "no tokenizer" in r.stderr and not (tmp_path / "exp" / "tokenizer.json").exists()


def test_finetune_from_an_imported_llama(hf_models, runner, tmp_path):
    """An imported model trains on: its tokenizer comes with it (here: a char tokenizer matching its vocabulary)."""
    from llmctl.tokenizer import Tokenizer

    _, src = hf_models["llama-gqa-untied-theta-odd-mlp-sharded"]
    tok = Tokenizer.train_char([PARAGRAPH])
    assert tok.vocab_size <= 71
    tok.save(tmp_path / "tokenizer.json")
    _import(runner, src, tmp_path / "imp", "--tokenizer", tmp_path / "tokenizer.json")
    corpus = tmp_path / "c.txt"
    corpus.write_text(PARAGRAPH * 4)
    r = invoke(runner, "finetune", "--from", tmp_path / "imp", *sets(f"data.path={corpus}", "train.max_steps=3",
               "train.batch_size=2", "train.dtype=float32", "train.eval_interval=0"), "--out", tmp_path / "ft",
               "--quiet", "--json")
    assert r.exit_code == 0, r.output
    r = invoke(runner, "infer", "--ckpt", tmp_path / "ft", "--prompt", "ROMEO:",
               "--max-new-tokens", "10", "--seed", "0")
    assert r.exit_code == 0 and r.stdout.startswith("ROMEO:")


def test_hub_name_downloads_through_the_same_path(hf_models, runner, tmp_path, monkeypatch):
    import huggingface_hub

    _, src = hf_models["gpt2-tied"]
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    r = invoke(runner, "import", "hf", "hf:someone/tiny-gpt2", "--out", tmp_path / "hub", "--json")
    assert r.exit_code == 0, r.output
    assert calls == [("someone/tiny-gpt2", hf.DOWNLOAD_PATTERNS)] and "chat_template.jinja" in hf.DOWNLOAD_PATTERNS
    assert json.loads(r.stdout)["arch"] == "gpt2"
    assert ckpt_io.load(tmp_path / "hub").meta["imported_from"] == "hf:someone/tiny-gpt2"

    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    r = invoke(runner, "import", "hf", "hf:someone/tiny-gpt2", "--out", tmp_path / "hub2")
    assert r.exit_code == 2 and "cannot download someone/tiny-gpt2" in r.stderr and "Traceback" not in r.output


def test_import_and_export_run_without_transformers(tiny_run, tmp_path):
    """The CLI's import and export read and write JSON and safetensors only: they work with transformers blocked."""
    code = f"""
import sys
sys.modules["transformers"] = None  # any `import transformers` now raises ImportError
from typer.testing import CliRunner
from llmctl.cli import app
runner = CliRunner()
for args in (["export", "--ckpt", {str(tiny_run)!r}, "--out", {str(tmp_path / "exp")!r}],
             ["import", "hf", {str(tmp_path / "exp")!r}, "--out", {str(tmp_path / "imp")!r}],
             ["infer", "--ckpt", {str(tmp_path / "imp")!r}, "--prompt", "ROMEO:", "--max-new-tokens", "5"]):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, (args, r.output)
print(r.stdout)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:")


def test_export_of_an_instruction_tuned_model_carries_its_chat_template(tiny_run, runner, tmp_path):
    from llmctl.chat import render_chat

    data = tmp_path / "tasks.jsonl"  # short: tiny_run's context is 32 characters
    data.write_text("".join(json.dumps({"instruction": f"Add {i}", "output": f"{i + 1}"}) + "\n" for i in range(40)))
    tuned = tmp_path / "tuned"
    r = invoke(runner, "finetune", "--from", tiny_run, *sets(f"data.path={data}", "finetune.task=instruct",
               'finetune.prompt_template_no_input="Q: {instruction}\\nA: "', "train.max_steps=2", "train.dtype=float32",
               "train.eval_interval=0"), "--out", tuned, "--quiet")
    assert r.exit_code == 0, r.output
    assert invoke(runner, "export", "--ckpt", tuned, "--out", tmp_path / "exp").exit_code == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exp")
    loaded = load_model(tuned, "cpu")
    turns = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A pear."},
             {"role": "user", "content": "Another?"}]
    ours = render_chat(turns, loaded.cfg.finetune, loaded.tokenizer.eos_token)
    assert hf_tok.apply_chat_template(turns, tokenize=False) == ours
    assert hf_tok.apply_chat_template(turns, tokenize=True, return_dict=False) == loaded.tokenizer.encode(ours)
    # (`infer --chat` and `serve` render through render_chat.) A plain language model gets no template: it was never
    # tuned on a conversation format
    assert invoke(runner, "export", "--ckpt", tiny_run, "--out", tmp_path / "plain").exit_code == 0
    assert "chat_template" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
