"""What each subcommand does, as plain functions: wiring of config, data, model, loop, checkpoint, generation.

They return results (dicts, iterators of text) and report through a `log` callable and a `Reporter`; the CLI
decides how to print. Every expected failure is an `LlmctlError`, raised before work starts where possible.
"""

from typing import Callable

Log = Callable[[str], None]  # how a command reports progress lines (the CLI prints them on stderr)


def nolog(message: str) -> None:
    """The `log` of a command called without one."""


from ..distributed import unwrap  # noqa: E402  (the submodules below import Log and nolog from here)
from ..loading import Loaded, for_inference, load_model, load_weights  # noqa: E402
from ..precision import resolve_amp, resolve_device  # noqa: E402
from .compression import prune  # noqa: E402
from .evaluation import evaluate, evaluate_tasks  # noqa: E402
from .inference import (  # noqa: E402
    ChatSession,
    classify_texts,
    complete_rows,
    encode_prompt,
    read_inputs,
    read_prompt,
    sampling,
    stream,
    write_outputs,
)
from .interop import export, import_hf  # noqa: E402
from .serving import serve  # noqa: E402
from .training import TrainPlan, describe, finetune, prepare, pretrain, show_config  # noqa: E402

__all__ = [
    "ChatSession", "Loaded", "Log", "nolog", "TrainPlan", "for_inference", "classify_texts",
    "complete_rows", "describe", "encode_prompt", "evaluate", "evaluate_tasks", "export", "finetune", "import_hf",
    "load_model", "load_weights", "prepare", "pretrain", "prune", "read_inputs", "read_prompt", "resolve_amp",
    "resolve_device", "sampling",
    "serve", "show_config", "stream", "unwrap", "write_outputs",
]
