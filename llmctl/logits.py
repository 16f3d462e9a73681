"""What a row samples from, and how: a `Sampling`'s penalties and `logit_bias` applied to a row's logits
(`processed`), temperature, top-k and top-p (`distribution`, `sample`), and the log-probabilities a request may ask
for (`top_logprobs`). The settings and their legal values live in llmctl.sampling; the engine (llmctl.generate)
and speculative decoding's accept rule (llmctl.speculative) both pick tokens through these functions.
"""

from __future__ import annotations

from typing import Optional

import torch

from .sampling import Sampling

# one position's log-probabilities: (token id, its log-probability, [(id, log-probability) of the top alternatives])
LogProb = tuple[int, float, list[tuple[int, float]]]


def processed(logits: torch.Tensor, s: Sampling, tokens: list[int], n_prompt: int) -> torch.Tensor:
    """The logits (V,) a row samples from, before temperature: the repetition penalty over prompt and output
    (CTRL's), OpenAI's presence and frequency penalties over the generated tokens (`tokens[n_prompt:]`), then
    `logit_bias` added. The logits as they are when none is set."""
    if not s.processed:
        return logits
    logits = logits.float()
    if s.repetition_penalty != 1.0:
        logits = penalize(logits, torch.tensor(tokens, device=logits.device), s.repetition_penalty)
    out = tokens[n_prompt:]
    if out and (s.presence_penalty or s.frequency_penalty):
        counts = torch.bincount(torch.tensor(out, device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits = logits - counts * s.frequency_penalty - (counts > 0).to(logits.dtype) * s.presence_penalty
    if s.logit_bias:
        ids = torch.tensor([t for t, _ in s.logit_bias], device=logits.device)
        logits = logits.index_add(0, ids, torch.tensor([b for _, b in s.logit_bias], device=logits.device))
    return logits


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[LogProb]:
    """For logits (T, V) and the tokens chosen at each position (T,): each one's log-probability and the k most
    likely tokens' (log-softmax in float32)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    mine = lp.gather(1, chosen[:, None])[:, 0].tolist()
    if k > 0:
        vals, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in mine]
    return [(t, m, top) for t, m, top in zip(chosen.tolist(), mine, tops)]


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick the next token from logits (B, V): greedy when temperature is 0, else top-k / nucleus sampling (from
    `distribution`)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(distribution(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


def distribution(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                 top_p: Optional[float] = None) -> torch.Tensor:
    """The probabilities (B, V) that `sample` draws from at a temperature > 0: logits (B, V) divided by it, cut to
    the top k and to the nucleus of mass top_p, softmaxed (float32)."""
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
    return logits.softmax(-1)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style repetition penalty on logits (V,) for the ids in `seen` (positive logits shrink, negative grow)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    vals = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits
