"""The encoders: BERT and ModernBERT config.json <-> ModelConfig, and their tensor names.

BERT is llmctl's gpt2 flavour with `causal: false`, post-norm blocks (`norm_position: post`), a norm over the
embeddings, token-type embeddings and the masked-LM head; ModernBERT is the llama flavour with LayerNorm (no bias),
GeGLU with exact GELU, RoPE with a global and a local base and bidirectional windows of +-local_attention/2 in its
sliding layers, the same embedding norm and MLM head. Each comes as a masked LM (`*ForMaskedLM`), a bare encoder
(`BertModel`, `ModernBertModel`: imported without an output head) and a sequence classifier
(`*ForSequenceClassification`: the encoder plus llmctl's classifier, pooler included).

Tensor pairs (ours <- theirs), BERT (prefix `bert.`): wte/wpe/wtt/embed_norm = embeddings.word_embeddings/
position_embeddings/token_type_embeddings/LayerNorm; attn.qkv = [query; key; value]; attn.proj, norm1 =
attention.output.dense/LayerNorm; mlp.fc = intermediate.dense; mlp.proj, norm2 = output.dense/LayerNorm; mlm.dense,
mlm.norm, lm_head.bias = cls.predictions.transform.dense/LayerNorm, cls.predictions.bias; classifier pre.dense =
pooler.dense, head = classifier. ModernBERT (prefix `model.`): wte, embed_norm = embeddings.tok_embeddings/norm;
attn.qkv = attn.Wqkv (q, k, v rows as ours); attn.proj = attn.Wo; mlp.fc = mlp.Wi (the GELU half first, as ours);
mlp.proj = mlp.Wo; norm1 = attn_norm (none in layer 0), norm2 = mlp_norm; norm = final_norm; mlm.* = head.*,
lm_head.bias = decoder.bias; classifier pre.* = head.*, head = classifier.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional

from ..config import ModelConfig, from_dict
from ..errors import LlmctlError
from . import rope
from .fields import Pair, Reader, unrepresentable

BERT_ARCHS = ("BertForMaskedLM", "BertModel", "BertForSequenceClassification")
MODERNBERT_ARCHS = ("ModernBertForMaskedLM", "ModernBertModel", "ModernBertForSequenceClassification")
ENCODER_ARCHS = BERT_ARCHS + MODERNBERT_ARCHS
MODEL_TYPES = {"bert": "BertForMaskedLM", "modernbert": "ModernBertForMaskedLM"}
GLOBAL_THETA, LOCAL_THETA = 160_000.0, 10_000.0


def is_bert(m: ModelConfig) -> bool:
    return m.arch == "gpt2"


def to_model_config(hf: dict, name: str, source: str) -> ModelConfig:
    """An encoder's config.json -> ModelConfig (mlm_head for *ForMaskedLM, none for the bare and classifying ones,
    whose output head is unused and tied)."""
    r = Reader(hf, source)
    mlm = name.endswith("ForMaskedLM")
    common = dict(causal=False, n_layer=r("num_hidden_layers", int), n_head=r("num_attention_heads", int),
                  n_embd=r("hidden_size", int), vocab_size=r("vocab_size", int),
                  mlp_hidden=r("intermediate_size", int), init_std=r("initializer_range", float, 0.02),
                  embed_norm=True, mlm_head=mlm, hf_architecture=MODEL_TYPES[hf_model_type(name)])
    tied = r("tie_word_embeddings", bool, True)
    if not tied and not mlm:
        raise unrepresentable(source, "tie_word_embeddings", tied, f"{name} has no output head to untie")
    extra = _read_bert(r) if name in BERT_ARCHS else _read_modernbert(r, common["n_layer"], mlm)
    m = ModelConfig(**common, tie_embeddings=tied, **extra)
    try:
        m = from_dict({"model": asdict(m)}).model
    except LlmctlError as e:
        raise LlmctlError(f"{source} describes a model llmctl cannot build: {e.message}") from None
    why = unsupported(m)
    if why:
        raise LlmctlError(f"{source} describes a {name} llmctl cannot represent exactly ({why})")
    return m


def hf_model_type(name: str) -> str:
    return "bert" if name in BERT_ARCHS else "modernbert"


def _one_dropout(r: Reader, names: tuple[str, ...], default: float) -> float:
    values = {n: r(n, float, default) for n in names}
    if len(set(values.values())) > 1:
        raise unrepresentable(r.source, names[1], values[names[1]],
                              f"llmctl has one dropout, and {names[0]}={values[names[0]]}")
    return values[names[0]]


def _read_bert(r: Reader) -> dict:
    r.require("hidden_act", ("gelu",), "gelu", "llmctl's BERT uses exact GELU")
    r.require("is_decoder", (False,), False, "llmctl's BERT is an encoder")
    r.require("add_cross_attention", (False,), False, "llmctl has no cross-attention")
    r.require("position_embedding_type", ("absolute",), "absolute", "llmctl's BERT has absolute positions")
    return dict(arch="gpt2", block_size=r("max_position_embeddings", int, 512), norm_position="post",
                type_vocab_size=r("type_vocab_size", int, 2), norm_eps=r("layer_norm_eps", float, 1e-12),
                bias=True, activation="gelu", pooler="tanh",
                dropout=_one_dropout(r, ("hidden_dropout_prob", "attention_probs_dropout_prob"), 0.1))


def _read_modernbert(r: Reader, n_layer: int, mlm: bool) -> dict:
    r.require("hidden_activation", ("gelu",), "gelu", "llmctl's ModernBERT MLP is GeGLU with exact GELU")
    r.require("classifier_activation", ("gelu",), "gelu", "llmctl's ModernBERT head uses exact GELU")
    bias = r("norm_bias", bool, False)
    for name in ("attention_bias", "mlp_bias", "classifier_bias"):
        r.require(name, (bias,), False, f"llmctl has one bias switch, and norm_bias={json.dumps(bias)}")
    if mlm:
        r.require("decoder_bias", (True,), True, "llmctl's MLM head has a bias on its vocabulary projection")
    every = r("global_attn_every_n_layers", int, 3)
    given = r.hf.get("layer_types")
    if given is None:
        given = ["sliding_attention" if i % every else "full_attention" for i in range(n_layer)]
    if not isinstance(given, list) or len(given) != n_layer or \
            any(t not in ("full_attention", "sliding_attention") for t in given):
        raise unrepresentable(r.source, "layer_types", given, f"expected {n_layer} entries of full_attention or "
                              "sliding_attention")
    p = rope.read(r.hf, r.source, per_layer_type=True, default_theta=r("global_rope_theta", float, GLOBAL_THETA),
                  default_local_theta=r("local_rope_theta", float, LOCAL_THETA))
    if p.scaling is not None:
        raise unrepresentable(r.source, "rope_parameters", r.hf.get("rope_parameters"),
                              "llmctl's ModernBERT has unscaled RoPE")
    sliding = [t == "sliding_attention" for t in given]
    return dict(arch="llama", block_size=r("max_position_embeddings", int, 8192), norm="layernorm", bias=bias,
                norm_eps=r("norm_eps", float, 1e-5), gate_activation="gelu", pooler="mlm",
                sliding_window=r("local_attention", int, 128) if any(sliding) else None,
                layer_types=["sliding" if s else "full" for s in sliding] if any(sliding) else None,
                rope_theta=p.theta, rope_local_theta=p.local_theta,
                dropout=_one_dropout(r, ("attention_dropout", "embedding_dropout", "mlp_dropout"), 0.0))


def unsupported(m: ModelConfig) -> Optional[str]:
    """What of encoder `m` neither BERT nor ModernBERT can hold (a phrase naming the field), or None."""
    want = {"causal": False, "embed_norm": True, "n_kv_head": None, "qk_norm": False, "norm_offset": False,
            "embed_scale": False, "post_norms": False, "attn_softcap": None, "final_softcap": None,
            "query_scale": None, "rope_scaling": None, "rotary_fraction": 1.0}
    if is_bert(m):
        want.update(norm_position="post", activation="gelu", bias=True, norm_kind="layernorm", pooler="tanh",
                    has_qkv_bias=True, head_dim=None)
    else:
        want.update(norm_position="pre", norm_kind="layernorm", gate_activation="gelu", type_vocab_size=0,
                    pooler="mlm", has_qkv_bias=m.has_bias)
    for k, v in want.items():
        if getattr(m, k) != v:
            return f"model.{k.removeprefix('has_').removesuffix('_kind')}={json.dumps(getattr(m, k))}: " \
                   f"{'BERT' if is_bert(m) else 'ModernBERT'} needs {json.dumps(v)}"
    if is_bert(m) and m.type_vocab_size < 1:
        return "model.type_vocab_size=0: BERT has token-type embeddings"
    if not is_bert(m) and m.head_dim is not None and m.head_dim * m.n_head != m.n_embd:
        return "model.head_dim: ModernBERT's head size is n_embd / n_head"
    return None


def to_hf_config(m: ModelConfig, classes: Optional[int] = None, pooling: str = "cls") -> dict:
    """config.json fields of encoder `m`: *ForSequenceClassification with `classes` labels, else *ForMaskedLM
    (mlm_head) or the bare model."""
    why = unsupported(m)
    if why:
        raise LlmctlError(f"the encoder cannot be written as BERT or ModernBERT ({why})")
    stem = "Bert" if is_bert(m) else "ModernBert"
    name = f"{stem}ForSequenceClassification" if classes else f"{stem}ForMaskedLM" if m.mlm_head else f"{stem}Model"
    out = {"architectures": [name], "model_type": hf_model_type(name), "vocab_size": m.vocab_size,
           "hidden_size": m.n_embd, "intermediate_size": m.hidden, "num_hidden_layers": m.n_layer,
           "num_attention_heads": m.n_head, "max_position_embeddings": m.block_size}
    if classes:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(classes)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(classes)}
    if is_bert(m):
        return {**out, "hidden_act": "gelu", "hidden_dropout_prob": m.dropout,
                "attention_probs_dropout_prob": m.dropout, "type_vocab_size": m.type_vocab_size,
                "layer_norm_eps": m.norm_eps, "is_decoder": False, "add_cross_attention": False}
    local = m.rope_local_theta if m.rope_local_theta is not None else m.rope_theta
    return {**out, "hidden_activation": "gelu", "classifier_activation": "gelu", "norm_eps": m.norm_eps,
            "norm_bias": m.has_bias, "attention_bias": m.has_bias, "mlp_bias": m.has_bias,
            "classifier_bias": m.has_bias, "decoder_bias": True, "classifier_pooling": pooling,
            "attention_dropout": m.dropout, "embedding_dropout": m.dropout, "mlp_dropout": m.dropout,
            "local_attention": m.sliding_window or 128,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in m.sliding],
            "global_rope_theta": m.rope_theta, "local_rope_theta": local,
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": m.rope_theta},
                                "sliding_attention": {"rope_type": "default", "rope_theta": local}}}


# ------------------------------------------------------------------------------------------------------------------
# Tensor names


def layout(m: ModelConfig) -> list[Pair]:
    """Every tensor of encoder `m` (the Transformer, MLM head included), with its transformers name(s)."""
    pairs = _bert(m) if is_bert(m) else _modernbert(m)
    if m.mlm_head:
        if is_bert(m):
            dense, norm, bias, decoder = ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                                          "cls.predictions.bias", "cls.predictions.decoder.weight")
        else:
            dense, norm, bias, decoder = "head.dense", "head.norm", "decoder.bias", "decoder.weight"
        pairs += _linear("mlm.dense", dense, m.has_bias) + _linear("mlm.norm", norm, m.has_bias)
        pairs.append(Pair("lm_head.bias", (bias,)))
        if not m.tied:
            pairs.append(Pair("lm_head.weight", (decoder,)))
    return pairs


def head_layout(m: ModelConfig) -> list[Pair]:
    """The tensors of llmctl's classifier (`heads.Classifier`, names relative to it) beyond its backbone."""
    if is_bert(m):
        return _linear("pre.dense", "bert.pooler.dense", True) + _linear("head", "classifier", True)
    return (_linear("pre.dense", "head.dense", m.has_bias) + _linear("pre.norm", "head.norm", m.has_bias)
            + _linear("head", "classifier", True))


