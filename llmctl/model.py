"""The Transformer: GPT-2 flavour and LLaMA flavour, decoders and encoders, in one module.

GPT-2 flavour: LayerNorm, learned positions, GELU MLP, tied embeddings, optional biases.
LLaMA flavour: RMSNorm, rotary positions (HF's rotate-half layout), SwiGLU MLP, grouped-query attention; its
small switches (ModelConfig) cover the open families: RoPE scaling and partial rotary (llmctl.rope), q/k/v bias
(Qwen2), QK-norm (Qwen3, Gemma 3), sliding-window layers (Mistral, Gemma), and Gemma's (1 + w) norms, GeGLU,
scaled embeddings, post-norms, soft-caps and query scale. Encoders are the same module with `causal` off
(bidirectional attention) and BERT's and ModernBERT's switches: post-norm blocks, a norm over the embeddings,
token types, LayerNorm in the llama flavour, exact-GELU GeGLU, the MLM head (`Dense` + the vocabulary projection)
and windows on either side. Each is exactly a transformers model (see `llmctl.hf`).

`forward` returns logits. Loss, optimizers and I/O live elsewhere. For generation the caller passes a `KVCache`
(slots of keys and values) to `forward`, which prefills one slot or decodes one token in every slot. For packed
documents the caller passes `segments` (B, T), a document id per token: attention stays inside each document and
positions restart at 0 where a document starts (`segment_positions`, `segment_masks`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .rope import apply_rope, rope_tables


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
    """LayerNorm (gpt2, optional bias) or RMSNorm (llama), computed in float32 like the references. `offset`: the
    RMSNorm scales by (1 + weight), in float32 before the cast back (Gemma's order)."""

    def __init__(self, dim: int, eps: float, kind: str, bias: bool, offset: bool = False):
        super().__init__()
        self.kind, self.eps, self.offset = kind, eps, offset
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if (bias and kind == "layernorm") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        if self.offset:
            return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1.0 + self.weight.float())).to(x.dtype)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op
        # normalise in float32, cast back, then scale: the order transformers' LlamaRMSNorm uses
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def attention_dtype(device_type: str, dtype: torch.dtype, kv_len: int, training: bool = False) -> torch.dtype:
    """The dtype attention runs in, given the dtype of q/k/v (shared with llmctl.estimate's memory model).

    CPU flash attention in bf16 is slower than in fp32 (torch 2.13) for short sequences, and at every length when
    its backward runs (`training`: its per-block GEMMs of head_dim size go through bf16 conversions and small
    oneDNN calls; docs/pretraining.md#training-speed-at-context-1024), so there it runs in fp32; the matmuls around
    it stay bf16.
    """
    if device_type == "cpu" and dtype == torch.bfloat16 and (training or kv_len < 512):
        return torch.float32
    return dtype


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_size
        # one fused projection for q, k and v: (C) -> (n_head + 2 * n_kv_head) * head_dim
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.has_qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=cfg.has_bias)
        # QK-norm: one RMSNorm over head_dim, shared by every head of q (and of k)
        self.q_norm = Norm(self.head_dim, cfg.norm_eps, "rmsnorm", False, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = Norm(self.head_dim, cfg.norm_eps, "rmsnorm", False, cfg.norm_offset) if cfg.qk_norm else None
        self.scale = cfg.query_scale ** -0.5 if cfg.query_scale else None  # None: SDPA's 1 / sqrt(head_dim)
        self.causal = cfg.causal
        self.softcap = cfg.attn_softcap
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, kv=None, slot: Optional[int | torch.Tensor] = None, pos=None, mask=None) -> torch.Tensor:
        # kv: this layer's cache tensors (k, v), each (slots, nkv, S, hd), or None (training).
        # Prefill (`slot` an int): x is one sequence (1, T) at positions 0..T-1; its keys and values go to that slot.
        # Extend (`slot` an int and `pos` an int start): x (1, T) continues that slot at positions pos..pos+T-1 and
        # reads the slot's positions 0..pos+T-1 (`mask` (1, 1, T, pos+T)).
        # Decode (`pos` (B,)): row b of x (B, T) is slot b (`slot` a (B,) tensor: slot[b]) at positions
        # pos[b]..pos[b]+T-1 (T is 1 when decoding; several rows' prompts prefilled in one forward have more).
        # `mask`: which keys each query reads, (B|1, 1, T, S) bool; None: causal over the T positions (an encoder,
        # cfg.causal false: every position).
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:
            kc, vc = kv
            if isinstance(slot, int) and pos:
                kc[slot, :, pos : pos + T] = k[0].to(kc.dtype)
                vc[slot, :, pos : pos + T] = v[0].to(vc.dtype)
                k, v = kc[slot : slot + 1, :, : pos + T], vc[slot : slot + 1, :, : pos + T]  # (1, nkv, pos+T, hd)
            elif isinstance(slot, int):
                kc[slot, :, :T] = k[0].to(kc.dtype)
                vc[slot, :, :T] = v[0].to(vc.dtype)
            elif T == 1 and slot is None:
                rows = torch.arange(B, device=x.device)
                kc[rows, :, pos] = k[:, :, 0].to(kc.dtype)  # (B, nkv, hd) into each row's own position
                vc[rows, :, pos] = v[:, :, 0].to(vc.dtype)
                k, v = kc[:B, :, : mask.shape[-1]], vc[:B, :, : mask.shape[-1]]  # (B, nkv, S', hd)
            else:  # T tokens per row, each row in slot[b] (or b)
                rows = (torch.arange(B, device=x.device) if slot is None else slot)[:, None]  # (B, 1)
                at = pos[:, None] + torch.arange(T, device=x.device)  # (B, T) positions
                kc[rows, :, at] = k.transpose(1, 2).to(kc.dtype)  # (B, T, nkv, hd)
                vc[rows, :, at] = v.transpose(1, 2).to(vc.dtype)
                k, v = kc[rows[:, 0], :, : mask.shape[-1]], vc[rows[:, 0], :, : mask.shape[-1]]  # (B, nkv, S', hd)
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask: documents on CUDA
            y = flex_attention(q, k, v, mask, self.scale, self.n_kv_head != self.n_head)
            return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)))
        dtype = q.dtype
        if attention_dtype(q.device.type, dtype, k.shape[2], q.requires_grad) != dtype:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast(q.device.type, enabled=False):
            y = (self._softcapped(q, k, v, mask) if self.softcap is not None else F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and self.causal, scale=self.scale,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head,
            )).to(dtype)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))

    def _softcapped(self, q, k, v, mask) -> torch.Tensor:
        """Attention with scores capped at +-softcap (Gemma 2): written out, as SDPA has no such step.
        q (B, nh, T, hd); k, v (B, nkv, S, hd); mask as in forward."""
        groups = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # (B, nh, S, hd)
        scores = (q @ k.transpose(-2, -1)) * (self.scale or self.head_dim ** -0.5)  # (B, nh, T, S)
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None and self.causal:
            mask = causal(q.shape[2], q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.dropout(scores.float().softmax(-1).to(q.dtype), self.dropout, self.training)
        return weights @ v


def causal(T: int, device, window: Optional[int] = None) -> torch.Tensor:
    """(1, 1, T, T) bool: query i reads keys j <= i, and with a window only the last `window` of them (j > i - W)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    keep = j <= i
    if window is not None:
        keep &= j > i - window
    return keep[None, None]


def bidirectional(T: int, device, window: int) -> torch.Tensor:
    """(1, 1, T, T) bool: an encoder's sliding layer, where query i reads keys within window // 2 on either side
    (ModernBERT's local_attention)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return ((i - j).abs() <= window // 2)[None, None]


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) long: each token's index within its segment, a run of equal ids in `segments` (B, T)."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def segment_masks(segments: torch.Tensor, window: Optional[int], flex: bool = False, is_causal: bool = True) -> list:
    """Which keys each query reads for full and for sliding layers when rows pack documents: a key of the query's
    own segment, at or before it (and within `window` of it in sliding layers); an encoder's (`is_causal` false) any
    key of its segment (within window // 2 on either side in sliding layers). Bool (B, 1, T, T) for SDPA, or with
    `flex` (and a torch that has it) FlexAttention block masks, which skip the blocks outside every document."""
    B, T = segments.shape
    sliding = window is not None and (window < T if is_causal else window // 2 < T - 1)
    if flex and _flex_ready():
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k, w=None):
            keep = segments[b, q] == segments[b, k]
            if is_causal:
                keep = keep & (k <= q)
                return keep & (k > q - w) if w is not None else keep
            return keep & ((q - k).abs() <= w // 2) if w is not None else keep

        full = create_block_mask(mask_mod, B, None, T, T, device=segments.device)
        return [full, create_block_mask(partial(mask_mod, w=window), B, None, T, T, device=segments.device)
                if sliding else full]
    same = (segments[:, :, None] == segments[:, None, :])[:, None]  # (B, 1, T, T)
    if not is_causal:
        return [same, same & bidirectional(T, segments.device, window) if sliding else same]
    full = same & causal(T, segments.device)
    return [full, same & causal(T, segments.device, window) if sliding else full]


def _flex_ready() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401  (torch >= 2.5)
        return True
    except ImportError:
        return False


_compiled_flex = None


def flex_attention(q, k, v, block_mask, scale: Optional[float], gqa: bool) -> torch.Tensor:
    """FlexAttention with a block mask, compiled once on CUDA (eager elsewhere: forward only, for tests)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.is_cuda:
        _compiled_flex = _compiled_flex or torch.compile(flex, dynamic=False)
        flex = _compiled_flex
    with torch.autocast(q.device.type, enabled=False):
        return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


ACTIVATIONS = {"silu": F.silu, "relu2": relu2}  # (GELU, exact or tanh, is the rest)


class MLP(nn.Module):
    """GELU or ReLU² MLP (gpt2, or llama with activation relu2) or a gated MLP with a fused gate/up projection
    (llama): SwiGLU, or GeGLU (Gemma)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.gated
        self.hidden = cfg.hidden
        self.fc = nn.Linear(cfg.n_embd, (2 if self.gated else 1) * self.hidden, bias=cfg.has_bias)
        self.proj = nn.Linear(self.hidden, cfg.n_embd, bias=cfg.has_bias)
        act = cfg.gate_activation if self.gated else cfg.activation
        self.act = ACTIVATIONS.get(act) or partial(F.gelu, approximate="tanh" if act == "gelu_tanh" else "none")
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, H) or (B, T, 2H)
        if self.gated:
            gate, up = h.split(self.hidden, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.proj(h))


def norm_of(cfg: ModelConfig) -> nn.Module:
    """A norm over the residual stream, of the kind and with the bias the config says."""
    return Norm(cfg.n_embd, cfg.norm_eps, cfg.norm_kind, cfg.has_bias, cfg.norm_offset)


class Block(nn.Module):
    """Pre-norm (x + f(norm(x))), or BERT's post-norm (norm(x + f(x))) where cfg.norm_position is post.
    `first`: block 0, which has no attention norm after normalised embeddings (ModernBERT)."""

    def __init__(self, cfg: ModelConfig, first: bool = False):
        super().__init__()
        norm = partial(norm_of, cfg)
        self.post = cfg.norm_position == "post"
        self.norm1 = nn.Identity() if first and cfg.embed_norm and not self.post else norm()
        self.attn = Attention(cfg)
        self.norm2 = norm()
        self.mlp = MLP(cfg)
        # Gemma 2/3 also normalise what attention and the MLP add to the residual stream
        self.post_attn_norm = norm() if cfg.post_norms else None
        self.post_mlp_norm = norm() if cfg.post_norms else None

    def forward(self, x, rope, kv=None, slot=None, pos=None, mask=None):
        if self.post:
            x = self.norm1(x + self.attn(x, rope, kv, slot, pos, mask))
            return self.norm2(x + self.mlp(x))
        h = self.attn(self.norm1(x), rope, kv, slot, pos, mask)
        x = x + (self.post_attn_norm(h) if self.post_attn_norm is not None else h)
        h = self.mlp(self.norm2(x))
        return x + (self.post_mlp_norm(h) if self.post_mlp_norm is not None else h)


class Dense(nn.Module):
    """dense + activation (+ norm): the transform of BERT's and ModernBERT's MLM head (exact GELU, norm) and of a
    classifier's pooler (model.pooler: BERT's tanh, ModernBERT's GELU + norm)."""

    def __init__(self, cfg: ModelConfig, act: str):
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.has_bias)
        self.act = torch.tanh if act == "tanh" else F.gelu
        self.norm = norm_of(cfg) if act == "gelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.dense(x))
        return self.norm(x) if self.norm is not None else x


