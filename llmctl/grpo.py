"""GRPO's arithmetic and its batches: group-relative advantages, the clipped policy-ratio loss with a KL penalty to
the reference, and the rollouts each step trains on (`Rollouts`: sampled by the `Engine`, scored by the rewards).

For a prompt's group of G completions with rewards r_1..r_G: A_i = (r_i - mean(r)) / (std(r) + 1e-4) (std with
Bessel's correction, as TRL; without the division when finetune.scale_rewards is false). Per completion token t:
  ratio = exp(log pi(t) - log pi_old(t))          (pi_old: the policy that sampled; ratio == 1 on its first update)
  loss_t = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + beta k3_t,  k3_t = exp(d) - d - 1, d = log pi_ref - log pi
and the step's loss is the sum of loss_t over every completion token of the step (all its micro-batches) divided by
their number: token-level normalisation over the batch (TRL's "bnpo"; under DDP each rank normalises by its own
tokens, the gradients then averaged).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.nn as nn

from .data import ExampleBatches, Examples, PromptRow
from .generate import Engine
from .rewards import Rewards
from .rollouts import completion_batch, derive_seed, sample, score, token_logps
from .sampling import Sampling

ADV_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards in groups of `group` consecutive completions -> (N,) advantages."""
    r = rewards.view(-1, group)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + ADV_EPS)
    return adv.flatten()


def grpo_terms(logits: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor, ref_logp: torch.Tensor,
               old_logp: Optional[torch.Tensor], clip_eps: float, beta: float, temperature: float
               ) -> dict[str, torch.Tensor]:
    """Per token (N, T), 0 outside the completions: `loss` (with gradient), `k3` and `clipped` (detached); and
    `mask`. `logits` (N, T, V), or (M, V) at the completion tokens alone (`rollouts.token_logps`). `old_logp` None:
    the sampling policy is this one (its log-probabilities, detached)."""
    logp, mask = token_logps(logits, labels, temperature)
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    a = advantages.to(ratio.dtype).unsqueeze(-1)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    per = -torch.min(ratio * a, clipped * a)
    d = ref_logp - logp
    k3 = torch.exp(d) - d - 1
    if beta:
        per = per + beta * k3
    return {"loss": per * mask, "k3": k3.detach() * mask, "mask": mask,
            "clipped": ((ratio * a > clipped * a) & mask).detach()}


