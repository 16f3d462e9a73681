"""See before you spend: parameter counts, FLOPs, memory and time estimates, and the dry-run report (the
device's peak FLOP/s and MFU come from `llmctl.hardware`).

Everything here reads a built model and config; nothing trains for real or writes a run directory. The memory
model counts what PyTorch keeps alive during a training step of this Transformer (docs/runs.md#dry-run lists the
terms); `dry_run` assembles the full report of `llmctl pretrain|finetune --dry-run`, including a few timed steps
whose effects (weights, optimizer state, RNG) are discarded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
import torch.nn as nn

from . import hardware
from .config import Config, ModelConfig
from .data import eval_blocks
from .distributed import DistContext, tensor_parallel
from .errors import LlmctlError
from .evaluate import lm_metrics
from .lora import LoRALinear
from .model import attention_dtype
from .optim import build_optimizer
from .qlora import dequant_bytes, is_nf4, stored_bytes
from .tasks import Task
from .tokenizer import Tokenizer
from .train import Hooks, LoopState, fit, rng_state, set_rng_state

PARTS = ("embeddings", "attention", "mlp", "norms", "head")


# ------------------------------------------------------------------------------------------------------------------
# Parameters and FLOPs


def _part(name: str) -> str:
    name = name.removeprefix("backbone.")  # a task head wraps the Transformer (heads.Classifier)
    if name.startswith(("wte.", "wpe.")):
        return "embeddings"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if name.startswith(("lm_head.", "head.")):
        return "head"
    if "norm" in name:
        return "norms"
    return "other"


def param_counts(model: nn.Module) -> dict:
    """Parameters by part, each counted once: a head tied to the embedding counts under embeddings (head 0)."""
    counts = dict.fromkeys(PARTS, 0)
    trainable = 0
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        part = _part(name)
        counts[part] = counts.get(part, 0) + p.numel()
        trainable += p.numel() if p.requires_grad else 0
    counts["total"] = sum(counts.values())
    counts["trainable"] = trainable
    counts["head_tied"] = bool(getattr(getattr(model, "cfg", None), "tied", False))
    return counts


def matmul_weights(model: nn.Module) -> int:
    """Elements of every Linear weight as used in matmuls (a tied head counts: it is a matmul too)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(model: nn.Module, cfg: ModelConfig, seq_len: Optional[int] = None) -> dict:
    """Forward and training (forward + backward = 3x forward) FLOPs per token.

    Forward: 2 FLOPs per multiply-add of every Linear weight, plus attention scores and values, 2 * 2 * T * d per
    layer for a context of T tokens and attention width d (the full T x T product, not the causal half; the
    convention of the PaLM paper's MFU, so figures compare with published ones).
    """
    T = seq_len or cfg.block_size
    forward = 2 * matmul_weights(model) + 4 * cfg.n_layer * T * cfg.n_head * cfg.head_size
    return {"forward": int(forward), "train": int(3 * forward)}


def task_flops(task: Any, cfg: Config) -> dict:
    """FLOPs per trained token of a task: the trained model's, plus a distillation teacher's forward pass, or DPO's
    and GRPO's reference (the same model) forward (GRPO's generation is not counted)."""
    module = getattr(task.module, "_orig_mod", task.module)
    flops = flops_per_token(module, cfg.model)
    if cfg.train.objective == "mlm":  # the head runs on the masked positions alone (llmctl.mlm.mlm_loss)
        head = 2 * sum(m.weight.numel() for name, m in module.named_modules()
                       if isinstance(m, nn.Linear) and name.startswith(("lm_head", "mlm")))
        skipped = int(head * (1 - cfg.train.mask_rate))
        flops = {"forward": flops["forward"] - skipped, "train": flops["train"] - 3 * skipped}
    if getattr(task, "kind", None) in ("dpo", "grpo"):
        flops = {**flops, "forward": 2 * flops["forward"], "train": flops["train"] + flops["forward"]}
    teacher = getattr(task, "teacher", None)
    if teacher is not None:
        extra = flops_per_token(teacher, teacher.cfg, cfg.model.block_size)["forward"]
        flops = {"forward": flops["forward"] + extra, "train": flops["train"] + extra, "teacher_forward": extra}
    return flops


