"""Task heads on top of the plain Transformer (kept out of `model.py`)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .model import Dense, Transformer


def pooling_of(backbone: Transformer, pooling: Optional[str]) -> str:
    """finetune.pooling, or its default: the first ([CLS]) token for an encoder, the final <eos> for a decoder."""
    return pooling or ("last" if backbone.cfg.causal else "cls")


class Classifier(nn.Module):
    """Sequence classification: a linear head on a summary of each sequence's hidden states.

    Sequences are right-padded. A decoder's end with <eos>: `pooling="last"` classifies the state at that <eos>,
    which the causal model reaches after reading the whole text. An encoder's are [CLS] text [SEP]: `"cls"`
    classifies the first token's state, which attends to every token; its padding is a segment of its own, so real
    tokens never read it. `"mean"` averages the states of all real tokens (padding left out). With model.pooler
    the summary first passes BERT's pooler (dense + tanh) or ModernBERT's head (dense + GELU + norm).
    """

    def __init__(self, backbone: Transformer, n_classes: int, pooling: Optional[str] = None):
        super().__init__()
        self.backbone, self.pooling = backbone, pooling_of(backbone, pooling)
        cfg, device = backbone.cfg, backbone.lm_head.weight.device
        self.pre = Dense(cfg, "tanh" if cfg.pooler == "tanh" else "gelu").to(device) if cfg.pooler else None
        self.head = nn.Linear(cfg.n_embd, n_classes, device=device)
        for layer in [self.head] + ([self.pre.dense] if self.pre is not None else []):
            nn.init.normal_(layer.weight, 0.0, cfg.init_std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) right-padded, lengths (B,) -> class logits (B, n_classes)."""
        real = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < lengths[:, None]  # (B, T)
        segments = None if self.backbone.cfg.causal else (~real).long()
        h = self.backbone.hidden(input_ids, segments=segments)  # (B, T, C)
        if self.pooling == "mean":
            summary = (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)  # (B, C)
        elif self.pooling == "cls":
            summary = h[:, 0]
        else:
            summary = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, C)
        return self.head(self.pre(summary) if self.pre is not None else summary)

    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's tensors as a checkpoint stores them (head.safetensors): the linear head's `weight`/`bias`,
        the pooler's under `pre.`."""
        pre = {f"pre.{k}": v for k, v in self.pre.state_dict().items()} if self.pre is not None else {}
        return {**self.head.state_dict(), **pre}

    def load_head_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("pre.")})
        if self.pre is not None:
            self.pre.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("pre.")})

    @staticmethod
    def head_tensors(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`head_state` from a Classifier's full state dict (its keys `backbone.*`, `head.*`, `pre.*`)."""
        return {(k[len("head."):] if k.startswith("head.") else k): v for k, v in full.items()
                if k.startswith(("head.", "pre."))}
