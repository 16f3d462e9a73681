"""`llmctl export --format gguf`: the file read back with the gguf package (names, shapes, tokenizer, template),
the q/k permutation checked against ggml's rope, and, where llama-cpp-python is installed (scripts/check_gguf.sh),
llama.cpp's own tokenization and greedy generation against llmctl's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch

from conftest import SHAKESPEARE, SHARED, TINY, invoke, sets

gguf = pytest.importorskip("gguf")
PARAGRAPH = SHAKESPEARE.read_text()[5000:5600]
TOKENIZERS = SHARED / "tokenizers"
# CJK, Hangul, Greek, Cyrillic, accents (NFC: llama.cpp normalizes nothing, Qwen's tokenizer NFC), emoji (a ZWJ
# sequence), code with tabs and runs of spaces, digits, and special and added tokens of both families
MULTILINGUAL = ("Open models, everywhere: 日本語の文章と中文句子，还有한국어 문장. Ελληνικά, русский текст, café naïve "
                "façade — “quotes” ‘too’. Emoji: 🦙🚀 👩‍💻 ✅\n\ndef square(x):\n\treturn x ** 2  # 12345 3.14159\n"
                "    if x  >=  0: print('ok')\n<|im_start|>user\nHi<|im_end|><think>\n</think><|eot_id|> I've been "
                "'told he's there\n\n\n   end")


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
a = json.loads(sys.argv[1])
# the KV cache in f32 (type 0), so float32 weights decode as llmctl's float32 does
llm = llama_cpp.Llama(model_path=a["path"], n_ctx=a["n_ctx"], verbose=False, type_k=0, type_v=0, n_threads=2)
ids = [llm.tokenize(text.encode(), add_bos=bos, special=special) for text, bos, special in a["texts"]]
decoded = [llm.detokenize(t, special=True).decode() for t in ids]
out = []
for t in llm.generate(a["prompt"], temp=0.0, top_k=1, reset=True):
    if t == a["eos"] or len(out) == a["n"]:
        break
    out.append(t)
print(json.dumps({"tokens": ids, "decoded": decoded, "generated": out,
                  "template": llm.metadata.get("tokenizer.chat_template")}))
"""


