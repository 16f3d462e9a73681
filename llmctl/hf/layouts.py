"""Parameter layout: our tensor names <-> transformers', one table per architecture, read in both directions.

Per block i (ours <- theirs):
  gpt2:   attn.qkv = c_attn^T (Conv1D stores (in, out)); attn.proj = attn.c_proj^T; mlp.fc = c_fc^T;
          mlp.proj = mlp.c_proj^T; norm1/norm2/norm = ln_1/ln_2/ln_f; wte, wpe
  llama:  attn.qkv = [q_proj; k_proj; v_proj] (rows); attn.proj = o_proj; mlp.fc = [gate_proj; up_proj] (rows);
          mlp.proj = down_proj; norm1/norm2/norm = input_layernorm/post_attention_layernorm/norm; wte = embed_tokens
          (Qwen2, Qwen3, Mistral the same; q/k/v biases where model.qkv_bias; attn.q_norm/k_norm = self_attn.q_norm/
          k_norm where model.qk_norm)
  gemma:  as llama, but four norms: norm1 = input_layernorm, post_attn_norm = post_attention_layernorm,
          norm2 = pre_feedforward_layernorm, post_mlp_norm = post_feedforward_layernorm (norm weights as stored:
          the model uses 1 + w)
  phi3:   attn.qkv = self_attn.qkv_proj and mlp.fc = mlp.gate_up_proj as they are (the same fused row order)
Our RoPE uses the same rotate-half layout as transformers, so q/k rows need no permutation.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import LlmctlError
from ..model import Transformer
from . import encoders
from .configs import family_of
from .fields import Pair

# buffers that old transformers versions saved with the weights; they hold no learned values
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def layout(m: ModelConfig) -> list[Pair]:
    """Every tensor of a model of config `m`, with its transformers name(s)."""
    if not m.causal:
        return encoders.layout(m)
    pairs = _gpt2(m) if m.arch == "gpt2" else _llama(m)
    if not m.tied:  # a tied head is the embedding: stored once, on both sides
        pairs.append(Pair("lm_head.weight", ("lm_head.weight",)))
    return pairs


def _gpt2(m: ModelConfig) -> list[Pair]:
    C, H = m.n_embd, m.hidden
    zero = lambda *shape: None if m.has_bias else shape  # noqa: E731
    pairs = [Pair("wte.weight", ("transformer.wte.weight",)), Pair("wpe.weight", ("transformer.wpe.weight",))]
    for i in range(m.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for norm, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
            pairs.append(Pair(f"{ours}{norm}.weight", (f"{theirs}{ln}.weight",)))
            pairs.append(Pair(f"{ours}{norm}.bias", (f"{theirs}{ln}.bias",), zero_shape=zero(C)))
        for mod, conv, out in (("attn.qkv", "attn.c_attn", 3 * C), ("attn.proj", "attn.c_proj", C),
                               ("mlp.fc", "mlp.c_fc", H), ("mlp.proj", "mlp.c_proj", C)):
            pairs.append(Pair(f"{ours}{mod}.weight", (f"{theirs}{conv}.weight",), transpose=True))
            pairs.append(Pair(f"{ours}{mod}.bias", (f"{theirs}{conv}.bias",), zero_shape=zero(out)))
    return pairs + [Pair("norm.weight", ("transformer.ln_f.weight",)),
                    Pair("norm.bias", ("transformer.ln_f.bias",), zero_shape=zero(C))]


def _llama(m: ModelConfig) -> list[Pair]:
    fam = family_of(m)
    H, hd = m.hidden, m.head_size
    qkv_sizes = (m.n_head * hd, m.kv_heads * hd, m.kv_heads * hd)
    if fam.gemma_norms:
        norms = (("norm1", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
                 ("norm2", "pre_feedforward_layernorm"), ("post_mlp_norm", "post_feedforward_layernorm"))
    else:
        norms = (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"))
    pairs = [Pair("wte.weight", ("model.embed_tokens.weight",))]
    for i in range(m.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        attn, mlp = f"{theirs}self_attn.", f"{theirs}mlp."
        pairs += [Pair(f"{ours}{n}.weight", (f"{theirs}{t}.weight",)) for n, t in norms]
        if m.qk_norm:
            pairs += [Pair(f"{ours}attn.{x}_norm.weight", (f"{attn}{x}_norm.weight",)) for x in "qk"]
        qkv = [p for p, on in (("weight", True), ("bias", m.has_qkv_bias)) if on]
        rest = ("weight", "bias") if m.has_bias else ("weight",)
        for p in qkv:
            if fam.fused:
                pairs.append(Pair(f"{ours}attn.qkv.{p}", (f"{attn}qkv_proj.{p}",)))
            else:
                pairs.append(Pair(f"{ours}attn.qkv.{p}", tuple(f"{attn}{x}_proj.{p}" for x in "qkv"), qkv_sizes))
        for p in rest:
            pairs.append(Pair(f"{ours}attn.proj.{p}", (f"{attn}o_proj.{p}",)))
            if fam.fused:
                pairs.append(Pair(f"{ours}mlp.fc.{p}", (f"{mlp}gate_up_proj.{p}",)))
            else:
                pairs.append(Pair(f"{ours}mlp.fc.{p}", (f"{mlp}gate_proj.{p}", f"{mlp}up_proj.{p}"), (H, H)))
            pairs.append(Pair(f"{ours}mlp.proj.{p}", (f"{mlp}down_proj.{p}",)))
    return pairs + [Pair("norm.weight", ("model.norm.weight",))]


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of our parameters for config `m` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = Transformer(m)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if m.tied:
        shapes.pop("lm_head.weight", None)
    return shapes


def from_hf_weights(theirs: dict[str, torch.Tensor], m: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """transformers state dict -> ours (float32), checking that every tensor is there with the right shape."""
    theirs = _canonical_names(theirs, m)
    pairs = layout(m)
    needed = [n for p in pairs for n in p.theirs]
    missing = [n for n in needed if n not in theirs]
    if missing:
        raise LlmctlError(f"{source} lacks tensor {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                          + "; the weights do not match config.json or are incomplete")
    known = set(needed) | ({"lm_head.weight"} if m.tied else set())  # a tied head saved anyway is the embedding
    known |= set(encoders.aliases(m)) | set(encoders.unused(m)) if not m.causal else set()
    extra = [n for n in theirs if n not in known and not n.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise LlmctlError(f"{source} has tensor {extra[0]} that config.json does not account for"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                          + "; the architecture has parts llmctl cannot represent")
    expected = expected_shapes(m)
    ours = {}
    for p in pairs:
        for name, shape in zip(p.theirs, _their_shapes(p, expected[p.ours])):
            if tuple(theirs[name].shape) != shape:
                raise LlmctlError(f"{source}: tensor {name} has shape {tuple(theirs[name].shape)} but config.json "
                                  f"implies {shape}")
        pieces = [theirs[n] for n in p.theirs]
        t = torch.cat(pieces, 0) if len(pieces) > 1 else pieces[0]
        ours[p.ours] = (t.t() if p.transpose else t).to(torch.float32).contiguous()
    return ours


def split_head(theirs: dict[str, torch.Tensor], m: ModelConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """A *ForSequenceClassification state dict -> (the encoder's tensors, llmctl's classifier head tensors: the
    `Classifier.head_state` form). Missing head tensors are an error naming the first."""
    theirs = _canonical_names(theirs, m)
    pairs = encoders.head_layout(m)
    missing = [n for p in pairs for n in p.theirs if n not in theirs]
    if missing:
        raise LlmctlError(f"the classifier lacks tensor {missing[0]}; the weights do not match config.json")
    head = {p.ours.removeprefix("head."): theirs[p.theirs[0]].to(torch.float32).contiguous() for p in pairs}
    taken = {n for p in pairs for n in p.theirs}
    return {k: v for k, v in theirs.items() if k not in taken}, head


def head_to_hf(head: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """llmctl's classifier head tensors (`Classifier.head_state`) -> transformers names."""
    return {p.theirs[0]: head[p.ours.removeprefix("head.")].contiguous() for p in encoders.head_layout(m)}


