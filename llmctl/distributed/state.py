"""Checkpoints in one format whatever the world size: the full state gathered on rank 0 and loaded into any layout,
and each rank's random stream.

The full model and optimizer state are gathered and written by rank 0 in the format of a single process, so any
checkpoint resumes in one process or in any world size. Each rank's RNG state is stored beside rank 0's.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import LlmctlError
from ..qlora import is_nf4
from ..train import rng_state, set_rng_state
from . import tensor_parallel
from .launch import DistContext
from .parallelize import backbone, unwrap


def _full_options(skip_frozen: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=skip_frozen)


def gather_for_save(model: nn.Module, optimizer: torch.optim.Optimizer,
                    ctx: DistContext) -> Optional[tuple[dict, dict, dict]]:
    """(weights, optimizer state, rng entries) for the checkpoint on rank 0; None on the other ranks.

    Collective: every rank must call it at the same step. The optimizer state is in the one format of a
    single-process run (`optimizer.state_dict()` of the plain model: parameters numbered in group order), and the
    rng entries are {"rng": rank 0's state} plus {"rng_ranks": [every rank's state]} when there are several ranks.
    """
    net = unwrap(model)
    if ctx.dtensors:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        # a QLoRA checkpoint holds the adapter only: its frozen NF4 base weights are never gathered (torchao's NF4
        # all-gather outside FSDP's own leaves its collectives unwaited)
        nf4 = any(is_nf4(p) for p in net.parameters())
        with _quiet_redistribute():
            weights = get_model_state_dict(net, options=_full_options(skip_frozen=nf4))
            by_name = get_optimizer_state_dict(net, optimizer, options=_full_options())
        if ctx.is_main and ctx.tp_size > 1:  # back from the interleaved rows of tensor parallelism
            cfg = backbone(net).cfg
            weights = tensor_parallel.to_checkpoint(weights, cfg, ctx.tp_size)
            by_name["state"] = tensor_parallel.to_checkpoint(by_name["state"], cfg, ctx.tp_size)
        if ctx.is_main:
            # a tied head is one parameter with two names: store it once, under the embedding's name, as a
            # single process does
            aliases = ({n for n, _ in net.named_parameters(remove_duplicate=False)}
                       - {n for n, _ in net.named_parameters()})
            weights = {k: v for k, v in weights.items() if k not in aliases}
            opt_state = _by_index(by_name)
    else:  # one process, or DDP: every rank holds the whole model and optimizer
        weights = net.state_dict() if ctx.is_main else {}
        opt_state = optimizer.state_dict() if ctx.is_main else {}
    states = [rng_state()]
    if ctx.enabled:
        gathered: Optional[list] = [None] * ctx.world_size if ctx.is_main else None
        dist.gather_object(states[0], gathered, dst=0)
        states = gathered or []
    if not ctx.is_main:
        return None
    rng = {"rng": states[0]}
    if len(states) > 1:
        rng["rng_ranks"] = states
    return weights, opt_state, rng


@contextlib.contextmanager
def _quiet_redistribute() -> Iterator[None]:
    """Gathering FSDP x TP parameters (FSDP's strided shard over TP's) takes two all-gathers, which DTensor reports
    as a warning on every rank; a checkpoint is gathered once per save, so the cost is known and the line noise."""
    import logging

    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _by_index(by_name: dict) -> dict:
    """A name-keyed full optimizer state dict -> the index-keyed format of `optimizer.state_dict()`."""
    order = [name for g in by_name["param_groups"] for name in g["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[k]: v for k, v in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, ctx: DistContext) -> None:
    """Load a checkpoint's optimizer state (the one format) into this run's optimizer, sharded or not.

    The implementation (fused, foreach or per parameter) and each group's lr_scale stay this run's: a checkpoint
    written under tensor parallelism (per parameter) resumes fused in one process, and one written fused resumes
    under TP."""
    impl = [{k: g[k] for k in ("fused", "foreach", "lr_scale") if k in g} for g in optimizer.param_groups]
    try:
        _load_optimizer_state(model, optimizer, state, ctx)
    finally:
        for group, kept in zip(optimizer.param_groups, impl):
            group.update(kept)


def _load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, ctx: DistContext) -> None:
    if not ctx.dtensors:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    net = unwrap(model)
    name_of = {id(p): n for n, p in net.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if len(saved) != len(names) or len(state["param_groups"]) != len(optimizer.param_groups):
        raise LlmctlError(f"the checkpoint's optimizer state holds {len(saved)} parameters, "
                          f"this model trains {len(names)}; "
                          "resume with the same model and trainable parameters")
    name = dict(zip(saved, names))  # saved index -> parameter name (both in group order)
    by_name = {
        "state": {name[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [name[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    if ctx.tp_size > 1:  # into the interleaved rows of tensor parallelism
        cfg = backbone(net).cfg
        by_name["state"] = tensor_parallel.from_checkpoint(by_name["state"], cfg, ctx.tp_size)
    # every rank passes the full state (all read the checkpoint); each keeps its own shard
    set_optimizer_state_dict(net, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def restore_rng(ctx: DistContext, resume_state: Optional[dict], seed: int) -> None:
    """Give each rank its RNG stream (dropout): exact on a resume with the same world size.

    A fresh run: rank 0 keeps the stream a single process would have (so 1 and N processes start alike); the
    other ranks get their own, derived from (seed, rank). On resume each rank restores its stored state; ranks the
    checkpoint has no state for (a larger world) derive one from (seed, rank, step).
    """
    if resume_state is None:
        if ctx.dp_rank:  # the ranks of a tensor-parallel group share one stream: identical dropout masks
            torch.manual_seed(_derive(seed, ctx.dp_rank))
        return
    per_rank = resume_state.get("rng_ranks") or [resume_state["rng"]]
    if ctx.rank < len(per_rank):
        set_rng_state(per_rank[ctx.rank])
    else:
        set_rng_state(resume_state["rng"])
        torch.manual_seed(_derive(seed, ctx.dp_rank, int(resume_state["loop"]["step"])))


def _derive(*parts: int) -> int:
    """A seed for torch from several integers, well mixed (numpy's SeedSequence): no two ranks or steps share one."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] % (2**63))
