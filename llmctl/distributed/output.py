"""What each rank shows: rank 0 speaks, the others are quiet; throughput per device beside the total.

Only rank 0 prints, logs, holds the run lock and writes the run directory; the other ranks get stand-ins that
discard what they are given.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..train import NullReporter, Reporter
from .launch import DistContext, env_rank


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
