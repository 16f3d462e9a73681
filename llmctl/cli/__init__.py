"""The `llmctl` command line, one module per group of commands: parse options, call a function in
`llmctl.commands`, print its result. Each command imports its command module inside the function, so `llmctl
prepare` and `llmctl config` start without torch.

Inside the package imports point one way: `app` (the Typer app, running a command, shared output) and `options`
at the bottom, the command groups above them, this file on top (it imports the groups so that they register).
"""

# the groups register their commands as they are imported, in the order `llmctl --help` lists them
# isort: off
from . import training, inference, serving, evaluation, preparation, runs, interop  # noqa: F401
# isort: on
from .app import app


def entry() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "entry"]
