"""Where and in what precision the work runs: the device, training's autocast dtype, and inference's dtype and
weight format, each resolving `auto` from what the machine can do (`llmctl.hardware`, `llmctl.quantize`)."""

from __future__ import annotations

from typing import Optional

import torch

from . import quantize as quantize_mod
from .config import INFER_DTYPES, QUANTIZE_MODES
from .errors import LlmctlError
from .hardware import cpu_has_fast_bf16


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LlmctlError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LlmctlError("train.device=mps but MPS is not available; use train.device=cpu or auto")
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype (None = plain float32). Weights and optimizer state stay float32 either way.

    auto: bfloat16 on CUDA when supported (else float16 with a grad scaler) and on CPUs whose oneDNN has bf16
    kernels, where they train the same models faster to the same loss (docs/results.md#speed); else float32.
    """
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return None


INT8_MIN_PARAMS = 10_000_000  # below this, per-step overhead dominates decoding and int8 costs more than it saves


def check_choices(dtype: Optional[str], quantize_mode: Optional[str]) -> None:
    """--dtype and --quantize against the one list of each (config.INFER_DTYPES, config.QUANTIZE_MODES); None is
    "not given"."""
    for option, value, choices in (("--dtype", dtype, INFER_DTYPES), ("--quantize", quantize_mode, QUANTIZE_MODES)):
        if value is not None and value not in choices:
            raise LlmctlError(f"{option} must be {', '.join(choices[:-1])} or {choices[-1]} (got {value})")


def inference_choices(g, dtype: Optional[str], quantize_mode: Optional[str], compile: Optional[bool | str],
                      device: torch.device, n_params: Optional[int] = None) -> tuple[str, str, bool | str]:
    """What generation runs in, (dtype, quantization, compile), resolved here and nowhere else.

    --dtype, --quantize and --compile/--no-compile are shorthand for generate.dtype, generate.quantize and
    generate.compile (`g`): None (not given) takes the key's value. Then `auto` has one meaning for each, wherever
    it was written: dtype and quantization are chosen by the hardware and the model's size (`inference_precision`),
    and compile "auto" stays for the engine (use a cached compiled step, build none; on a CPU, trace the one-row
    step: llmctl.traced). Dynamic int8 on a CPU does not export, so asking for --compile with it is an error; its
    "auto" traces the one-row step only."""
    check_choices(dtype, quantize_mode)
    asked_compile = g.compile if compile is None else compile
    dtype, quantize_mode = inference_precision(g.dtype if dtype is None else dtype,
                                               g.quantize if quantize_mode is None else quantize_mode, device, n_params)
    if quantize_mode == "int8" and device.type == "cpu":
        if asked_compile is True:
            raise LlmctlError("--compile does not apply to int8 on a CPU (dynamic int8 layers do not export); "
                              "use --quantize none to compile, or --no-compile")
        asked_compile = "auto" if asked_compile is not False else False
    return dtype, quantize_mode, asked_compile


def inference_precision(dtype: str, quantize_mode: str, device: torch.device, n_params: Optional[int] = None
                        ) -> tuple[str, str]:
    """Resolve `auto` for generation: (dtype, quantization).

    CPU: int8 dynamic quantization (fbgemm) for models of INT8_MIN_PARAMS parameters or more, where reading the
    weights dominates each step (perplexity within 2% of float32); float32 for smaller models, where int8's
    activation quantization costs more than it saves (docs/results.md#inference-speed has the figures). CUDA: bfloat16
    weights when supported; elsewhere float32.
    """
    if quantize_mode == "auto":
        int8_here = device.type == "cpu" and quantize_mod.cpu_int8_available()
        big = n_params is None or n_params >= INT8_MIN_PARAMS
        quantize_mode = "int8" if int8_here and big and dtype in ("auto", "float32") else "none"
    if dtype == "auto":
        if quantize_mode == "int8":
            dtype = "float32"  # dynamic int8 keeps float32 activations
        elif device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = "bfloat16"
        else:
            dtype = "float32"
    return dtype, quantize_mode
