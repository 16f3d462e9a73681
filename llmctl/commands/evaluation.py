"""eval: loss, perplexity and bits per byte of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


from ..data import eval_blocks, prepare as prepare_tokens, tokenize_file
from ..errors import LlmctlError
from ..evaluate import lm_metrics
from .common import Log, _nolog, load_model


def evaluate(ckpt: Path, data: Optional[str] = None, batch_size: Optional[int] = None, device: str = "auto",
             log: Log = _nolog, tokenizer: Optional[Path] = None) -> dict:
    """`llmctl eval`: loss, perplexity and bits per byte on the validation split or on `data`."""
    loaded = load_model(ckpt, device, tokenizer=tokenizer)
    cfg, tok = loaded.cfg, loaded.tokenizer
    if data is not None:
        tokens = tokenize_file(data, cfg.data, tok)
        source = data
    else:
        if not cfg.data.path:  # an imported checkpoint has no training data to take a validation split from
            raise LlmctlError(f"{loaded.ckpt.path} names no data.path to evaluate on (an imported model?); pass --data FILE")
        if cfg.data.path and not cfg.data.path.startswith(("hf:", "http://", "https://")) and not Path(cfg.data.path).expanduser().exists():
            raise LlmctlError(f"the checkpoint's data.path {cfg.data.path} is not on this machine; pass --data FILE to evaluate on a file")
        tokens = prepare_tokens(cfg.data, cfg.tokenizer, tokenizer=tok, log=log).val
        source = f"{cfg.data.path} (validation split)"
    if len(tokens) < 2:
        raise LlmctlError(f"{source} has fewer than 2 tokens; nothing to evaluate")
    n_bytes = len(tok.decode([int(i) for i in tokens[1:]]).encode("utf-8"))
    r = lm_metrics(loaded.model, eval_blocks(tokens, cfg.model.block_size, batch_size or cfg.eval.batch_size),
                   loaded.device, None, n_bytes=n_bytes)
    return {"checkpoint": str(loaded.ckpt.path), "data": source, **r}


