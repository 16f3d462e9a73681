"""AdamW with decay / no-decay groups, and the learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear and embedding weights) decay; vectors (biases, norm gains) do not.

    Only parameters with requires_grad are included, so frozen or LoRA-wrapped bases hold no optimizer state.
    """
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str, per_parameter: bool = False
                    ) -> torch.optim.Optimizer:
    """AdamW over `param_groups`. `per_parameter`: one update per parameter instead of one fused launch, for a
    model whose parameters mix sharded DTensors and plain tensors (tensor parallelism), which one kernel cannot take."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if per_parameter:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    # the fused kernel is one launch for all parameters: faster on CUDA and on CPU
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine (or linear) decay to `min_lr` at `max_steps`."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if step >= cfg.max_steps:
        return min_lr
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (cfg.lr - min_lr)
