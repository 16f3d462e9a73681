"""Completions sampled from a policy and measured: prompts as token ids, K completions per prompt from the `Engine`
(continuous batching, each with its own seed), their rewards, their log-probabilities under the policy and a
reference, and `measure` (mean reward and the KL to the reference), shared by GRPO's validation and
`llmctl eval --reward`.

A prompt keeps at most `prompt_room` tokens (its end, by `rows.fit_prompt`: the context less the room for an
answer, the smaller of max_new_tokens and half the context), and each completion is capped by max_new_tokens and by
what is left of the context, so a prompt and its completion are always one sequence the model reads at once.
Log-probabilities are taken at the sampling temperature (the logits divided by it, as TRL does; 1 when greedy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .chat import render_messages
from .data import Examples, PromptRow, pad_batch
from .errors import LlmctlError
from .generate import Engine
from .rewards import Rewards
from .rows import Request, fit_prompt
from .sampling import Sampling
from .tokenizer import Tokenizer


@dataclass
class Completion:
    """One sampled completion: the prompt's ids, the generated ids (with the end id that ended it, which the model
    learns to write), the text the rewards read (up to a stop string), and why it ended."""

    prompt_ids: list[int]
    ids: list[int]
    text: str
    finish_reason: str


def derive_seed(*parts: int) -> int:
    """A sampling seed from several integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] % (2**63))


def prompt_room(block_size: int, max_new_tokens: int) -> int:
    """The most tokens a prompt keeps: the context less the room for an answer."""
    return block_size - min(max_new_tokens, block_size // 2)


def encode_prompts(cfg, tok: Tokenizer, rows: list[PromptRow], max_new_tokens: int) -> tuple[list[list[int]], int]:
    """(each row's prompt as token ids, how many were cut to `prompt_room`): a string as `infer` encodes it, a
    conversation rendered by the model's chat template with the generation prompt (cfg: the model's Config)."""
    room = prompt_room(cfg.model.block_size, max_new_tokens)
    out, cut = [], 0
    for row in rows:
        if row.chat:
            try:
                text = render_messages(cfg, tok, row.prompt, add_generation_prompt=True)
            except LlmctlError as e:
                raise LlmctlError(f"{row.where}: {e.message}") from None
            full = tok.encode(text)  # (the template wrote the special tokens)
        else:
            full = tok.encode_prompt(row.prompt)
        cut += len(full) > room
        out.append(fit_prompt(tok, full, room, truncate=True))
    return out, cut


def sample(engine: Engine, prompts: list[list[int]], s: Sampling, samples: int, seeds: Optional[list[int]] = None,
           slots: Optional[int] = None) -> list[Completion]:
    """`samples` completions of each prompt, prompt by prompt (completion k of prompt i at i * samples + k), on
    `engine` with `slots` rows decoding together; `seeds` (one per completion) make each one's sample repeatable.
    The model's train/eval mode is left as it was."""
    block = engine.model.cfg.block_size
    requests = []
    for i, ids in enumerate(prompts):
        for k in range(samples):
            change = {"max_new_tokens": min(s.max_new_tokens, block - len(ids))}
            if seeds is not None:
                change["seed"] = seeds[i * samples + k]
            requests.append(Request(ids, dataclasses.replace(s, **change)))
    index = {id(q): n for n, q in enumerate(requests)}
    out: list[Optional[Completion]] = [None] * len(requests)
    was = engine.model.training
    try:
        for row in engine.run(requests, slots=slots):
            if row.done:
                q = row.request
                ids = row.tokens[len(q.prompt):] + ([row.end_id] if row.end_id is not None else [])
                out[index[id(q)]] = Completion(q.prompt, ids, row.text, row.finish_reason)
    finally:
        engine.model.train(was)
    return out


def completion_value(row: PromptRow, text: str):
    """What a reward function receives as a completion: its text, or for a conversation one assistant message."""
    return [{"role": "assistant", "content": text}] if row.chat else text


def score(rewards: Rewards, rows: list[PromptRow], completions: list[Completion], samples: int
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The rewards of completions laid out as `sample` lays them out (each row's `samples` in a run)."""
    owners = [rows[n // samples] for n in range(len(completions))]
    names = list(dict.fromkeys(k for r in rows for k in r.columns))
    columns = {k: [r.columns.get(k) for r in owners] for k in names}
    return rewards.score([r.prompt for r in owners], [completion_value(r, c.text) for r, c in zip(owners, completions)],
                         columns, [r.where for r in owners])


def completion_batch(completions: list[Completion], pad_id: int) -> dict:
    """input_ids (N, T) and labels (N, T) (shifted by one; -100 on the prompt and padding) of prompt + completion,
    and each sequence's length."""
    ids = [c.prompt_ids + c.ids for c in completions]
    labels = [[-100] * len(c.prompt_ids) + c.ids for c in completions]
    batch = pad_batch(Examples(ids, labels), list(range(len(ids))), pad_id, "instruct")
    return {**batch, "lengths": torch.tensor([len(s) for s in ids])}


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(each labelled token's log-probability at `temperature` (N, T) float32, 0 elsewhere; the mask of labelled
    tokens). `logits` are (N, T, V), or (M, V) at the M labelled positions alone in row-major order (what
    `Transformer.forward(only=labels != -100)` returns: the head and the softmax skip prompts and padding)."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    mask = labels != -100  # (N, T)
    if logits.dim() == 2:  # (M, V)
        lp = F.log_softmax(logits, dim=-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)  # (M,)
        return torch.zeros(labels.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp), mask
    lp = F.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


def measure(policy: torch.nn.Module, reference: Callable[[torch.Tensor], torch.Tensor], engine: Engine,
            rows: list[PromptRow], prompts: list[list[int]], rewards: Rewards, s: Sampling, samples: int = 1,
            seeds: Optional[list[int]] = None, slots: Optional[int] = None, batch_size: int = 16,
            pad_id: int = 0) -> dict:
    """Sample `samples` completions per prompt and report `reward` (the mean), `reward_std` (over completions),
    `kl` (the mean over completions of the sum over their tokens of log p_policy - log p_reference: the
    sequence-level KL estimate) and `samples` (completions)."""
    completions = sample(engine, prompts, s, samples, seeds, slots)
    total, _ = score(rewards, rows, completions, samples)
    device = next(policy.parameters()).device
    kls = []
    was = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(completions), batch_size):
                b = completion_batch(completions[i:i + batch_size], pad_id)
                x, y = b["input_ids"].to(device), b["labels"].to(device)
                only = y != -100
                pol, mask = token_logps(policy(x, only=only), y, s.temperature)
                ref, _ = token_logps(reference(x, only=only), y, s.temperature)
                kls.append(((pol.double() - ref.double()) * mask).sum(-1).cpu())
    finally:
        policy.train(was)
    kl = torch.cat(kls)
    std = total.std().item() if len(total) > 1 else 0.0
    return {"reward": total.mean().item(), "reward_std": std, "kl": kl.mean().item(), "samples": len(completions)}
