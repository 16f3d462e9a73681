"""Measurements: language-model loss, perplexity and bits per byte over a full pass of a token stream."""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def lm_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """A language model's logits (B, T, V) for a batch: its input_ids, and its segments when rows pack documents
    (data.document_mask); the batch is on the model's device."""
    if "segments" in batch:
        return model(batch["input_ids"], segments=batch["segments"])
    return model(batch["input_ids"])


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
            y = batch["labels"].to(device)
            logits = lm_logits(model, {k: v.to(device) for k, v in batch.items()})  # (B, T, V)
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


@torch.no_grad()
def classify(model: nn.Module, batches: Iterable[dict], device: torch.device, amp_dtype: Optional[torch.dtype] = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Run a classifier over batches: returns (rows, predicted ids, probabilities (N, C), mean loss)."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    rows, preds, probs, loss_sum, n = [], [], [], 0.0, 0
    with autocast:
        for b in batches:
            logits = model(b["input_ids"].to(device), b["lengths"].to(device)).float()  # (B, C)
            if "labels" in b:
                loss_sum += F.cross_entropy(logits, b["labels"].to(device), reduction="sum").item()
                n += len(logits)
            p = logits.softmax(-1).cpu()
            probs.append(p)
            preds.append(p.argmax(-1))
            rows.append(b["rows"] if "rows" in b else torch.arange(len(p)))
    model.train(was_training)
    return torch.cat(rows), torch.cat(preds), torch.cat(probs), (loss_sum / n if n else float("nan"))


def classification_metrics(pred: list[int] | torch.Tensor, gold: list[int] | torch.Tensor, labels: list[str]) -> dict:
    """Accuracy, per-class and macro precision / recall / F1, and the confusion matrix
    (rows: gold, columns: predicted)."""
    pred, gold = torch.as_tensor(pred).long(), torch.as_tensor(gold).long()
    k = len(labels)
    confusion = torch.bincount(gold * k + pred, minlength=k * k).reshape(k, k)
    tp = confusion.diag().double()
    precision = torch.where(confusion.sum(0) > 0, tp / confusion.sum(0).clamp(min=1),
                            torch.zeros(k, dtype=torch.double))
    recall = torch.where(confusion.sum(1) > 0, tp / confusion.sum(1).clamp(min=1), torch.zeros(k, dtype=torch.double))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros(k, dtype=torch.double))
    return {
        "accuracy": tp.sum().item() / max(1, len(gold)),
        "macro_precision": precision.mean().item(),
        "macro_recall": recall.mean().item(),
        "macro_f1": f1.mean().item(),
        "per_class": {name: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
                             "support": int(confusion[i].sum())} for i, name in enumerate(labels)},
        "confusion": {"labels": labels, "matrix": confusion.tolist()},
        "examples": len(gold),
    }
