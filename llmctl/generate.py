"""Token generation on the model's one static KV cache: prefill the prompts, then decode one token per step.

One decode loop serves a single prompt and a batch of prompts alike. Prompts of a batch are left-padded to a
common length; the model shifts their positions and masks the padding, so a row's tokens do not depend on the
other rows (exactly so in float32). Yields token ids; turning them into text is the caller's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from . import aot
from .model import Transformer


@dataclass
class Request:
    """One prompt and how to continue it."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.8  # 0 = greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    seed: Optional[int] = None


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
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style repetition penalty on logits (V,) for the ids in `seen` (positive logits shrink, negative grow)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    vals = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def slide_keep(block_size: int) -> int:
    """Tokens kept when generation runs past the context: the newest three quarters of it."""
    return max(1, block_size - block_size // 4)


class Decoder:
    """Runs the model on its KV cache: eager prefill, then a decode step that is compiled ahead of time or eager.

    `compile`: "auto" uses a compiled decode step when the cache holds one for this model, precision and shape
    (loading it takes ~0.05 s, so it pays off even for a short generation), True also builds a missing one first
    (half a minute to a minute on a CPU, once per model, precision and shape; see llmctl.aot), False always
    decodes eagerly. `notify` hears about builds and dropped cache files.
    Cache lengths are rounded up to a power of two (at least 256) when compiled steps are in play, so few shapes
    exist: at most three for a 1024-token context and one batch size.
    """

    def __init__(self, model: Transformer, compile: bool | str = False,
                 notify: Optional[Callable[[str], None]] = None, store: Optional[aot.StepStore] = None):
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto' (got {compile!r})")
        self.model = model
        self.mode = compile
        self.store = None if compile is False else (store or aot.StepStore(model, notify=notify))
        self.compiled = None  # the compiled step of the current shape, if any
        self.build_next = False  # auto: build the next shape's step if missing (a long job asks, see complete_rows)
        self._caches: list[torch.Tensor] = []  # the model's cache tensors, flat: k0, v0, k1, v1, ...
        self._no_pad: Optional[torch.Tensor] = None

    def cache_length(self, needed: int) -> int:
        """Slots to allocate for `needed` tokens: exactly that when eager, else the next power of two (>= 256)."""
        block = self.model.cfg.block_size
        if self.store is None:
            return min(needed, block)
        return min(block, max(256, 1 << (needed - 1).bit_length()))

    def begin(self, batch_size: int, needed: int) -> None:
        """Set up the model's KV cache for `batch_size` rows of up to `needed` tokens, and find the compiled step."""
        length = self.cache_length(needed)
        self.model.setup_cache(batch_size, length)
        if self.store is not None:
            self.compiled = self.store.get(batch_size, length, build_missing=self.mode is True or self.build_next)
            self.build_next = False
        self._caches = [t for block in self.model.blocks for t in (block.attn.kv_cache.k, block.attn.kv_cache.v)]
        self._no_pad = torch.zeros(batch_size, dtype=torch.long, device=self.model.wte.weight.device)

    def end(self) -> None:
        """Detach the KV cache from the model."""
        self.model.clear_cache()
        self.compiled, self._caches = None, []

    def prefill(self, idx: torch.Tensor, left_pad: Optional[torch.Tensor]) -> torch.Tensor:
        """idx (B, T) written at slots 0..T-1 -> logits of the last position (B, V)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        return self.model(idx, input_pos=pos, left_pad=left_pad, kv_len=T)[:, -1]

    def step(self, tok: torch.Tensor, pos: int, left_pad: Optional[torch.Tensor]) -> torch.Tensor:
        """tok (B,) at slot `pos` -> next logits (B, V)."""
        input_pos = torch.tensor([pos], device=tok.device)
        if self.compiled is not None:  # (no padding is zero padding: the same mask)
            return self.compiled(tok[:, None], input_pos, self._no_pad if left_pad is None else left_pad, self._caches)
        return self.model(tok[:, None], input_pos=input_pos, left_pad=left_pad, kv_len=pos + 1)[:, -1]


@torch.inference_mode()  # lighter than no_grad: no version counters (~30% of a small model's step)
def generate_batch(
    model: Transformer,
    requests: list[Request],
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    decoder: Optional[Decoder] = None,
    cancelled: Optional[set[int]] = None,
) -> Iterator[tuple[int, int]]:
    """Yield (row, token id) as tokens are generated; a row ends at `eos_id` (not yielded) or its max_new_tokens.

    A caller may end rows early by adding them to `cancelled` (stop strings). Prompts must fit the context
    (callers truncate or refuse). When a row's prompt plus output outgrow the context its window slides: its newest
    `slide_keep(block_size)` tokens are prefilled again and decoding goes on.
    """
    if not requests:
        return
    block = model.cfg.block_size
    for r in requests:
        if not r.prompt:
            raise ValueError("a prompt must hold at least one token")
        if len(r.prompt) > block:
            raise ValueError(f"prompt of {len(r.prompt)} tokens exceeds the context of {block}")
    decoder = decoder or Decoder(model)
    device = model.wte.weight.device
    B = len(requests)
    gens = []
    for r in requests:
        g = torch.Generator(device=device)
        g.manual_seed(r.seed) if r.seed is not None else g.seed()
        gens.append(g)
    seqs = [list(r.prompt) for r in requests]  # every row's tokens so far (for sliding and the penalty)
    ctx = [len(r.prompt) for r in requests]  # how many of them are in the row's current window
    done = [False] * B
    produced = [0] * B
    greedy_all = all(r.temperature == 0 and r.repetition_penalty == 1.0 for r in requests)

    def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        T = max(len(s) for s in rows)
        idx = torch.full((B, T), pad_id, dtype=torch.long)
        for i, s in enumerate(rows):
            idx[i, T - len(s):] = torch.tensor(s)
        pads = [T - len(s) for s in rows]
        return idx.to(device), (torch.tensor(pads, device=device) if any(pads) else None)

    model.eval()
    try:
        decoder.begin(B, max(len(s) for s in seqs) + max(r.max_new_tokens for r in requests))
        idx, left_pad = left_padded(seqs)
        logits = decoder.prefill(idx, left_pad)  # (B, V)
        pos = idx.shape[1]
        while True:
            if greedy_all:
                nxt = logits.argmax(-1)  # (B,)
            else:
                picks = []
                for i, r in enumerate(requests):
                    row = logits[i]
                    if r.repetition_penalty != 1.0:
                        row = penalize(row, torch.tensor(seqs[i], device=device), r.repetition_penalty)
                    picks.append(sample(row[None], r.temperature, r.top_k, r.top_p, gens[i]))
                nxt = torch.cat(picks)
            toks = nxt.tolist()
            for i, t in enumerate(toks):
                if cancelled and i in cancelled:
                    done[i] = True
                if done[i]:
                    continue
                if eos_id is not None and t == eos_id:
                    done[i] = True
                    continue
                seqs[i].append(t)
                ctx[i] += 1
                produced[i] += 1
                yield i, t
                if produced[i] >= requests[i].max_new_tokens:
                    done[i] = True
            if all(done):
                return
            if pos == model.cache_len:
                # the longest row's context is full: it keeps its newest tokens; the other rows keep all of theirs,
                # so each row slides exactly when it would on its own
                ctx = [slide_keep(block) if n > block else n for n in ctx]
                idx, left_pad = left_padded([s[-n:] for s, n in zip(seqs, ctx)])
                logits = decoder.prefill(idx, left_pad)
                pos = idx.shape[1]
                continue
            logits = decoder.step(nxt, pos, left_pad)
            pos += 1
    finally:
        decoder.end()


def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: Optional[int] = None,
    seed: Optional[int] = None,
    repetition_penalty: float = 1.0,
    decoder: Optional[Decoder] = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids for one prompt (the batch loop with one row)."""
    req = Request(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    for _, t in generate_batch(model, [req], eos_id=eos_id, decoder=decoder):
        yield t


@torch.inference_mode()
def generate_uncached(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
                      seed: Optional[int] = None) -> list[int]:
    """Reference path without a cache (full forward over the last block_size tokens each step); for tests."""
    device = model.wte.weight.device
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
