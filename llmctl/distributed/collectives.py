"""What the ranks do together while training: the loop's hooks, agreeing on a stop signal, shared evaluation.

What stays the same whatever the world size: gradients are averaged over ranks and the logged loss too
(`reduce_mean`); every rank stops (and saves) at the same step when any received a signal (`agree_signal`); the
validation loss is the one of a single process (`sharded_lm_metrics`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Iterable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from ..evaluate import lm_metrics
from ..interrupt import STOP, Stopped
from . import tensor_parallel
from .launch import DistContext
from .parallelize import unwrap

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------------------------
# Hooks for train.fit


def loop_hooks(model: nn.Module, ctx: DistContext) -> dict:
    """`no_sync`, `reduce_mean`, `sync_stop` and `clip_grads` for train.Hooks (empty for a single process)."""
    if not ctx.enabled:
        return {}
    extra: dict = {}
    no_sync: Optional[Callable[[], ContextManager]] = None
    if ctx.tp_size > 1:  # tensor-parallel gradients are DTensors beside replicated tensors: one norm over both
        extra["clip_grads"] = lambda params, max_norm: tensor_parallel.clip_grad_norm(params, max_norm, ctx.world_size)
    if ctx.parallel == "ddp":
        no_sync = _ddp(model).no_sync
    elif ctx.parallel in ("fsdp", "fsdp_tp"):
        root = unwrap(model)

        @contextlib.contextmanager
        def no_sync() -> Iterator[None]:
            # FSDP2: accumulate unsharded gradients locally; the last micro-batch reduce-scatters the sum
            root.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                root.set_requires_gradient_sync(True)

    def reduce_mean(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
        return t / ctx.world_size

    return {"no_sync": no_sync, "reduce_mean": reduce_mean, "sync_stop": lambda signum: agree_signal(ctx, signum),
            **extra}


def agree_all(ctx: DistContext, flag: bool) -> bool:
    """Whether `flag` holds on every rank (collective under torchrun): a choice each rank makes from its own
    hardware that must be the same everywhere, such as Muon's Newton-Schulz dtype on hosts with different CPUs."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def agree_signal(ctx: DistContext, signum: Optional[int]) -> Optional[int]:
    """The stop signal any rank received (collective under torchrun: every rank calls it at the same point).

    A signal may reach the ranks at different moments; all of them stop (and save) at the same point."""
    if not ctx.enabled:
        return signum
    t = torch.tensor([signum or 0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def polled(batches: Iterable[T], ctx: DistContext, every: int = 1) -> Iterator[T]:
    """`batches`, raising `interrupt.Stopped` before every `every`-th one once any rank received a signal.

    For passes that run while the training loop defers signals (validation); under torchrun every rank must
    draw the same number of items, so that the agreement lines up."""
    for i, b in enumerate(batches):
        if i % every == 0:
            signum = agree_signal(ctx, STOP.signum)
            if signum is not None:
                raise Stopped(signum)
        yield b


def sharded_lm_metrics(model: nn.Module, blocks: Callable[[], Iterable[dict]], ctx: DistContext,
                       device: torch.device, amp: Optional[torch.dtype]) -> dict:
    """evaluate.lm_metrics over `blocks()`, the batches split round-robin over the ranks and the sums combined.

    Every rank gets the same result. Under FSDP each forward pass is collective, so a rank with one batch fewer
    runs a padding batch whose labels are all ignored (-100): it adds nothing to the sums.
    """
    if not ctx.enabled:
        return lm_metrics(model, polled(blocks(), ctx), device, amp)
    net = unwrap(model)  # DDP: replicas are identical, evaluate without DDP's hooks; FSDP: the sharded root
    n = sum(1 for _ in blocks())
    dp, me = ctx.dp_size, ctx.dp_rank  # a tensor-parallel group evaluates its batches together
    if n < dp:  # too few batches to share: every rank evaluates all of them
        return lm_metrics(net, polled(blocks(), ctx), device, amp)
    per_rank = math.ceil(n / dp)

    def mine() -> Iterator[dict]:
        first, count = None, 0
        for i, b in enumerate(polled(blocks(), ctx, every=dp)):  # every rank draws all n
            if i % dp == me:
                first, count = (b if first is None else first), count + 1
                yield b
        if ctx.parallel in ("fsdp", "fsdp_tp"):
            for _ in range(per_rank - count):
                yield {**first, "labels": torch.full_like(first["labels"], -100)}  # (its segments too)

    r = lm_metrics(net, mine(), device, amp)
    sums = torch.tensor([r["loss"] * r["tokens"], float(r["tokens"])], dtype=torch.float64, device=device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    sums /= ctx.tp_size  # each tensor-parallel group summed its batches tp_size times
    total, count = sums.tolist()
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": int(count)}


def _ddp(model: nn.Module) -> nn.Module:
    """The DistributedDataParallel module under torch.compile's wrapper: it owns `no_sync`."""
    while hasattr(model, "_orig_mod"):
        model = model._orig_mod
    return model
