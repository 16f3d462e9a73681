"""The two bounds most keys share, each written once: counts that must be at least 1 (or some other floor), and
amounts that must not be negative. A section's `check` lists its keys; the message names each key as `--set` and
YAML do (`train.batch_size: must be at least 1 (got 0)`)."""

from typing import Any, Iterable


def at_least(section: str, obj: Any, names: Iterable[str], floor: int = 1) -> list[str]:
    """One problem for each key of `obj` below `floor`."""
    return [f"{section}.{n}: must be at least {floor} (got {getattr(obj, n)})" for n in names
            if getattr(obj, n) < floor]


def not_negative(section: str, obj: Any, names: Iterable[str]) -> list[str]:
    """One problem for each key of `obj` below zero."""
    return [f"{section}.{n}: must not be negative (got {getattr(obj, n)})" for n in names if getattr(obj, n) < 0]