class Transformer(nn.Module):
    """The Transformer, a decoder or (cfg.causal false) an encoder. `cfg.vocab_size` must be set (the commands fill
    it from the tokenizer)."""

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
        # encoders (BERT): a token-type embedding (every token type 0) and a norm over the summed embeddings
        self.wtt = (nn.Embedding(cfg.type_vocab_size, cfg.n_embd,
                                 _weight=torch.empty(cfg.type_vocab_size, cfg.n_embd) if shapes_only else None)
                    if cfg.type_vocab_size else None)
        self.embed_norm = norm_of(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, first=i == 0) for i in range(cfg.n_layer))
        self.norm = norm_of(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.mlm = Dense(cfg, "gelu") if cfg.mlm_head else None
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.mlm_head)
        if cfg.tied:
            self.lm_head.weight = self.wte.weight
        self.sliding = cfg.sliding  # per layer
        self.local_rope = cfg.rope_local_theta is not None and any(self.sliding)
        if cfg.arch == "llama":
            for name, (cos, sin) in self._rope_tables().items():
                self.register_buffer(f"{name}_cos", cos, persistent=False)  # (block_size, rotary_dim)
                self.register_buffer(f"{name}_sin", sin, persistent=False)
        self.reset_parameters()

    def _rope_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """rope: the full layers' tables (scaled); rope_local: the sliding layers' when they have their own base."""
        c = self.cfg
        tables = {"rope": rope_tables(c.rotary_dim, c.block_size, c.rope_theta, c.rope_scaling)}
        if self.local_rope:
            tables["rope_local"] = rope_tables(c.rotary_dim, c.block_size, c.rope_local_theta)
        return tables

    # ---------------------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, init_std), residual projections scaled by 1/sqrt(2 * n_layer) (or zero, with
        model.zero_init_proj)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.is_meta:  # shapes only (a checkpoint's weights replace them); init is skipped, see __init__
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:  # a (1 + w) norm starts at w = 0
                (nn.init.zeros_ if self.cfg.norm_offset else nn.init.ones_)(p)
            elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                if self.cfg.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)
        if self.cfg.arch == "llama":  # buffers are not parameters; recompute in case of meta-device init
            for name, (cos, sin) in self._rope_tables().items():
                device = getattr(self, f"{name}_cos").device
                setattr(self, f"{name}_cos", cos.to(device))
                setattr(self, f"{name}_sin", sin.to(device))

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters counted once (tied weights once). Without embeddings: the blocks and the final norm only (no
        token or position embedding, no output head: Kaplan et al.'s non-embedding count)."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.wte.weight.numel() + (self.lm_head.weight.numel() if not self.cfg.tied else 0)
            n -= sum(e.weight.numel() for e in (self.wpe, self.wtt) if e is not None)
        return n

    # ---------------------------------------------------------------------------------------------------------
    def hidden(
        self,
        idx: torch.Tensor,
        cache: Optional[KVCache] = None,
        slot: Optional[int | torch.Tensor] = None,
        pos: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
        segments: Optional[torch.Tensor] = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) of token ids idx (B, T).

        Without a cache: positions 0..T-1, causal attention (training, evaluation). With `segments` (B, T), integer
        document ids in contiguous runs (packed documents, no cache): a token attends only to its own document and
        its position is its index within that document.
        Prefill, `cache` and `slot`: idx (1, T) is a sequence from position 0; its keys and values are written to
        that slot of the cache. With `start` too (a Python int): idx (1, T) continues the slot's first `start`
        positions at positions start..start+T-1 (several tokens in one forward: speculative decoding's verify);
        positions past start+T are not read, so whatever a longer earlier extension left there does not matter.
        Decode, `cache` and `pos` (B,): idx (B, 1) holds one token per slot 0..B-1, at that slot's position pos[b];
        each row reads its own slot's positions 0..pos[b]. `kv_len` (an int, or a 0-d tensor in a traced step;
        >= max(pos) + T) bounds the positions read (eager decoding); None reads the whole cache (the compiled step,
        whose shapes are fixed).
        Several prompts at once, `cache`, `pos` (B,) and `slot` a (B,) tensor: idx (B, T) continues slot[b] at
        positions pos[b]..pos[b]+T-1 (a row with fewer tokens is padded at its end: the pads' keys land past the
        row's tokens, where its own decoding overwrites them before reading; pos[b] + T must fit the cache).
        """
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        if segments is not None:
            if cache is not None:
                raise ValueError("segments (packed documents) are for training and evaluation, not a KV cache")
            positions = segment_positions(segments)  # (B, T)
        elif cache is not None and not isinstance(slot, int):
            if pos is None or (T != 1 and slot is None):
                raise ValueError("decoding with a cache takes one token per row and its positions `pos` (B,)")
            positions = pos[:, None] + torch.arange(T, device=idx.device)  # (B, T)
        else:
            if start and (cache is None or slot is None):
                raise ValueError("`start` extends a slot of a cache: give `cache` and `slot`")
            positions = torch.arange(start, start + T, device=idx.device)[None]  # (1, T)
        if start:
            masks = self._extend_masks(T, start, idx.device)
        else:
            masks = (self._masks(T, idx.device, pos if not isinstance(slot, int) else None,
                                 kv_len if kv_len is not None else (cache.length if cache else T))
                     if segments is None else self._segment_masks(segments))
        x = self.wte(idx)  # (B, T, C)
        if self.cfg.embed_scale:  # by sqrt(C) rounded to x's dtype, as Gemma does
            x = x * torch.tensor(self.cfg.n_embd ** 0.5, dtype=x.dtype)
        ropes = [None, None]  # full layers, sliding layers
        if self.wtt is not None:  # token type 0 (llmctl's texts are single segments)
            x = x + self.wtt.weight[0]
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            ropes[0] = ropes[1] = self._rope("rope", positions, x.dtype)  # (B|1, 1, T, rot) each
            if self.local_rope:
                ropes[1] = self._rope("rope_local", positions, x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            w = self.sliding[i]
            x = block(x, ropes[w], cache.layers[i] if cache is not None else None, slot, start or pos, masks[w])
        return self.norm(x)

    def _rope(self, name: str, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (getattr(self, f"{name}_cos")[positions].unsqueeze(1).to(dtype),
                getattr(self, f"{name}_sin")[positions].unsqueeze(1).to(dtype))

    def _masks(self, T: int, device, pos: Optional[torch.Tensor], kv_len: int) -> list[Optional[torch.Tensor]]:
        """Which keys each query reads, for full and for sliding layers: None (causal, SDPA's fast path) or bool
        (B|1, 1, T, S). Decoding (`pos` (B,)): row b's query t reads its slot's positions 0..pos[b]+t (the last
        `window` of them in sliding layers) among the first kv_len."""
        window = self.cfg.sliding_window if any(self.sliding) else None
        if not self.cfg.causal:  # an encoder: every position, or a window on either side in sliding layers
            return [None, bidirectional(T, device, window) if window is not None and window // 2 < T - 1 else None]
        if pos is None:
            return [None, causal(T, device, window) if window is not None and window < T else None]
        keys = torch.arange(kv_len, device=device)  # (S',)
        at = (pos[:, None] + torch.arange(T, device=device))[:, :, None]  # (B, T, 1) each query's position
        full = keys <= at  # (B, T, S')
        sliding = full & (keys > at - window) if window is not None else full
        return [full[:, None], sliding[:, None]]

    def _extend_masks(self, T: int, start: int, device) -> list[torch.Tensor]:
        """Extending a slot: query i (position start+i) reads keys j <= start+i (the last `window` in sliding
        layers), (1, 1, T, start+T)."""
        window = self.cfg.sliding_window if any(self.sliding) else None
        q = torch.arange(start, start + T, device=device)[:, None]
        keys = torch.arange(start + T, device=device)[None, :]
        full = keys <= q
        sliding = full & (keys > q - window) if window is not None else full
        return [full[None, None], sliding[None, None]]

    def _segment_masks(self, segments: torch.Tensor) -> list:
        """`segment_masks` for this model: FlexAttention on CUDA unless dropout or soft-capped scores need SDPA, or
        the model is an encoder (whose segments are a padded batch's, of a new length each time: SDPA's bool masks
        need no compiling per shape)."""
        flex = segments.is_cuda and self.cfg.dropout == 0 and self.cfg.attn_softcap is None and self.cfg.causal
        return segment_masks(segments, self.cfg.sliding_window if any(self.sliding) else None, flex, self.cfg.causal)

    def forward(
        self,
        idx: torch.Tensor,
        cache: Optional[KVCache] = None,
        slot: Optional[int | torch.Tensor] = None,
        pos: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
        segments: Optional[torch.Tensor] = None,
        start: int = 0,
        only: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T); see `hidden` for the cache, `segments` and
        `start` arguments. `only` (B, T) bool: the logits of those positions alone, (N, vocab_size) in row-major
        order: masked-language modelling (~15% of the positions) and DPO (answer tokens) need no others."""
        h = self.hidden(idx, cache, slot, pos, kv_len, segments, start)  # (B, T, C)
        if only is not None:
            h = h[only]  # (N, C)
        logits = self.lm_head(self.mlm(h) if self.mlm is not None else h)
        if self.cfg.final_softcap is not None:  # Gemma 2: cap * tanh(logits / cap)
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits
