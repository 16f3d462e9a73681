"""What a training run trains, built and checked before anything is written: `build_plan` makes the `TrainPlan`
(config, tokenizer, task with its model and data, device, precision, process layout), which is frozen from then on.

`llmctl.recipe` runs a plan in its run directory; `llmctl.estimate.dry_run` measures one instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from . import checkpoint as ckpt_io
from . import distributed, tblog
from .config import Config, from_dict
from .data import prepare as prepare_tokens
from .errors import LlmctlError
from .events import Events
from .hardware import slow_precision_warning
from .loading import build_backbone, load_model, restore, vocab_for
from .lora import merge_lora
from .model import Transformer
from .precision import resolve_amp, resolve_device
from .tasks import BUILDERS as TASKS
from .tasks import Layout, Task, count_trainable, distill_task, lm_task, make_trainable
from .tokenizer import Tokenizer
from .train import seed_everything


@dataclass(frozen=True)
class TrainPlan:
    """Everything a training run needs, built and checked before the run directory is touched; never changed
    afterwards (the modules it holds are trained, and a resumed run loads its checkpoint into them)."""

    cfg: Config
    tokenizer: Tokenizer
    task: Task
    device: torch.device
    amp: Optional[torch.dtype]
    kind: str = "pretrain"
    base: Optional[ckpt_io.Checkpoint] = None  # the checkpoint a finetune started from
    dist: distributed.DistContext = field(default_factory=distributed.DistContext)  # torchrun rank and world size
    grad_accum: int = 1  # micro-batches per step (train.grad_accum, or derived from train.global_batch_size)

    @property
    def model(self) -> torch.nn.Module:
        return self.task.module

    @property
    def method(self) -> str:
        """full, lora or qlora: what a finetune trains; a pretrain trains everything."""
        return self.cfg.finetune.method if self.kind == "finetune" else "full"


def describe(plan: TrainPlan) -> dict:
    """What the run trains and how its global batch is made up (the CLI's first two lines: views.plan_lines)."""
    cfg, t = plan.cfg, plan.cfg.train
    trainable, total = count_trainable(plan.task.module)
    # sequences per optimizer step (a TP group shares)
    global_batch = t.batch_size * plan.grad_accum * plan.dist.dp_size
    out = {
        "task": plan.task.kind,
        "method": plan.method,
        "parameters": total,
        "parameters_non_embedding": plan.task.backbone.num_params(embeddings=False),
        "trainable_parameters": trainable,
        "tokens_per_step": plan.task.tokens_per_step,
        "global_batch": global_batch,
        "batch_size": t.batch_size,
        "grad_accum": plan.grad_accum,
        "world_size": plan.dist.world_size,
        "tp_size": plan.dist.tp_size,
        "dp_size": plan.dist.dp_size,
        "parallel": plan.dist.parallel,
        **plan.task.sizes,
        "vocab_size": cfg.model.vocab_size,
        "device": str(plan.device),
        "precision": "float32" if plan.amp is None else f"{str(plan.amp).replace('torch.', '')} autocast",
    }
    if plan.task.tokens_per_step and "train_tokens" in plan.task.sizes:
        out["epochs"] = round(t.max_steps * plan.task.tokens_per_step / max(1, plan.task.sizes["train_tokens"]), 2)
    return out


def load_teacher(cfg: Config, tokenizer: Tokenizer, device: torch.device, student: str) -> Transformer:
    """finetune.teacher as a frozen language model in eval mode on `device` (an adapter merged into its base),
    refused unless it shares the student's tokenizer and reads at least the student's context."""
    where = cfg.finetune.teacher
    try:
        loaded = load_model(where, "cpu")
    except LlmctlError as e:
        raise LlmctlError(f"finetune.teacher: {e.message}") from None
    ck = loaded.ckpt
    if loaded.classifier is not None:
        raise LlmctlError(f"finetune.teacher {ck.path} is a classification checkpoint; a language-model student "
                          "learns from a language model's next-token distributions (use the checkpoint it was "
                          "finetuned from)")
    if loaded.tokenizer.sha256 != tokenizer.sha256:
        raise LlmctlError(f"the teacher {ck.path} (tokenizer sha256 {loaded.tokenizer.sha256[:12]}) and the student "
                          f"{student} (tokenizer sha256 {tokenizer.sha256[:12]}) do not share a tokenizer; "
                          "distillation compares their distributions token by token, so both need the same one")
    if loaded.cfg.model.block_size < cfg.model.block_size:
        raise LlmctlError(f"the teacher {ck.path} reads {loaded.cfg.model.block_size} tokens but the student's "
                          f"model.block_size is {cfg.model.block_size}; give the student at most the teacher's context")
    teacher = merge_lora(loaded.model).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def build_plan(cfg: Config, tokenizer: Optional[Tokenizer], kind: str, base: Optional[ckpt_io.Checkpoint] = None, *,
               events: Events) -> TrainPlan:
    """Tokenizer, data, model and task, all checked; a finetune's backbone starts from `base`'s weights. `cfg` is
    completed on the way (model.vocab_size from the tokenizer, finetune.labels from the data) and then belongs to
    the plan. `tokenizer` None: data preparation trains one (or reads the cached one)."""
    distributed.check_layout(cfg, finetune=kind == "finetune")  # (before joining: a bad layout fails at once)
    if cfg.train.activation_checkpointing is None:  # the default: on where memory is the point of the method
        cfg.train.activation_checkpointing = kind == "finetune" and cfg.finetune.method == "qlora"
    ctx = distributed.init(cfg.train, resolve_device(cfg.train.device))  # under torchrun: join the group
    device = ctx.device
    amp = resolve_amp(cfg.train.dtype, device)
    slow = slow_precision_warning(amp, device, "train.dtype")  # (auto never picks an emulated precision)
    if slow:
        events.warn(slow)
    accum = distributed.check(ctx, cfg.train, amp)
    tblog.check(cfg.train.log)
    task_kind = cfg.finetune.task if kind == "finetune" else "lm"
    td = None
    if task_kind in ("lm", "distill"):
        # under torchrun one process per node tokenizes; the others then open the cache
        td = distributed.local_rank0_first(
            ctx, lambda: prepare_tokens(cfg.data, cfg.tokenizer, tokenizer=tokenizer, events=events,
                                        encoder=cfg.train.objective == "mlm"))
        tokenizer = td.tokenizer
    elif cfg.data.path is None:
        raise LlmctlError(f"data.path is not set: finetune.task={task_kind} needs a training file")
    cfg.model.vocab_size = vocab_for(cfg, tokenizer)
    seed_everything(cfg.train.seed)
    backbone = _backbone(cfg, device, base)
    layout = Layout(ctx, accum)
    if task_kind == "lm":
        task = lm_task(cfg, td, backbone, device, amp, layout)
    elif task_kind == "distill":
        student = str(base.path) if base is not None else "(a fresh model: section)"
        task = distill_task(cfg, td, backbone, device, amp, layout, load_teacher(cfg, tokenizer, device, student))
    else:
        task = TASKS[task_kind](cfg, tokenizer, backbone, device, amp, layout)
    if task.labels is not None:
        cfg.finetune.labels = task.labels  # saved with every checkpoint: the label set is part of the model
    if kind == "finetune":
        make_trainable(task, cfg)
    for note in task.notes:
        events.log(f"note: {note}")
    # DDP / FSDP / compile wrap the module when training starts, after weights load
    return TrainPlan(cfg, tokenizer, task, device, amp, kind=kind, base=base, dist=ctx, grad_accum=accum)


def _backbone(cfg: Config, device: torch.device, base: Optional[ckpt_io.Checkpoint]) -> Transformer:
    """The model a run trains: `base`'s weights (a finetune), or a fresh initialisation from train.seed."""
    if base is not None:
        backbone = build_backbone(cfg, device)
        restore(backbone, None, base, from_dict(base.config))
        return backbone
    with torch.device(device):
        return Transformer(cfg.model)