# ------------------------------------------------------------------------------------------------------------------
# Memory


def teacher_bytes(teacher: nn.Module, cfg: Config, amp: Optional[torch.dtype]) -> int:
    """A distillation teacher per device: its weights (and their autocast copies) and, while it runs, one block's
    activations and its float32 logits and log-probabilities (no gradient, so nothing is kept for backward)."""
    weights = sum(p.numel() * p.element_size() for p in teacher.parameters())
    weights += sum(m.weight.numel() * _size(amp) for m in teacher.modules() if isinstance(m, nn.Linear)) if amp else 0
    tc, tokens = teacher.cfg, cfg.train.batch_size * cfg.model.block_size
    transient = tokens * (4 * tc.n_embd * 4 + 4 * tc.hidden + 3 * 4 * (tc.vocab_size or 0))
    return int(weights + transient)


def _size(dtype: Optional[torch.dtype]) -> int:
    return 4 if dtype is None else torch.empty((), dtype=dtype).element_size()


@dataclasses.dataclass(frozen=True)
class Trained:
    """What of the model trains, as far as the activation model cares (the defaults: everything, as in pretraining).
    A frozen part needs no saved input for its own gradient."""

    gains: bool = True  # the norms' gains (RMSNorm keeps its normalised output for their gradient)
    head: bool = True  # the output head (its input is kept for its gradient)
    embeddings: bool = True  # the token embedding (frozen: the first norm's input needs no gradient)
    adapter_rank: int = 0  # LoRA ranks summed over one block's adapted linears (each keeps its (r) intermediate)


def trained(model: nn.Module) -> Trained:
    """What of `model` (a Transformer, or a task head around one) trains: everything, LoRA or QLoRA, frozen parts."""
    bb = model if hasattr(model, "blocks") else model.backbone
    rank = sum(m.lora_a.shape[0] for m in bb.blocks[0].modules() if isinstance(m, LoRALinear)) if bb.blocks else 0
    gains = [p.requires_grad for name, p in bb.named_parameters() if "norm" in name]
    return Trained(gains=any(gains) or not gains, head=bb.lm_head.weight.requires_grad or bb is not model,
                   embeddings=bb.wte.weight.requires_grad or hasattr(bb.wte, "lora_a"), adapter_rank=rank)


