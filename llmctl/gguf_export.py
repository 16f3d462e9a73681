"""GGUF export for llama.cpp (and Ollama, LM Studio, ...) through the `gguf` package llama.cpp publishes.

The llama.cpp architecture follows from the model's switches (`arch_of`), under llama.cpp's tensor names:
  - llama: token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}
    (with their biases where the model has them), output_norm, output; `rope_freqs` (per-frequency divisors) for
    Llama 3's `llama3` RoPE scaling, as llama.cpp's convert_hf_to_gguf writes it. llama.cpp rotates interleaved pairs
    here, so q and k (weights and biases) are permuted from the rotate-half layout (ours, and transformers'), as its
    own converter does.
  - qwen3 (QK-norm): as llama plus blk.N.attn_q_norm / attn_k_norm; qwen2 (q/k/v biases): as llama. Both rotate
    halves in llama.cpp (its NEOX RoPE), so nothing is permuted.
  - gpt2: token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down} (weights
    and biases; zeros where the model has none), output_norm, output. ggml's GPT-2 uses the tanh GELU, so only
    models with `model.activation: gelu_tanh` export exactly.
What llama.cpp would compute differently is refused with the reason (`check`).

The tokenizer goes along as byte-level BPE: tokens, merges, token types (special added tokens CONTROL, other added
tokens USER_DEFINED, as convert_hf_to_gguf marks them), and the pre-tokenizer llama.cpp names after its split
regex: GPT-2's `gpt-2`, Llama 3's `llama-bpe`, Qwen2's `qwen2`. add_bos/add_eos say what the tokenizer's
post-processor adds, so llama.cpp tokenizes a prompt as llmctl does; ids past the tokenizer (a padded vocabulary)
are unused [PAD] tokens. Weights: f32, f16 (matrices; norms and biases stay f32), or q8_0 (matrices whose rows are
a multiple of 32; others f16).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .chat import exported_template
from .config import Config
from .config.model import ModelConfig
from .errors import LlmctlError
from .tokenizer import Tokenizer

OUTTYPES = ("f32", "f16", "q8_0")
# llama.cpp's pre-tokenizer names for the split regexes of byte-level BPE tokenizers (llama-vocab.cpp), with
# whether that pre-tokenizer ignores merges for words in the vocabulary (tokenizer.json's `ignore_merges`)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {None: ("gpt-2", False), LLAMA3_SPLIT: ("llama-bpe", True), QWEN2_SPLIT: ("qwen2", False)}
# the end-of-turn tokens of Llama 3 and ChatML (Qwen), written as tokenizer.ggml.eot_token_id
END_OF_TURN = ("<|eot_id|>", "<|im_end|>")


def require() -> Any:
    try:
        import gguf
    except ImportError:
        raise LlmctlError("--format gguf needs the gguf package (pip install 'llmctl[gguf]')") from None
    return gguf


def arch_of(m: ModelConfig) -> str:
    """llama.cpp's architecture for the model: gpt2 for the GPT-2 flavour; qwen3 for QK-norm; qwen2 for q/k/v
    biases on a model llama.cpp's qwen2 takes as it is (no other biases, heads of n_embd / n_head channels, no llama3
    RoPE scaling); llama otherwise (it takes every bias and any head size)."""
    if m.arch == "gpt2":
        return "gpt2"
    if m.qk_norm:
        return "qwen3"
    if (m.has_qkv_bias and not m.has_bias and m.head_size * m.n_head == m.n_embd
            and _rope_type(m) != "llama3"):
        return "qwen2"
    return "llama"


def _rope_type(m: ModelConfig) -> Optional[str]:
    s = m.rope_scaling
    return None if s is None else s.get("rope_type", s.get("type"))


def check(cfg: Config, tok: Optional[Tokenizer], outtype: str) -> None:
    """Refuse what llama.cpp cannot run exactly, with the reason."""
    if outtype not in OUTTYPES:
        raise LlmctlError(f"--outtype {outtype!r} is not supported for GGUF; choose one of: {', '.join(OUTTYPES)}")
    if tok is None:
        raise LlmctlError("GGUF export needs the tokenizer (llama.cpp tokenizes itself); pass --tokenizer FILE")
    pre_tokenizer(tok)
    m = cfg.model
    if m.arch == "gpt2" and m.activation != "gelu_tanh":
        raise LlmctlError(f"llama.cpp's gpt2 architecture uses the tanh GELU; this model uses "
                          f"model.activation={m.activation}, so llama.cpp would compute another function "
                          "(train or finetune with model.activation=gelu_tanh)")
    problems = refusals(m)
    if problems:
        raise LlmctlError(f"GGUF export: llama.cpp's {arch_of(m)} architecture has no {problems[0]}, so llama.cpp "
                          "would compute another function (export --format hf instead)")


def refusals(m: ModelConfig) -> list[str]:
    """What of this model llama.cpp's architecture for it (`arch_of`) would not compute, each as the words after
    "llama.cpp's ARCH architecture has no"."""
    arch = arch_of(m)
    if arch == "gpt2":
        return []
    p = []
    if not m.gated:
        p.append("ungated ReLU² MLP (model.activation=relu2)")
    if m.embed_scale:
        p.append("embedding scale (model.embed_scale=true, Gemma)")
    if m.gate_activation != "silu":
        p.append(f"{m.gate_activation} gated MLP (model.gate_activation={m.gate_activation}; it computes SwiGLU)")
    if m.post_norms:
        p.append("norms after attention and MLP (model.post_norms=true, Gemma 2/3)")
    if m.attn_softcap is not None or m.final_softcap is not None:
        p.append("logit soft-capping (model.attn_softcap / model.final_softcap, Gemma 2)")
    if m.query_scale is not None and m.query_scale != m.head_size:
        p.append(f"attention scale other than head_dim ** -0.5 (model.query_scale={m.query_scale:g})")
    if m.rotary_fraction != 1.0:
        p.append(f"partial rotary embedding (model.rotary_fraction={m.rotary_fraction:g})")
    sliding = [s for s in m.sliding if s]
    if sliding and m.sliding_window < m.block_size:
        p.append(f"sliding window (model.sliding_window={m.sliding_window} is shorter than the context, "
                 f"{m.block_size}: llama.cpp would attend to all of it)")
    if sliding and (m.rope_scaling is not None or m.rope_local_theta not in (None, m.rope_theta)):
        p.append("per-layer RoPE (model.rope_scaling / model.rope_local_theta apply to full-attention layers only)")
    kind = _rope_type(m)
    if kind not in (None, "linear", "llama3"):
        p.append(f"RoPE scaling {kind} as transformers computes it (model.rope_scaling; GGUF takes linear and "
                 "llama3)")
    if kind == "llama3" and arch != "llama":
        p.append("llama3 RoPE scaling (model.rope_scaling; llama.cpp reads rope_freqs in its llama architecture "
                 "only)")
    if arch == "qwen3" and m.has_bias:
        p.append("biases outside q/k/v (model.bias=true; with model.qk_norm the model exports as qwen3)")
    return p


def pre_tokenizer(tok: Tokenizer, spec: Optional[dict] = None) -> tuple[str, bool]:
    """llama.cpp's pre-tokenizer name for this tokenizer, and whether the tokenizer ignores merges; refused with the
    reason when llama.cpp could not tokenize as it does (a character-level vocabulary, SentencePiece-style BPE, an
    unknown split regex, a normalizer other than NFC). `spec`: the tokenizer's JSON, when parsed already."""
    if tok.kind != "bpe":
        raise LlmctlError(f"GGUF export needs a byte-level BPE tokenizer; this checkpoint's is {tok.kind!r} "
                          "(llama.cpp has no character-level vocabulary type): train with tokenizer.kind=bpe")
    spec = spec or json.loads(tok.to_str())
    pre, norm, model = spec.get("pre_tokenizer") or {}, spec.get("normalizer"), spec["model"]
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split: Any = "?"
    if len(steps) == 1 and _byte_level(steps[0], use_regex=True):
        split = None
    elif (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
          and not steps[0].get("invert") and _byte_level(steps[1], use_regex=False)):
        split = (steps[0].get("pattern") or {}).get("Regex", "?")
    problem = ("its pre-tokenizer is not a byte-level split llama.cpp knows (GPT-2's, Llama 3's or Qwen2's regex)"
               if split not in PRE_TOKENIZERS else
               f"its normalizer is {norm.get('type')} (llama.cpp normalizes nothing)"
               if norm is not None and norm.get("type") != "NFC" else
               "it falls back to bytes (SentencePiece-style BPE)" if model.get("byte_fallback") else
               "its ignore_merges differs from what llama.cpp does for that pre-tokenizer"
               if bool(model.get("ignore_merges")) != PRE_TOKENIZERS.get(split, (0, False))[1] else None)
    if problem:
        raise LlmctlError(f"GGUF export cannot carry this tokenizer: {problem}, so llama.cpp would tokenize "
                          "differently (export --format hf instead)")
    return PRE_TOKENIZERS[split]