def _llama_cpp(path: Path, n_ctx: int, texts: list, prompt: list[int], eos: int, n: int) -> dict:
    """llama.cpp in its own process (its OpenMP runtime and torch's stay apart, and a crash there is a failure
    here, not the end of the test run): its token ids of each (text, add_bos, parse_special), those ids decoded,
    and its greedy continuation of `prompt` (up to `n` tokens or `eos`)."""
    import subprocess
    import sys

    args = {"path": str(path), "n_ctx": n_ctx, "texts": texts, "prompt": prompt, "eos": eos, "n": n}
    r = subprocess.run([sys.executable, "-c", LLAMA_CPP, json.dumps(args)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (path.name, r.returncode, r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_llama_cpp_tokenizes_and_generates_as_llmctl(runs, runner, tmp_path):
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
            got = _llama_cpp(path, loaded.cfg.model.block_size, [[PARAGRAPH, False, False]], prompt, tok.eos_id, 50)
            assert got["tokens"] == [tok.encode(PARAGRAPH)], (arch, outtype)
            if outtype == "f32":
                assert got["generated"] == want, arch
            else:  # 8-bit weights: loads and generates
                assert len(got["generated"]) > 10, (arch, got)


def test_gguf_without_the_extra_is_one_line(runner, runs, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)
    r = invoke(runner, "export", "--ckpt", runs["llama"], "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.exit_code == 2 and "pip install 'llmctl[gguf]'" in r.stderr and not (tmp_path / "m.gguf").exists()


# ----- open families: Llama 3 (llama, llama3 RoPE scaling), Qwen3 (qwen3: QK-norm, head_dim decoupled), Qwen2
# (qwen2: q/k/v biases), random weights with their real tokenizers -----

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}  # short, so every band (kept, smoothed, scaled) matters
FAMILIES = {
    # Llama 3.2: tied head, rope_theta 500000, llama3 scaling; the official tokenizer's post-processor adds BOS
    "llama3": ("llama", "llama3", dict(vocab_size=128256, tie_embeddings=True, rope_theta=500000.0,
                                       rope_scaling=LLAMA3_SCALING)),
    # Qwen3: QK-norm, 4 heads of 32 channels in a width of 64, tied, a vocabulary padded past the tokenizer
    "qwen3": ("qwen3", "qwen3", dict(vocab_size=151936, head_dim=32, qk_norm=True, tie_embeddings=True,
                                     rope_theta=1000000.0, norm_eps=1e-6)),
    # Qwen2.5: q/k/v biases, untied head
    "qwen2": ("qwen2", "qwen2", dict(vocab_size=151936, qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6)),
}
PRE = {"llama3": "llama-bpe", "qwen3": "qwen2", "qwen2": "qwen2"}
TEMPLATES = {"llama3": "meta-llama-Llama-3.2-3B-Instruct.jinja", "qwen3": "Qwen-Qwen3-0.6B.jinja",
             "qwen2": "Qwen-Qwen2.5-7B-Instruct.jinja"}
# the `tokenizer:` settings import hf records for the instruct models (tokenizer_config.json's names,
# generation_config.json's end ids)
QWEN_TOKENS = dict(special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, end_ids=[151645, 151643])
TOKEN_SETTINGS = {"llama3": dict(special_tokens={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                                 end_ids=[128001, 128008, 128009]),
                  "qwen3": QWEN_TOKENS, "qwen2": QWEN_TOKENS}
EOS = {"llama3": 128009, "qwen3": 151645, "qwen2": 151645}


def _real_tokenizer(family: str):
    """The family's real tokenizer.json; Llama 3's with the BOS post-processor Meta's release has (the shared copy
    was re-serialised without it)."""
    from llmctl.tokenizer import Tokenizer

    path = TOKENIZERS / family / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"{path} is not here (the shared data of ../shared/data)")
    if family != "llama3":
        return Tokenizer.from_file(path)
    spec = json.loads(path.read_text())
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    a, b = ({"Sequence": {"id": x, "type_id": i}} for i, x in enumerate("AB"))
    spec["post_processor"] = {"type": "Sequence", "processors": [spec["post_processor"], {
        "type": "TemplateProcessing", "single": [bos, a], "pair": [bos, a, bos, b],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                 "tokens": ["<|begin_of_text|>"]}}}]}
    return Tokenizer.from_str(json.dumps(spec))


def _checkpoint(out: Path, tok, seed: int = 0, template: Optional[str] = None, tokens: Optional[dict] = None,
                **model) -> Path:
    """An llmctl checkpoint of a random-weight model: weights at init_std 0.2 (the layers outweigh the embedding in
    the residual stream, so greedy text varies), the final norm's weight x 5 (greedy choices well apart), 1-D
    parameters (norms, biases) moved off their initial values."""
    from llmctl import checkpoint as ckpt_io
    from llmctl.config import Config
    from llmctl.config.model import ModelConfig
    from llmctl.model import Transformer
    from llmctl.rundir import write_run_files

    cfg = Config(model=ModelConfig(arch="llama", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=128,
                                   init_std=0.2, **model))
    cfg.tokenizer.kind = "bpe"
    if template is not None:  # the model's own chat template, as import hf records it
        path = SHARED / "chat_templates" / template
        if not path.is_file():
            pytest.skip(f"{path} is not here (the shared data of ../shared/data)")
        cfg.tokenizer.chat_template = path.read_text()
    for k, v in (tokens or {}).items():
        setattr(cfg.tokenizer, k, v)
    torch.manual_seed(seed)
    net = Transformer(cfg.model)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * (0.5 if name.endswith("bias") else 0.1))
        net.norm.weight.mul_(5.0)
    ckpt_io.save(out, 0, net.state_dict(), cfg.to_yaml(), tok.to_str(), meta={"kind": "import"})
    write_run_files(out, cfg.to_yaml(), tok.to_str())
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: _checkpoint(root / f, _real_tokenizer(tok), template=TEMPLATES[f], tokens=TOKEN_SETTINGS[f], **model)
            for f, (_, tok, model) in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_open_families_export_under_llama_cpp_names_with_their_tokenizer(family, families, runner, tmp_path):
    from llmctl.gguf_export import _permute
    from llmctl.loading import load_model

    arch = FAMILIES[family][0]
    reader = gguf.GGUFReader(str(_export(runner, families[family], tmp_path / "m.gguf")))
    loaded = load_model(families[family], "cpu")
    m, tok, sd = loaded.cfg.model, loaded.tokenizer, loaded.model.state_dict()
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == PRE[family]
    assert _field(reader, f"{arch}.attention.head_count_kv") == 2
    assert _field(reader, f"{arch}.rope.freq_base") == m.rope_theta
    assert _field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(m.norm_eps)
    names = {t.name: t for t in reader.tensors}
    per_layer = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    per_layer = {n + ".weight" for n in per_layer}
    per_layer |= {"attn_q_norm.weight", "attn_k_norm.weight"} if family == "qwen3" else set()
    per_layer |= {"attn_q.bias", "attn_k.bias", "attn_v.bias"} if family == "qwen2" else set()
    want = {"token_embd.weight", "output_norm.weight", "output.weight"}
    want |= {f"blk.{i}.{n}" for i in range(m.n_layer) for n in per_layer}
    want |= {"rope_freqs.weight"} if family == "llama3" else set()
    assert set(names) == want

    def tensor(name: str) -> torch.Tensor:
        t = names[name]
        return torch.from_numpy(t.data.copy()).reshape(list(reversed([int(d) for d in t.shape])))

    q, k, _ = sd["blocks.1.attn.qkv.weight"].split([4 * m.head_size, 2 * m.head_size, 2 * m.head_size])
    if arch == "llama":  # llama.cpp's llama rotates interleaved pairs; its qwen2/qwen3 rotate halves, as we do
        q, k = _permute(q, 4), _permute(k, 2)
    assert torch.equal(tensor("blk.1.attn_q.weight"), q) and torch.equal(tensor("blk.1.attn_k.weight"), k)
    if family == "qwen3":
        assert _field(reader, "qwen3.attention.key_length") == 32 and _field(reader, "qwen3.rope.dimension_count") == 32
        assert torch.equal(tensor("blk.0.attn_q_norm.weight"), sd["blocks.0.attn.q_norm.weight"])
        assert list(names["blk.0.attn_k_norm.weight"].shape) == [32]
    if family == "qwen2":
        assert torch.equal(tensor("blk.0.attn_v.bias"), sd["blocks.0.attn.qkv.bias"][-2 * m.head_size:])
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == m.vocab_size and tokens[: tok.vocab_size] == [tok.tk.id_to_token(i)
                                                                        for i in range(tok.vocab_size)]
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    T = gguf.TokenType
    assert types[vocab["Hello"]] == T.NORMAL and types[tok.eos_id] == T.CONTROL
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_id == EOS[family]  # the named eos_token
    assert _field(reader, "tokenizer.chat_template") == loaded.cfg.tokenizer.chat_template  # the model's own
    if family == "llama3":
        assert _field(reader, "tokenizer.ggml.add_bos_token") is True
        assert _field(reader, "tokenizer.ggml.bos_token_id") == 128000 == vocab["<|begin_of_text|>"]
        assert _field(reader, "tokenizer.ggml.eot_token_id") == vocab["<|eot_id|>"]
    else:
        assert _field(reader, "tokenizer.ggml.add_bos_token") is False
        assert _field(reader, "tokenizer.ggml.eot_token_id") == vocab["<|im_end|>"]
        assert types[vocab["<|im_end|>"]] == T.CONTROL
        if family == "qwen3":  # added, not special: llama.cpp matches it in any text, as tokenizers does
            assert types[vocab["<think>"]] == T.USER_DEFINED
            assert tokens[-1] == f"[PAD{m.vocab_size - 1}]" and types[-1] == T.UNUSED


