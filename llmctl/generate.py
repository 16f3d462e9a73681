"""Token generation on the model's static KV cache: prefill the prompt, then decode one token at a time.

Yields token ids; turning them into text is the caller's job (`Tokenizer.stream`).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .model import Transformer


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick the next token from logits (B, V): greedy when temperature is 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def slide_keep(block_size: int) -> int:
    """Tokens kept when generation runs past the context: the newest three quarters of it."""
    return max(1, block_size - block_size // 4)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: Optional[int] = None,
    seed: Optional[int] = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids for one prompt; stops early at `eos_id` (not yielded).

    The prompt must fit the context (callers truncate or refuse). When prompt plus output outgrow the context,
    the window slides: the newest `slide_keep(block_size)` tokens are prefilled again and decoding continues.
    """
    block = model.cfg.block_size
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if len(prompt) > block:
        raise ValueError(f"prompt of {len(prompt)} tokens exceeds the context of {block}")
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    model.eval()
    model.setup_cache(1, min(block, len(prompt) + max_new_tokens))
    try:
        tokens = list(prompt)
        window = torch.tensor([tokens], device=device)  # (1, T)
        pos = window.shape[1]
        logits = model(window, input_pos=torch.arange(pos, device=device), kv_len=pos)[:, -1]  # (1, V)
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, top_p, gen)  # (1,)
            t = int(nxt)
            if eos_id is not None and t == eos_id:
                return
            yield t
            tokens.append(t)
            if pos == model.cache_len:  # the context is full: slide the window and prefill again
                keep = tokens[-slide_keep(block):]
                pos = len(keep)
                logits = model(torch.tensor([keep], device=device), input_pos=torch.arange(pos, device=device), kv_len=pos)[:, -1]
                continue
            logits = model(nxt.view(1, 1), input_pos=torch.tensor([pos], device=device), kv_len=pos + 1)[:, -1]
            pos += 1
    finally:
        model.clear_cache()


@torch.no_grad()
def generate_uncached(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
                      seed: Optional[int] = None) -> list[int]:
    """Reference path without a cache (full forward over the last block_size tokens each step); for tests."""
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    model.eval()
    tokens = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        idx = torch.tensor([tokens[-model.cfg.block_size:]], device=device)
        t = int(sample(model(idx)[:, -1], temperature, top_k, top_p, gen))
        if eos_id is not None and t == eos_id:
            break
        out.append(t)
        tokens.append(t)
    return out