def _byte_level(step: dict, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
            and bool(step.get("use_regex", True)) == use_regex)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection from rotate-half order to ggml's interleaved pairs (per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freqs(m: ModelConfig) -> Optional[torch.Tensor]:
    """The `rope_freqs` tensor llama.cpp divides each RoPE frequency by (Llama 3's scaling): the unscaled
    frequencies over the model's own; None without llama3 scaling."""
    if _rope_type(m) != "llama3":
        return None
    from .rope import inverse_frequencies

    plain, _ = inverse_frequencies(m.head_size, m.rope_theta, None, m.block_size)
    scaled, _ = inverse_frequencies(m.head_size, m.rope_theta, m.rope_scaling, m.block_size)
    return plain / scaled


def tensors(cfg: Config, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under llama.cpp's names and layouts (float32)."""
    m = cfg.model
    arch = arch_of(m)
    w = {k: v.detach().float().cpu() for k, v in weights.items()}
    if m.norm_offset:  # RMSNorm scaling by (1 + w): llama.cpp's scales by its weight
        w = {k: v + 1 if "norm" in k.split(".")[-2] else v for k, v in w.items()}
    head = w.get("lm_head.weight", w["wte.weight"])
    out: dict[str, torch.Tensor] = {"token_embd.weight": w["wte.weight"], "output_norm.weight": w["norm.weight"],
                                    "output.weight": head}
    if arch == "gpt2":
        return _gpt2_tensors(m, w, out)
    freqs = rope_freqs(m)
    if freqs is not None:
        out["rope_freqs.weight"] = freqs
    permute = _permute if arch == "llama" else (lambda t, n: t)
    hd = m.head_size
    for i in range(m.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        sizes = [m.n_head * hd, m.kv_heads * hd, m.kv_heads * hd]
        for kind in ("weight", "bias"):
            if p + "attn.qkv." + kind in w:
                q, k, v = w[p + "attn.qkv." + kind].split(sizes)
                out[b + "attn_q." + kind], out[b + "attn_k." + kind] = permute(q, m.n_head), permute(k, m.kv_heads)
                out[b + "attn_v." + kind] = v
            if p + "mlp.fc." + kind in w:
                out[b + "ffn_gate." + kind], out[b + "ffn_up." + kind] = w[p + "mlp.fc." + kind].split(m.hidden)
        names = {"norm1.weight": "attn_norm.weight", "norm2.weight": "ffn_norm.weight",
                 "attn.q_norm.weight": "attn_q_norm.weight", "attn.k_norm.weight": "attn_k_norm.weight",
                 "attn.proj.weight": "attn_output.weight", "attn.proj.bias": "attn_output.bias",
                 "mlp.proj.weight": "ffn_down.weight", "mlp.proj.bias": "ffn_down.bias"}
        out.update({b + theirs: w[p + ours] for ours, theirs in names.items() if p + ours in w})
    return out


def _gpt2_tensors(m: ModelConfig, w: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict:
    C = m.n_embd
    zeros = (lambda n: torch.zeros(n))  # noqa: E731  (gpt2 models without biases: llama.cpp requires them)
    out["position_embd.weight"] = w["wpe.weight"]
    out["output_norm.bias"] = w.get("norm.bias", zeros(C))
    for i in range(m.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        for ours, theirs, n in (("norm1", "attn_norm", C), ("norm2", "ffn_norm", C),
                                ("attn.qkv", "attn_qkv", 3 * C), ("attn.proj", "attn_output", C),
                                ("mlp.fc", "ffn_up", m.hidden), ("mlp.proj", "ffn_down", C)):
            out[b + theirs + ".weight"] = w[p + ours + ".weight"]
            out[b + theirs + ".bias"] = w.get(p + ours + ".bias", zeros(n))
    return out


def write(path: Path, cfg: Config, weights: dict[str, torch.Tensor], tok: Tokenizer, outtype: str, name: str) -> None:
    """Write the GGUF file `path` (the caller renames a temporary file into place)."""
    gguf = require()
    m = cfg.model
    arch = arch_of(m)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(m.block_size)
    writer.add_embedding_length(m.n_embd)
    writer.add_block_count(m.n_layer)
    writer.add_feed_forward_length(m.hidden)
    writer.add_head_count(m.n_head)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(ftype)
    if arch == "gpt2":
        writer.add_layer_norm_eps(m.norm_eps)
    else:
        _llama_hparams(writer, gguf, m)
    _tokenizer(writer, gguf, tok, m.vocab_size)
    template = exported_template(cfg, tok)  # the model's own, or llmctl's for an instruction-tuned model
    if template is not None:
        writer.add_chat_template(template)
    for key, t in tensors(cfg, weights).items():
        data = t.numpy().astype(np.float32)
        if outtype == "f32" or data.ndim == 1:
            writer.add_tensor(key, data)
        elif outtype == "q8_0" and data.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _llama_hparams(writer: Any, gguf: Any, m: ModelConfig) -> None:
    """The hyperparameters of llama.cpp's llama, qwen2 and qwen3 architectures."""
    writer.add_head_count_kv(m.kv_heads)
    writer.add_layer_norm_rms_eps(m.norm_eps)
    writer.add_rope_dimension_count(m.head_size)
    if m.head_size * m.n_head != m.n_embd:  # decoupled (Qwen3) or head-pruned: llama.cpp reads the head size here
        writer.add_key_length(m.head_size)
        writer.add_value_length(m.head_size)
    writer.add_rope_freq_base(m.rope_theta)
    if _rope_type(m) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(m.rope_scaling["factor"]))
    writer.add_vocab_size(m.vocab_size)


def _tokenizer(writer: Any, gguf: Any, tok: Tokenizer, n_vocab: int) -> None:
    spec = json.loads(tok.to_str())
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = by_id[i]
        tokens.append(t)
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].get("special") or (t.startswith("<|") and t.endswith("|>")):  # (as convert_hf_to_gguf's
            types.append(gguf.TokenType.CONTROL)                                    # does_token_look_special)
        else:
            types.append(gguf.TokenType.USER_DEFINED)  # matched in any text, as the tokenizers library does
    merges = spec["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    pre, _ = pre_tokenizer(tok, spec)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    before, after = tok.added_specials()  # what the post-processor adds to a plain prompt (Llama 3: BOS)
    bos = before[0] if before else tok.bos_id
    writer.add_bos_token_id(bos if bos is not None else tok.eos_id)  # (GPT-2's <|endoftext|> is both)
    writer.add_eos_token_id(tok.eos_id)
    eot = next((vocab[t] for t in END_OF_TURN if t in vocab), None)
    if eot is not None:
        writer.add_eot_token_id(eot)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(bool(before))
    writer.add_add_eos_token(bool(after))
