"""Measurements: language-model loss, perplexity and bits per byte over a full pass of a token stream."""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def lm_metrics(
    model: nn.Module,
    blocks: Iterable[dict],
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    n_bytes: Optional[int] = None,
) -> dict:
    """Mean next-token loss over every label in `blocks`, its perplexity, and bits per byte when `n_bytes` is known.

    Bits per byte = total nats / ln 2 / bytes of the predicted text: comparable across tokenizers.
    """
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    total, count = 0.0, 0
    with autocast:
        for batch in blocks:
            x, y = batch["input_ids"].to(device), batch["labels"].to(device)
            logits = model(x)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((y != -100).sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to evaluate")
    mean = total / count
    out = {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": count}
    if n_bytes:
        out["bits_per_byte"] = total / math.log(2) / n_bytes
        out["bytes"] = n_bytes
    return out
