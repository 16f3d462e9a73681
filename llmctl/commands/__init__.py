"""What each subcommand does, as plain functions: wiring of config, data, model, loop, checkpoint, generation.

One module a command group (training, inference, serving, evaluation, preparation, interop, compression, and
decode_step, the work after training that the inference side owns); the CLI imports each where it is used, so
`llmctl prepare` and `llmctl config` start without torch. They return results (dicts, iterators of text) and
report through the callables they are given; the CLI decides how to print. Every expected failure is an
`LlmctlError`, raised before work starts where possible.
"""

from typing import Callable

Log = Callable[[str], None]  # how a command reports progress lines (the CLI prints them on stderr)


def nolog(message: str) -> None:
    """The `log` of a command called without one."""
