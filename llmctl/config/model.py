"""The `model:` section: the shape of the decoder-only Transformer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .bounds import at_least
from .whole import Whole


@dataclass
class ModelConfig:
    """Shape of the decoder-only Transformer; `arch` picks the GPT-2 or the LLaMA flavour."""

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
    activation: Literal["gelu", "gelu_tanh"] = "gelu"
    """The MLP's GELU, exact or tanh-approximated (gpt2 flavour only: llama uses SwiGLU; GGUF needs gelu_tanh)."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position frequencies (llama flavour only)."""
    dropout: float = 0.0
    """Dropout probability in training (embeddings, attention weights, residual branches); 0: none."""
    init_std: float = 0.02
    """Standard deviation of the initial weights; residual projections get it over sqrt(2 x n_layer)."""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        """Channels per attention head: model.head_dim, or n_embd / n_head."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.arch == "gpt2":
            return 4 * self.n_embd
        return 64 * ((int(2 * 4 * self.n_embd / 3) + 63) // 64)

    @property
    def has_bias(self) -> bool:
        return self.arch == "gpt2" if self.bias is None else self.bias

    @property
    def tied(self) -> bool:
        return self.arch == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

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

        return p
