"""What each rank shows: rank 0 speaks, the others are quiet; throughput per device beside the total.

Only rank 0 reports, holds the run lock and writes the run directory; the other ranks get stand-ins that discard
what they are given.
"""

from __future__ import annotations

from typing import Any, Callable

from ..events import SILENT, Events, with_fields
from .launch import DistContext, env_rank


def speaks() -> bool:
    """Whether this process reports to the user: rank 0 (or the one process when not launched by torchrun)."""
    return env_rank() == 0


def rank0_only(events: Events) -> Events:
    """The events of this process: `events` on rank 0, silent on the other ranks (rank 0 speaks for all)."""
    return events if speaks() else SILENT


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


def per_device_events(events: Events, ctx: DistContext) -> Events:
    """Add tokens_per_sec_per_device to the training progress (the loop reports the total over all ranks)."""
    if not ctx.enabled:
        return events
    world = ctx.world_size
    return with_fields(events, "train", lambda f: ({"tokens_per_sec_per_device": f["tokens_per_sec"] / world}
                                                   if "tokens_per_sec" in f else {}))
