"""The optimizer (AdamW, or Muon for the blocks' matrices with AdamW for the rest) with its parameter groups, and
the learning-rate schedule as a pure function of the step.

Every group's peak learning rate is `train.lr` times its `lr_scale` (muon_lr / lr, embed_lr / lr, head_lr / lr):
the loop sets `lr_at(step) * lr_scale` before each step, so one schedule drives every group.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

import torch
import torch.nn as nn

from .config import TrainConfig
from .errors import LlmctlError

EMBEDDINGS = ("wte.weight", "wpe.weight")  # (a tied head is the token embedding)
HEAD = "lm_head.weight"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear and embedding weights) decay; vectors (biases, norm gains) do not.

    Only parameters with requires_grad are included, so frozen or LoRA-wrapped bases hold no optimizer state.
    """
    decay, no_decay = [], []
    for _, p in _trainable(model):
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter, each once (a tied weight under its first name)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _role(name: str, p: nn.Parameter, cfg: TrainConfig) -> str:
    """Which group a parameter trains in: muon (a block's 2-D weight, with train.optimizer=muon), embed (with
    train.embed_lr), head (an untied head, with train.head_lr), decay (other matrices) or no_decay (vectors). Names
    may carry a wrapper's prefix (module., _orig_mod.). Without those settings the groups are AdamW's two of old,
    in the same order, so earlier checkpoints resume."""
    if cfg.embed_lr is not None and name.endswith(EMBEDDINGS):
        return "embed"
    if cfg.head_lr is not None and name.endswith(HEAD):
        return "head"
    if cfg.optimizer == "muon" and p.dim() == 2 and "blocks." in name:
        return "muon"
    return "decay" if p.dim() >= 2 else "no_decay"


def role_groups(model: nn.Module, cfg: TrainConfig) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters by role (see `_role`), roles without parameters left out."""
    roles: dict[str, list] = defaultdict(list)
    for name, p in _trainable(model):
        roles[_role(name, p, cfg)].append(p)
    return dict(roles)


def _adamw_groups(roles: dict[str, list], cfg: TrainConfig) -> list[dict]:
    scale = {"embed": (cfg.embed_lr or cfg.lr) / cfg.lr, "head": (cfg.head_lr or cfg.lr) / cfg.lr}
    return [{"params": roles[r], "weight_decay": 0.0 if r == "no_decay" else cfg.weight_decay,
             "lr": cfg.lr * scale.get(r, 1.0), "lr_scale": scale.get(r, 1.0)}
            for r in ("embed", "head", "decay", "no_decay") if r in roles]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str, per_parameter: bool = False
                    ) -> torch.optim.Optimizer:
    """AdamW over the groups by role (embeddings, head, other matrices with weight decay, vectors without), or with
    train.optimizer=muon, `MuonAdamW`. `per_parameter`: one update per parameter instead of one fused launch, for
    a model whose parameters mix sharded DTensors and plain tensors (tensor parallelism), which one kernel cannot
    take."""
    roles = role_groups(model, cfg)
    if not roles:
        raise ValueError("the model has no trainable parameters")
    impl = {"foreach": False} if per_parameter else {"fused": device_type in ("cuda", "cpu")}
    adamw_groups = _adamw_groups(roles, cfg)
    if cfg.optimizer == "muon":
        return MuonAdamW(roles.get("muon", []), adamw_groups, cfg, impl)
    # the fused kernel is one launch for all parameters: faster on CUDA and on CPU
    return torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **impl)


def muon_class() -> type:
    """torch.optim.Muon, or the one-line error of a torch without it."""
    cls = getattr(torch.optim, "Muon", None)
    if cls is None:
        raise LlmctlError(f"train.optimizer=muon needs torch.optim.Muon (torch 2.9 or newer); this torch is "
                          f"{torch.__version__}: upgrade torch or use train.optimizer=adamw")
    return cls


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the blocks' 2-D weights and AdamW on the rest, as one optimizer: one list of parameter
    groups (Muon's first) and one state, so the loop, the grad scaler and checkpoints (`state_dict`, the house's
    pickle-free format) see an ordinary optimizer.

    Muon orthogonalises each parameter whole: a fused qkv weight ((n_head + 2 n_kv_head) x head_dim rows) and a
    fused gate/up weight (2 x hidden rows) are one matrix each, not three or two."""

    def __init__(self, muon_params: list, adamw_groups: list[dict], cfg: TrainConfig, impl: dict):
        scale = cfg.muon_lr / cfg.lr
        self.muon = (muon_class()([{"params": muon_params, "lr_scale": scale}], lr=cfg.muon_lr,
                                  weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum, nesterov=True)
                     if muon_params else None)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **impl)
        inner = (self.muon.param_groups if self.muon else []) + self.adamw.param_groups
        super().__init__(inner, {})  # the same group dicts: one view of both
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this one's groups and state (after construction and after a load)."""
        k = len(self.muon.param_groups) if self.muon else 0
        if self.muon:
            self.muon.param_groups, self.muon.state = self.param_groups[:k], self.state
        self.adamw.param_groups, self.adamw.state = self.param_groups[k:], self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        if self.muon:
            self.muon.step()
        self.adamw.step()
        return None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The base learning rate of optimizer step `step` (0-based): linear warmup over `warmup_steps`, then cosine or
    linear decay to `min_lr` at `max_steps`, a constant lr, or WSD (lr until the last `decay_len` steps, then
    `decay_shape` down to min_lr)."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if step >= cfg.max_steps:
        return min_lr
    if cfg.lr_schedule == "wsd":
        start = cfg.max_steps - cfg.decay_len
        if step < start:
            return cfg.lr
        ratio, shape = (step - start) / cfg.decay_len, cfg.decay_shape
    else:
        ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        shape = cfg.lr_schedule
    if shape == "linear":
        coeff = 1.0 - ratio
    elif shape == "sqrt":
        coeff = 1.0 - math.sqrt(ratio)
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (cfg.lr - min_lr)


def check_continuation(step: int, cfg: TrainConfig, trained: Optional[TrainConfig]) -> None:
    """A run that continues a checkpoint at `step` (trained under `trained`, its own config) must not move a WSD
    decay's start before that step: the steps up to it were trained at the stable lr, which a schedule already
    decaying there contradicts. An interrupted run resumed with its own schedule passes (the two agree there)."""
    if cfg.lr_schedule != "wsd" or step == 0:
        return
    start = cfg.max_steps - cfg.decay_len
    if step <= start or (trained is not None and math.isclose(lr_at(step - 1, cfg), lr_at(step - 1, trained))):
        return
    raise LlmctlError(f"train.decay_steps: the WSD decay of {cfg.decay_len} steps is longer than the "
                      f"{max(cfg.max_steps - step, 0)} steps left after the checkpoint at step {step}; raise "
                      f"train.max_steps to {step + cfg.decay_len} or shorten train.decay_steps")
