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
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to min_lr after the warmup: cosine, linear, or constant (stays at lr)."""
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

        if t.patience < 0:
            p.append(f"train.patience: must not be negative (got {t.patience})")
        return p

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
