"""How work tells the user something: one `Events` object, passed once to whatever reports.

The boundary: work below the CLI (commands, training, data preparation, loading, generation) never prints and never
styles text. It says what happens through the `Events` it was given, in plain words; the console layer
(`llmctl.console`, which `llmctl.cli` builds one of per command) decides how each event looks: a rich bar on a
terminal, plain lines in a pipe, nothing under --quiet, only rank 0 under torchrun. Everything it shows goes to
stderr; results (text, tables, JSON) are returned, and the CLI prints them on stdout.

Three events:
  log(message)       a line about the work as it goes ("resuming from ...", "saved ...").
  warn(message)      something the user should know and may act on; the message is the problem alone: the console
                     adds the "warning:" prefix, and shows warnings even under --quiet.
  progress(label, total, done) -> Progress
                     a long piece of work counted in units; `update(done, **fields)` as it moves, `close()` (or a
                     `with` block) when it ends. The label names the work, and so how the console shows it:
                     "train" (optimizer steps; fields loss, lr, grad_norm, and on logged steps tokens_per_sec, mfu,
                     tokens_per_sec_per_device), "prepare" (bytes of the corpus read; field tokens), "infer" (rows
                     completed). Fields are plain numbers: the console formats them.

What is not an event: results shown before the work ends stay explicit, typed callbacks of the command that has them
(`on_plan` of training: the plan once it is built; `on_ready` of serving: the address and model once the server
listens). They carry data the caller acts on -- a test takes the plan's model, `serve --json` prints the address on
stdout, where results go, and a script reads the port from there -- and a generic `show(kind, data)` would hide
what they carry behind a string. A loop hook (`on_step`) is no output either.

`SILENT` (the base class itself) does nothing: it is the default of every function that reports, so a library
caller need not pass one. `Relay` passes events on to another `Events`; `with_fields` is one that adds derived fields
to a progress (the run adds MFU to the training loop's tokens/s, torchrun the rate per device).
"""

from __future__ import annotations

from typing import Any, Callable, Optional


class Progress:
    """A handle on one piece of work in progress. The base shows nothing."""

    def update(self, done: int, **fields: Any) -> None:
        """`done` units of the work are complete; `fields` are what the work measures beside them."""

    def close(self) -> None:
        """The work has ended (finished or not): a live bar stops."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Events:
    """What work reports, as events; this base class is silent (see the module docstring)."""

    def log(self, message: str) -> None:
        """One line about the work as it goes."""

    def warn(self, message: str) -> None:
        """Something the user should know; `message` without a "warning:" prefix."""

    def progress(self, label: str, total: Optional[int] = None, done: int = 0) -> Progress:
        """A handle for `label` work of `total` units (None: unknown), `done` of them complete already."""
        return Progress()


SILENT = Events()


class Relay(Events):
    """Passes every event on to `inner`: the base of wrappers that change some of them."""

    def __init__(self, inner: Events):
        self.inner = inner

    def log(self, message: str) -> None:
        self.inner.log(message)

    def warn(self, message: str) -> None:
        self.inner.warn(message)

    def progress(self, label: str, total: Optional[int] = None, done: int = 0) -> Progress:
        return self.inner.progress(label, total, done)


Derive = Callable[[dict], dict]  # the fields of one update -> fields to add (empty: none this time)


def with_fields(events: Events, label: str, derive: Derive) -> Events:
    """`events`, where every update of a `label` progress also carries the fields `derive` makes from its own."""
    return _WithFields(events, label, derive)


class _WithFields(Relay):
    def __init__(self, inner: Events, label: str, derive: Derive):
        super().__init__(inner)
        self.label, self.derive = label, derive

    def progress(self, label: str, total: Optional[int] = None, done: int = 0) -> Progress:
        handle = self.inner.progress(label, total, done)
        return _DerivedProgress(handle, self.derive) if label == self.label else handle


class _DerivedProgress(Progress):
    def __init__(self, inner: Progress, derive: Derive):
        self.inner, self.derive = inner, derive

    def update(self, done: int, **fields: Any) -> None:
        self.inner.update(done, **fields, **self.derive(fields))

    def close(self) -> None:
        self.inner.close()
