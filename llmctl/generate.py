"""Token generation on the model's one static KV cache: prefill the prompts, then decode one token per step.

One decode loop serves a single prompt and a batch of prompts alike. Prompts of a batch are left-padded to a
common length; the model shifts their positions and masks the padding, so a row's tokens do not depend on the
other rows (exactly so in float32). Yields token ids; turning them into text is the caller's job.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from .errors import LlmctlError
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
    """Runs the model on its KV cache: eager prefill, and a decode step that can be compiled.

    The compiled step sees fixed shapes (batch, one token, the whole cache), so inductor builds it once per batch
    size and cache length. Cache lengths are rounded up to a power of two and each shape's cache tensors are kept
    between calls, so later generations of a seen shape reuse the compiled step; inductor's artifacts live under
    the llmctl cache and are reused across runs. On a CPU the step is compiled with inductor's weight freezing and
    its autotuned C++ GEMM templates: batch-1 decoding is a chain of matrix-vector products, and those templates
    read the frozen weights at close to memory bandwidth (about 2-4x torch's default kernels here).
    """

    def __init__(self, model: Transformer, compile: bool = False):
        self.model = model
        self.compiled = None
        self._kept: dict[tuple[int, int], list] = {}  # the compiled step's KV caches between calls, by (batch, length)
        self._key = (0, 0)
        self._steady = False  # the compiled step ran (guards checked) since the last prefill
        if compile:
            configure_compile_cache()
            self.compiled = torch.compile(model, dynamic=False)

    def cache_length(self, needed: int) -> int:
        """Slots to allocate for `needed` tokens: exactly that when eager, else the next power of two (>= 256).

        Each (batch size, length) compiles its own step, which holds its own pre-packed copy of the weights, so
        there are few lengths: at most three for a 1024-token context."""
        block = self.model.cfg.block_size
        if self.compiled is None:
            return min(needed, block)
        return min(block, max(256, 1 << (needed - 1).bit_length()))

    def begin(self, batch_size: int, needed: int) -> None:
        """Set up the model's KV cache for `batch_size` rows of up to `needed` tokens."""
        self._key = (batch_size, self.cache_length(needed))
        self.model.setup_cache(*self._key, reuse=self._kept.pop(self._key, None))
        self._steady = False

    def end(self) -> None:
        """Detach the KV cache from the model (kept for the next call when compiled)."""
        caches = self.model.clear_cache()
        if self.compiled is not None:  # the compiled step is specialised to these very tensors
            self._kept[self._key] = caches

    def prefill(self, idx: torch.Tensor, left_pad: Optional[torch.Tensor]) -> torch.Tensor:
        """idx (B, T) written at slots 0..T-1 -> logits of the last position (B, V)."""
        self._steady = False  # a new prefill (a slide) may change left_pad to or from None: check guards again
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        return self.model(idx, input_pos=pos, left_pad=left_pad, kv_len=T)[:, -1]

    def step(self, tok: torch.Tensor, pos: int, left_pad: Optional[torch.Tensor]) -> torch.Tensor:
        """tok (B,) at slot `pos` -> next logits (B, V)."""
        input_pos = torch.tensor([pos], device=tok.device)
        if self.compiled is not None:
            if self._steady:
                # later steps after a prefill repeat the first one's shapes and tensors, so the guards that pick
                # the compiled graph can only agree; evaluating all of them costs ~0.5 ms a step on a 124M model
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self.compiled(tok[:, None], input_pos=input_pos, left_pad=left_pad)[:, -1]
            try:
                with compile_options(tok.device.type):
                    out = self.compiled(tok[:, None], input_pos=input_pos, left_pad=left_pad)[:, -1]
            except Exception as e:  # compiling happens here: a missing C++ compiler, an unsupported op, ...
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise LlmctlError(f"--compile failed to compile the decode step ({type(e).__name__}: {first}); run "
                                  "without --compile (on a CPU, inductor also needs a working C++ compiler)") from e
            self._steady = True
            return out
        return self.model(tok[:, None], input_pos=input_pos, left_pad=left_pad, kv_len=pos + 1)[:, -1]


def compile_options(device_type: str):
    """Inductor settings for compiling the decode step (read when a graph is compiled, so set around each call)."""
    import torch._inductor.config as inductor_config

    if device_type != "cpu":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    # freezing: weights become constants that inductor pre-packs; autotune: try its C++ GEMM templates vs aten,
    # without printing each contest to the terminal
    stack.enter_context(inductor_config.patch(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN",
                                              autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False))
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # raised inside inductor's autotuner
    return stack


def configure_compile_cache() -> None:
    """Keep inductor's compiled artifacts in llmctl's cache so a second run skips most of the compile."""
    from .config import default_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(default_cache_dir()) / "inductor"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")


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
    decoder.begin(B, max(len(s) for s in seqs) + max(r.max_new_tokens for r in requests))
    try:
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