def activation_bytes(cfg: ModelConfig, batch: int, seq: int, device_type: str, amp: Optional[torch.dtype],
                     tp: int = 1, parts: Trained = Trained(), head_share: float = 1.0) -> dict:
    """Bytes of the tensors autograd keeps for the backward pass of one micro-batch, per term.

    The residual stream and the norms run in float32; under autocast the inputs of every Linear are saved as
    `amp` copies; attention runs in `attention_dtype` (fp32 for bf16 training on CPU) and keeps q, k, v,
    its output and the log-sum-exp; the loss keeps float32 log-probabilities. `checkpointed` is the same with
    per-block activation checkpointing: every block's input, one block recomputed at a time, and the head.
    Under tensor parallelism (`tp` ranks per group) each rank keeps its heads' and channels' share of the attention
    and MLP internals; the residual stream, the norms and the head stay whole. Under LoRA (`parts`: frozen gains,
    head and embedding) the norms keep only their input, the head's input is not kept, each adapter keeps its rank-r
    intermediate, and the first norm keeps nothing (its input needs no gradient). `head_share`: the fraction of
    positions the head runs on (masked-language modelling's mask rate: `Transformer.forward(only=)`).
    """
    p = _size(amp)  # bytes of a matmul input under autocast (4 without)
    s = _size(attention_dtype(device_type, amp or torch.float32, seq, training=True))
    C, H, V, L = cfg.n_embd, cfg.hidden, cfg.vocab_size or 0, cfg.n_layer
    qd, kvd = cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size
    rms = cfg.arch == "llama"
    dropout = cfg.dropout
    # fp32 input (+ fp32 normalised output kept for the gain's gradient in RMSNorm)
    norm = 4 * C * (2 if rms and parts.gains else 1)
    if dropout > 0 and device_type != "cuda":
        # attention with dropout takes the math path here: float32 q, k, v and three (T, T) tensors per head
        # (probabilities, dropout mask, dropped probabilities), 12 bytes per score; in float32 its output is
        # copied once more on the way to the projection
        core = 4 * (qd + 2 * kvd) + 12 * cfg.n_head * seq + (4 * qd if p == 4 else 0)
    else:
        # flash / memory-efficient attention keeps q, k, v, its output and the log-sum-exp. When it runs in the
        # matmul dtype, q, k, v are views of the fused qkv output (whose whole storage stays alive) and RoPE adds
        # fresh q and k; otherwise they are upcast copies
        if s != p:
            core = s * (qd + 2 * kvd)
        else:
            core = p * (qd + 2 * kvd) + (p * (qd + kvd) if cfg.arch == "llama" else 0)
        core += s * qd + 4 * cfg.n_head
    attn = p * C + (core + (p * qd if (s != p or dropout > 0) else 0)) / tp  # qkv input, attention, proj input
    masks = 2 * p * C if dropout > 0 else 0  # residual dropout masks, in the dtype of what they drop
    mlp = p * C + (4 * p * H if cfg.gated else 2 * p * H) / tp  # fc input, fc output (gate/up), proj input
    block = norm + attn + norm + mlp + masks + p * parts.adapter_rank  # per token
    # final norm, head input, float32 log-probabilities, input ids and targets (int64), embedding dropout mask
    head = norm + (p * C if parts.head else 0) * head_share + 4 * V * head_share + 8 + 8 + (4 * C if dropout > 0 else 0)
    first = 0 if parts.embeddings else norm  # a frozen embedding: the first block's first norm keeps nothing
    tokens = batch * seq
    full = tokens * (L * block + head - first)
    checkpointed = tokens * (L * 4 * C + block + head - first)
    return {"per_layer": int(tokens * block), "head": int(tokens * head), "full": int(full),
            "checkpointed": int(checkpointed)}


def weight_bytes(model: nn.Module, amp: Optional[torch.dtype], share: Callable[[str], float] = lambda n: 1.0) -> dict:
    """Bytes of the parameters by role: frozen (an NF4 base weight at its packed size, with its block scalers and
    their factors; buffers too), trainable (outside adapters), adapters (LoRA's A and B); the gradients and AdamW's
    two moments of what trains; and the autocast copies of matmul weights kept for the backward pass (none for an
    NF4 weight: torchao keeps the NF4 tensor and dequantizes it again), and `dequant`, the transient of dequantizing
    the largest NF4 weight (`qlora.dequant_bytes`; one is dequantized at a time). `share(name)`: the fraction one
    device holds."""
    seen: set = set()
    out = dict.fromkeys(("frozen", "trainable", "adapters", "gradients", "optimizer", "copies", "dequant"), 0.0)
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = stored_bytes(p) * share(name)
        role = ("frozen" if not p.requires_grad else "adapters" if name.endswith((".lora_a", ".lora_b"))
                else "trainable")
        out[role] += part
        out["dequant"] = max(out["dequant"], dequant_bytes(p))
        if p.requires_grad:
            out["gradients"] += part
            out["optimizer"] += 2 * part
    out["frozen"] += sum(b.numel() * b.element_size() for b in model.buffers())
    if amp is not None:
        ids: set = set()
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and id(m.weight) not in ids and not is_nf4(m.weight):
                ids.add(id(m.weight))
                out["copies"] += m.weight.numel() * _size(amp) * share(name + ".weight")
    return {k: int(v) for k, v in out.items()}


