"""The Typer application, how a command is run (one clear line and an exit status for every expected failure), and
the console output every command shares: error lines, JSON, tables, the resolved config.

stdout carries only results (generated text, tables, JSON); the resolved config, progress, logs and warnings go to
stderr. Each command builds one `console.ConsoleEvents` and passes it to the work it calls.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Callable, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..console import err
from ..errors import EXIT_BROKEN_PIPE, EXIT_SIGINT, EXIT_UNEXPECTED, LlmctlError
from ..events import Events

app = typer.Typer(
    name="llmctl",
    help="Train, finetune, sample from and measure GPT- and LLaMA-style language models on your own text.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)


app.add_typer(config_app, name="config")


import_app = typer.Typer(help="Bring in checkpoints made elsewhere (Hugging Face transformers).", no_args_is_help=True)


app.add_typer(import_app, name="import")


STATE = {"debug": bool(os.environ.get("LLMCTL_DEBUG"))}


def run(fn: Callable[[], Optional[int]]) -> None:
    """Call a command, turning expected failures into one clear line and an exit status."""
    from ..interrupt import STOP, Stopped, as_stop

    try:
        with STOP.handling():  # SIGINT / SIGTERM stop the command within seconds (llmctl.interrupt)
            try:
                code = fn()
            except Exception as e:
                stop = as_stop(e)  # a library's error on the way out of an interrupted call is the stop
                if stop is None:
                    raise
                raise stop from None
    except LlmctlError as e:
        if STATE["debug"]:
            traceback.print_exc()
        _print_error(e.message)
        raise typer.Exit(e.status)
    except Stopped as e:
        _print_error(f"interrupted by {e.name}")
        raise typer.Exit(e.status)
    except KeyboardInterrupt:
        _print_error("interrupted")
        raise typer.Exit(EXIT_SIGINT)
    except typer.Exit:
        raise
    except BrokenPipeError:  # the reader went away (`llmctl eval ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        raise typer.Exit(EXIT_BROKEN_PIPE)
    except Exception as e:  # an unexpected failure: say so plainly, the traceback only on request
        if STATE["debug"]:
            traceback.print_exc()
        _print_error(f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback, and please report it)")
        raise typer.Exit(EXIT_UNEXPECTED)
    raise typer.Exit(code or 0)


def _print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str), flush=True)


def _table(title: str, rows: dict) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows.items():
        if isinstance(v, bool):
            v = "yes" if v else "no"
        elif isinstance(v, float):
            v = f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
        elif isinstance(v, int):
            v = f"{v:,}"
        t.add_row(k, "" if v is None else str(v))
    return t


def _print_config(cfg, events: Events, quiet: bool) -> None:
    """The config's warnings (always), then its resolved values, one dim line a section (not when `quiet`)."""
    for w in cfg.warnings:
        events.warn(w)
    if quiet:
        return
    for section, values in cfg.to_dict().items():
        line = " ".join(f"{k}={v}" for k, v in values.items())
        err.print(Text(f"{section}: {line}", style="dim"), soft_wrap=True)  # values as written: a path may hold [x]


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors (also LLMCTL_DEBUG=1).",
                               show_default="off"),
) -> None:
    """llmctl: from your own text to a trained, measured language model."""
    if debug:
        STATE["debug"] = True
