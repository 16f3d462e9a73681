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
from .hardware import cpu_has_fast_bf16

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
        return MuonAdamW(roles.get("muon", []), adamw_groups, cfg, impl, newton_schulz_dtype(device_type))
    # the fused kernel is one launch for all parameters: faster on CUDA and on CPU
    return torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **impl)


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steepest slope at zero, 5 steps suffice
NS_STEPS = 5


def newton_schulz_dtype(device_type: str) -> torch.dtype:
    """bfloat16 where its matmuls are native (CUDA; CPUs with AVX-512 bf16 or AMX), as torch.optim.Muon always
    uses; float32 elsewhere: on a CPU that emulates bfloat16 the iteration ran 10x slower than in float32 (AMD EPYC,
    AVX2: 5.2 s against 0.5 s a step for the speedrun model's 16 matrices) and dominated the training step."""
    return torch.bfloat16 if device_type == "cuda" or (device_type == "cpu" and cpu_has_fast_bf16()) else torch.float32


def orthogonalise(g: torch.Tensor, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g (rows x cols), approximately (singular values in about [0.7, 1.2]):
    NS_STEPS quintic Newton-Schulz iterations in `dtype` on the short side first, after Frobenius normalisation so
    the spectral norm is at most 1. Returns `dtype`, g's shape."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(NS_STEPS):
        gram = x @ x.T  # (short, short)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the blocks' 2-D weights and AdamW on the rest, as one optimizer: one list of parameter groups
    (Muon's first, when there are such weights) and one state, so the loop, the grad scaler and checkpoints
    (`state_dict`, the house's pickle-free format) see an ordinary optimizer.

    Muon is torch.optim.Muon's update (Nesterov momentum as an average, `momentum_buffer` in the state, decoupled
    weight decay, the step scaled by sqrt(max(1, rows / cols))) with the Newton-Schulz iteration in the dtype of
    `newton_schulz_dtype`: torch's fixes bfloat16 (tests/test_optim.py checks the two agree bit for bit in
    bfloat16). It orthogonalises each parameter whole: a fused qkv weight ((n_head + 2 n_kv_head) x head_dim rows)
    and a fused gate/up weight (2 x hidden rows) are one matrix each, not three or two."""

    def __init__(self, muon_params: list, adamw_groups: list[dict], cfg: TrainConfig, impl: dict,
                 ns_dtype: torch.dtype = torch.bfloat16):
        self.ns_dtype, self.n_muon = ns_dtype, 1 if muon_params else 0
        self.adamw = torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **impl)
        # torch.optim.Muon's group keys too, so a checkpoint of this optimizer loads into torch's (and older llmctl)
        muon = ([{"params": muon_params, "lr_scale": cfg.muon_lr / cfg.lr, "lr": cfg.muon_lr,
                  "weight_decay": cfg.muon_weight_decay, "momentum": cfg.muon_momentum, "nesterov": True,
                  "ns_coefficients": NS_COEFFICIENTS, "eps": 1e-7, "ns_steps": NS_STEPS, "adjust_lr_fn": None}]
                if muon_params else [])
        super().__init__(muon + self.adamw.param_groups, {})  # the same group dicts: one view of both
        self._share()

    def _share(self) -> None:
        """Point the inner AdamW at this one's groups and state (after construction and after a load)."""
        self.adamw.param_groups = self.param_groups[self.n_muon:]
        self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups[:self.n_muon]:
            self._muon_step(group)
        self.adamw.step()
        return None

    def _muon_step(self, group: dict) -> None:
        lr, mu = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"].lerp_(p.grad, 1 - mu)
            update = orthogonalise(p.grad.lerp(buf, mu), self.ns_dtype)  # Nesterov
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))


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