def batch_rows(cfg: Config, rows_per_example: int = 1) -> int:
    """Sequences in one micro-batch: train.batch_size examples of `rows_per_example` sequences each (a task's
    `rows_per_example`: a DPO pair is 2, a GRPO prompt its finetune.group_size completions)."""
    return cfg.train.batch_size * rows_per_example


def memory_estimate(model: nn.Module, cfg: Config, device: torch.device, amp: Optional[torch.dtype],
                    layout: Any = None, teacher: Optional[nn.Module] = None, capacity: Optional[int] = None,
                    rows_per_example: int = 1) -> dict:
    """Estimated bytes per device for one training step at `batch_rows` x model.block_size.

    `layout` (a distributed.DistContext) divides what each device holds: FSDP shards every parameter, gradient and
    AdamW moment over the data-parallel ranks; tensor parallelism splits the block matrices over its group.

    weights (`weight_bytes`: frozen, trainable, adapters), gradients, AdamW state, the autocast copies of matmul
    weights kept for the backward pass, the NF4 dequantization transient, a distillation `teacher`
    (`teacher_bytes`), and activations with and without checkpointing. `total` adds them up (gradients and
    activations are counted as if all alive at once: the backward pass frees activations while it fills gradients,
    so this is an upper bound on live tensors; the CPU allocator's retained memory often makes up the difference in
    the process's resident size); `needed` is the total under train.activation_checkpointing, `fits` whether it
    fits `capacity` (default: the device's memory).
    """
    tp = getattr(layout, "tp_size", 1)
    fsdp = getattr(layout, "dp_size", 1) if getattr(layout, "parallel", "") in ("fsdp", "fsdp_tp") else 1

    def share(name: str) -> float:  # the fraction of a parameter one device holds
        split = tp > 1 and tensor_parallel.is_split(name)
        return 1 / (fsdp * (tp if split else 1))

    w = weight_bytes(model, amp, share)
    weights = w["frozen"] + w["trainable"] + w["adapters"]
    head_share = cfg.train.mask_rate if cfg.train.objective == "mlm" else 1.0  # (llmctl.mlm.mlm_loss)
    act = activation_bytes(cfg.model, batch_rows(cfg, rows_per_example), cfg.model.block_size, device.type, amp, tp,
                           trained(model), head_share)
    extra = {"teacher": teacher_bytes(teacher, cfg, amp)} if teacher is not None else {}
    base = weights + w["gradients"] + w["optimizer"] + w["copies"] + w["dequant"] + extra.get("teacher", 0)
    checkpointing = bool(cfg.train.activation_checkpointing)
    cap = capacity if capacity is not None else device_capacity(device)
    needed = base + (act["checkpointed"] if checkpointing else act["full"])
    return {
        "weights": weights, "weights_frozen": w["frozen"], "weights_trainable": w["trainable"],
        "adapters": w["adapters"], "gradients": w["gradients"], "optimizer": w["optimizer"],
        "autocast_copies": w["copies"], "nf4_dequant": w["dequant"], **extra,
        "activations": act["full"], "activations_checkpointed": act["checkpointed"],
        "total": base + act["full"], "total_checkpointed": base + act["checkpointed"],
        "checkpointing": checkpointing, "needed": needed,
        "device_capacity": cap, "fits": None if cap is None else needed <= cap,
    }


