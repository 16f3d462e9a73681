"""Task heads on top of the plain Transformer (kept out of `model.py`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .model import Transformer


class Classifier(nn.Module):
    """Sequence classification: a linear head on the hidden state of each sequence's last real token.

    Sequences are right-padded and end with <eos>, which the causal model has read the whole text before; its
    state is the summary the head classifies. Padding after it cannot leak backwards through causal attention.
    """

    def __init__(self, backbone: Transformer, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.cfg.n_embd, n_classes, device=backbone.lm_head.weight.device)
        nn.init.normal_(self.head.weight, 0.0, backbone.cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) right-padded, lengths (B,) -> class logits (B, n_classes)."""
        h = self.backbone.hidden(input_ids)  # (B, T, C)
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, C)
        return self.head(last)
