"""The `model:` section: the shape of the Transformer (a decoder, or an encoder with causal: false)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .bounds import at_least
from .whole import Whole


@dataclass
class ModelConfig:
    """Shape of the Transformer; `arch` picks the GPT-2 or the LLaMA flavour, `causal` a decoder or an encoder."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    """gpt2: LayerNorm, learned positions, GELU, tied embeddings, biases; llama: RMSNorm, rotary positions, SwiGLU,
    grouped-query attention, untied embeddings."""
    n_layer: int = 6
    """Transformer blocks."""
    n_head: int = 6
    """Query heads per attention layer."""
    n_kv_head: Optional[int] = None
    """Key/value heads (grouped-query attention, llama only; must divide n_head); null: n_head, no grouping."""
    n_embd: int = 384
    """Width of the residual stream (embedding size)."""
    head_dim: Optional[int] = None
    """Channels per attention head (llama only); null: n_embd / n_head (a pruned model keeps its parent's)."""
    block_size: int = 256
    """Context length in tokens."""
    vocab_size: Optional[int] = None
    """Rows of the token embedding; null: the tokenizer's size, rounded up to vocab_multiple."""
    vocab_multiple: int = 1
    """Pad the embedding to a multiple of this many rows (64 helps GPUs); 1: no padding."""
    mlp_hidden: Optional[int] = None
    """Hidden width of each MLP; null: 4 x n_embd (gpt2), 2/3 x 4 x n_embd rounded up to 64 (llama)."""
    bias: Optional[bool] = None
    """Biases in linear layers and LayerNorm; null: true for gpt2, false for llama."""
    tie_embeddings: Optional[bool] = None
    """Share the input embedding with the output head; null: true for gpt2, false for llama."""
    activation: Literal["gelu", "gelu_tanh", "relu2"] = "gelu"
    """The ungated MLP's activation: GELU, exact or tanh-approximated (gpt2 flavour; GGUF needs gelu_tanh), or relu2
    (ReLU squared, modded-nanogpt's), which in the llama flavour replaces the gated MLP with an ungated one."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position frequencies (llama flavour only)."""
    qkv_bias: Optional[bool] = None
    """Biases on the query/key/value projections (Qwen2); null: as model.bias."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (Qwen3, Gemma 3; llama flavour only)."""
    gate_activation: Literal["silu", "gelu_tanh", "gelu"] = "silu"
    """The llama flavour's gated MLP: silu (SwiGLU), gelu_tanh (GeGLU, Gemma) or gelu (GeGLU with exact GELU,
    ModernBERT)."""
    norm_offset: bool = False
    """RMSNorm scales by (1 + weight) rather than weight (Gemma; llama flavour only)."""
    embed_scale: bool = False
    """Multiply the token embeddings by sqrt(n_embd) (Gemma; llama flavour only)."""
    post_norms: bool = False
    """Also normalise the attention and MLP outputs before adding them to the residual stream (Gemma 2 and 3)."""
    attn_softcap: Optional[float] = None
    """Cap attention scores smoothly at +-this value (cap * tanh(score / cap), Gemma 2); null: no cap."""
    final_softcap: Optional[float] = None
    """Cap the output logits smoothly at +-this value (Gemma 2); null: no cap."""
    query_scale: Optional[float] = None
    """Attention scores are scaled by query_scale ** -0.5 (Gemma's query_pre_attn_scalar); null: head_dim."""
    sliding_window: Optional[int] = None
    """Sliding layers attend to the last this-many positions, their own included (Mistral, Gemma); null: none."""
    layer_types: Optional[list[str]] = None
    """Per layer: full or sliding attention, one entry per layer; null: every layer sliding when sliding_window is
    set, else full."""
    rope_scaling: Optional[dict] = None
    """RoPE frequency scaling, in transformers' rope_scaling form: rope_type linear, llama3 or yarn with its keys
    (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings, beta_fast, beta_slow,
    attention_factor); null: none. Sliding layers with their own rope_local_theta are not scaled (Gemma 3)."""
    rope_local_theta: Optional[float] = None
    """RoPE base of the sliding layers (Gemma 3's rope_local_base_freq); null: rope_theta."""
    rotary_fraction: float = 1.0
    """Share of each head's channels that RoPE rotates, the first ones (Phi-4-mini: 0.75); 1: all."""
    hf_architecture: Optional[str] = None
    """The transformers architecture `export --format hf` writes (set by `import hf` to the one imported:
    GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, Gemma2ForCausalLM,
    Gemma3ForCausalLM, Phi3ForCausalLM; encoders: BertForMaskedLM, ModernBertForMaskedLM, whose export writes the
    masked LM, the bare model or the classifier by what the checkpoint holds); null: GPT2LMHeadModel for gpt2, else
    the first of these that has every switch the model uses (encoders: BERT for gpt2, ModernBERT for llama)."""
    causal: bool = True
    """Each position attends to earlier ones only (a decoder); false: to every position of its sequence (an encoder,
    BERT and ModernBERT: trained with train.objective=mlm, finetuned to classify; it does not generate). Sliding
    layers of an encoder read sliding_window / 2 positions on either side (ModernBERT's local_attention)."""
    norm: Optional[Literal["layernorm", "rmsnorm"]] = None
    """The kind of every norm; null: layernorm for gpt2, rmsnorm for llama (ModernBERT: llama with layernorm).
    A LayerNorm has a bias where model.bias is on."""
    norm_position: Literal["pre", "post"] = "pre"
    """pre: each block normalises its input to attention and MLP, and a final norm follows the last block; post:
    each block normalises the residual sum after attention and after the MLP, and there is no final norm (BERT)."""
    embed_norm: bool = False
    """Normalise the embeddings (token + positions + token types) before the first block (BERT, ModernBERT); with
    norm_position=pre the first block then reads them without its own attention norm (ModernBERT)."""
    type_vocab_size: int = 0
    """Rows of a token-type (segment A/B) embedding added to every token (BERT: 2; llmctl's texts are all type 0);
    0: none."""
    mlm_head: bool = False
    """The masked-LM output head of BERT and ModernBERT: dense + exact GELU + norm, then the vocabulary projection
    (tied to the embedding where tie_embeddings) with its own bias; false: the vocabulary projection alone."""
    pooler: Optional[Literal["tanh", "mlm"]] = None
    """What a classifier puts between the pooled state and its linear head: tanh (BERT's pooler: dense + tanh), mlm
    (ModernBERT's: dense + exact GELU + norm, shaped like mlm_head's); null: nothing. Its weights are the head's."""
    dropout: float = 0.0
    """Dropout probability in training (embeddings, attention weights, residual branches); 0: none."""
    init_std: float = 0.02
    """Standard deviation of the initial weights; residual projections get it over sqrt(2 x n_layer)."""
    zero_init_proj: bool = False
    """Start the residual projections (attention output and MLP down projection) at zero, so every block begins as
    the identity (modded-nanogpt, nanochat)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        """Channels per attention head: model.head_dim, or n_embd / n_head."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def gated(self) -> bool:
        """Whether the MLP is gated (the llama flavour's SwiGLU / GeGLU; model.activation=relu2 ungates it)."""
        return self.arch == "llama" and self.activation != "relu2"

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if not self.gated:
            return 4 * self.n_embd
        return 64 * ((int(2 * 4 * self.n_embd / 3) + 63) // 64)

    @property
    def norm_kind(self) -> str:
        """layernorm or rmsnorm: model.norm, else the flavour's."""
        return self.norm or ("layernorm" if self.arch == "gpt2" else "rmsnorm")

    @property
    def has_bias(self) -> bool:
        return self.arch == "gpt2" if self.bias is None else self.bias

    @property
    def tied(self) -> bool:
        return self.arch == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def has_qkv_bias(self) -> bool:
        return self.has_bias if self.qkv_bias is None else self.qkv_bias

    @property
    def sliding(self) -> list[bool]:
        """Per layer: whether it attends through the sliding window (model.layer_types, model.sliding_window)."""
        if self.sliding_window is None:
            return [False] * self.n_layer
        if self.layer_types is None:
            return [True] * self.n_layer
        return [t == "sliding" for t in self.layer_types]

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (the first ones): head_size x rotary_fraction, even."""
        return int(self.head_size * self.rotary_fraction) // 2 * 2

    def check(self, cfg: Whole) -> list[str]:
        """Impossible shapes: what no Transformer can be built with."""
        m = self
        p = at_least("model", m, ["n_layer", "n_head", "n_embd", "block_size", "vocab_multiple"])
        if m.head_dim is not None:
            if m.head_dim < 1:
                p.append(f"model.head_dim: must be at least 1, or null for n_embd / n_head (got {m.head_dim})")
            elif m.arch == "gpt2" and m.head_dim * m.n_head != m.n_embd:
                p.append(f"model.head_dim: GPT-2 has no separate head size (transformers' GPT-2 cannot load it); "
                         f"it is n_embd / n_head = {m.n_embd / max(m.n_head, 1):g}: remove model.head_dim")
        elif m.n_head >= 1 and m.n_embd >= 1 and m.n_embd % m.n_head:
            p.append(f"model.n_embd: {m.n_embd} is not divisible by model.n_head={m.n_head}; pick sizes where it is "
                     "(or set model.head_dim, llama only)")
        if m.n_kv_head is not None:
            if m.n_kv_head < 1 or (m.n_head >= 1 and m.n_head % m.n_kv_head):
                p.append(f"model.n_kv_head: must divide model.n_head={m.n_head} (got {m.n_kv_head})")
            elif m.arch == "gpt2" and m.n_kv_head != m.n_head:
                p.append("model.n_kv_head: grouped-query attention needs model.arch=llama (GPT-2 has none)")
        sized = m.head_dim is not None or (m.n_head >= 1 and m.n_embd % m.n_head == 0)  # (else reported above)
        if m.arch == "llama" and sized and m.head_size % 2:
            p.append(f"model.head_dim: RoPE needs an even head size (got {m.head_size})")
        if m.vocab_size is not None and m.vocab_size < 1:
            p.append(f"model.vocab_size: must be positive (got {m.vocab_size})")
        if m.mlp_hidden is not None and m.mlp_hidden < 1:
            p.append(f"model.mlp_hidden: must be positive (got {m.mlp_hidden})")
        if not 0.0 <= m.dropout < 1.0:
            p.append(f"model.dropout: must be in [0, 1) (got {m.dropout})")
        if m.norm_eps <= 0 or m.rope_theta <= 0 or m.init_std <= 0:
            p.append("model.norm_eps, model.rope_theta and model.init_std must be positive")
        p += self._check_switches()
        p += self._check_encoder()
        return p

    def _check_encoder(self) -> list[str]:
        """The encoder switches (BERT and ModernBERT layouts)."""
        m, p = self, []
        if m.type_vocab_size < 0:
            p.append(f"model.type_vocab_size: must not be negative (got {m.type_vocab_size})")
        if m.norm_position == "post" and (m.post_norms or m.norm_offset):
            p.append("model.norm_position=post: the block already normalises the residual sum; it cannot be "
                     "combined with model.post_norms or model.norm_offset")
        encoders = ("BertForMaskedLM", "ModernBertForMaskedLM")
        if m.causal and m.hf_architecture in encoders:
            p.append(f"model.hf_architecture: {m.hf_architecture} is an encoder; it needs model.causal=false")
        if not m.causal and m.hf_architecture is not None and m.hf_architecture not in encoders:
            p.append(f"model.hf_architecture: {m.hf_architecture} is a decoder; an encoder (model.causal=false) is "
                     "written as BertForMaskedLM or ModernBertForMaskedLM (or null)")
        if m.embed_norm and m.norm_kind == "rmsnorm" and m.norm_offset:
            p.append("model.embed_norm: not with model.norm_offset (Gemma scales its embeddings instead)")
        return p

    def _check_switches(self) -> list[str]:
        """The open-model switches: llama flavour only, and each within its legal values."""
        m, p = self, []
        llama_only = {"qk_norm": m.qk_norm, "norm_offset": m.norm_offset, "embed_scale": m.embed_scale,
                      "post_norms": m.post_norms, "gate_activation": m.gate_activation != "silu",
                      "attn_softcap": m.attn_softcap is not None, "query_scale": m.query_scale is not None,
                      "sliding_window": m.sliding_window is not None, "rope_scaling": m.rope_scaling is not None,
                      "rope_local_theta": m.rope_local_theta is not None, "rotary_fraction": m.rotary_fraction != 1.0}
        if m.arch == "gpt2":
            p += [f"model.{k}: needs model.arch=llama (the GPT-2 flavour has no such switch)"
                  for k, on in llama_only.items() if on]
        for k in ("attn_softcap", "final_softcap", "query_scale", "rope_local_theta"):
            v = getattr(m, k)
            if v is not None and not v > 0:
                p.append(f"model.{k}: must be positive, or null for none (got {v})")
        if m.sliding_window is not None and m.sliding_window < 1:
            p.append(f"model.sliding_window: must be at least 1, or null for none (got {m.sliding_window})")
        if m.layer_types is not None:
            bad = [t for t in m.layer_types if t not in ("full", "sliding")]
            if bad:
                p.append(f"model.layer_types: each entry is full or sliding (got {bad[0]!r})")
            elif len(m.layer_types) != m.n_layer:
                p.append(f"model.layer_types: needs one entry per layer, {m.n_layer} (got {len(m.layer_types)})")
            elif "sliding" in m.layer_types and m.sliding_window is None:
                p.append("model.layer_types: sliding layers need model.sliding_window")
        if not 0.0 < m.rotary_fraction <= 1.0:
            p.append(f"model.rotary_fraction: must be in (0, 1] (got {m.rotary_fraction})")
        if m.rope_scaling is not None:
            p += check_rope_scaling(m.rope_scaling)
        if m.hf_architecture is not None:
            flavour = HF_ARCHITECTURES.get(m.hf_architecture)
            if flavour is None:
                p.append(f"model.hf_architecture: {m.hf_architecture!r} is not one export writes; choose one of "
                         + ", ".join(HF_ARCHITECTURES) + " (or null)")
            elif flavour != m.arch:
                p.append(f"model.hf_architecture: {m.hf_architecture} needs model.arch={flavour}")
        return p


# The transformers architectures import and export take (llmctl.hf has a family for each), with the flavour of
# model.arch each one is
HF_ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "llama", "Qwen3ForCausalLM": "llama",
    "MistralForCausalLM": "llama", "Gemma2ForCausalLM": "llama", "Gemma3ForCausalLM": "llama",
    "Phi3ForCausalLM": "llama", "BertForMaskedLM": "gpt2", "ModernBertForMaskedLM": "llama",
}


# RoPE scaling types llmctl computes, with their required and optional keys (transformers' names)
ROPE_SCALING = {
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": ({"factor"}, {"original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                          "mscale", "mscale_all_dim", "truncate"}),
}


def check_rope_scaling(scaling: dict) -> list[str]:
    """What is wrong with a model.rope_scaling mapping (the one home of its legal types and keys)."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALING:
        return [f"model.rope_scaling: rope_type {kind!r} is not supported; llmctl computes "
                + ", ".join(ROPE_SCALING) + " (or null for none)"]
    required, optional = ROPE_SCALING[kind]
    keys = set(scaling) - {"rope_type", "type"}
    p = [f"model.rope_scaling: {kind} needs {k}" for k in sorted(required - keys)]
    p += [f"model.rope_scaling: {kind} takes no key {k!r} (it takes " + ", ".join(sorted(required | optional)) + ")"
          for k in sorted(keys - required - optional)]
    for k in sorted(keys & (required | optional) - {"truncate"}):
        v = scaling[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            p.append(f"model.rope_scaling.{k}: must be a positive number (got {v!r})")
    return p