def preflight(model: nn.Module, cfg: Config, device: torch.device, amp: Optional[torch.dtype], layout: Any = None,
              teacher: Optional[nn.Module] = None, rows_per_example: int = 1) -> None:
    """Refuse a run whose estimated memory per device (the dry run's model) exceeds the device's memory, with the
    estimate and the settings that lower it; `train.allow_oversubscribe` lets it try anyway."""
    if cfg.train.allow_oversubscribe:
        return
    mem = memory_estimate(model, cfg, device, amp, layout, teacher, rows_per_example=rows_per_example)
    need, cap = mem["needed"], mem["device_capacity"]
    if cap and need > cap:
        gib = lambda n: f"{n / 2**30:,.1f} GiB"  # noqa: E731
        raise LlmctlError(
            f"this run needs about {gib(need)} per device ({gib(mem['activations'])} of it activations of "
            f"{batch_rows(cfg, rows_per_example)} x {cfg.model.block_size} tokens; `--dry-run` itemises it) but "
            f"{device.type} has {gib(cap)}; lower model.block_size or train.batch_size, set "
            "train.activation_checkpointing=true, or --set train.allow_oversubscribe=true to try anyway")


def device_capacity(device: torch.device) -> Optional[int]:
    """Memory of the device in bytes (physical RAM on CPU), when it can be read."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, what: str = "--gpu-memory") -> int:
    """Bytes from a size such as 24GB (10^9), 80GiB (2^30), 512MB or 1e9; a bad one is an error naming `what`."""
    t = text.strip().upper().replace(" ", "")
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if u and t.endswith(u)), "")
    try:
        n = float(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        n = -1
    if not n > 0:
        raise LlmctlError(f"{what}: {text!r} is not a memory size; write e.g. 24GB, 80GiB or 512MB")
    return int(n)


# ------------------------------------------------------------------------------------------------------------------
# Time: a few real steps of the real loop, their effects discarded


@contextlib.contextmanager
def discarded(model: nn.Module):
    """Run something that trains `model`, then put back its weights, gradients, mode and every RNG."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng, was_training = rng_state(), model.training
    try:
        yield
    finally:
        with torch.no_grad():
            model.load_state_dict(weights)
        for p in model.parameters():
            p.grad = None
        set_rng_state(rng)
        model.train(was_training)


def time_steps(model: nn.Module, cfg: Config, task: Task, device: torch.device, amp: Optional[torch.dtype],
               steps: int = 5, warmup: int = 2, start_step: int = 0) -> dict:
    """Seconds per optimizer step: `warmup` untimed steps, then the median of `steps` timed ones, through `fit`
    with the task's own batches and loss.

    A fresh optimizer is used and dropped; weights and RNG are restored afterwards (`discarded`).
    """
    t = cfg.train
    n = warmup + steps
    loop_cfg = dataclasses.replace(t, max_steps=start_step + n, eval_interval=0, save_interval=0, log_interval=10**9)
    stamps: list[float] = []
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    with discarded(model):
        optimizer = build_optimizer(model, t, device.type)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = _reset_peak_rss() if device.type == "cpu" else None

        def on_step(state: LoopState) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())

        t0 = time.perf_counter()
        fit(model, optimizer, loop_cfg, Hooks(batches=task.batches, loss=task.loss, on_step=on_step),
            LoopState(step=start_step), device=device, amp_dtype=amp, scaler=scaler,
            tokens_per_step=task.tokens_per_step)
        durations = np.diff([t0, *stamps]).tolist()
        if device.type == "cuda":
            measured_peak = int(torch.cuda.max_memory_allocated(device))
        else:
            peak_rss = _proc_status("VmHWM")
            measured_peak = peak_rss - rss_before if rss_before is not None and peak_rss is not None else None
        del optimizer
    timed = durations[warmup:]
    return {
        "step_seconds": statistics.median(timed),
        "first_step_seconds": durations[0],
        "steps_timed": len(timed),
        "warmup_steps": warmup,
        "measured_peak_memory": measured_peak,
    }


def _proc_status(field: str) -> Optional[int]:
    """A byte figure from /proc/self/status (Linux), e.g. VmRSS or VmHWM (the peak resident size)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> Optional[int]:
    """Reset the process's peak resident size to the current one (Linux); returns it, or None if unsupported.

    On CPU the growth of the peak over this point, across the timed steps, is the memory the run really takes,
    allocator behaviour included (glibc's malloc keeps freed heap, so it exceeds the tensors' own total).
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status("VmRSS")


