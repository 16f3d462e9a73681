"""What each subcommand does, as plain functions: wiring of config, data, model, loop, checkpoint, generation.

They return results (dicts, iterators of text) and report through a `log` callable and a `Reporter`; the CLI
decides how to print. Every expected failure is an `LlmctlError`, raised before work starts where possible.
"""

from .common import Loaded, for_inference, load_model, load_weights, resolve_amp, resolve_device, unwrap
from .evaluation import evaluate
from .inference import (ChatSession, classify_texts, complete, complete_rows, encode_prompt, read_inputs, read_prompt,
                        sampling, stream, write_outputs)
from .interop import export, import_hf
from .training import TrainPlan, describe, finetune, prepare, pretrain, show_config

__all__ = [
    "ChatSession", "Loaded", "TrainPlan", "for_inference", "classify_texts", "complete", "complete_rows", "describe", "encode_prompt",
    "evaluate", "export", "finetune", "import_hf", "load_model", "load_weights", "prepare", "pretrain", "read_inputs", "read_prompt",
    "resolve_amp", "resolve_device", "sampling", "show_config", "stream", "unwrap", "write_outputs",
]
