"""Console output: a rich progress bar on a terminal, plain log lines otherwise. Everything goes to stderr."""

from __future__ import annotations

import sys
import time
from typing import Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MfuMixin:
    """Model FLOP utilisation from tokens/s: `set_mfu(train FLOPs per token, device peak FLOP/s)` turns it on."""

    flops_per_token: float = 0.0
    peak: Optional[float] = None

    def set_mfu(self, flops_per_token: float, peak: Optional[float]) -> None:
        self.flops_per_token, self.peak = flops_per_token, peak

    def mfu_text(self, tokens_per_sec: float) -> str:
        from .hardware import mfu

        value = mfu(tokens_per_sec, self.flops_per_token, self.peak)
        return "" if value is None else f"MFU {100 * value:.1f}%"


class RichReporter(MfuMixin):
    """Step, loss, lr, tokens/s, MFU and ETA in a live bar on stderr."""

    def __init__(self, console: Console = err, label: str = "train"):
        self.console, self.label = console, label
        self.progress: Optional[Progress] = None
        self.task = None
        self.fields = {"loss": "", "lr": "", "tps": "", "mfu": ""}

    def start(self, total: int, done: int) -> None:
        self.progress = Progress(
            TextColumn(f"[bold]{self.label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("{task.fields[mfu]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=total, completed=done, **self.fields)

    def update(self, step: int, info: dict) -> None:
        if "tokens_per_sec" in info:
            self.fields["tps"] = f"{info['tokens_per_sec']:,.0f}" + _per_device(info)
            self.fields["mfu"] = self.mfu_text(info["tokens_per_sec"])
        self.fields["loss"] = f"{info['loss']:.4f}"
        self.fields["lr"] = f"{info['lr']:.2e}"
        self.progress.update(self.task, completed=step, **self.fields)

    def log(self, message: str) -> None:
        (self.progress.console if self.progress else self.console).print(message)

    def stop(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None


class PlainReporter(MfuMixin):
    """One line per logged step, for logs, pipes and CI."""

    def __init__(self, stream=None, label: str = "train"):
        self.stream = stream or sys.stderr
        self.label = label
        self.total = self.start_step = 0
        self.t0 = time.perf_counter()

    def start(self, total: int, done: int) -> None:
        self.total, self.start_step, self.t0 = total, done, time.perf_counter()

    def update(self, step: int, info: dict) -> None:
        if "tokens_per_sec" not in info:
            return
        done = step - self.start_step
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        mfu = self.mfu_text(info["tokens_per_sec"])
        print(
            f"{self.label} step {step}/{self.total} | loss {info['loss']:.4f} | lr {info['lr']:.2e} | "
            f"{info['tokens_per_sec']:,.0f}{_per_device(info)} tok/s | "
            f"{mfu + ' | ' if mfu else ''}eta {fmt_duration(eta)}",
            file=self.stream,
            flush=True,
        )

    def log(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def stop(self) -> None:
        pass


def _per_device(info: dict) -> str:
    """The " (N/device)" suffix when several processes train (tokens_per_sec is then their total)."""
    per = info.get("tokens_per_sec_per_device")
    return f" ({per:,.0f}/device)" if per is not None else ""


class BytesBar:
    """`llmctl prepare` on a terminal: a live bar of the corpus read, with tokens, tokens/s and the time left."""

    def __init__(self, console: Console = err, label: str = "prepare"):
        self.console, self.label = console, label
        self.progress: Optional[Progress] = None
        self.t0 = time.time()
        self.tokens0: Optional[int] = None

    def __call__(self, done: int, total: Optional[int], tokens: int) -> None:
        if self.progress is None:
            self.progress = Progress(
                TextColumn(f"[bold]{self.label}"), BarColumn(bar_width=20), DownloadColumn(), TransferSpeedColumn(),
                TextColumn("{task.fields[tokens]} tokens, {task.fields[tps]} tok/s"), TextColumn("eta"),
                TimeRemainingColumn(), console=self.console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=total, tokens="0", tps="-")
            self.t0, self.tokens0 = time.time(), tokens
        rate = (tokens - (self.tokens0 or 0)) / max(time.time() - self.t0, 1e-9)
        self.progress.update(self.task, completed=done, tokens=f"{tokens:,}", tps=f"{rate:,.0f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def bytes_bar() -> Optional[BytesBar]:
    """A live bar for `prepare` when stderr is a terminal; None for plain progress lines."""
    return BytesBar() if err.is_terminal else None


def reporter(label: str = "train", quiet: bool = False):
    """A rich bar when stderr is a terminal, plain lines otherwise (or nothing when quiet)."""
    if quiet:
        from .train import NullReporter

        return NullReporter()
    if err.is_terminal:
        return RichReporter(err, label)
    return PlainReporter(label=label)
