"""What a training run optimises: language modelling, classification, instruction or preference tuning, reinforcement
learning with rewards (GRPO), full or LoRA.

A `Task` bundles the module the loop trains, its batches, its loss and its evaluation. `train.fit` runs any of
them unchanged; the commands only pick which one to build.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .config import ADAPTER_METHODS, Config
from .data import (
    ExampleBatches,
    Examples,
    LMBatches,
    TokenData,
    chat_examples,
    classification_examples,
    document_starts,
    eval_batches,
    eval_blocks,
    holdout,
    instruct_examples,
    packed_tokens,
    preference_examples,
    prompt_rows,
)
from .errors import LlmctlError
from .evaluate import classification_metrics, classify, lm_logits
from .grpo import Rollouts
from .heads import Classifier
from .lora import apply_lora
from .mlm import Masking, masked_batches, masked_blocks, mlm_loss, mlm_metrics
from .model import Transformer
from .preference import StepMeans, dpo_terms, frozen_reference
from .qlora import quantize_base
from .rewards import load_rewards
from .rollouts import derive_seed, encode_prompts, measure
from .tokenizer import Tokenizer
from .train import lm_loss


@dataclass
class Layout:
    """Where this process's batches come from: its rank in the job and the micro-batches per step."""

    dist: distributed.DistContext = field(default_factory=distributed.DistContext)
    accum: int = 1

    @property
    def rank(self) -> int:
        """The data-parallel rank: the ranks of one tensor-parallel group draw the same micro-batches."""
        return self.dist.dp_rank

    @property
    def world(self) -> int:
        """Data-parallel replicas (world size / tensor-parallel size)."""
        return self.dist.dp_size


@dataclass
class Task:
    kind: str  # lm | classification | instruct
    module: nn.Module  # what the loop trains: the Transformer, or a Classifier around it
    backbone: Transformer
    batches: Callable[[int], list[dict]]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    validate: Callable[[nn.Module, int], dict]  # (the module as trained, maybe wrapped; step) -> metrics
    tokens_per_step: Optional[int]  # None: counted from the batches
    sizes: dict = field(default_factory=dict)  # what the run trains and validates on, for the start-up line
    labels: Optional[list[str]] = None
    notes: list[str] = field(default_factory=list)
    val_tokens: Any = None  # the validation token stream of a language-modelling task
    teacher: Optional[Transformer] = None  # distillation: the frozen model the student learns from
    step_metrics: Optional[Callable[[], dict]] = None  # metrics of the last step besides its loss (read once)
    state: Optional[Callable[[], dict]] = None  # what a checkpoint keeps of the task besides the loop (GRPO's rollouts)
    load_state: Optional[Callable[[dict], None]] = None  # restore `state` on resume
    # sequences each of a micro-batch's train.batch_size examples becomes: DPO 2 (its chosen and rejected answers),
    # GRPO finetune.group_size (its completions); what the dry run's memory, tokens and preflight count
    rows_per_example: int = 1


def classification_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["lengths"])  # (B, n_classes)
    return F.cross_entropy(logits.float(), batch["labels"])


def lm_task(cfg: Config, td: TokenData, backbone: Transformer, device: torch.device, amp,
            layout: Layout = Layout()) -> Task:
    """Next-token prediction on a token stream (pretraining, and finetuning with task lm)."""
    t, T = cfg.train, cfg.model.block_size
    if len(td.train) < T + 2:
        raise LlmctlError(
            f"data.path: the training split has {len(td.train)} tokens, fewer than one block of "
            f"model.block_size={T}; use more text or a smaller block_size"
        )
    starts, val_starts = document_starts(td) if cfg.data.document_mask else (None, None)
    batches = LMBatches(td.train, T, t.batch_size, layout.accum, t.seed, layout.rank, layout.world, starts=starts)
    if t.objective == "mlm":
        return mlm_task(cfg, td, backbone, device, amp, layout, batches)
    if not cfg.model.causal:
        raise LlmctlError("an encoder (model.causal=false) cannot learn next-token prediction, as it sees every "
                          "token; set train.objective=mlm")

    def validate(model: nn.Module, step: int) -> dict:
        if len(td.val) < 2:
            return {}
        blocks = lambda: eval_blocks(td.val, T, cfg.eval.batch_size, t.eval_batches, val_starts)  # noqa: E731
        return {"val_loss": distributed.sharded_lm_metrics(model, blocks, layout.dist, device, amp)["loss"]}

    return Task("lm", backbone, backbone, batches.get, lm_loss, validate,
                t.batch_size * layout.accum * T * layout.world,
                sizes={"train_tokens": len(td.train), "val_tokens": len(td.val)}, val_tokens=td.val)


