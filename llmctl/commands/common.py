"""Pieces every command shares: device and precision choice, building and loading models."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import checkpoint as ckpt_io
from ..config import Config, from_dict
from ..errors import LlmctlError
from ..model import Transformer
from ..tokenizer import Tokenizer

Log = Callable[[str], None]


def _nolog(msg: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------------------------
# Device and precision


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

    auto: bfloat16 on CUDA when supported (else float16 with a grad scaler) and on CPU, where oneDNN's bf16 matmuls
    train the same models 1.3-2.6x faster with the same loss (README "Speed"); float32 on MPS.
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
        return torch.bfloat16
    return None


# ------------------------------------------------------------------------------------------------------------------
# Model construction and loading


def vocab_for(cfg: Config, tok: Tokenizer) -> int:
    m = cfg.model
    if m.vocab_size is not None:
        if m.vocab_size < tok.vocab_size:
            raise LlmctlError(
                f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {tok.vocab_size} tokens; "
                "raise it or leave it unset"
            )
        return m.vocab_size
    return m.vocab_multiple * math.ceil(tok.vocab_size / m.vocab_multiple)


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, except for the output head when it is tied to the embedding."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors and not (k == "lm_head.weight" and model.cfg.tied)]
    unexpected = [k for k in tensors if k not in own]
    wrong = [k for k in tensors if k in own and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong:
            parts.append(f"shape of {wrong[0]} is {tuple(tensors[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise LlmctlError(f"weights in {source} do not match the model config ({'; '.join(parts)})")
    model.load_state_dict(tensors, strict=False)


@dataclass
class Loaded:
    """A model restored from a checkpoint, with everything needed to use it."""

    ckpt: ckpt_io.Checkpoint
    cfg: Config
    tokenizer: Optional[Tokenizer]  # None only when loaded with require_tokenizer=False
    model: Transformer
    device: torch.device


def load_tokenizer(ck: ckpt_io.Checkpoint, cfg: Config, tokenizer: Optional[Path] = None) -> Tokenizer:
    """The checkpoint's tokenizer, or `tokenizer` (a tokenizer.json) when given: imported checkpoints may lack one."""
    tok = Tokenizer.from_file(tokenizer) if tokenizer is not None else Tokenizer.from_str(ck.tokenizer_json())
    if cfg.model.vocab_size is not None and tok.vocab_size > cfg.model.vocab_size:
        raise LlmctlError(f"the tokenizer has {tok.vocab_size} tokens but the model in {ck.path} only "
                          f"{cfg.model.vocab_size} embeddings; give the tokenizer that belongs to this model")
    return tok


def load_model(path: str | Path, device: str = "auto", dtype: Optional[torch.dtype] = None,
               tokenizer: Optional[Path] = None, require_tokenizer: bool = True) -> Loaded:
    """Verify and load a checkpoint (run directory or step directory) for inference or evaluation.

    `tokenizer` (a tokenizer.json) replaces the checkpoint's, or supplies one that an imported checkpoint lacks;
    with `require_tokenizer=False` a checkpoint without one loads with `Loaded.tokenizer` None."""
    ck = ckpt_io.load(path)
    try:
        cfg = from_dict(ck.config)
    except LlmctlError as e:
        raise LlmctlError(f"{ck.path}/config.yaml does not describe a valid model: {e}") from None
    tok = load_tokenizer(ck, cfg, tokenizer) if require_tokenizer or tokenizer or ck.has_tokenizer else None
    dev = resolve_device(device)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model = model.to_empty(device=dev)
    if cfg.model.tied:  # to_empty materialises each module's parameters separately: tie them again
        model.lm_head.weight = model.wte.weight
    model.reset_parameters()  # rope tables and any buffer; weights come next
    load_weights(model, ck.weights(), str(ck.path))
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    return Loaded(ck, cfg, tok, model, dev)



def unwrap(model):
    """The plain module under torch.compile / DDP / FSDP wrappers."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model
