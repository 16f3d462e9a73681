"""Task heads on top of the plain Transformer (kept out of `model.py`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .model import Transformer


class Classifier(nn.Module):
    """Sequence classification: a linear head on a summary of each sequence's hidden states.

    Sequences are right-padded and end with <eos>. `pooling="last"` classifies the state at that <eos>, which the
    causal model reaches after reading the whole text; `"mean"` averages the states of all real tokens. Padding
    after the text cannot leak backwards through causal attention and is left out of the mean.
    """

    def __init__(self, backbone: Transformer, n_classes: int, pooling: str = "last"):
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        self.head = nn.Linear(backbone.cfg.n_embd, n_classes, device=backbone.lm_head.weight.device)
        nn.init.normal_(self.head.weight, 0.0, backbone.cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) right-padded, lengths (B,) -> class logits (B, n_classes)."""
        h = self.backbone.hidden(input_ids)  # (B, T, C)
        if self.pooling == "mean":
            real = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]  # (B, T)
            summary = (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)  # (B, C)
        else:
            summary = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, C)
        return self.head(summary)
