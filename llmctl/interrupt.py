"""SIGINT and SIGTERM: the first one stops the work within seconds, wherever it is; a second Ctrl-C aborts at once.

There are two ways a signal stops work, and `STOP` (the process's one handler) picks by where the main thread is:
  - raising (the default): work that can stop at any instruction without harm (loading and tokenizing a corpus
    into a temporary directory, validation passes, compiling the decode step) is stopped by `Stopped`, raised
    by the handler in the main thread at once;
  - deferred (`STOP.deferred()`): work that must not stop half-way (a training step, writing a checkpoint, a
    collective under torchrun) only records the signal, and looks at `STOP.signum` at its safe points: the
    training loop after every step and between the batches of a validation pass.

Python runs a signal handler only between bytecodes of the main thread, so a long native call (one Rust
tokenizer call over a whole corpus, a BPE merge computation) would hold a signal back until it returns. Such
work runs in bounded pieces (`Tokenizer.encode_batch` cuts long texts) or in a worker thread (`in_thread`),
while the main thread waits where it can hear signals.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional, TypeVar

from .errors import EXIT_SIGINT, EXIT_SIGTERM, LlmctlError

T = TypeVar("T")
NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def exit_status(signum: int) -> int:
    return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM


class Stopped(KeyboardInterrupt):
    """The first SIGINT / SIGTERM. A BaseException, so that a library's `except Exception` cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(NAMES.get(signum, str(signum)))
        self.signum = signum

    @property
    def status(self) -> int:
        return exit_status(self.signum)

    @property
    def name(self) -> str:
        return NAMES.get(self.signum, f"signal {self.signum}")


class Stop:
    """The process's handler for SIGINT and SIGTERM (installed by `handling()`, in the main thread only)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the first signal, once one arrived
        # seconds in which a repeated SIGINT is the same Ctrl-C: torchrun forwards the terminal's Ctrl-C to
        # workers that received it already (llmctl.distributed sets this under torchrun)
        self.repeat_window = 0.0
        self._first = 0.0
        self._deferring = 0
        self._installed = 0
        self._old: dict = {}

    @contextlib.contextmanager
    def handling(self) -> Iterator["Stop"]:
        """Install the handler for the duration (nested uses share one installation)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        if self._installed == 0:
            self.signum = None
            for s in NAMES:
                self._old[s] = signal.signal(s, self._handle)
        self._installed += 1
        try:
            yield self
        finally:
            self._installed -= 1
            if self._installed == 0:
                for s, h in self._old.items():
                    if signal.getsignal(s) == self._handle:  # (a handler set since, e.g. SIG_IGN while a
                        signal.signal(s, h)                   # failing rank reports, stays for the exit)
                self._old.clear()
                self.signum = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                if time.monotonic() - self._first < self.repeat_window:
                    return
                raise KeyboardInterrupt  # second Ctrl-C: abort now
            return  # a later SIGTERM changes nothing: the first stop is under way
        self.signum, self._first = signum, time.monotonic()
        if self._deferring == 0:
            raise Stopped(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Record signals instead of raising them; the code inside asks `check()` where it can stop."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1


STOP = Stop()


def as_stop(e: BaseException) -> Optional[Stopped]:
    """The stop behind `e`: `e` itself, or an error a library raised while a stop was under way (its cleanup
    failing because the work was interrupted: `datasets` waits for pool results that will never come)."""
    if isinstance(e, Stopped):
        return e
    if STOP.signum is not None and isinstance(e, Exception) and not isinstance(e, LlmctlError):
        return Stopped(STOP.signum)
    return None


def _child_after_fork() -> None:
    """A process forked while the handler is installed (a `datasets` worker) leaves signals to its parent: a
    terminal's Ctrl-C, which reaches the whole process group, is ignored there (the parent stops and ends its
    workers), and SIGTERM ends it at once (how a pool is terminated)."""
    if STOP._installed:
        STOP._installed, STOP.signum, STOP._old = 0, None, {}
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:  # (forked from a thread other than the main one)
            pass


os.register_at_fork(after_in_child=_child_after_fork)


def in_thread(fn: Callable[[], T], poll: float = 0.2) -> T:
    """`fn()` in a worker thread while the main thread waits where it can hear signals.

    For a long native call that cannot be cut into pieces (training a tokenizer). When `Stopped` interrupts the
    wait, the worker is left to finish in the background (a daemon thread: it cannot hold up the exit).
    """
    if threading.current_thread() is not threading.main_thread():
        return fn()
    result: dict = {}

    def work() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the waiting thread
            result["error"] = e

    worker = threading.Thread(target=work, name="llmctl-native", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(poll)
    if "error" in result:
        raise result["error"]
    return result["value"]