def aliases(m: ModelConfig) -> dict[str, str]:
    """Tensors transformers may save twice (tied): their name -> the name that holds the value."""
    if not m.mlm_head:
        return {}
    if is_bert(m):
        out = {"cls.predictions.decoder.bias": "cls.predictions.bias"}
        return {**out, "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"} if m.tied else out
    return {"decoder.weight": "model.embeddings.tok_embeddings.weight"} if m.tied else {}


def unused(m: ModelConfig) -> tuple[str, ...]:
    """Tensors of a bare encoder that llmctl's model has no place for: BertModel's pooler, which only a classifier
    uses (a classifier finetuned from the import starts a fresh one)."""
    return ("bert.pooler.dense.weight", "bert.pooler.dense.bias") if is_bert(m) and not m.mlm_head else ()


def canonical(theirs: dict, m: ModelConfig) -> dict:
    """Add the `bert.` / `model.` prefix that a bare model's checkpoint (BertModel, ModernBertModel) leaves out."""
    prefix, heads = ("bert.", ("cls.", "classifier.")) if is_bert(m) else ("model.", ("head.", "decoder.",
                                                                                      "classifier."))
    return {(k if k.startswith((prefix, *heads)) else prefix + k): v for k, v in theirs.items()}


def _linear(ours: str, theirs: str, bias: bool) -> list[Pair]:
    return [Pair(f"{ours}.{p}", (f"{theirs}.{p}",)) for p in (("weight", "bias") if bias else ("weight",))]