# llama.cpp's convert_hf_to_gguf names a tokenizer's pre-tokenizer by hashing its ids of this text (get_vocab_base_pre;
# the text and the hashes copied from llama.cpp as vendored in llama-cpp-python 0.3.36)
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenate'
          'd) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314'
          '151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told '
          "he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
CHKHSH = {"0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
          "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2"}  # Qwen1.5-7B


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_pre_tokenizer_is_the_one_llama_cpps_converter_finds(family):
    """The name read off the split regex equals the one llama.cpp's converter finds by hashing the tokenizer's ids
    (with its post-processor's specials, as AutoTokenizer.encode gives them) of its test text."""
    import hashlib

    from llmctl.gguf_export import pre_tokenizer

    tok = _real_tokenizer(FAMILIES[family][1])
    chkhsh = hashlib.sha256(str(tok.tk.encode(CHKTXT).ids).encode()).hexdigest()
    assert CHKHSH[chkhsh] == pre_tokenizer(tok)[0] == PRE[family]


def _llama3_factors(head_dim: int, base: float, s: dict) -> list[float]:
    """llama.cpp's convert_hf_to_gguf (LlamaModel.generate_extra_tensors), restated: the divisor of each RoPE
    frequency under llama3 scaling."""
    import math

    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        low, high = s["original_max_position_embeddings"] / s["low_freq_factor"], \
            s["original_max_position_embeddings"] / s["high_freq_factor"]
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / \
                (s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return out


def test_rope_freqs_are_llama_cpps_divisors_and_give_our_rotation():
    """The rope_freqs tensor equals what llama.cpp's converter writes, and ggml's rope with it (angle = position x
    base^(-2i/d) / factor_i) turns by the angles our llama3-scaled RoPE turns by."""
    from llmctl.config.model import ModelConfig
    from llmctl.gguf_export import rope_freqs
    from llmctl.rope import inverse_frequencies

    m = ModelConfig(arch="llama", n_embd=64, n_head=4, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    factors = rope_freqs(m)
    want = torch.tensor(_llama3_factors(16, 500000.0, LLAMA3_SCALING))
    assert torch.allclose(factors, want, rtol=1e-6) and {1.0, 8.0} < set(want.tolist())  # all three bands
    ggml = 500000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16) / factors.double()
    assert torch.allclose(ggml, inverse_frequencies(16, 500000.0, LLAMA3_SCALING, 128)[0].double(), rtol=1e-6)


OPEN_BAD = [
    (dict(sliding_window=16), "has no sliding window (model.sliding_window=16 is shorter than the context, 128"),
    (dict(gate_activation="gelu_tanh"), "has no gelu_tanh gated MLP"),
    (dict(attn_softcap=50.0), "has no logit soft-capping"),
    (dict(final_softcap=30.0), "has no logit soft-capping"),
    (dict(embed_scale=True), "has no embedding scale"),
    (dict(post_norms=True), "has no norms after attention and MLP"),
    (dict(query_scale=24.0), "has no attention scale other than head_dim ** -0.5"),
    (dict(rotary_fraction=0.5), "has no partial rotary embedding"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "has no RoPE scaling yarn"),
    (dict(qk_norm=True, rope_scaling=LLAMA3_SCALING), "qwen3 architecture has no llama3 RoPE scaling"),
    (dict(qk_norm=True, bias=True), "qwen3 architecture has no biases outside q/k/v"),
    (dict(sliding_window=256, layer_types=["sliding", "full"], rope_local_theta=5000.0), "has no per-layer RoPE"),
]


@pytest.mark.parametrize("switches,words", OPEN_BAD, ids=[w.split(" (")[0].split("has no ")[-1] for _, w in OPEN_BAD])
def test_what_llama_cpp_would_compute_differently_is_refused(switches, words):
    from llmctl.config import Config
    from llmctl.config.model import ModelConfig
    from llmctl.errors import LlmctlError
    from llmctl.gguf_export import check
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["hello world " * 20], 300)
    cfg = Config(model=ModelConfig(arch="llama", n_layer=2, n_embd=64, n_head=4, block_size=128, **switches))
    with pytest.raises(LlmctlError) as e:
        check(cfg, tok, "f32")
    assert words in str(e.value) and "\n" not in str(e.value) and "export --format hf" in str(e.value)


