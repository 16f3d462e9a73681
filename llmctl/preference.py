"""Preference tuning's arithmetic (DPO and IPO): answers' log-probabilities under the policy and its frozen reference,
the loss on their margin, and the rewards, accuracy and KL logged with it.

A batch holds 2B sequences, the B chosen answers then the B rejected ones (llmctl.data.pad_batch, kind
"preference"), labelled on the answer tokens only. With logratio = log pi(answer) - log pi_ref(answer), summed over
the answer's tokens (averaged over them for IPO):
  sigmoid: loss = -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m),  m = logratio_chosen - logratio_rejected
  ipo:     loss = (m - 1 / (2 beta))^2
reward_chosen / reward_rejected = beta x logratio; margin = reward_chosen - reward_rejected; accuracy = margin > 0;
kl = the exact KL(pi || pi_ref) of the next-token distributions, summed over an answer's positions and averaged over
all 2B answers (the KL along the data's answers, not along sampled ones).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import adapters_off

METRICS = ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "kl")


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sequence sum of the labelled tokens' log-probabilities (N,), their count (N,), log-softmax (M, V) of the
    M labelled positions): `logits` are (N, T, V), or (M, V) those positions' alone in row-major order (what
    `Transformer.forward(only=labels != -100)` returns, so the head and the softmax skip prompts and padding). The
    log-softmax in float32, the sums in float64 (the differences of long sums are what DPO compares). Labels of
    -100 are not answer tokens."""
    mask = labels != -100  # (N, T)
    logp = F.log_softmax(_labelled(logits, mask).float(), dim=-1)  # (M, V)
    tok = logp.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)  # (M,)
    return _per_row(tok.double(), mask), mask.sum(-1), logp


def _labelled(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[mask] if logits.dim() == 3 else logits  # (M, V)


def _per_row(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(M,) values of the labelled positions, summed per sequence: (N,), in their dtype."""
    rows = mask.nonzero()[:, 0]
    return torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)


def dpo_terms(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, loss_type: str,
              beta: float, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Per pair (B,): `loss` (with gradient) and the metrics of `METRICS` (detached), from the logits of the 2B
    sequences under the policy and the reference ((2B, T, V), or (M, V) at the M labelled positions alone)."""
    pol, n, plp = answer_logps(policy_logits, labels)
    with torch.no_grad():
        ref, _, rlp = answer_logps(ref_logits, labels)
        # the KL of each labelled position summed over the vocabulary in float32, then per sequence in float64
        kl = _per_row((plp.exp() * (plp - rlp)).sum(-1).double(), labels != -100)  # (2B,)
    if loss_type == "ipo":
        pol, ref = pol / n.clamp(min=1), ref / n.clamp(min=1)
    B = labels.shape[0] // 2
    ratio = pol - ref  # (2B,)
    m = ratio[:B] - ratio[B:]
    if loss_type == "ipo":
        loss = (m - 1 / (2 * beta)) ** 2
    else:
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * m) - label_smoothing * F.logsigmoid(-beta * m)
    rewards = beta * ratio.detach()
    chosen, rejected = rewards[:B], rewards[B:]
    terms = {"loss": loss, "reward_chosen": chosen, "reward_rejected": rejected, "margin": chosen - rejected,
             "accuracy": (chosen > rejected).double(), "kl": (kl[:B] + kl[B:]) / 2}
    return {k: v.float() for k, v in terms.items()}


def frozen_reference(backbone: nn.Module, lora: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """input_ids -> the reference's logits, without gradient, in eval mode. Under LoRA (`lora`: adapters are, or
    will be, applied to `backbone`) the backbone itself with its adapters switched off (no second copy); otherwise
    a frozen copy of the weights `backbone` holds now (the starting checkpoint's)."""
    if lora:
        net, off = backbone, (lambda: adapters_off(backbone))
    else:
        net, off = copy.deepcopy(backbone).eval(), contextlib.nullcontext
        net.requires_grad_(False)
    return lambda ids, only=None: _forward(net, off, ids, only)


def _forward(net: nn.Module, off: Callable[[], ContextManager], ids: torch.Tensor, only) -> torch.Tensor:
    was = net.training
    net.eval()
    try:
        with torch.no_grad(), off():
            return net(ids, only=only)
    finally:
        net.train(was)


class StepMeans:
    """The metrics of a step's pairs, summed as micro-batches come and averaged when read (then cleared)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            v = v.detach().sum()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += len(terms["loss"])

    def read(self) -> dict[str, torch.Tensor]:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out