def mlm_task(cfg: Config, td: TokenData, backbone: Transformer, device: torch.device, amp, layout: Layout,
             batches: LMBatches) -> Task:
    """Masked-language modelling on the same blocks (llmctl.mlm); validation: masked-token loss and accuracy on
    the validation split's blocks, masked the same way at every evaluation."""
    t, T = cfg.train, cfg.model.block_size
    masking = Masking.of(td.tokenizer, t.mask_rate)

    def validate(model: nn.Module, step: int) -> dict:
        if len(td.val) < 2:
            return {}
        # every rank measures the whole (small) validation split: identical results, collective forwards line up
        blocks = masked_blocks(eval_blocks(td.val, T, cfg.eval.batch_size, t.eval_batches), masking)
        r = mlm_metrics(distributed.unwrap(model), distributed.polled(blocks, layout.dist), device, amp)
        return {"val_loss": r["masked_loss"], "val_masked_accuracy": r["masked_accuracy"]}

    return Task("lm", backbone, backbone, masked_batches(batches.get, masking, t.seed, layout.rank), mlm_loss,
                validate, t.batch_size * layout.accum * T * layout.world,
                sizes={"train_tokens": len(td.train), "val_tokens": len(td.val)}, val_tokens=td.val)


def distill_loss(teacher: Transformer, alpha: float, temperature: float, vocab: int
                 ) -> Callable[[nn.Module, dict], torch.Tensor]:
    """alpha * T^2 * KL(teacher || student) at temperature T, plus (1 - alpha) * next-token cross-entropy; both over
    the tokenizer's `vocab` (padded embedding rows are no tokens). The teacher runs under the loop's autocast, with
    no gradient. With alpha 0 the loss and its gradient are the cross-entropy's exactly."""

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        logits = lm_logits(model, batch)  # (B, T, V)
        labels = batch["labels"]
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        with torch.no_grad():
            target = F.log_softmax(lm_logits(teacher, batch)[..., :vocab].float() / temperature, dim=-1)
        student = F.log_softmax(logits[..., :vocab].float() / temperature, dim=-1)  # (B, T, vocab)
        kl = F.kl_div(student, target, log_target=True, reduction="none").sum(-1)  # (B, T)
        keep = labels != -100
        kl = (kl * keep).sum() / keep.sum().clamp(min=1)
        return alpha * temperature ** 2 * kl + (1 - alpha) * ce

    return loss


def distill_task(cfg: Config, td: TokenData, backbone: Transformer, device: torch.device, amp,
                 layout: Layout = Layout(), teacher: Optional[Transformer] = None) -> Task:
    """Knowledge distillation on the corpus: the language-modelling task with the teacher's distributions in the
    loss; validation is the plain next-token loss, comparable with the teacher's own."""
    f = cfg.finetune
    task = lm_task(cfg, td, backbone, device, amp, layout)
    task.kind, task.teacher = "distill", teacher
    task.loss = distill_loss(teacher, f.distill_alpha, f.distill_temperature, td.tokenizer.vocab_size)
    return task


