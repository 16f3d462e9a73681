"""The model a launch trains: the settings checked against the launch, then the wrapping (activation
checkpointing, DDP, FSDP2, tensor parallelism or FSDP x TP on a 2-D mesh, torch.compile) and its inverse.

Under tensor parallelism the ranks of one group (`train.tp_size` consecutive ranks, inside a node) hold pieces of
the same layers and work on the same micro-batch (see `tensor_parallel` for the layout).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..config import TrainConfig
from ..errors import LlmctlError
from ..qlora import check_shardable, is_nf4
from . import tensor_parallel
from .launch import DistContext, launched, tp_size

# ------------------------------------------------------------------------------------------------------------------
# Checks: the settings against this launch, before anything is built


def check(ctx: DistContext, cfg: TrainConfig, amp: Optional[torch.dtype]) -> int:
    """Check the settings against this launch; returns the number of micro-batches per step (grad_accum).

    With `train.global_batch_size` (sequences per optimizer step over all ranks), grad_accum is derived so the
    global batch is the same on 1 device or 64: global = batch_size * grad_accum * world_size.
    """
    if ctx.dtensors and amp == torch.float16:
        raise LlmctlError(f"train.parallel={ctx.parallel} does not support train.dtype=float16 (its grad scaler is "
                          "not sharded); use train.dtype=bfloat16 or float32")
    if cfg.global_batch_size is None:
        return cfg.grad_accum
    per_step = cfg.batch_size * ctx.dp_size
    if cfg.global_batch_size % per_step:
        replicas = (f"{ctx.dp_size} data-parallel replicas ({ctx.world_size} processes in tensor-parallel groups of "
                    f"{ctx.tp_size})" if ctx.tp_size > 1 else f"{ctx.world_size} processes")
        raise LlmctlError(
            f"train.global_batch_size={cfg.global_batch_size} is not a multiple of train.batch_size={cfg.batch_size} "
            f"x {replicas} = {per_step}; change one of them"
        )
    return cfg.global_batch_size // per_step

def inherited_layout(raw: dict, log: Callable[[str], None]) -> dict:
    """A checkpoint's config to continue from: its tensor-parallel layout applies only under torchrun, so one
    process continues a TP checkpoint whole (with a note) instead of refusing the layout it did not ask for."""
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    if launched() or train.get("parallel") not in ("tp", "fsdp_tp"):
        return raw
    log(f"note: the checkpoint was trained with train.parallel={train['parallel']}; one process trains it whole")
    return {**raw, "train": {**train, "parallel": "ddp", "tp_size": None}}


def check_layout(cfg, finetune: bool = False) -> None:
    """Before joining the process group: the tensor-parallel layout against this launch, the model's shape and the
    finetuning method (cfg: the whole Config). Pure: nothing is started, so a bad layout fails at once."""
    t = cfg.train
    if finetune and cfg.finetune.method == "qlora" and t.parallel in ("tp", "fsdp_tp"):
        raise LlmctlError(f"finetune.method=qlora: train.parallel={t.parallel} does not split NF4 base weights; "
                          "use train.parallel=ddp (or fsdp) under torchrun, or finetune.method=lora")
    if t.parallel not in ("tp", "fsdp_tp"):
        return
    if not launched():
        raise LlmctlError(f"train.parallel={t.parallel} splits the model over processes: launch with torchrun "
                          "(e.g. torchrun --nproc_per_node=2 -m llmctl pretrain ...), or use train.parallel=ddp")
    tp = tp_size(t, int(os.environ["WORLD_SIZE"]))
    bad = tensor_parallel.divisibility_problems(cfg.model, tp)
    if bad:
        raise LlmctlError(f"train.parallel={t.parallel}: " + "; ".join(bad) + "; change train.tp_size or the model")
    if cfg.model.qk_norm:  # one q/k-norm weight serves every head, and each rank sees only its own heads' gradient
        raise LlmctlError(f"train.parallel={t.parallel} does not sum the gradient of model.qk_norm's weights over the "
                          "ranks that split the heads; train this model with train.parallel=ddp or fsdp")
    if finetune and cfg.finetune.method == "lora":
        raise LlmctlError(f"train.parallel={t.parallel} does not shard LoRA adapters; finetune with "
                          "finetune.method=lora under train.parallel=ddp or fsdp")


# ------------------------------------------------------------------------------------------------------------------
# The model: activation checkpointing, DDP or FSDP2 and tensor parallelism, torch.compile


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each Transformer block's activations in the backward pass instead of storing them.

    torch.utils.checkpoint (non-reentrant) around each block's forward, set on the instance, so parameter names,
    the state dict and model.py stay exactly as they are. Saves memory at the cost of one more forward pass.
    """
    from torch.utils.checkpoint import checkpoint

    for block in _blocks(model):
        if getattr(block, "_llmctl_checkpointed", False):
            continue
        run = block.forward

        def forward(*args, _run=run):
            return checkpoint(_run, *args, use_reentrant=False)

        block.forward = forward
        block._llmctl_checkpointed = True


def wrap_model(model: nn.Module, cfg: TrainConfig, ctx: DistContext) -> nn.Module:
    """The module to train: activation checkpointing, then DDP or FSDP2 under torchrun, then torch.compile.

    Weights must already be loaded (FSDP shards what is there). For FSDP every block is its own unit (its
    parameters are gathered just before it runs and freed after) and the root holds the embeddings, final norm
    and head, so a tied head and embedding stay one parameter.
    """
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    if ctx.parallel in ("fsdp", "tp", "fsdp_tp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # a 2-D mesh (data-parallel, tensor-parallel) with the TP groups as consecutive ranks: inside a node
        mesh = init_device_mesh(ctx.device.type, (ctx.dp_size, ctx.tp_size), mesh_dim_names=("dp", "tp"))
        if ctx.tp_size > 1:
            tensor_parallel.parallelize(model, backbone(model).cfg, mesh["tp"])
        if ctx.parallel in ("fsdp", "fsdp_tp"):
            check_shardable(model, ctx.dp_size)  # (NF4 base weights, under QLoRA)
            for block in _blocks(model):
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
    elif ctx.parallel == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # buffers are constant RoPE tables: no need to broadcast them before every forward pass (torch >= 2.13
        # spells that forward_sync_buffers, older versions broadcast_buffers)
        quiet_buffers = ({"forward_sync_buffers": False}
                         if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                         else {"broadcast_buffers": False})
        # NF4 base weights (QLoRA) are frozen and the same on every rank (the same base, quantized the same way):
        # DDP neither broadcasts them at the start (it cannot flatten an NF4 tensor) nor reduces anything for them
        nf4 = [name for name, p in model.named_parameters() if is_nf4(p)]
        if nf4:
            DDP._set_params_and_buffers_to_ignore_for_model(model, nf4)
        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, **quiet_buffers)
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The Transformer blocks of the trained module (a Transformer, or a task head around one)."""
    return backbone(model).blocks


def backbone(model: nn.Module) -> nn.Module:
    """The Transformer of the trained module: itself, or the one a task head wraps."""
    return model if hasattr(model, "blocks") else model.backbone


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module (a Transformer, or a task head around one; for FSDP the sharded root itself) under the
    wrappers `wrap_model` adds: torch.compile and DDP."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model