def _bert(m: ModelConfig) -> list[Pair]:
    C, e = m.n_embd, "bert.embeddings."
    pairs = [Pair("wte.weight", (e + "word_embeddings.weight",)),
             Pair("wpe.weight", (e + "position_embeddings.weight",)),
             Pair("wtt.weight", (e + "token_type_embeddings.weight",)), *_linear("embed_norm", e + "LayerNorm", True)]
    for i in range(m.n_layer):
        ours, theirs = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for p in ("weight", "bias"):
            pairs.append(Pair(f"{ours}attn.qkv.{p}", tuple(f"{theirs}attention.self.{x}.{p}"
                                                           for x in ("query", "key", "value")), (C, C, C)))
        for mod, t in (("attn.proj", "attention.output.dense"), ("norm1", "attention.output.LayerNorm"),
                       ("mlp.fc", "intermediate.dense"), ("mlp.proj", "output.dense"), ("norm2", "output.LayerNorm")):
            pairs += _linear(ours + mod, theirs + t, True)
    return pairs


def _modernbert(m: ModelConfig) -> list[Pair]:
    b = m.has_bias
    pairs = [Pair("wte.weight", ("model.embeddings.tok_embeddings.weight",)),
             *_linear("embed_norm", "model.embeddings.norm", b)]
    for i in range(m.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        mods = [("attn.qkv", "attn.Wqkv"), ("attn.proj", "attn.Wo"), ("norm2", "mlp_norm"), ("mlp.fc", "mlp.Wi"),
                ("mlp.proj", "mlp.Wo")] + ([("norm1", "attn_norm")] if i else [])
        for mod, t in mods:
            pairs += _linear(ours + mod, theirs + t, b)
    return pairs + _linear("norm", "model.final_norm", b)
