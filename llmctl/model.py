"""The decoder-only Transformer: GPT-2 flavour and LLaMA flavour in one module.

GPT-2 flavour: LayerNorm, learned positions, GELU MLP, tied embeddings, optional biases.
LLaMA flavour: RMSNorm, rotary positions (HF's rotate-half layout), SwiGLU MLP, grouped-query attention.
Both are exactly expressible as transformers' `gpt2` / `llama` models (see `llmctl.hf`).

`forward` returns logits. Loss, optimizers and I/O live elsewhere. For generation, `setup_cache` allocates one
static KV cache per layer; `forward(idx, input_pos=...)` then writes keys/values at those positions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class KVCache(nn.Module):
    """Preallocated keys and values for one layer: (B, n_kv_head, max_len, head_dim)."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # input_pos: (T,) slots; k, v: (B, n_kv_head, T, head_dim)
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


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
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # one fused projection for q, k and v: (C) -> (n_head + 2 * n_kv_head) * head_dim
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.has_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=cfg.has_bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, rope, input_pos, mask, kv_len: Optional[int], causal: bool = True) -> torch.Tensor:
        # mask: (B|1, 1, T, S) bool or None; without one, attention is causal if `causal`, else over every key read
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, hd)
            if kv_len is not None:  # eager decoding reads only the filled part of the cache
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
                mask = mask[..., :kv_len] if mask is not None else None
        dtype = q.dtype
        if attention_dtype(q.device.type, dtype, k.shape[2]) != dtype:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast(q.device.type, enabled=False):
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                is_causal=mask is None and causal,
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

    def forward(self, x, rope, input_pos, mask, kv_len, causal=True):
        x = x + self.attn(self.norm1(x), rope, input_pos, mask, kv_len, causal)
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
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hd)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.cache_len = 0
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
            cos, sin = rope_tables(self.cfg.head_dim, self.cfg.block_size, self.cfg.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters counted once (tied weights once); without position and token embeddings if asked."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.wte.weight.numel() if not self.cfg.tied else 0
            n -= self.wpe.weight.numel() if self.wpe is not None else 0
        return n

    # ---------------------------------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> None:
        """Allocate the static KV cache for generation (`max_len` <= block_size slots per sequence).

        A layer's current cache of the right shape is kept (zeroing it is not needed: slots are written before
        they are read)."""
        max_len = min(max_len or self.cfg.block_size, self.cfg.block_size)
        p = self.wte.weight  # (the output head may be swapped for a quantized layer)
        dtype = dtype or p.dtype
        shape = (batch_size, self.cfg.kv_heads, max_len, self.cfg.head_dim)
        for block in self.blocks:
            kv = block.attn.kv_cache
            if kv is None or kv.k.shape != shape or kv.k.dtype != dtype or kv.k.device != p.device:
                kv = KVCache(batch_size, self.cfg.kv_heads, max_len, self.cfg.head_dim, dtype, p.device)
            block.attn.kv_cache = kv
        self.cache_len = max_len

    def clear_cache(self) -> list[Optional[KVCache]]:
        """Drop the KV cache; returns the layers' caches (so a caller can put them back)."""
        caches = [block.attn.kv_cache for block in self.blocks]
        for block in self.blocks:
            block.attn.kv_cache = None
        self.cache_len = 0
        return caches

    def positions(self, input_pos: torch.Tensor, left_pad: Optional[torch.Tensor]) -> torch.Tensor:
        """Position ids (B or 1, T): the cache slot minus the sequence's left padding."""
        pos = input_pos[None, :]
        if left_pad is not None:
            pos = (pos - left_pad[:, None]).clamp(min=0)
        return pos

    def hidden(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        left_pad: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, C).

        idx: (B, T) token ids. Without a cache, positions are 0..T-1 and attention is causal.
        With a cache (`setup_cache`), `input_pos` (T,) are the cache slots written by this call, `left_pad` (B,)
        the number of padding slots at the start of each row (masked out, positions shifted), and `kv_len` an
        optional Python int bounding the slots read (eager decoding, whose queries are always the last T of the
        kv_len slots; leave None when exporting the compiled step).
        """
        B, T = idx.shape
        cached = self.cache_len > 0
        if input_pos is None:
            if cached:
                raise ValueError("input_pos is required when the KV cache is set up")
            input_pos = torch.arange(T, device=idx.device)
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        pos = self.positions(input_pos, left_pad)  # (B or 1, T)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = (self.rope_cos[pos].unsqueeze(1).to(x.dtype),
                    self.rope_sin[pos].unsqueeze(1).to(x.dtype))  # (B|1, 1, T, hd)
        x = self.drop(x)
        mask, causal = None, True
        if cached and kv_len is not None and left_pad is None and T in (1, kv_len):
            # eager decoding reads slots 0..kv_len-1 and the queries are the last T of them: one query sees every
            # slot read, and T == kv_len is plain causal attention; either way no mask is needed
            causal = T > 1
        elif cached:
            slots = torch.arange(self.cache_len, device=idx.device)
            mask = slots[None, None, None, :] <= input_pos[None, None, :, None]  # (1, 1, T, S) causal over slots
            if left_pad is not None:
                mask = mask & (slots[None, None, None, :] >= left_pad[:, None, None, None])  # (B, 1, T, S)
        elif left_pad is not None:
            tril = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = tril[None, None] & (input_pos[None, None, None, :] >= left_pad[:, None, None, None])
        if mask is not None and left_pad is not None:
            # a padding query row would mask every key; let it see itself so softmax stays finite
            own_slot = input_pos[:, None] == torch.arange(mask.shape[-1], device=idx.device)[None, :]  # (T, S)
            mask = mask | own_slot[None, None]
        for block in self.blocks:
            x = block(x, rope, input_pos, mask, kv_len, causal)
        return self.norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        left_pad: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T); see `hidden` for the cache arguments."""
        return self.lm_head(self.hidden(idx, input_pos, left_pad, kv_len))
