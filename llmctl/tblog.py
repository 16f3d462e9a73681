"""Optional TensorBoard logging (`train.log: [tensorboard]`): every metrics.jsonl row also goes to RUN/tensorboard.

The `tensorboard` package is an optional extra (`pip install 'llmctl[tensorboard]'`); `check` reports its absence
when the config is checked, before any work starts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Optional

from .errors import LlmctlError

BACKENDS = ("tensorboard",)


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check(backends: list[str]) -> None:
    """Fail early, with the fix, when a requested logging backend is not installed."""
    if "tensorboard" in backends and not installed("tensorboard"):
        raise LlmctlError(
            "train.log: tensorboard logging needs the tensorboard package; "
            "pip install 'llmctl[tensorboard]' or remove tensorboard from train.log"
        )


class Tee:
    """A metrics sink (a callable taking one row, with close()) that also writes TensorBoard scalars."""

    def __init__(self, sink: Callable[[dict], None], run_dir: Path, backends: list[str]):
        self.sink = sink
        self.writer = None
        if "tensorboard" in backends:
            check(backends)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def __call__(self, row: dict) -> None:
        self.sink(row)
        if self.writer is None or "step" not in row:
            return
        # evaluation rows carry val_* keys; training rows carry loss, lr, ...
        group = "val" if any(k.startswith("val_") for k in row) else "train"
        for key, value in row.items():
            if key in ("step",) or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"{group}/{key}", value, global_step=int(row["step"]))
        self.writer.flush()

    def close(self) -> None:
        close: Optional[Callable[[], None]] = getattr(self.sink, "close", None)
        if close:
            close()
        if self.writer is not None:
            self.writer.close()


def tee(sink: Callable[[dict], None], run_dir: Path, backends: list[str]) -> Callable[[dict], None]:
    """`sink` itself when no backend is requested, else a Tee that writes both."""
    return Tee(sink, run_dir, backends) if backends else sink