class Rollouts:
    """The micro-batches of every step: the step's prompts (seeded, as every task draws examples), G completions
    each sampled by the policy as it is (one seed per completion, from train.seed, the step and its place: a resumed
    run samples the same), scored, and turned into advantages, reference log-probabilities and (with
    grpo_iterations > 1) the sampling policy's. One generation serves grpo_iterations steps; `state` / `load_state`
    carry it through a checkpoint. `metrics` reads the last step's figures."""

    def __init__(self, cfg, tok, rows: list[PromptRow], prompts: list[list[int]], train_idx, backbone: nn.Module,
                 reference: Callable[[torch.Tensor], torch.Tensor], rewards: Rewards, layout, device: torch.device):
        f, t = cfg.finetune, cfg.train
        self.cfg, self.tok, self.rows, self.prompts, self.backbone = cfg, tok, rows, prompts, backbone
        self.reference, self.rewards, self.layout, self.device = reference, rewards, layout, device
        self.G, self.iterations = f.group_size, f.grpo_iterations
        self.sampling = Sampling.from_config(cfg.generate)
        self.engine = Engine(backbone, tok, compile=False)
        self.picker = ExampleBatches(Examples(prompts, [[]] * len(prompts)), train_idx, "instruct", tok.pad_id,
                                     t.batch_size, layout.accum, t.seed, layout.rank, layout.world)
        self.current: Optional[dict] = None  # {"step": the step that generated, "micro": batches, "figures": ...}
        self.kl_sum, self.kl_n, self.clip_n, self.t_train, self.gen_seconds = 0.0, 0, 0, 0.0, 0.0

    def get(self, step: int) -> list[dict]:
        """The micro-batches of `step`: generated now every grpo_iterations steps, else the last generation's."""
        start = step - step % self.iterations
        self.gen_seconds = 0.0
        if self.current is None or self.current["step"] != start:
            t0 = time.perf_counter()
            self.current = self._generate(start)
            self.gen_seconds = time.perf_counter() - t0
        self.t_train = time.perf_counter()
        return self.current["micro"]

    def _generate(self, step: int) -> dict:
        # (accum, B) prompt indices: the generations are numbered as the steps of a run without repeats
        picked = self.picker.rows(step // self.iterations)[:, self.layout.rank]
        flat = [int(i) for i in picked.flatten()]
        seeds = [derive_seed(self.cfg.train.seed, step, self.layout.rank, n) for n in range(len(flat) * self.G)]
        completions = sample(self.engine, [self.prompts[i] for i in flat], self.sampling, self.G, seeds,
                             slots=self.cfg.generate.batch_size)
        total, each = score(self.rewards, [self.rows[i] for i in flat], completions, self.G)
        adv = group_advantages(total, self.G, self.cfg.finetune.scale_rewards)
        n_tokens = sum(len(c.ids) for c in completions)
        per_micro = len(completions) // len(picked)
        micro = [self._micro(completions[a:a + per_micro], adv[a:a + per_micro], len(picked) / n_tokens)
                 for a in range(0, len(completions), per_micro)]
        lengths = torch.tensor([len(c.ids) for c in completions], dtype=torch.float64)
        figures = {"reward": total.mean(), "reward_std": total.view(-1, self.G).std(1).mean(),
                   "completion_len": lengths.mean(), "completion_len_max": lengths.max()}
        if len(each) > 1:
            figures.update({f"reward_{name}": v.mean() for name, v in each.items()})
        return {"step": step, "micro": micro, "figures": {k: v.float() for k, v in figures.items()}}

    @torch.no_grad()
    def _micro(self, completions: list, adv: torch.Tensor, scale: float) -> dict:
        """One micro-batch: the sequences, their advantages, the reference's (and the sampling policy's)
        log-probabilities, and the factor that makes the step's loss a mean over all its completion tokens."""
        b = completion_batch(completions, self.tok.pad_id)
        x, y = b["input_ids"].to(self.device), b["labels"].to(self.device)
        temperature = self.sampling.temperature
        out = {**b, "advantages": adv.float(), "scale": torch.tensor([scale]),
               "ref_logp": token_logps(self.reference(x, only=y != -100), y, temperature)[0].cpu()}
        if self.iterations > 1:
            was = self.backbone.training
            self.backbone.eval()
            out["old_logp"] = token_logps(self.backbone(x, only=y != -100), y, temperature)[0].cpu()
            self.backbone.train(was)
        return out

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        f = self.cfg.finetune
        ids, labels = batch["input_ids"], batch["labels"]
        terms = grpo_terms(model(ids, only=labels != -100), labels, batch["advantages"], batch["ref_logp"],
                           batch.get("old_logp"), f.clip_eps, f.beta, self.sampling.temperature)
        self.kl_sum += terms["k3"].sum().item()
        self.kl_n += int(terms["mask"].sum())
        self.clip_n += int(terms["clipped"].sum())
        return terms["loss"].sum() * batch["scale"][0]

    def metrics(self) -> dict[str, torch.Tensor]:
        """The last step's figures (read once after it): its generation's rewards and lengths, the mean k3 KL over
        its tokens, the fraction of clipped tokens, and the seconds spent generating and training."""
        n = max(self.kl_n, 1)
        out = {**self.current["figures"], "kl": torch.tensor(self.kl_sum / n),
               "clip_ratio": torch.tensor(self.clip_n / n), "gen_seconds": torch.tensor(self.gen_seconds),
               "train_seconds": torch.tensor(time.perf_counter() - self.t_train)}
        self.kl_sum, self.kl_n, self.clip_n = 0.0, 0, 0
        return out

    def state(self) -> dict:
        """What a checkpoint keeps: the generation the next steps may still train on (none with one update per
        generation)."""
        return {"current": self.current} if self.iterations > 1 else {}

    def load_state(self, state: dict) -> None:
        self.current = state.get("current")
