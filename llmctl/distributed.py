"""Scaling out with PyTorch's own engine: torchrun detection, DDP / FSDP2 wrapping, rank-0 helpers.

`llmctl pretrain` and `finetune` run unchanged in one process; under `torchrun` (RANK, WORLD_SIZE and LOCAL_RANK
in the environment) they join a process group (nccl on CUDA with the device taken from LOCAL_RANK, gloo on CPU)
and wrap the model in DistributedDataParallel, shard it with FSDP2's `fully_shard`, split its layers with tensor
parallelism (`llmctl.tensor_parallel`), or both on a 2-D mesh (`train.parallel`: ddp, fsdp, tp, fsdp_tp).

Under tensor parallelism the ranks of one group (`train.tp_size` consecutive ranks, inside a node) work on the same
micro-batch: data, RNG and validation follow the data-parallel rank (`DistContext.dp_rank`), not the rank.

What stays the same whatever the world size:
- the data: `LMBatches` draws each step's global batch from the seed and every rank takes its slice;
- the loss: gradients are averaged over ranks, the logged loss too (`reduce_mean`);
- the checkpoint: the full model and optimizer state are gathered and written by rank 0 in the one format, so any
  checkpoint resumes in one process or in any world size. Each rank's RNG state is stored beside rank 0's.

Only rank 0 prints, logs, holds the run lock and writes the run directory. A rank that dies or hangs makes the
others fail with a clear message (`peer_errors`) instead of waiting forever: collectives give up after
`train.dist_timeout` seconds, and torchrun stops the remaining workers as soon as one exits with an error.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from . import tensor_parallel
from .config import TrainConfig
from .errors import EXIT_DIVERGED, EXIT_PEER, EXIT_SIGINT, EXIT_SIGTERM, LlmctlError
from .evaluate import lm_metrics as _lm_metrics
from .interrupt import STOP, Stopped
from .train import NullReporter, Reporter, rng_state, set_rng_state

T = TypeVar("T")

# ------------------------------------------------------------------------------------------------------------------
# Launch detection and the process group


def launched() -> bool:
    """True when this process was started by torchrun (or anything that sets the same variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def env_rank() -> int:
    """This process's global rank from the environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


@dataclass
class DistContext:
    """Where this process stands in the job. The default is a single process, with nothing distributed."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    parallel: str = "none"  # none | ddp | fsdp | tp | fsdp_tp
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout: float = 300.0
    tp_size: int = 1  # ranks per tensor-parallel group (consecutive ranks); 1 without tensor parallelism

    @property
    def enabled(self) -> bool:
        return self.parallel != "none"

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the number of different micro-batches each step (world / tp_size)."""
        return self.world_size // self.tp_size

    @property
    def dp_rank(self) -> int:
        """Which micro-batch this rank works on: the ranks of one tensor-parallel group share theirs."""
        return self.rank // self.tp_size

    @property
    def dtensors(self) -> bool:
        """Parameters are DTensors (FSDP or tensor parallel): state dicts are gathered and set through DCP."""
        return self.parallel in ("fsdp", "tp", "fsdp_tp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(cfg: TrainConfig, device: torch.device) -> DistContext:
    """Join the torchrun process group (idempotent); a single-process context when not launched by torchrun.

    nccl on CUDA (this rank's GPU is LOCAL_RANK), gloo on CPU. Every collective gives up after `cfg.dist_timeout`
    seconds, so a rank that hangs cannot stall the others forever.
    """
    if not launched():
        return DistContext(device=device)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    tp = tp_size(cfg, world)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LlmctlError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "launch at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise LlmctlError(f"distributed training runs on CUDA (nccl) or CPU (gloo), not {device.type}; "
                          "set train.device=cpu")
    STOP.repeat_window = 2.0  # the terminal's Ctrl-C and torchrun's forwarded copy are one Ctrl-C
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=cfg.dist_timeout))
        except Exception as e:  # rendezvous failures: wrong address, port in use, a rank that never came up
            raise LlmctlError(
                f"rank {rank}: could not join the process group ({_first_line(e)}); check MASTER_ADDR/MASTER_PORT "
                f"and that all {world} processes start (train.dist_timeout={cfg.dist_timeout:g}s)",
                status=EXIT_PEER,
            ) from None
        atexit.register(teardown)
    return DistContext(rank, local_rank, world, cfg.parallel, device, cfg.dist_timeout, tp)


def tp_size(cfg: TrainConfig, world: int) -> int:
    """Ranks per tensor-parallel group for this launch: all of them for tp, train.tp_size for fsdp_tp."""
    if cfg.parallel not in ("tp", "fsdp_tp"):
        return 1
    tp = cfg.tp_size or (world if cfg.parallel == "tp" else None)
    if tp is None:
        raise LlmctlError("train.parallel=fsdp_tp needs train.tp_size (processes per tensor-parallel group, e.g. "
                          "the GPUs of one node); the rest of the processes is the FSDP dimension")
    if world % tp:
        raise LlmctlError(f"train.tp_size={tp} does not divide the {world} processes; launch a multiple of it, "
                          "or change train.tp_size")
    if cfg.parallel == "fsdp_tp" and tp == world:
        raise LlmctlError(f"train.parallel=fsdp_tp with train.tp_size={tp} leaves no FSDP dimension for "
                          f"{world} processes; use train.parallel=tp, or a smaller train.tp_size")
    return tp


def teardown() -> None:
    """Leave the process group (safe to call twice, and when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def finish(ctx: DistContext) -> None:
    """End of a successful run: wait for every rank (rank 0 may still be writing), then leave the group together.

    Leaving at interpreter exit while a peer is still busy can abort a gloo process ("terminate called without
    an active exception"); a barrier first makes the shutdown orderly.
    """
    if ctx.enabled and dist.is_initialized():
        barrier(ctx)
        teardown()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def local_rank0_first(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run `fn` on each node's first process, then on the others (which then find its result in the cache).

    For the token cache: one process per node tokenizes; the rest wait and then open the files. On one node that
    is exactly "rank 0 prepares"; with several nodes it works whether or not the cache directory is shared (the
    cache is written atomically, so concurrent builders cannot corrupt it).

    Tokenizing a large corpus can take longer than train.dist_timeout, so the waiting is not one long barrier:
    the preparing processes work in a thread while every rank takes part in a small all-reduce each second
    ("is anyone still preparing?"). A rank that dies meanwhile is noticed at the next one.
    """
    if not ctx.enabled:
        return fn()
    result: dict = {}
    worker = None
    if ctx.local_rank == 0:
        def run() -> None:
            try:
                result["value"] = fn()
            except BaseException as e:  # re-raised in the main thread
                result["error"] = e

        worker = threading.Thread(target=run, name="llmctl-prepare", daemon=True)
        worker.start()
    while True:
        busy = worker is not None and worker.is_alive()
        flag = torch.tensor([1 if busy else 0], device=ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            break
        if worker is not None and busy:
            worker.join(timeout=1.0)
        else:
            time.sleep(0.2)
    if worker is not None:
        if "error" in result:
            raise result["error"]
        return result["value"]
    return fn()


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


# ------------------------------------------------------------------------------------------------------------------
# The model: activation checkpointing, DDP or FSDP2, torch.compile


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
    if t.parallel not in ("tp", "fsdp_tp"):
        return
    if not launched():
        raise LlmctlError(f"train.parallel={t.parallel} splits the model over processes: launch with torchrun "
                          "(e.g. torchrun --nproc_per_node=2 -m llmctl pretrain ...), or use train.parallel=ddp")
    tp = tp_size(t, int(os.environ["WORLD_SIZE"]))
    bad = tensor_parallel.divisibility_problems(cfg.model, tp)
    if bad:
        raise LlmctlError(f"train.parallel={t.parallel}: " + "; ".join(bad) + "; change train.tp_size or the model")
    if finetune and cfg.finetune.method == "lora":
        raise LlmctlError(f"train.parallel={t.parallel} does not shard LoRA adapters; finetune with "
                          "finetune.method=lora under train.parallel=ddp or fsdp")


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
            tensor_parallel.parallelize(model, _backbone(model).cfg, mesh["tp"])
        if ctx.parallel in ("fsdp", "fsdp_tp"):
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
        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, **quiet_buffers)
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The Transformer blocks of the trained module (a Transformer, or a task head around one)."""
    return _backbone(model).blocks


def _backbone(model: nn.Module) -> nn.Module:
    return model if hasattr(model, "blocks") else model.backbone


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module (a Transformer, or a task head around one; for FSDP the sharded root itself) under the
    wrappers `wrap_model` adds: torch.compile and DDP."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def _ddp(model: nn.Module) -> nn.Module:
    while hasattr(model, "_orig_mod"):
        model = model._orig_mod
    return model


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


def lm_metrics(model: nn.Module, blocks: Callable[[], Iterable[dict]], ctx: DistContext, device: torch.device,
               amp: Optional[torch.dtype]) -> dict:
    """evaluate.lm_metrics over `blocks()`, the batches split round-robin over the ranks and the sums combined.

    Every rank gets the same result. Under FSDP each forward pass is collective, so a rank with one batch fewer
    runs a padding batch whose labels are all ignored (-100): it adds nothing to the sums.
    """
    if not ctx.enabled:
        return _lm_metrics(model, polled(blocks(), ctx), device, amp)
    net = unwrap(model)  # DDP: replicas are identical, evaluate without DDP's hooks; FSDP: the sharded root
    n = sum(1 for _ in blocks())
    dp, me = ctx.dp_size, ctx.dp_rank  # a tensor-parallel group evaluates its batches together
    if n < dp:  # too few batches to share: every rank evaluates all of them
        return _lm_metrics(net, polled(blocks(), ctx), device, amp)
    per_rank = math.ceil(n / dp)

    def mine() -> Iterator[dict]:
        first, count = None, 0
        for i, b in enumerate(polled(blocks(), ctx, every=dp)):  # every rank draws all n
            if i % dp == me:
                first, count = (b if first is None else first), count + 1
                yield b
        if ctx.parallel in ("fsdp", "fsdp_tp"):
            for _ in range(per_rank - count):
                yield {"input_ids": first["input_ids"], "labels": torch.full_like(first["labels"], -100)}

    r = _lm_metrics(net, mine(), device, amp)
    sums = torch.tensor([r["loss"] * r["tokens"], float(r["tokens"])], dtype=torch.float64, device=device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    sums /= ctx.tp_size  # each tensor-parallel group summed its batches tp_size times
    total, count = sums.tolist()
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": int(count)}


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints: gather the full state on rank 0, load it into any world size


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


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

        with _quiet_redistribute():
            weights = get_model_state_dict(net, options=_full_options())
            by_name = get_optimizer_state_dict(net, optimizer, options=_full_options())
        if ctx.is_main and ctx.tp_size > 1:  # back from the interleaved rows of tensor parallelism
            cfg = _backbone(net).cfg
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

    The implementation (fused, foreach or per parameter) stays this run's: a checkpoint written under tensor
    parallelism (per parameter) resumes fused in one process, and one written fused resumes under TP."""
    impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
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
        cfg = _backbone(net).cfg
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
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] % (2**63))


# ------------------------------------------------------------------------------------------------------------------
# Output: rank 0 speaks, the others are quiet; tokens/s per device


def rank0_only(reporter: Reporter, log: Callable[[str], None], on_plan: Optional[Callable] = None):
    """(reporter, log, on_plan) for this process: unchanged on rank 0, silent on the other ranks."""
    if env_rank() == 0:
        return reporter, log, on_plan
    return NullReporter(), (lambda message: None), None


class Discard:
    """Stands in for metrics.jsonl on ranks other than 0."""

    def __call__(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def discard(*args: Any, **kwargs: Any) -> None:
    """Stands in for a write (status.json) on ranks other than 0."""


def per_device_metrics(write: Callable[[dict], None], ctx: DistContext) -> Callable[[dict], None]:
    """Add tokens_per_sec_per_device to metrics rows (tokens_per_sec is the total over all ranks)."""
    if not ctx.enabled:
        return write

    def log_row(row: dict) -> None:
        if "tokens_per_sec" in row:
            row = {**row, "tokens_per_sec_per_device": round(row["tokens_per_sec"] / ctx.world_size, 1)}
        write(row)

    return log_row


class PerDeviceReporter:
    """A reporter that also shows tokens/s per device (the loop reports the total over all ranks)."""

    def __init__(self, inner_reporter: Reporter, world_size: int):
        self.inner, self.world = inner_reporter, world_size

    def start(self, total: int, done: int) -> None:
        self.inner.start(total, done)

    def update(self, step: int, info: dict) -> None:
        if "tokens_per_sec" in info:
            info = {**info, "tokens_per_sec_per_device": info["tokens_per_sec"] / self.world}
        self.inner.update(step, info)

    def log(self, message: str) -> None:
        self.inner.log(message)

    def stop(self) -> None:
        self.inner.stop()


def per_device_reporter(reporter: Reporter, ctx: DistContext) -> Reporter:
    return PerDeviceReporter(reporter, ctx.world_size) if ctx.enabled else reporter


def launch_prefix() -> list[str]:
    """How this process was launched, for the printed resume command: torchrun's options on one node."""
    if not launched():
        return []
    local = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    if local != os.environ["WORLD_SIZE"]:  # several nodes: each reruns its own torchrun line
        return ["torchrun", "...", "-m"]
    return ["torchrun", "--standalone", f"--nproc_per_node={local}", "-m"]


# ------------------------------------------------------------------------------------------------------------------
# Failures of other ranks


PEER_SIGNS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "nccl", "gloo",
              "socket", "peer", "recvbytes", "sendbytes", "watchdog")


@contextlib.contextmanager
def peer_errors(ctx: Optional[DistContext] = None) -> Iterator[None]:
    """Turn a failed collective (another rank died, hung past train.dist_timeout, or the network broke) into
    one clear line with exit status 4; on ranks other than 0 every error message names the rank."""
    if not launched():
        yield
        return
    rank, world = env_rank(), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        yield
    except LlmctlError as e:
        if rank and e.status in (EXIT_DIVERGED, EXIT_SIGINT, EXIT_SIGTERM):
            raise SystemExit(e.status) from None  # every rank agrees on these; rank 0 reports them
        if rank and not e.message.startswith("rank "):
            e.message = f"rank {rank}: {e.message}"
        raise
    except Exception as e:
        text = str(e).lower()
        if not (isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(s in text for s in PEER_SIGNS))):
            raise
        timeout = ctx.timeout if ctx else None
        with contextlib.suppress(ValueError):  # (not in the main thread)
            # torchrun is about to send SIGTERM to the ranks still alive: finish reporting this first
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise LlmctlError(
            f"rank {rank} of {world}: lost contact with the other ranks ({_first_line(e)}). Another rank failed, was "
            "killed or stopped responding: its own error line, or torchrun's summary, names it"
            + (f"; a rank that hangs is given up on after train.dist_timeout={timeout:g}s" if timeout else ""),
            status=EXIT_PEER,
        ) from None


def _first_line(e: BaseException) -> str:
    """The gist of a backend error: its first sentence, without a source-location prefix."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    line = re.sub(r"^\[[^\]]*\.(cpp|cc|h|hpp|py):\d+\]\s*", "", line)
    return line.split(". ")[0].rstrip(".")[:300]
