"""Rotary position tables: the frequencies of RoPE, plain or scaled (linear, llama3, yarn), as cos/sin tables.

The legal scaling types and their keys are ModelConfig's (`config.model.ROPE_SCALING`); this module computes them
the way transformers' `modeling_rope_utils` does, so imported models match it numerically.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def inverse_frequencies(dim: int, theta: float, scaling: Optional[dict], context: int) -> tuple[torch.Tensor, float]:
    """The (dim/2,) inverse frequencies of a `dim`-channel rotation and the factor on cos/sin ("attention factor",
    yarn only). `context`: the model's block_size (yarn's original context when its config gives none)."""
    # on the CPU even inside a meta-device context: the same ops on meta tensors would import torch._dynamo (~1 s)
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))  # (dim/2,)
    if scaling is None:
        return inv, 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv, scaling), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling, context)
    raise ValueError(f"unsupported rope scaling {kind!r}")  # ModelConfig.check refuses it first


def _llama3(inv: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor, old = s["factor"], s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def _mscale(factor: float, m: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _yarn(dim: int, theta: float, s: dict, context: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies by `factor`, keep the high ones, ramp between the dimensions that turn
    beta_fast and beta_slow times over the original context; cos/sin scaled by the attention factor."""
    factor, original = s["factor"], s.get("original_max_position_embeddings") or context
    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = _mscale(factor, m) / _mscale(factor, m_all) if m and m_all else _mscale(factor)
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def turns_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = turns_dim(fast), turns_dim(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high  # no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos = theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return (1.0 / (factor * pos)) * (1 - keep) + (1.0 / pos) * keep, float(attention)


def rope_tables(dim: int, length: int, theta: float, scaling: Optional[dict] = None,
                context: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables of shape (length, dim) in HF's rotate-half layout.

    HF rotates as x * cos + cat(-x2, x1) * sin. The sin table here carries the minus sign on its first half, so
    the rotation is x * cos + roll(x, dim/2) * sin: the same products, in half the ops."""
    inv, attention = inverse_frequencies(dim, theta, scaling, context or length)
    freqs = torch.outer(torch.arange(length, dtype=torch.int64, device="cpu").float(), inv)  # (L, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (L, dim)
    cos, sin = emb.cos() * attention, emb.sin() * attention
    sin[:, : dim // 2] *= -1
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x (B, H, T, hd) by cos/sin (B or 1, 1, T, rot); the rest pass
    (partial rotary: Phi-4-mini rotates 3/4 of each head)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return (x * cos + x.roll(rot // 2, -1) * sin).to(x.dtype)  # roll(x, hd/2) = cat(x2, x1)
    xr, rest = x[..., :rot], x[..., rot:]
    return torch.cat(((xr * cos + xr.roll(rot // 2, -1) * sin).to(x.dtype), rest), dim=-1)
