"""What each subcommand does, as plain functions: wiring of config, data, model, loop, checkpoint, generation.

They return results (dicts, iterators of text) and report through a `log` callable and a `Reporter`; the CLI
decides how to print. Every expected failure is an `LlmctlError`, raised before work starts where possible.
"""

from .common import Loaded, load_model, load_weights, resolve_amp, resolve_device, unwrap
from .evaluation import evaluate
from .inference import encode_prompt, infer, read_prompt
from .interop import export, import_hf
from .training import TrainPlan, describe, finetune, prepare, pretrain, show_config

__all__ = [
    "Loaded", "TrainPlan", "describe", "encode_prompt", "evaluate", "export", "finetune", "import_hf", "infer", "load_model",
    "load_weights", "prepare", "pretrain", "read_prompt", "resolve_amp", "resolve_device", "show_config", "unwrap",
]