def eval_plan(n_val: int, cfg: Config, start_step: int = 0) -> dict:
    """How many evaluation passes a run makes and how many batches each has (as `fit` and `eval_blocks` do)."""
    t, T, bs = cfg.train, cfg.model.block_size, cfg.eval.batch_size
    if n_val < 2:
        return {"evals": 0, "batches": 0}
    n_full = (n_val - 1) // T
    if t.eval_batches is not None and n_full > t.eval_batches * bs:
        batches = t.eval_batches
    else:
        batches = math.ceil(n_full / bs) + (1 if (n_val - 1) % T else 0)
    if t.eval_interval:
        evals = t.max_steps // t.eval_interval - start_step // t.eval_interval
        evals += 0 if t.max_steps % t.eval_interval == 0 else 1
    else:
        evals = 1
    return {"evals": max(evals, 0), "batches": batches}


def time_eval_batch(model: nn.Module, cfg: Config, val_tokens, device: torch.device, amp: Optional[torch.dtype],
                    batches: int = 2) -> Optional[float]:
    """Seconds per validation batch (one untimed batch first)."""
    if len(val_tokens) < cfg.model.block_size + 2:
        return None
    lm_metrics(model, eval_blocks(val_tokens, cfg.model.block_size, cfg.eval.batch_size, 1), device, amp)
    t0 = time.perf_counter()
    lm_metrics(model, eval_blocks(val_tokens, cfg.model.block_size, cfg.eval.batch_size, batches), device, amp)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / batches


# ------------------------------------------------------------------------------------------------------------------
# The sample batch


def sample_batch(task: Task, tokenizer: Tokenizer, step: int = 0, labels_names: Optional[list] = None) -> dict:
    """The first sequence of the first micro-batch of `step`, as spans of text marked trained on or not.

    Token j of the input is trained on when it is the target of position j - 1 (its label is not -100); the first
    token of a sequence is context only. An encoder's (masked-LM) labels are its own positions': a trained token
    is shown as it is read ([MASK], a random token, or itself). A classification example shows its text and its
    label instead.
    """
    batch = task.batches(step)[0]
    ids = batch["input_ids"][0].tolist()
    if batch["labels"].dim() == 1:  # classification: one label per sequence
        n = int(batch["lengths"][0])
        label = int(batch["labels"][0])
        return {"step": step, "tokens": n, "trained_tokens": 0, "label": labels_names[label] if labels_names else label,
                "spans": [{"trained": False, "tokens": n, "text": tokenizer.decode(ids[:n], skip_special=False)}]}
    labels = batch["labels"][0].tolist()
    if task.backbone.cfg.causal:  # the last label is the target of a token past the input
        trained, past = [False] + [lab != -100 for lab in labels[:-1]], int(labels[-1] != -100)
    else:
        trained, past = [lab != -100 for lab in labels], 0
    spans: list[dict] = []
    for tok_id, flag in zip(ids, trained):
        if spans and spans[-1]["trained"] == flag:
            spans[-1]["ids"].append(tok_id)
        else:
            spans.append({"trained": flag, "ids": [tok_id]})
    out_spans = [{"trained": sp["trained"], "tokens": len(sp["ids"]),
                  "text": tokenizer.decode(sp["ids"], skip_special=False)}
                 for sp in spans]
    return {"step": step, "tokens": len(ids), "trained_tokens": int(sum(trained)) + past,
            "spans": out_spans}


# ------------------------------------------------------------------------------------------------------------------
# The whole dry-run report


class Plan(Protocol):
    """What the dry run reads of a training plan (llmctl.plan.TrainPlan is the one)."""

    cfg: Config
    task: Task
    tokenizer: Tokenizer
    device: torch.device
    amp: Optional[torch.dtype]
    kind: str
    grad_accum: int
    dist: DistContext

    @property
    def model(self) -> nn.Module: ...


