"""The console layer: how the events of work look (`ConsoleEvents`), and the two consoles, stderr and stdout.

Work reports through `llmctl.events`; the CLI builds one `ConsoleEvents` per command and passes it down. Log lines
and warnings go to stderr one line each, never wrapped (long paths and commands stay copyable and greppable), their
text shown as is (no rich markup or emoji codes in them); a warning has a yellow "warning:" prefix. Progress is a
live rich bar when stderr is a terminal, plain lines otherwise (logs, pipes, CI). --quiet silences log lines and
progress, not warnings. stdout (`out`) carries only results.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as Bar
from rich.text import Text

from .events import Events, Progress

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

PLAIN_EVERY_S = 5.0  # plain `prepare` progress: one line at most this often


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ConsoleEvents(Events):
    """Events shown on stderr. `command` titles the training bar and its plain lines (pretrain, finetune)."""

    def __init__(self, quiet: bool = False, command: str = "train", console: Console = err):
        self.quiet, self.command, self.console = quiet, command, console

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(Text(message), soft_wrap=True)

    def warn(self, message: str) -> None:
        self.console.print(Text.assemble(("warning:", "yellow"), " ", message), soft_wrap=True)

    def progress(self, label: str, total: Optional[int] = None, done: int = 0) -> Progress:
        if self.quiet:
            return Progress()
        if label not in _SHOWN:
            raise ValueError(f"the console has no way to show {label!r} progress (it shows {', '.join(_SHOWN)})")
        live, plain = _SHOWN[label]
        title = self.command if label == "train" else label
        return (live if self.console.is_terminal else plain)(self.console, title, total, done)


def _line(console: Console, line: str) -> None:
    console.print(Text(line), soft_wrap=True)


def _per_device(fields: dict) -> str:
    """The " (N/device)" suffix when several processes train (tokens_per_sec is then their total)."""
    per = fields.get("tokens_per_sec_per_device")
    return f" ({per:,.0f}/device)" if per is not None else ""


def _mfu(fields: dict) -> str:
    value = fields.get("mfu")
    return "" if value is None else f"MFU {100 * value:.1f}%"


class _LiveBar(Progress):
    """A live rich bar, titled in bold, with `columns` after it; started at once, stopped by `close`."""

    def __init__(self, console: Console, title: str, total: Optional[int], done: int, columns: tuple,
                 transient: bool = False, **shown: str):
        self.bar: Optional[Bar] = Bar(TextColumn(f"[bold]{title}"), *columns, console=console, transient=transient)
        self.bar.start()
        self.task = self.bar.add_task(title, total=total, completed=done, **shown)

    def show(self, done: int, **shown: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, **shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class _TrainBar(_LiveBar):
    """Training on a terminal: step, loss, lr, tokens/s, MFU and the time left in a live bar."""

    def __init__(self, console: Console, title: str, total: Optional[int], done: int):
        self.shown = {"loss": "", "lr": "", "tps": "", "mfu": ""}
        columns = (BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                   TextColumn("lr {task.fields[lr]}"), TextColumn("{task.fields[tps]} tok/s"),
                   TextColumn("{task.fields[mfu]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        super().__init__(console, title, total, done, columns, **self.shown)

    def update(self, done: int, **fields: Any) -> None:
        if "tokens_per_sec" in fields:  # (only logged steps measure throughput)
            self.shown["tps"] = f"{fields['tokens_per_sec']:,.0f}" + _per_device(fields)
            self.shown["mfu"] = _mfu(fields)
        self.shown["loss"], self.shown["lr"] = f"{fields['loss']:.4f}", f"{fields['lr']:.2e}"
        self.show(done, **self.shown)


class _TrainLines(Progress):
    """Training in a pipe: one line per logged step (those that measure throughput)."""

    def __init__(self, console: Console, title: str, total: Optional[int], done: int):
        self.console, self.title, self.total, self.start = console, title, total or 0, done
        self.t0 = time.perf_counter()

    def update(self, done: int, **fields: Any) -> None:
        if "tokens_per_sec" not in fields:
            return
        eta = (time.perf_counter() - self.t0) / max(done - self.start, 1) * (self.total - done)
        mfu = _mfu(fields)
        _line(self.console, f"{self.title} step {done}/{self.total} | loss {fields['loss']:.4f} | "
                            f"lr {fields['lr']:.2e} | {fields['tokens_per_sec']:,.0f}{_per_device(fields)} tok/s | "
                            f"{mfu + ' | ' if mfu else ''}eta {fmt_duration(eta)}")


class _BytesBar(_LiveBar):
    """Data preparation on a terminal: a live bar of the corpus read, with tokens, tokens/s and the time left."""

    def __init__(self, console: Console, title: str, total: Optional[int], done: int):
        columns = (BarColumn(bar_width=20), DownloadColumn(), TransferSpeedColumn(),
                   TextColumn("{task.fields[tokens]} tokens, {task.fields[tps]} tok/s"), TextColumn("eta"),
                   TimeRemainingColumn())
        super().__init__(console, title, total, done, columns, transient=True, tokens="0", tps="-")
        self.t0, self.tokens0 = time.time(), None

    def update(self, done: int, tokens: int = 0, **fields: Any) -> None:
        if self.tokens0 is None:  # tokens already there when the bar started (a resumed preparation)
            self.tokens0 = tokens
        rate = (tokens - self.tokens0) / max(time.time() - self.t0, 1e-9)
        self.show(done, tokens=f"{tokens:,}", tps=f"{rate:,.0f}")


class _BytesLines(Progress):
    """Data preparation in a pipe: one line every PLAIN_EVERY_S seconds with the bytes read, tokens, tokens/s and
    the time left."""

    def __init__(self, console: Console, title: str, total: Optional[int], done: int):
        self.console, self.title, self.total, self.base_bytes = console, title, total, done
        self.t0 = self.last = time.time()
        self.base_tokens: Optional[int] = None

    def update(self, done: int, tokens: int = 0, **fields: Any) -> None:
        if self.base_tokens is None:  # tokens already there when the work started (a resumed preparation)
            self.base_tokens = tokens
        now = time.time()
        if now - self.last < PLAIN_EVERY_S:
            return
        self.last = now
        rate = (tokens - self.base_tokens) / max(now - self.t0, 1e-9)
        line = f"{self.title}: {done / 1e6:,.1f}"
        if self.total:
            speed = (done - self.base_bytes) / max(now - self.t0, 1e-9)
            eta = (self.total - done) / speed if speed > 0 else 0.0
            line += f" / {self.total / 1e6:,.1f} MB read ({100 * done / self.total:.0f}%)"
        else:
            line += " MB read"
        line += f", {tokens:,} tokens, {rate:,.0f} tokens/s"
        if self.total:
            line += f", eta {eta:.0f}s"
        _line(self.console, line)


class _RowsBar(_LiveBar):
    """Rows of an `infer --input` job on a terminal: a live bar of the rows completed."""

    def __init__(self, console: Console, title: str, total: Optional[int], done: int):
        super().__init__(console, title, total, done, (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()))

    def update(self, done: int, **fields: Any) -> None:
        self.show(done)


class _RowsLines(Progress):
    """Rows of an `infer --input` job in a pipe: one line as it starts."""

    def __init__(self, console: Console, title: str, total: Optional[int], done: int):
        _line(console, f"completing {total} prompts")


_SHOWN = {  # progress label -> (how it looks on a terminal, in a pipe)
    "train": (_TrainBar, _TrainLines),
    "prepare": (_BytesBar, _BytesLines),
    "infer": (_RowsBar, _RowsLines),
}
