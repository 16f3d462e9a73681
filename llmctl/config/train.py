"""The `train:` section: the loop, its optimizer and schedule, precision, checkpoints and scaling out
(docs/pretraining.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .bounds import at_least, not_negative
from .whole import Whole


@dataclass
class TrainConfig:
    """The training loop: optimizer, schedule, precision, logging and checkpoints."""

    objective: Literal["clm", "mlm"] = "clm"
    """What language modelling learns: the next token (clm, decoders), or masked tokens from both sides (mlm: BERT's
    masked-language modelling, for encoders, model.causal=false; docs/encoders.md)."""
    mask_rate: float = 0.15
    """mlm: the share of tokens predicted; of those, 80% are replaced by [MASK], 10% by a random token, 10% kept."""
    batch_size: int = 12
    """Sequences per micro-batch on each device."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (derived instead when global_batch_size is set)."""
    max_steps: int = 2000
    """Optimizer steps of the run."""
    lr: float = 1e-3
    """Peak learning rate of AdamW, reached after the warmup."""
    min_lr: Optional[float] = None
    """Learning rate at the end of the decay; null: lr / 10."""
    warmup_steps: int = 100
    """Steps of linear warmup from near zero to lr; 0: no warmup."""
    lr_schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """Decay from lr to min_lr after the warmup: cosine, linear, constant (stays at lr), or wsd (warmup-stable-decay:
    lr until the last decay_steps of the run, then decay_shape down to min_lr)."""
    decay_steps: Optional[int] = None
    """wsd: steps of the final decay, which starts at max_steps - decay_steps; null: decay_fraction of max_steps.
    A stable-phase checkpoint at step S cools down with --resume-from it and max_steps = S + decay_steps."""
    decay_fraction: float = 0.2
    """wsd: the decay's share of max_steps when decay_steps is null."""
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"
    """wsd: how the decay falls from lr to min_lr: linear, cosine (half a period), or sqrt (1 - sqrt(progress))."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw: AdamW on every parameter; muon: Muon (torch.optim.Muon's update) on the blocks' 2-D weight matrices
    (each fused qkv and gate/up matrix orthogonalised whole), AdamW on embeddings, head, norms and biases."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (train.optimizer=muon), scaled by the schedule like lr; Muon further scales each
    matrix's step by sqrt(max(1, rows / columns))."""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum."""
    muon_weight_decay: float = 0.0
    """Muon's decoupled weight decay (multiplied by its learning rate each step, as AdamW's)."""
    embed_lr: Optional[float] = None
    """Peak learning rate of the token and position embeddings (a tied head with them); null: lr."""
    head_lr: Optional[float] = None
    """Peak learning rate of an untied output head (model.tie_embeddings=false); null: lr."""
    stop_at_loss: Optional[float] = None
    """End the run (saved, status finished) at the first validation whose val_loss is at or below this; null: never.
    Needs a validation split."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay, applied to matrices (linear and embedding weights), never to vectors."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.99
    """AdamW's second-moment decay."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0: no clipping."""
    seed: int = 1337
    """Seed of initialisation, dropout and batch order (the batches of step k depend only on seed and k)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to train; auto: CUDA if present, else MPS if present, else CPU."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Autocast precision (weights stay float32); auto: bfloat16 on CUDA and on CPUs with native bf16, else float32."""
    compile: bool = False
    """Compile the model with torch.compile before training."""
    eval_interval: int = 250
    """Steps between validation passes; 0: only at the end."""
    eval_batches: Optional[int] = None
    """Batches per validation pass; null: one full pass over the validation split."""
    log_interval: int = 10
    """Steps between log lines and metrics.jsonl rows."""
    save_interval: int = 0
    """Steps between checkpoints; 0: only the final one."""
    keep_last: int = 2
    """Step checkpoints kept (the newest ones)."""
    keep_best: bool = True
    """Also save a checkpoint at each new best best_metric and keep it (RUN/best)."""
    best_metric: str = "val_loss"
    """The evaluation metric that picks the best checkpoint and drives patience: val_loss, or for classifiers
    accuracy, macro_f1, macro_precision or macro_recall (GRPO: val_reward)."""
    best_mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower or higher best_metric is better; auto: max for accuracy, f1, precision, recall, DPO's
    val_accuracy and val_margin, and GRPO's val_reward, else min."""
    skip_nonfinite: int = 0
    """Steps with a NaN/inf loss or gradient that may be skipped before the run stops as diverged (exit 3); 0: stop
    at the first."""
    patience: int = 0
    """Early stopping: evaluations without a new best before the run stops; 0: never stop early."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all ranks, from which grad_accum is derived; null: use grad_accum."""
    parallel: Literal["ddp", "fsdp", "tp", "fsdp_tp"] = "ddp"
    """Under torchrun: replicate the model (ddp), shard it with FSDP2 (fsdp), split its layers (tp), or both on a
    2-D mesh (fsdp_tp: tensor-parallel groups of tp_size ranks, FSDP across them)."""
    tp_size: Optional[int] = None
    """Ranks per tensor-parallel group; null: all ranks for tp (fsdp_tp needs it)."""
    activation_checkpointing: Optional[bool] = None
    """Recompute each block's activations in the backward pass: less memory, more compute; null: on for
    finetune.method=qlora (whose point is memory), off otherwise."""
    dist_timeout: float = 300.0
    """Seconds a collective waits for the other ranks before failing (exit 4); only under torchrun."""
    allow_oversubscribe: bool = False
    """Start even when the memory estimate exceeds the device's memory."""
    log: list[Literal["tensorboard"]] = field(default_factory=list)
    """Extra metric sinks besides metrics.jsonl (tensorboard); empty: none."""

    def check(self, cfg: Whole) -> list[str]:
        """Impossible loop settings (adjustments of merely odd ones are `adjust`'s)."""
        t = self
        p = at_least("train", t, ["batch_size", "grad_accum", "max_steps", "log_interval"])
        p += not_negative("train", t, ["warmup_steps", "eval_interval", "save_interval", "weight_decay", "grad_clip"])
        if t.lr <= 0:
            p.append(f"train.lr: must be positive (got {t.lr})")
        if t.min_lr is not None and t.min_lr < 0:
            p.append(f"train.min_lr: must not be negative (got {t.min_lr})")
        p += not_negative("train", t, ["skip_nonfinite"])
        p += t._check_scaling()
        p += at_least("train", t, ["keep_last"])
        if t.eval_batches is not None and t.eval_batches < 1:
            p.append(f"train.eval_batches: must be at least 1, or null for a full pass (got {t.eval_batches})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(t, name) < 1.0:
                p.append(f"train.{name}: must be in [0, 1) (got {getattr(t, name)})")
        if t.eps <= 0:
            p.append(f"train.eps: must be positive (got {t.eps})")

        p += t._check_optimizer(cfg)
        if t.objective == "mlm" and cfg.model.causal:
            p.append("train.objective=mlm predicts masked tokens from both sides, which a decoder cannot see; set "
                     "model.causal=false (an encoder) or train.objective=clm")
        if not 0.0 < t.mask_rate < 1.0:
            p.append(f"train.mask_rate: must be in (0, 1) (got {t.mask_rate})")
        if t.patience < 0:
            p.append(f"train.patience: must not be negative (got {t.patience})")
        return p

    def _check_optimizer(self, cfg: Whole) -> list[str]:
        """Muon, the learning rates of the parameter groups, the WSD decay and the loss to stop at."""
        t, p = self, []
        for name in ("muon_lr", "embed_lr", "head_lr"):
            v = getattr(t, name)
            if v is not None and not v > 0:
                p.append(f"train.{name}: must be positive (got {v})")
        if not 0.0 <= t.muon_momentum < 1.0:
            p.append(f"train.muon_momentum: must be in [0, 1) (got {t.muon_momentum})")
        if t.muon_weight_decay < 0:
            p.append(f"train.muon_weight_decay: must not be negative (got {t.muon_weight_decay})")
        if t.optimizer == "muon" and t.parallel != "ddp":
            p.append(f"train.optimizer=muon with train.parallel={t.parallel}: each rank would hold only a shard of "
                     "every matrix, and Muon orthogonalises whole matrices; use train.parallel=ddp (or adamw)")
        if t.lr_schedule == "wsd":
            if t.decay_steps is not None and t.decay_steps < 1:
                p.append(f"train.decay_steps: must be at least 1, or null for decay_fraction (got {t.decay_steps})")
            elif not 0.0 < t.decay_fraction <= 1.0:
                p.append(f"train.decay_fraction: must be in (0, 1] (got {t.decay_fraction})")
            elif t.decay_len > t.max_steps:
                p.append(f"train.decay_steps: the WSD decay of {t.decay_len} steps is longer than the run's "
                         f"train.max_steps={t.max_steps}; shorten it or raise train.max_steps")
        if t.stop_at_loss is not None and cfg.data.val_fraction == 0 and cfg.data.val_path is None:
            p.append("train.stop_at_loss needs a validation split to measure; set data.val_fraction above 0 or "
                     "data.val_path")
        return p

    @property
    def decay_len(self) -> int:
        """wsd: steps of the final decay (decay_steps, else decay_fraction of max_steps, at least 1)."""
        return self.decay_steps if self.decay_steps is not None else max(1, round(self.decay_fraction * self.max_steps))

    def _check_scaling(self) -> list[str]:
        """The global batch and the parallel layout."""
        t = self
        p: list[str] = []
        if t.global_batch_size is not None:
            if t.global_batch_size < 1:
                p.append(f"train.global_batch_size: must be at least 1 (got {t.global_batch_size})")
            elif t.grad_accum != 1:
                p.append("train.global_batch_size and train.grad_accum are both set; set only one "
                         "(with global_batch_size, grad_accum = global_batch_size / (batch_size x processes))")
            elif t.batch_size >= 1 and t.global_batch_size % t.batch_size:
                p.append(f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
                         f"train.batch_size={t.batch_size}")
        if t.dist_timeout <= 0:
            p.append(f"train.dist_timeout: must be positive seconds (got {t.dist_timeout})")
        if t.tp_size is not None and t.tp_size < 1:
            p.append(f"train.tp_size: must be a positive number of processes (got {t.tp_size})")
        if t.tp_size is not None and t.tp_size > 1 and t.parallel not in ("tp", "fsdp_tp"):
            p.append(f"train.tp_size={t.tp_size} applies to train.parallel=tp or fsdp_tp, not {t.parallel}; "
                     "set one of them")
        return p

    def adjust(self) -> list[str]:
        """Odd but workable values, set to what they can only mean; one warning each."""
        t, warnings = self, []
        if t.warmup_steps > t.max_steps:
            warnings.append(f"train.warmup_steps={t.warmup_steps} is longer than train.max_steps={t.max_steps}; "
                            f"clamped to {t.max_steps}")
            t.warmup_steps = t.max_steps
        if t.min_lr is not None and t.min_lr > t.lr:
            warnings.append(f"train.min_lr={t.min_lr} is above train.lr={t.lr}; clamped to {t.lr}")
            t.min_lr = t.lr
        if t.eval_interval > t.max_steps:
            warnings.append(f"train.eval_interval={t.eval_interval} exceeds train.max_steps; "
                            "validation runs only at the end")
            t.eval_interval = 0
        return warnings
