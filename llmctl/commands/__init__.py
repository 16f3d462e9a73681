"""What each subcommand does, as plain functions: wiring of config, data, model, loop, checkpoint, generation.

They return results (dicts, iterators of text) and report through a `log` callable and a `Reporter`; the CLI
decides how to print. Every expected failure is an `LlmctlError`, raised before work starts where possible.
"""

from typing import Callable

Log = Callable[[str], None]  # how a command reports progress lines (the CLI prints them on stderr)


def nolog(message: str) -> None:
    """The `log` of a command called without one."""


# Where each public name lives. They are imported on first use (PEP 562), so `llmctl prepare` and `llmctl config`
# start without torch and the model code (about 3 s of start-up on a small machine).
_HOMES = {
    "unwrap": "..distributed",
    "Loaded": "..loading", "for_inference": "..loading", "load_model": "..loading", "load_weights": "..loading",
    "resolve_amp": "..precision", "resolve_device": "..precision",
    "prune": ".compression",
    "evaluate": ".evaluation", "evaluate_tasks": ".evaluation",
    **dict.fromkeys(["ChatSession", "classify_texts", "complete_rows", "read_inputs", "read_prompt",
                     "sampling_settings", "stream", "write_outputs"], ".inference"),
    "export": ".interop", "import_hf": ".interop",
    "serve": ".serving",
    "TrainPlan": "..plan", "describe": "..plan", "finetune": ".training", "pretrain": ".training",
    "prepare": ".preparation", "show_config": ".preparation",
}

__all__ = ["Log", "nolog", *_HOMES]


def __getattr__(name: str):
    import importlib

    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value  # (found directly from now on)
    return value