def _their_shapes(p: Pair, ours: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes of the transformers tensor(s) of a pair, given the shape of ours."""
    if p.transpose:
        return [tuple(reversed(ours))]
    if p.sizes:
        return [(n, *ours[1:]) for n in p.sizes]
    return [ours]


def to_hf_weights(ours: dict[str, torch.Tensor], m: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers names and layouts (biases GPT-2 needs but we lack are written as zeros)."""
    check_shapes(ours, m, source)
    out = {}
    for p in layout(m):
        if p.ours in ours:
            t = ours[p.ours]
        elif p.zero_shape is not None:
            t = torch.zeros(p.zero_shape, dtype=ours["wte.weight"].dtype)
        else:  # check_shapes has seen every tensor of the model, so only a tensor we never store ends here
            raise LlmctlError(f"{source} lacks tensor {p.ours}")
        if p.transpose:
            t = t.t()
        pieces = t.split(list(p.sizes), 0) if p.sizes else (t,)
        for name, piece in zip(p.theirs, pieces):
            out[name] = piece.contiguous()
    return out


def check_shapes(ours: dict[str, torch.Tensor], m: ModelConfig, source: str) -> None:
    expected = expected_shapes(m)
    missing = [k for k in expected if k not in ours]
    if missing:
        raise LlmctlError(f"{source} lacks tensor {missing[0]}; the weights do not match the model config")
    for k, shape in expected.items():
        if tuple(ours[k].shape) != shape:
            raise LlmctlError(f"{source}: tensor {k} has shape {tuple(ours[k].shape)} but the config implies {shape}")


def _canonical_names(theirs: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Add the `transformer.` / `model.` prefix that checkpoints saved from the base model (GPT2Model, the
    original gpt2 repository, LlamaModel) leave out."""
    if not m.causal:
        return encoders.canonical(theirs, m)
    prefix = "transformer." if m.arch == "gpt2" else "model."
    return {(k if k.startswith(prefix) or k == "lm_head.weight" else prefix + k): v for k, v in theirs.items()}
