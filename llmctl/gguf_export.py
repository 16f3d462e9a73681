"""GGUF export for llama.cpp (and Ollama, LM Studio, ...) through the `gguf` package llama.cpp publishes.

llama.cpp's `llama` and `gpt2` architectures, under their tensor names:
  - llama: token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down},
    output_norm, output. q and k are permuted from the rotate-half layout (ours, and transformers') to the
    interleaved pairs ggml's rope rotates, as llama.cpp's own converter does.
  - gpt2: token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down} (weights
    and biases; zeros where the model has none), output_norm, output. ggml's GPT-2 uses the tanh GELU, so only
    models with `model.activation: gelu_tanh` export exactly.
The tokenizer goes along as byte-level BPE (tokens, merges, token types, the GPT-2 pre-tokenizer), with
add_bos/add_eos off, so llama.cpp tokenizes as llmctl does; ids past the tokenizer (a padded vocabulary) are
unused [PAD] tokens. Weights: f32, f16 (matrices; norms and biases stay f32), or q8_0 (matrices whose rows are a
multiple of 32; others f16).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .chat import exported_template
from .config import Config
from .errors import LlmctlError
from .tokenizer import Tokenizer

OUTTYPES = ("f32", "f16", "q8_0")


def require() -> Any:
    try:
        import gguf
    except ImportError:
        raise LlmctlError("--format gguf needs the gguf package (pip install 'llmctl[gguf]')") from None
    return gguf


def check(cfg: Config, tok: Optional[Tokenizer], outtype: str) -> None:
    """Refuse what llama.cpp cannot run exactly, with the reason."""
    if outtype not in OUTTYPES:
        raise LlmctlError(f"--outtype {outtype!r} is not supported for GGUF; choose one of: {', '.join(OUTTYPES)}")
    if tok is None:
        raise LlmctlError("GGUF export needs the tokenizer (llama.cpp tokenizes itself); pass --tokenizer FILE")
    if tok.kind != "bpe" or not _byte_level(tok):
        raise LlmctlError(f"GGUF export needs a byte-level BPE tokenizer; this checkpoint's is {tok.kind!r} "
                          "(llama.cpp has no character-level vocabulary type): train with tokenizer.kind=bpe")
    if cfg.model.arch == "gpt2" and cfg.model.activation != "gelu_tanh":
        raise LlmctlError(f"llama.cpp's gpt2 architecture uses the tanh GELU; this model uses "
                          f"model.activation={cfg.model.activation}, so llama.cpp would compute another function "
                          "(train or finetune with model.activation=gelu_tanh)")


def _byte_level(tok: Tokenizer) -> bool:
    spec = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and not spec.get("normalizer")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection from rotate-half order to ggml's interleaved pairs (per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(cfg: Config, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under llama.cpp's names and layouts (float32)."""
    m = cfg.model
    w = {k: v.detach().float().cpu() for k, v in weights.items()}
    head = w.get("lm_head.weight", w["wte.weight"])
    out: dict[str, torch.Tensor] = {"token_embd.weight": w["wte.weight"], "output_norm.weight": w["norm.weight"],
                                    "output.weight": head}
    C, hd = m.n_embd, m.head_size
    zeros = (lambda n: torch.zeros(n))  # noqa: E731  (gpt2 models without biases: llama.cpp requires them)
    if m.arch == "gpt2":
        out["position_embd.weight"] = w["wpe.weight"]
        out["output_norm.bias"] = w.get("norm.bias", zeros(C))
    for i in range(m.n_layer):
        p, b = f"blocks.{i}.", f"blk.{i}."
        qkv = w[p + "attn.qkv.weight"]
        out[b + "attn_norm.weight"] = w[p + "norm1.weight"]
        out[b + "ffn_norm.weight"] = w[p + "norm2.weight"]
        out[b + "attn_output.weight"] = w[p + "attn.proj.weight"]
        out[b + "ffn_down.weight"] = w[p + "mlp.proj.weight"]
        if m.arch == "llama":
            q, k, v = qkv.split([m.n_head * hd, m.kv_heads * hd, m.kv_heads * hd])
            out[b + "attn_q.weight"] = _permute(q, m.n_head)
            out[b + "attn_k.weight"] = _permute(k, m.kv_heads)
            out[b + "attn_v.weight"] = v
            gate, up = w[p + "mlp.fc.weight"].split(m.hidden)
            out[b + "ffn_gate.weight"], out[b + "ffn_up.weight"] = gate, up
        else:
            out[b + "attn_qkv.weight"] = qkv
            out[b + "ffn_up.weight"] = w[p + "mlp.fc.weight"]
            for ours, theirs, n in (("norm1", "attn_norm", C), ("norm2", "ffn_norm", C),
                                    ("attn.qkv", "attn_qkv", 3 * C), ("attn.proj", "attn_output", C),
                                    ("mlp.fc", "ffn_up", m.hidden), ("mlp.proj", "ffn_down", C)):
                out[b + theirs + ".bias"] = w.get(p + ours + ".bias", zeros(n))
    return out


def write(path: Path, cfg: Config, weights: dict[str, torch.Tensor], tok: Tokenizer, outtype: str, name: str) -> None:
    """Write the GGUF file `path` (the caller renames a temporary file into place)."""
    gguf = require()
    m = cfg.model
    arch = m.arch
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
    if arch == "llama":
        writer.add_head_count_kv(m.kv_heads)
        writer.add_layer_norm_rms_eps(m.norm_eps)
        writer.add_rope_dimension_count(m.head_size)
        if m.head_size * m.n_head != m.n_embd:  # a head-pruned model: llama.cpp reads the head size from these
            writer.add_key_length(m.head_size)
            writer.add_value_length(m.head_size)
        writer.add_rope_freq_base(m.rope_theta)
        writer.add_vocab_size(m.vocab_size)
    else:
        writer.add_layer_norm_eps(m.norm_eps)
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


def _tokenizer(writer: Any, gguf: Any, tok: Tokenizer, n_vocab: int) -> None:
    spec = json.loads(tok.to_str())
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = spec["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for the GPT-2 split regex (our ByteLevel one)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.eos_id)  # (not added: llmctl's prompts start without one)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
