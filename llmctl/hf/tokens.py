"""The token ids of config.json and generation_config.json (the files beside tokenizer.json are
llmctl.tokenizer_files')."""

from __future__ import annotations

from typing import Any, Optional

from ..config import Config
from ..sampling import Sampling
from ..tokenizer import Tokenizer
from ..tokenizer_files import generation_eos


def token_ids(tok: Optional[Tokenizer]) -> dict[str, Optional[int]]:
    """bos/eos/pad ids for config.json and generation_config.json. BOS is the tokenizer's own (`Tokenizer.bos_id`)
    if it has one, else <eos> (where unconditional sampling starts); eos_token_id lists every end id when the model
    has more than one (Llama 3.1: 128001, 128008, 128009; `tokenizer_files.generation_eos`)."""
    if tok is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    bos = tok.bos_id if tok.bos_id is not None else tok.eos_id
    return {"bos_token_id": bos, "eos_token_id": generation_eos(tok), "pad_token_id": tok.pad_id}


def generation_config(cfg: Config, tok: Optional[Tokenizer]) -> dict:
    """Our `generate` defaults as a generation_config.json (sampling parameters only when sampling; top_k 0 and -1,
    "no limit" in llmctl, are left out as the carrier stores them: None)."""
    g = Sampling.from_config(cfg.generate)
    out: dict[str, Any] = {**token_ids(tok), "do_sample": g.temperature > 0}
    if g.temperature > 0:
        out["temperature"] = g.temperature
        if g.top_k is not None:
            out["top_k"] = g.top_k
        if g.top_p is not None:
            out["top_p"] = g.top_p
    return out
