"""Tensor parallelism (Megatron-LM's layout) through PyTorch's DTensor: `parallelize_module` on a DeviceMesh.

Inside each block, the projections that widen (`attn.qkv`, `mlp.fc`) are column-parallel and the ones that narrow
back (`attn.proj`, `mlp.proj`) row-parallel, so a block costs one all-reduce forward and one backward per
sub-layer. llmctl fuses q|k|v into one `attn.qkv` and gate|up into one `mlp.fc`; `ColwiseParallel` cuts a weight's
rows into contiguous pieces, which for the fused layouts would give rank 0 all of q and rank 1 all of v. So before
sharding the rows are put in interleaved order, [q, k, v of rank 0's heads | q, k, v of rank 1's | ...] (and
[gate | up] per rank's channels), each rank then holds `n_head / tp` query heads with their key/value groups and its
slice of gate and up, and the modules are told their local head and channel counts. Parameter names stay
`attn.qkv` / `mlp.fc`; checkpoints hold the original order (`to_checkpoint` / `from_checkpoint`).

Embeddings, norms and the head are replicated: at the sizes this tool trains, their weights are a small share of
the memory, and keeping them whole keeps tied embeddings one parameter and the loss a plain cross-entropy; a
vocabulary-parallel head and sequence-parallel norms would pay only for very large vocabularies and contexts. Their
gradients are the same on every rank of a tensor-parallel group (the column-parallel layers all-reduce their
input gradients), so they need no communication of their own.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import ModelConfig

# the layers split in every block: column-parallel where the width grows, row-parallel where it shrinks back
PLAN = {"attn.qkv": "colwise", "attn.proj": "rowwise", "mlp.fc": "colwise", "mlp.proj": "rowwise"}
FUSED = ("attn.qkv", "mlp.fc")  # column-parallel layers whose rows are interleaved before sharding


def is_split(name: str) -> bool:
    """Whether parameter `name` is sharded over a tensor-parallel group (a row-parallel bias is added whole)."""
    return any(name.endswith(f"{layer}.weight") or (kind == "colwise" and name.endswith(f"{layer}.bias"))
               for layer, kind in PLAN.items())


def divisibility_problems(cfg: ModelConfig, tp: int) -> list[str]:
    """What of the model's shape cannot be split over `tp` ranks (empty when all of it can)."""
    parts = [("model.n_head", cfg.n_head), ("model.n_kv_head", cfg.kv_heads),
             ("the MLP width (model.mlp_hidden)", cfg.hidden)]
    return [f"{name}={n} is not divisible by train.tp_size={tp}" for name, n in parts if n % tp]


def row_order(cfg: ModelConfig, name: str, tp: int) -> Optional[torch.Tensor]:
    """The row permutation that makes `name`'s contiguous shards per-rank pieces (None: rows stay as they are).

    `name` ends in attn.qkv.{weight,bias} or mlp.fc.{weight,bias}; new[i] = old[order[i]]."""
    hd = cfg.head_size
    if ".attn.qkv." in f".{name}":
        sizes = [cfg.n_head * hd, cfg.kv_heads * hd, cfg.kv_heads * hd]  # q, k, v
    elif ".mlp.fc." in f".{name}" and cfg.arch == "llama":
        sizes = [cfg.hidden, cfg.hidden]  # gate, up
    else:
        return None
    pieces = torch.arange(sum(sizes)).split(sizes)
    return torch.cat([torch.cat([p.chunk(tp)[r] for p in pieces]) for r in range(tp)])


def _reorder(state: dict, cfg: ModelConfig, tp: int, inverse: bool) -> dict:
    out = {}
    for name, value in state.items():
        order = row_order(cfg, name, tp)
        if order is not None:
            index = torch.argsort(order) if inverse else order

            def move(t):
                return t[index] if isinstance(t, torch.Tensor) and t.dim() >= 1 and len(t) == len(index) else t

            value = {k: move(v) for k, v in value.items()} if isinstance(value, dict) else move(value)
        out[name] = value
    return out


def to_checkpoint(state: dict, cfg: ModelConfig, tp: int) -> dict:
    """Full tensors gathered from a tensor-parallel model (rows interleaved) -> the checkpoint's order.

    `state` maps parameter names to tensors (weights) or to dicts of tensors (an optimizer's per-parameter state:
    its moments have the parameter's shape and are reordered alike; the step count is not)."""
    return _reorder(state, cfg, tp, inverse=True)


def from_checkpoint(state: dict, cfg: ModelConfig, tp: int) -> dict:
    """The checkpoint's order -> the interleaved rows a tensor-parallel model holds (see `to_checkpoint`)."""
    return _reorder(state, cfg, tp, inverse=False)


def parallelize(model: nn.Module, cfg: ModelConfig, tp_mesh) -> None:
    """Shard every block of `model` (a Transformer, or a task head around one) over `tp_mesh`, in place."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    blocks = model.blocks if hasattr(model, "blocks") else model.backbone.blocks
    for i, block in enumerate(blocks):
        with torch.no_grad():
            for name in FUSED:
                layer = block.get_submodule(name)
                for pname, p in layer.named_parameters():
                    order = row_order(cfg, f"blocks.{i}.{name}.{pname}", tp)
                    if order is not None:
                        p.copy_(p[order])
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        parallelize_module(block, tp_mesh, {name: styles[kind]() for name, kind in PLAN.items()})
        # each rank computes its own heads and channels: the modules split their local outputs accordingly
        block.attn.n_head //= tp
        block.attn.n_kv_head //= tp
        block.mlp.hidden //= tp


def _distinct_shards(p: torch.Tensor) -> int:
    """How many different pieces of `p` exist over the whole job (1 for a tensor every rank holds whole)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return 1
    # Shard, and the _StridedShard FSDP puts over a tensor-parallel one (not a Shard subclass in torch 2.13)
    return math.prod(p.device_mesh.size(d) for d, pl in enumerate(p.placements)
                     if pl.is_shard() or type(pl).__name__ == "_StridedShard")


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, world_size: int) -> torch.Tensor:
    """The global gradient norm over a mix of sharded DTensors and replicated tensors, clipped to `max_norm` (> 0).

    torch's clip_grad_norm_ needs all gradients on one mesh; here each rank sums the squares of what it holds,
    weighted by how many ranks hold the same piece, and one all-reduce over the job gives the total."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    local = None
    for g in grads:
        part = g.to_local() if hasattr(g, "to_local") else g
        sq = part.detach().float().pow(2).sum() * (_distinct_shards(g) / world_size)
        local = sq if local is None else local + sq
    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    total = local.sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.item())
    return total
