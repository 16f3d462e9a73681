"""Masked-language modelling (BERT's objective, train.objective=mlm): which tokens are masked and how, and the
masked-token loss and accuracy.

A block of tokens becomes the model's input with `rate` of its positions chosen (at least one per row); of those,
80% read [MASK], 10% a random token and 10% stay as they were, and only they are predicted (labels elsewhere
-100). The choice is a pure function of the seed it is given, so the batches of step k stay a function of
(train.seed, k) and a resumed run masks as the uninterrupted one did; validation masks with fixed seeds, so every
evaluation sees the same masks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import LlmctlError

MLM_STREAM = 0x6D6C6D  # the masking draws' own stream, apart from the block offsets of the same step


@dataclass(frozen=True)
class Masking:
    mask_id: int
    vocab: int  # random replacements are drawn from ids 0..vocab-1 (the tokenizer's)
    rate: float = 0.15

    @classmethod
    def of(cls, tokenizer, rate: float) -> "Masking":
        if tokenizer.mask_id is None:
            raise LlmctlError("train.objective=mlm needs a mask token, and the tokenizer has none ([MASK] or <mask>); "
                              "llmctl adds one when it prepares the data for an mlm run: run `llmctl prepare` with "
                              "train.objective=mlm, or give a tokenizer.json that has [MASK]")
        return cls(tokenizer.mask_id, tokenizer.vocab_size, rate)

    def apply(self, ids: torch.Tensor, seed: list[int]) -> dict:
        """{'input_ids', 'labels'} for the (B, T) token block `ids`, masked with numpy's default_rng(seed)."""
        rng = np.random.default_rng([*seed, MLM_STREAM])
        x = ids.numpy().copy()
        B, T = x.shape
        chosen = rng.random((B, T)) < self.rate
        chosen[np.arange(B), rng.integers(0, T, size=B)] |= ~chosen.any(1)  # at least one per row
        how = rng.random((B, T))
        labels = np.where(chosen, x, -100)
        x = np.where(chosen & (how < 0.8), self.mask_id, x)
        x = np.where(chosen & (how >= 0.8) & (how < 0.9), rng.integers(0, self.vocab, size=(B, T)), x)
        return {"input_ids": torch.from_numpy(x.astype(np.int64)), "labels": torch.from_numpy(labels.astype(np.int64))}


def masked_batches(get, masking: Masking, seed: int, rank: int):
    """`get(step)` (language-modelling micro-batches of contiguous blocks) with their blocks masked: the masks of a
    step are a function of (seed, step, micro-batch, rank)."""

    def masked(step: int) -> list[dict]:
        return [masking.apply(b["input_ids"], [seed, step, i, rank]) for i, b in enumerate(get(step))]

    return masked


def masked_blocks(blocks: Iterable[dict], masking: Masking) -> Iterator[dict]:
    """Evaluation blocks masked with fixed seeds (the i-th batch with seed i): the same masks at every evaluation."""
    for i, b in enumerate(blocks):
        yield masking.apply(b["input_ids"], [i])


def mlm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the masked positions, with the head applied to them alone (`only=`): the loss and
    gradients of the full (B, T, V) logits with every other label -100, for ~15% of the head's work (the head is
    n_embd x vocab per position: over every position, half of the SST-2 encoder's step at an 8k vocabulary)."""
    labels = batch["labels"]  # (B, T), -100 where nothing is predicted
    keep = labels != -100
    logits = model(batch["input_ids"], only=keep)  # (N, V)
    return F.cross_entropy(logits.float(), labels[keep])


@torch.no_grad()
def mlm_metrics(model: nn.Module, batches: Iterable[dict], device: torch.device,
                amp_dtype: Optional[torch.dtype] = None) -> dict:
    """Mean cross-entropy over the masked tokens and the share of them predicted exactly (argmax)."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    total, right, count = 0.0, 0, 0
    with autocast:
        for batch in batches:
            x, y = batch["input_ids"].to(device), batch["labels"].to(device)
            seen = y != -100
            logits = model(x, only=seen).float()  # (N, V)
            total += F.cross_entropy(logits, y[seen], reduction="sum").item()
            right += int((logits.argmax(-1) == y[seen]).sum())
            count += int(seen.sum())
    model.train(was_training)
    if count == 0:
        raise LlmctlError("no masked tokens to evaluate")
    return {"masked_loss": total / count, "masked_accuracy": right / count, "masked_tokens": count}