def classification_task(cfg: Config, tok: Tokenizer, backbone: Transformer, device: torch.device, amp,
                        layout: Layout = Layout()) -> Task:
    """Sequence classification; validation is a seeded held-out slice of the training file (data.val_fraction)."""
    d, t = cfg.data, cfg.train
    ex, labels = classification_examples(d.path, d, tok, cfg.model.block_size, d.text_column, d.label_column,
                                         cfg.finetune.labels, encoder=not cfg.model.causal)
    train_idx, val_idx = holdout(len(ex.ids), d.val_fraction, t.seed)
    module = Classifier(backbone, len(labels), cfg.finetune.pooling)
    batches = ExampleBatches(ex, train_idx, "classification", tok.pad_id, t.batch_size, layout.accum, t.seed,
                             layout.rank, layout.world)

    def validate(model: nn.Module, step: int) -> dict:
        if not len(val_idx):
            return {}
        idx = val_idx if t.eval_batches is None else val_idx[: t.eval_batches * cfg.eval.batch_size]
        # every rank classifies the whole (small) validation slice: identical results, and FSDP's collective
        # forward passes line up
        batches = eval_batches(ex, idx, "classification", tok.pad_id, cfg.eval.batch_size)
        rows, pred, _, loss = classify(distributed.unwrap(model), distributed.polled(batches, layout.dist), device, amp)
        m = classification_metrics(pred, [ex.targets[i] for i in rows.tolist()], labels)
        return {"val_loss": loss, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    notes = ([f"{ex.truncated} of {len(ex.ids)} texts were longer than the context and were truncated"]
             if ex.truncated else [])
    return Task("classification", module, backbone, batches.get, classification_loss, validate, None,
                sizes={"train_examples": len(train_idx), "val_examples": len(val_idx),
                       "epochs": round(batches.epochs(t.max_steps), 2)},
                labels=labels, notes=notes)


def instruct_task(cfg: Config, tok: Tokenizer, backbone: Transformer, device: torch.device, amp,
                  layout: Layout = Layout()) -> Task:
    """Instruction tuning: the loss covers response tokens, and the assistant turns of conversations, only (other
    labels are -100)."""
    d, t, T = cfg.data, cfg.train, cfg.model.block_size
    ex = instruct_examples(d.path, d, tok, T, cfg.finetune, chat=chat_examples(cfg, tok))
    train_idx, val_idx = holdout(len(ex.ids), d.val_fraction, t.seed)
    if cfg.finetune.packing:
        sub = Examples([ex.ids[i] for i in train_idx], [ex.targets[i] for i in train_idx])
        ids, labels = packed_tokens(sub, tok.eos_id)
        get = LMBatches(ids, T, t.batch_size, layout.accum, t.seed, layout.rank, layout.world, labels=labels).get
        tokens = t.batch_size * layout.accum * T * layout.world
    else:
        get = ExampleBatches(ex, train_idx, "instruct", tok.pad_id, t.batch_size, layout.accum, t.seed,
                             layout.rank, layout.world).get
        tokens = None

    def validate(model: nn.Module, step: int) -> dict:
        if not len(val_idx):
            return {}
        batches = lambda: eval_batches(ex, val_idx, "instruct", tok.pad_id, cfg.eval.batch_size)  # noqa: E731
        return {"val_loss": distributed.sharded_lm_metrics(model, batches, layout.dist, device, amp)["loss"]}

    notes = [f"{ex.truncated} examples were longer than the context and were cut"] if ex.truncated else []
    return Task("instruct", backbone, backbone, get, lm_loss, validate, tokens,
                sizes={"train_examples": len(train_idx), "val_examples": len(val_idx)}, notes=notes)


def dpo_task(cfg: Config, tok: Tokenizer, backbone: Transformer, device: torch.device, amp,
             layout: Layout = Layout()) -> Task:
    """Preference tuning (finetune.dpo_loss: DPO or IPO) against the frozen starting model (llmctl.preference):
    each step's pairs log their rewards, margin, accuracy and KL beside the loss; validation (a held-out slice,
    data.val_fraction) logs the same under val_."""
    d, t, f = cfg.data, cfg.train, cfg.finetune
    ex = preference_examples(d.path, d, tok, cfg.model.block_size, f, chat=chat_examples(cfg, tok))
    train_idx, val_idx = holdout(len(ex.ids), d.val_fraction, t.seed)
    reference = frozen_reference(backbone, f.method in ADAPTER_METHODS)
    means = StepMeans()

    def terms(model: nn.Module, batch: dict) -> dict:
        ids, labels = batch["input_ids"], batch["labels"]
        answers = labels != -100  # the head runs on the answer tokens alone: (M, V) logits
        return dpo_terms(model(ids, only=answers), reference(ids, only=answers), labels, f.dpo_loss, f.beta,
                         f.label_smoothing)

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        out = terms(model, batch)
        means.add(out)
        return out["loss"].mean()

    def validate(model: nn.Module, step: int) -> dict:
        if not len(val_idx):
            return {}
        net, val = distributed.unwrap(model).eval(), StepMeans()
        idx = val_idx if t.eval_batches is None else val_idx[: t.eval_batches * cfg.eval.batch_size]
        autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
        # every rank evaluates the whole (small) slice, as classification does
        batches = eval_batches(ex, idx, "preference", tok.pad_id, cfg.eval.batch_size)
        with torch.no_grad():
            for b in distributed.polled(batches, layout.dist):
                with autocast():
                    val.add(terms(net, {k: v.to(device) for k, v in b.items()}))
        return {f"val_{k}": v.item() for k, v in val.read().items()}

    batches = ExampleBatches(ex, train_idx, "preference", tok.pad_id, t.batch_size, layout.accum, t.seed,
                             layout.rank, layout.world)
    notes = [f"{ex.truncated} of {len(ex.ids) + ex.dropped} preference pairs were longer than the context and were "
             "cut (the prompt keeps its end, each answer its start)"] if ex.truncated else []
    if ex.dropped:
        notes.append(f"{ex.dropped} pairs were dropped: their answers were the same once cut to the context")
    return Task("dpo", backbone, backbone, batches.get, loss, validate, None,
                sizes={"train_examples": len(train_idx), "val_examples": len(val_idx),  # (pairs)
                       "epochs": round(batches.epochs(t.max_steps), 2)},
                notes=notes, step_metrics=means.read, rows_per_example=2)


def grpo_task(cfg: Config, tok: Tokenizer, backbone: Transformer, device: torch.device, amp,
              layout: Layout = Layout()) -> Task:
    """Online reinforcement learning (llmctl.grpo): each step samples finetune.group_size completions of its
    prompts with the policy, scores them with finetune.reward, and trains on their group-relative advantages;
    validation samples one completion of each held-out prompt (data.val_fraction, fixed seeds) and logs val_reward,
    val_reward_std and val_kl (the sequence-level KL to the reference)."""
    d, t, f = cfg.data, cfg.train, cfg.finetune
    if layout.dist.dtensors:
        raise LlmctlError(f"finetune.task=grpo runs on one process or under DDP (train.parallel=ddp), not "
                          f"{layout.dist.parallel}: its rollouts need the whole model on every rank")
    rewards = load_rewards(f.reward, f.reward_weights, device)
    rows = prompt_rows(d.path, d, f.prompt_field)
    prompts, cut = encode_prompts(cfg, tok, rows, cfg.generate.max_new_tokens)
    train_idx, val_idx = holdout(len(rows), d.val_fraction, t.seed)
    reference = frozen_reference(backbone, f.method in ADAPTER_METHODS)
    rollouts = Rollouts(cfg, tok, rows, prompts, train_idx, backbone, reference, rewards, layout, device)

    def validate(model: nn.Module, step: int) -> dict:
        idx = [int(i) for i in val_idx][: None if t.eval_batches is None else t.eval_batches * cfg.eval.batch_size]
        if not idx:
            return {}
        seeds = [derive_seed(t.seed, 0x7A1, i) for i in idx]  # the same samples' seeds at every validation
        m = measure(backbone, reference, rollouts.engine, [rows[i] for i in idx], [prompts[i] for i in idx],
                    rewards, rollouts.sampling, 1, seeds, cfg.generate.batch_size, cfg.eval.batch_size, tok.pad_id)
        return {"val_reward": m["reward"], "val_reward_std": m["reward_std"], "val_kl": m["kl"]}

    notes = [f"{cut} of {len(rows)} prompts were longer than the context leaves them (model.block_size less the "
             "room for an answer) and keep their end"] if cut else []
    return Task("grpo", backbone, backbone, rollouts.get, rollouts.loss, validate, None,
                sizes={"train_prompts": len(train_idx), "val_prompts": len(val_idx), "group_size": f.group_size,
                       "epochs": round(rollouts.picker.epochs(t.max_steps) / f.grpo_iterations, 2)},
                notes=notes, step_metrics=rollouts.metrics, state=rollouts.state, load_state=rollouts.load_state,
                rows_per_example=f.group_size)


BUILDERS = {"classification": classification_task, "instruct": instruct_task, "dpo": dpo_task, "grpo": grpo_task}


def make_trainable(task: Task, cfg: Config) -> list[str]:
    """Apply freezing or LoRA to the backbone; the classification head always trains. Returns LoRA-wrapped names."""
    f, bb = cfg.finetune, task.backbone
    wrapped: list[str] = []
    if f.method in ADAPTER_METHODS:
        wrapped = apply_lora(bb, f.lora_targets, f.lora_rank, f.lora_alpha, f.lora_dropout)
        if f.method == "qlora":
            quantize_base(bb)  # the frozen base linears in NF4
    else:
        if f.freeze_embeddings:
            for p in [bb.wte.weight] + ([bb.wpe.weight] if bb.wpe is not None else []):
                p.requires_grad_(False)
        for block in bb.blocks[: f.freeze_blocks]:
            for p in block.parameters():
                p.requires_grad_(False)
    for p in task.module.parameters():  # a task head is new: it always trains
        if not any(p is q for q in bb.parameters()):
            p.requires_grad_(True)
    return wrapped


def count_trainable(module: nn.Module) -> tuple[int, int]:
    seen, total, trainable = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total

