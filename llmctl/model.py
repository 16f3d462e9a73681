"""The decoder-only Transformer: GPT-2 flavour and LLaMA flavour in one module.

GPT-2 flavour: LayerNorm, learned positions, GELU MLP, tied embeddings, optional biases.
LLaMA flavour: RMSNorm, rotary positions (HF's rotate-half layout), SwiGLU MLP, grouped-query attention.
Both are exactly expressible as transformers' `gpt2` / `llama` models (see `llmctl.hf`).

`forward` returns logits. Loss, optimizers and I/O live elsewhere. For generation the caller passes a `KVCache`
(slots of keys and values) to `forward`, which prefills one slot or decodes one token in every slot.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class KVCache:
    """The static key/value cache of generation, addressed by slot: one (k, v) pair per layer, each
    (slots, n_kv_head, length, head_dim). A slot holds one sequence; generation (llmctl.generate) owns the cache and
    passes it to `Transformer.forward`, so the model itself keeps no state between calls."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers = layers

    @classmethod
    def empty(cls, cfg: ModelConfig, slots: int, length: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (slots, cfg.kv_heads, length, cfg.head_size)
        return cls([(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                    for _ in range(cfg.n_layer)])

    @classmethod
    def of(cls, flat: list[torch.Tensor]) -> "KVCache":
        """From the flat list [k0, v0, k1, v1, ...] (the compiled decode step's inputs)."""
        return cls(list(zip(flat[0::2], flat[1::2])))

    def flat(self) -> list[torch.Tensor]:
        return [t for kv in self.layers for t in kv]

    @property
    def slots(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2]


class Norm(nn.Module):
    """LayerNorm (gpt2, optional bias) or RMSNorm (llama), computed in float32 like the references."""

    def __init__(self, dim: int, eps: float, kind: str, bias: bool):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if (bias and kind == "layernorm") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op
        # normalise in float32, cast back, then scale: the order transformers' LlamaRMSNorm uses
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables of shape (length, head_dim) in HF's rotate-half layout.

    HF rotates as x * cos + cat(-x2, x1) * sin. The sin table here carries the minus sign on its first half, so
    the rotation is x * cos + roll(x, hd/2) * sin: the same products, in half the ops."""
    # on the CPU even inside a meta-device context: the same ops on meta tensors would import torch._dynamo (~1 s)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
                                / head_dim))  # (hd/2,)
    freqs = torch.outer(torch.arange(length, dtype=torch.int64, device="cpu").float(), inv_freq)  # (L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (L, hd)
    sin = emb.sin()
    sin[:, : head_dim // 2] *= -1
    return emb.cos(), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos/sin: (B or 1, 1, T, hd); roll(x, hd/2) = cat(x2, x1)
    return (x * cos + x.roll(x.shape[-1] // 2, -1) * sin).to(x.dtype)


def attention_dtype(device_type: str, dtype: torch.dtype, kv_len: int) -> torch.dtype:
    """The dtype attention runs in, given the dtype of q/k/v (shared with llmctl.estimate's memory model).

    CPU flash attention in bf16 is slower than in fp32 for short sequences (torch 2.13), so there it runs in
    fp32; the matmuls around it stay bf16.
    """
    if device_type == "cpu" and dtype == torch.bfloat16 and kv_len < 512:
        return torch.float32
    return dtype


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_size
        # one fused projection for q, k and v: (C) -> (n_head + 2 * n_kv_head) * head_dim
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.has_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=cfg.has_bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, rope, kv=None, slot: Optional[int] = None, pos=None, mask=None) -> torch.Tensor:
        # kv: this layer's cache tensors (k, v), each (slots, nkv, S, hd), or None (training: causal attention).
        # Prefill (`slot` an int): x is one sequence (1, T) at positions 0..T-1; its keys and values go to that slot
        # and attention is causal over them. Decode (`pos` (B,)): row b of x (B, 1) is slot b at position pos[b];
        # `mask` (B, 1, 1, S') says which of the first S' slots it reads.
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:
            kc, vc = kv
            if slot is not None:
                kc[slot, :, :T] = k[0].to(kc.dtype)
                vc[slot, :, :T] = v[0].to(vc.dtype)
            else:
                rows = torch.arange(B, device=x.device)
                kc[rows, :, pos] = k[:, :, 0].to(kc.dtype)  # (B, nkv, hd) into each row's own position
                vc[rows, :, pos] = v[:, :, 0].to(vc.dtype)
                k, v = kc[:B, :, : mask.shape[-1]], vc[:B, :, : mask.shape[-1]]  # (B, nkv, S', hd)
        dtype = q.dtype
        if attention_dtype(q.device.type, dtype, k.shape[2]) != dtype:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast(q.device.type, enabled=False):
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                is_causal=mask is None,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            ).to(dtype)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU with a fused gate/up projection (llama)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        self.hidden = cfg.hidden
        self.fc = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * self.hidden, bias=cfg.has_bias)
        self.proj = nn.Linear(self.hidden, cfg.n_embd, bias=cfg.has_bias)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, H) or (B, T, 2H)
        if self.swiglu:
            gate, up = h.split(self.hidden, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kind = "layernorm" if cfg.arch == "gpt2" else "rmsnorm"
        self.norm1 = Norm(cfg.n_embd, cfg.norm_eps, kind, cfg.has_bias)
        self.attn = Attention(cfg)
        self.norm2 = Norm(cfg.n_embd, cfg.norm_eps, kind, cfg.has_bias)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, kv=None, slot=None, pos=None, mask=None):
        x = x + self.attn(self.norm1(x), rope, kv, slot, pos, mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Decoder-only Transformer. `cfg.vocab_size` must be set (the commands fill it from the tokenizer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        self.cfg = cfg
        # on the meta device (checkpoint loading builds there) embeddings skip their own normal_ init, which would
        # import torch._dynamo there (~1 s); elsewhere it runs as usual, keeping the random stream of training inits
        shapes_only = torch.get_default_device().type == "meta"
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd,
                                _weight=torch.empty(cfg.vocab_size, cfg.n_embd) if shapes_only else None)
        self.wpe = (nn.Embedding(cfg.block_size, cfg.n_embd,
                                 _weight=torch.empty(cfg.block_size, cfg.n_embd) if shapes_only else None)
                    if cfg.arch == "gpt2" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = Norm(cfg.n_embd, cfg.norm_eps, "layernorm" if cfg.arch == "gpt2" else "rmsnorm", cfg.has_bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.wte.weight
        if cfg.arch == "llama":
            cos, sin = rope_tables(cfg.head_size, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hd)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # ---------------------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, init_std), residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.is_meta:  # shapes only (a checkpoint's weights replace them); init is skipped, see __init__
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)
        if self.cfg.arch == "llama":  # buffers are not parameters; recompute in case of meta-device init
            cos, sin = rope_tables(self.cfg.head_size, self.cfg.block_size, self.cfg.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters counted once (tied weights once). Without embeddings: the blocks and the final norm only (no
        token or position embedding, no output head: Kaplan et al.'s non-embedding count)."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.wte.weight.numel() + (self.lm_head.weight.numel() if not self.cfg.tied else 0)
            n -= self.wpe.weight.numel() if self.wpe is not None else 0
        return n

    # ---------------------------------------------------------------------------------------------------------
    def hidden(
        self,
        idx: torch.Tensor,
        cache: Optional[KVCache] = None,
        slot: Optional[int] = None,
        pos: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) of token ids idx (B, T).

        Without a cache: positions 0..T-1, causal attention (training, evaluation).
        Prefill, `cache` and `slot`: idx (1, T) is a sequence from position 0; its keys and values are written to
        that slot of the cache.
        Decode, `cache` and `pos` (B,): idx (B, 1) holds one token per slot 0..B-1, at that slot's position pos[b];
        each row reads its own slot's positions 0..pos[b]. `kv_len` (a Python int, >= max(pos) + 1) bounds the
        positions read (eager decoding); None reads the whole cache (the compiled step, whose shapes are fixed).
        """
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        mask = None
        if cache is not None and slot is None:
            if pos is None or T != 1:
                raise ValueError("decoding with a cache takes one token per row and its positions `pos` (B,)")
            positions = pos[:, None]  # (B, 1)
            keys = torch.arange(kv_len or cache.length, device=idx.device)
            mask = (keys[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, S')
        else:
            positions = torch.arange(T, device=idx.device)[None]  # (1, T)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            rope = (self.rope_cos[positions].unsqueeze(1).to(x.dtype),
                    self.rope_sin[positions].unsqueeze(1).to(x.dtype))  # (B|1, 1, T, hd)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache.layers[i] if cache is not None else None, slot, pos, mask)
        return self.norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        cache: Optional[KVCache] = None,
        slot: Optional[int] = None,
        pos: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T); see `hidden` for the cache arguments."""
        return self.lm_head(self.hidden(idx, cache, slot, pos, kv_len))