@pytest.mark.parametrize("switches,arch", [
    (dict(sliding_window=128), "llama"),  # Mistral's window, as long as the context: nothing to leave out
    (dict(query_scale=16.0), "llama"),  # = head_dim
    (dict(norm_offset=True), "llama"),  # (1 + w) written as the weight
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, qk_norm=True), "qwen3"),
    (dict(qkv_bias=True), "qwen2"),
    (dict(qkv_bias=True, head_dim=32), "llama"),  # llama.cpp's qwen2 takes heads of n_embd / n_head channels only
    (dict(qkv_bias=True, rope_scaling=LLAMA3_SCALING), "llama"),  # its qwen2 reads no rope_freqs
    (dict(bias=True), "llama"),
], ids=["window-as-long-as-context", "query-scale-head-dim", "norm-offset", "qwen3-linear-scaling", "qwen2",
        "qkv-bias-head-dim", "qkv-bias-llama3-scaling", "all-biases"])
def test_what_llama_cpp_computes_alike_is_exported(switches, arch):
    from llmctl.config import Config
    from llmctl.config.model import ModelConfig
    from llmctl.gguf_export import arch_of, check
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["hello world " * 20], 300)
    cfg = Config(model=ModelConfig(arch="llama", n_layer=2, n_embd=64, n_head=4, block_size=128, **switches))
    check(cfg, tok, "f32")
    assert arch_of(cfg.model) == arch


