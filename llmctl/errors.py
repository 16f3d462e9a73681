"""The one error type that carries an exit status to the CLI.

Exit statuses (docs/exit-statuses.md has the same table):
  0 success, 1 unexpected error, 2 bad input, 3 training diverged, 4 another rank of a distributed run failed,
  130 interrupted by SIGINT, 143 interrupted by SIGTERM.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_PEER = 4  # torchrun: another rank died, hung past train.dist_timeout, or the network failed
EXIT_SIGINT = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `cat big | head`
EXIT_SIGTERM = 143


class LlmctlError(Exception):
    """An expected failure: the message names the problem and the fix; `status` is the exit code."""

    def __init__(self, message: str, status: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message
