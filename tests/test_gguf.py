"""`llmctl export --format gguf`: the file read back with the gguf package (names, shapes, tokenizer, template),
the q/k permutation checked against ggml's rope, and, where llama-cpp-python is installed (scripts/check_gguf.sh),
llama.cpp's own tokenization and greedy generation against llmctl's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SHAKESPEARE, TINY, invoke, sets

gguf = pytest.importorskip("gguf")
PARAGRAPH = SHAKESPEARE.read_text()[5000:5600]


def _train(runner, out: Path, corpus: Path, *settings: str) -> Path:
    r = invoke(runner, "pretrain", *sets(*TINY, f"data.path={corpus}", "tokenizer.kind=bpe", "tokenizer.vocab_size=300",
                                         "model.init_std=0.2", "train.eval_interval=0", *settings), "--out", out,
               "--quiet")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, runner) -> dict[str, Path]:
    """A llama-flavour and a GPT-2-flavour (tanh GELU) byte-level BPE model; the llama one with a padded
    vocabulary (300 -> 320) and grouped-query attention."""
    root = tmp_path_factory.mktemp("runs")
    corpus = root / "shakespeare-300k.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:300_000])
    out = {"llama": _train(runner, root / "llama", corpus, "model.arch=llama", "model.n_head=4", "model.n_kv_head=2",
                           "model.n_embd=64", "model.block_size=96", "model.vocab_multiple=64"),
           "gpt2": _train(runner, root / "gpt2", corpus, "model.activation=gelu_tanh", "model.block_size=96")}
    # a head-pruned llama: 2 heads of 16 channels in a width of 64 (model.head_dim; GGUF key/value length)
    r = invoke(runner, "prune", "--ckpt", out["llama"], "--data", corpus, "--samples", "16", "--set", "model.n_head=2",
               "--out", root / "llama-head-dim", "--quiet")
    assert r.exit_code == 0, r.output
    out["llama-head-dim"] = root / "llama-head-dim"
    return out


def _export(runner, run: Path, out: Path, outtype: str = "f32") -> Path:
    r = invoke(runner, "export", "--ckpt", run, "--format", "gguf", "--outtype", outtype, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["format"] == "gguf"
    return out


def _field(reader, key: str):
    f = reader.fields[key]
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.contents(i) for i in range(len(f.data))] if hasattr(f, "contents") else None
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_file_has_llama_cpp_names_shapes_and_our_tokenizer(arch, runs, runner, tmp_path):
    from llmctl.loading import load_model

    path = _export(runner, runs[arch], tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    loaded = load_model(runs[arch], "cpu")
    m, tok = loaded.cfg.model, loaded.tokenizer
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.context_length") == m.block_size
    assert _field(reader, f"{arch}.block_count") == m.n_layer
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == m.vocab_size and tokens[tok.eos_id] == tok.eos_token
    assert tokens[: tok.vocab_size] == [tok.tk.id_to_token(i) for i in range(tok.vocab_size)]
    names = {t.name: t for t in reader.tensors}
    common = {"token_embd.weight", "output_norm.weight", "output.weight"}
    per_layer = ({"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                  "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"} if arch == "llama" else
                 {f"{n}.{k}" for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
                  for k in ("weight", "bias")})
    want = common | {f"blk.{i}.{n}" for i in range(m.n_layer) for n in per_layer}
    want |= {"position_embd.weight", "output_norm.bias"} if arch == "gpt2" else set()
    assert set(names) == want
    assert list(names["token_embd.weight"].shape) == [m.n_embd, m.vocab_size]  # ggml lists dimensions innermost first
    emb = torch.from_numpy(names["token_embd.weight"].data.copy()).reshape(m.vocab_size, m.n_embd)
    assert torch.equal(emb, loaded.model.wte.weight.detach())


def test_q_and_k_are_permuted_to_the_pairs_ggml_rotates():
    """ggml's default rope rotates pairs (2i, 2i+1); ours (and transformers') rotates (i, i + hd/2). Rotating the
    permuted projection's output the ggml way gives our rotated output in the permuted order."""
    from llmctl.gguf_export import _permute
    from llmctl.rope import apply_rope, rope_tables

    n_head, hd, C, T = 4, 16, 32, 7
    w, x = torch.randn(n_head * hd, C), torch.randn(T, C)
    cos, sin = rope_tables(hd, T, 10000.0)
    ours = apply_rope((x @ w.T).view(T, n_head, hd).transpose(0, 1), cos, sin)  # (nh, T, hd)
    y = (x @ _permute(w, n_head).T).view(T, n_head, hd).transpose(0, 1)  # (nh, T, hd), interleaved order
    ang = torch.arange(T).float()[:, None] * 10000.0 ** (-torch.arange(0, hd, 2).float() / hd)[None]  # (T, hd/2)
    a, b = y[..., 0::2], y[..., 1::2]
    ggml = torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1).flatten(-2)
    in_pairs = ours.view(n_head, T, 2, hd // 2).transpose(-1, -2).reshape(n_head, T, hd)  # new[2i]=old[i], ...
    assert torch.allclose(ggml, in_pairs, atol=1e-5)


def test_an_instruction_tuned_model_carries_its_chat_template(runs, runner, tmp_path):
    from llmctl.chat import chat_template
    from llmctl.loading import load_model

    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i}", "output": f"{i + 1}"}) + "\n" for i in range(40)))
    tuned = tmp_path / "tuned"
    r = invoke(runner, "finetune", "--from", runs["llama"], *sets(f"data.path={data}", "finetune.task=instruct",
               "train.max_steps=2", "train.dtype=float32", "train.eval_interval=0"), "--out", tuned, "--quiet")
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(str(_export(runner, tuned, tmp_path / "t.gguf", "q8_0")))
    loaded = load_model(tuned, "cpu")
    assert _field(reader, "tokenizer.chat_template") == chat_template(loaded.cfg.finetune, loaded.tokenizer.eos_token)
    q = {t.name: t for t in reader.tensors}
    assert q["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


LLAMA_CPP = r"""
import json, sys
import llama_cpp
path, n_ctx, text, prompt, eos = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
# the KV cache in f32 (type 0), so float32 weights decode as llmctl's float32 does
llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, verbose=False, type_k=0, type_v=0, n_threads=2)
ids = llm.tokenize(text.encode(), add_bos=False, special=False)
out = []
for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
    if t == eos or len(out) == 50:
        break
    out.append(t)
print(json.dumps({"tokens": ids, "generated": out}))
"""


def test_llama_cpp_tokenizes_and_generates_as_llmctl(runs, runner, tmp_path):
    """llama.cpp in its own process (its OpenMP runtime and torch's stay apart, and a crash there is a failure
    here, not the end of the test run)."""
    import subprocess
    import sys

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/check_gguf.sh)")
    from llmctl.generate import generate
    from llmctl.loading import load_model

    for arch in ("llama", "gpt2", "llama-head-dim"):
        loaded = load_model(runs[arch], "cpu")
        tok = loaded.tokenizer
        prompt = tok.encode("First Citizen:\n")
        want = list(generate(loaded.model, prompt, 50, temperature=0, eos_id=tok.eos_id))
        for outtype in ("f32", "q8_0") if arch != "llama-head-dim" else ("f32",):
            path = _export(runner, runs[arch], tmp_path / f"{arch}-{outtype}.gguf", outtype)
            r = subprocess.run([sys.executable, "-c", LLAMA_CPP, str(path), str(loaded.cfg.model.block_size),
                                PARAGRAPH, json.dumps(prompt), str(tok.eos_id)], capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, (arch, outtype, r.returncode, r.stderr[-2000:])
            got = json.loads(r.stdout.strip().splitlines()[-1])
            assert got["tokens"] == tok.encode(PARAGRAPH), (arch, outtype)
            if outtype == "f32":
                assert got["generated"] == want, arch
            else:  # 8-bit weights: loads and generates
                assert len(got["generated"]) > 10, (arch, got)


def test_gguf_without_the_extra_is_one_line(runner, runs, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)
    r = invoke(runner, "export", "--ckpt", runs["llama"], "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.exit_code == 2 and "pip install 'llmctl[gguf]'" in r.stderr and not (tmp_path / "m.gguf").exists()