@pytest.mark.parametrize("family", ["llama2", "mistral"])
def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused(family, runner, tmp_path):
    """SentencePiece-style BPE (a Metaspace pre-tokenizer or normalizer, byte fallback): llama.cpp's "llama"
    vocabulary type, which this export does not write."""
    words = "its pre-tokenizer is not a byte-level split llama.cpp knows"
    tok = _real_tokenizer(family)
    run = _checkpoint(tmp_path / family, tok, vocab_size=tok.vocab_size)
    r = invoke(runner, "export", "--ckpt", run, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_tokenizes_and_generates_open_families_as_llmctl(family, families, runner, tmp_path):
    """Llama 3 and Qwen3 (and Qwen2) with their real tokenizers: llama.cpp's ids of a multilingual paragraph with
    special and added tokens in it, without and with the tokenizer's own specials (Llama 3's BOS), decode back to it,
    its 40 greedy tokens are llmctl's (f32; q8_0 loads and generates), and it reads the model's chat template."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/check_gguf.sh)")
    import unicodedata

    from llmctl.generate import generate
    from llmctl.loading import load_model

    assert unicodedata.is_normalized("NFC", MULTILINGUAL)
    loaded = load_model(families[family], "cpu")
    tk = loaded.tokenizer.tk
    plain, with_specials = tk.encode(MULTILINGUAL, add_special_tokens=False).ids, tk.encode(MULTILINGUAL).ids
    assert (with_specials != plain) == (family == "llama3")  # Llama 3 adds <|begin_of_text|>, Qwen nothing
    prompt = tk.encode("The capital of France is").ids
    want = list(generate(loaded.model, prompt, 40, temperature=0, eos_id=-1))
    for outtype in ("f32", "q8_0"):
        path = _export(runner, families[family], tmp_path / f"{family}-{outtype}.gguf", outtype)
        got = _llama_cpp(path, loaded.cfg.model.block_size, [[MULTILINGUAL, False, True], [MULTILINGUAL, True, True]],
                         prompt, -1, 40)
        assert got["tokens"] == [plain, with_specials], (family, outtype)
        assert got["decoded"][0] == MULTILINGUAL == tk.decode(plain, skip_special_tokens=False)
        assert got["template"] == loaded.cfg.tokenizer.chat_template  # the model's own, as llama.cpp reads it
        if outtype == "f32":
            assert got["generated"] == want, family
        else:
            assert len(got["generated"]) == 40, (family, got)
