"""Joining the job torchrun started: where this process stands, the process group, and failures of other ranks.

`launched` and `env_rank` read torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK); `init` joins the process group
(nccl on CUDA with the device taken from LOCAL_RANK, gloo on CPU) and returns the `DistContext` every other part
of the package takes. A rank that dies or hangs makes the others fail with a clear message (`peer_errors`) instead
of waiting forever: collectives give up after `train.dist_timeout` seconds, and torchrun stops the remaining
workers as soon as one exits with an error.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..errors import EXIT_DIVERGED, EXIT_PEER, EXIT_SIGINT, EXIT_SIGTERM, LlmctlError
from ..interrupt import STOP

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------------------------
# Launch detection and the process group


def launched() -> bool:
    """True when this process was started by torchrun (or anything that sets the same variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def env_rank() -> int:
    """This process's global rank from the environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def launch_prefix() -> list[str]:
    """How this process was launched, for the printed resume command: torchrun's options on one node."""
    if not launched():
        return []
    local = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    if local != os.environ["WORLD_SIZE"]:  # several nodes: each reruns its own torchrun line
        return ["torchrun", "...", "-m"]
    return ["torchrun", "--standalone", f"--nproc_per_node={local}", "-m"]


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