def dry_run(plan: Plan, start_step: int = 0, timed_steps: int = 5, warmup_steps: int = 2,
            out: Optional[Path] = None, gpu_memory: Optional[int] = None) -> dict:
    """Everything `--dry-run` shows, as one JSON-ready dict. `plan` is a plan.TrainPlan (duck-typed). `gpu_memory`
    (bytes): estimate the memory for a CUDA GPU of that size (its attention's dtypes) instead of this device."""
    cfg, model, device, amp, task = plan.cfg, plan.model, plan.device, plan.amp, plan.task
    t = cfg.train
    raw = getattr(model, "_orig_mod", model)
    rows = batch_rows(cfg, task.rows_per_example)
    tokens_per_step = task.tokens_per_step or rows * plan.grad_accum * cfg.model.block_size  # padded: at most
    flops = task_flops(task, cfg)
    peak = hardware.peak_flops(device, amp, cfg.data.cache_dir)
    report: dict = {
        "kind": plan.kind,
        "out": str(out) if out is not None else None,
        "out_exists": bool(out is not None and Path(out).is_dir() and any(Path(out).iterdir())),
        "config": cfg.to_dict(),
        "device": str(device),
        "precision": "float32" if amp is None else f"{str(amp).replace('torch.', '')} autocast",
        "parameters": param_counts(raw),
        "flops_per_token": flops["train"],
        "flops_per_token_forward": flops["forward"],
        "tokens_per_step": tokens_per_step,
        "rows_per_batch": rows,
        "task": task.kind,
        **{k: v for k, v in task.sizes.items() if k != "epochs"},
        "epochs": (round((t.max_steps - start_step) * tokens_per_step / max(1, task.sizes["train_tokens"]), 3)
                   if "train_tokens" in task.sizes else task.sizes.get("epochs")),
        **({"teacher_flops_per_token": flops["teacher_forward"],
            "teacher_parameters": task.teacher.num_params()} if task.teacher is not None else {}),
        "memory": memory_estimate(raw, cfg, torch.device("cuda") if gpu_memory else device, amp, plan.dist,
                                  task.teacher, capacity=gpu_memory, rows_per_example=task.rows_per_example),
        "memory_for": f"a CUDA GPU of {gpu_memory:,} bytes (--gpu-memory)" if gpu_memory else str(device),
        "peak_flops": peak["flops"],
        "peak_flops_source": peak["source"],
    }
    report["fits"] = report["memory"]["fits"]
    try:
        timing = time_steps(model, cfg, task, device, amp, timed_steps, warmup_steps, start_step)
        if task.kind == "lm":
            per_eval_batch = time_eval_batch(task.backbone, cfg, task.val_tokens, device, amp)
            ev = eval_plan(len(task.val_tokens), cfg, start_step)
        else:  # one whole validation pass, timed
            t0 = time.perf_counter()
            task.validate(model, start_step)
            per_eval_batch, ev = time.perf_counter() - t0, {**eval_plan(2, cfg, start_step), "batches": 1}
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) and "memory" not in str(e).lower():
            raise
        report["time"] = {"error": f"out of memory during the timed steps: {str(e).splitlines()[0][:200]}"}
        report["fits"] = False if not gpu_memory else report["fits"]  # (this device ran out, not the GPU asked about)
    else:
        step_s = timing["step_seconds"]
        eval_s = (per_eval_batch or 0.0) * ev["batches"] * ev["evals"]
        steps_left = t.max_steps - start_step
        tps = tokens_per_step / step_s if step_s > 0 else None
        report["time"] = {
            **timing,
            "tokens_per_sec": tps,
            "mfu": hardware.mfu(tps, flops["train"], peak["flops"]),
            "steps": steps_left,
            "train_seconds": step_s * steps_left,
            "evals": ev["evals"],
            "eval_batches": ev["batches"],
            "eval_seconds": eval_s,
            "run_seconds": step_s * steps_left + eval_s,
        }
    report["sample"] = sample_batch(task, plan.tokenizer, start_step, task.labels)
    return report
