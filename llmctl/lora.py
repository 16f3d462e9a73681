"""LoRA: low-rank adapters on chosen linear layers (and optionally the token embedding), kept beside `model.py`
so the Transformer stays plain.

A wrapped linear layer computes  y = x W^T + b + (alpha / r) * dropout(x) A^T B^T  with A (r, in) and B (out, r); B
starts at zero so training begins from the base model exactly. The wrapped token embedding (target `wte`) looks up
W[i] + (alpha / r) * A^T[i] B^T with A (r, vocab) starting at zero and B (dim, r): a low-rank change of every token's
vector, which lets a frozen model re-read words for a new task (it lifts SST-2 dev accuracy by several points).
Wrappers subclass the base module and share its weight, so the base parameter names (`blocks.0.attn.qkv.weight`)
are unchanged and base checkpoints load as they are; the adapter adds `...lora_a` and `...lora_b`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import LlmctlError

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "wte")


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared, frozen by the caller
        self.rank, self.scale = rank, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged or self.disabled:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: W += scale * B A (exact up to float rounding)."""
        if not self.merged:
            self.weight += (self.lora_b @ self.lora_a) * self.scale
            self.merged = True


class LoRAEmbedding(nn.Embedding):
    def __init__(self, base: nn.Embedding, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.weight = base.weight  # shared, frozen by the caller
        self.rank, self.scale = rank, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        # A is the per-token factor, so it starts at zero (a token never seen in training keeps its base vector)
        self.lora_a = nn.Parameter(torch.zeros(rank, self.num_embeddings, device=dev, dtype=dt))
        self.lora_b = nn.Parameter(torch.empty(self.embedding_dim, rank, device=dev, dtype=dt))
        nn.init.normal_(self.lora_b, std=1.0 / math.sqrt(rank))
        self.merged = self.disabled = False

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        y = F.embedding(idx, self.weight)  # (B, T, C)
        if self.merged or self.disabled:
            return y
        return y + F.linear(F.embedding(idx, self.lora_a.t()), self.lora_b) * self.scale  # (B, T, r) -> (B, T, C)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the table: W += scale * A^T B^T, shape (vocab, dim)."""
        if not self.merged:
            self.weight += (self.lora_a.t() @ self.lora_b.t()) * self.scale
            self.merged = True


LORA_MODULES = (LoRALinear, LoRAEmbedding)


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float) -> list[str]:
    """Wrap every linear layer whose name ends with one of `targets`; freeze all base parameters.

    Returns the wrapped names. A target that matches nothing is an error that names it, and so is `wte` on a model
    whose output head shares the embedding (the adapter would change the head only once merged).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    head = getattr(model, "lm_head", None)
    wrapped, hits = [], {t: 0 for t in targets}
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Embedding)) or isinstance(module, LORA_MODULES):
            continue
        matched = [t for t in targets if name == t or name.endswith("." + t)]
        if not matched:
            continue
        for t in matched:
            hits[t] += 1
        if isinstance(module, nn.Embedding):
            if head is not None and head.weight is module.weight:
                raise LlmctlError(f"finetune.lora_targets: {name} is tied to the output head (model.tie_embeddings), "
                                  "so an adapter on it would change the head only after merging; "
                                  f"remove {name} from the targets")
            wrapper: nn.Module = LoRAEmbedding(module, rank, alpha)
        else:
            wrapper = LoRALinear(module, rank, alpha, dropout)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper)
        wrapped.append(name)
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise LlmctlError(
            f"finetune.lora_targets: {', '.join(missing)} matches no layer of the model "
            f"(choose from {', '.join(TARGETS)})"
        )
    return wrapped


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Within the block, `model` computes as its base: every adapter is skipped (no copy of any weight is made).
    DPO's reference under LoRA. A merged adapter cannot be switched off: an error."""
    mods = [m for m in model.modules() if isinstance(m, LORA_MODULES)]
    if any(m.merged for m in mods):
        raise LlmctlError("the model's adapters are merged into its weights, so its base cannot be recovered by "
                          "switching them off")
    for m in mods:
        m.disabled = True
    try:
        yield
    finally:
        for m in mods:
            m.disabled = False


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by their full names."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and turn the wrappers back into plain layers."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LORA_MODULES):
            module.merge()
            # built on the meta device, then given the merged tensors: no second copy of the weights is allocated
            if isinstance(module, LoRALinear):
                plain: nn.Module = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                             device="meta")
                plain.weight, plain.bias = module.weight, module.bias
            else:
                plain = nn.Embedding(module.num_embeddings, module.embedding_dim, device="meta")
                plain.weight = module.weight
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model
