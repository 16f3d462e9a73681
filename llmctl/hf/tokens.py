"""The tokenizer side of a transformers directory: special token ids, tokenizer_config.json,
special_tokens_map.json, generation_config.json."""

from __future__ import annotations

from typing import Any, Optional

from ..config import Config
from ..sampling import Sampling
from ..tokenizer import Tokenizer

BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<|im_start|>")


def token_ids(tok: Optional[Tokenizer]) -> dict[str, Optional[int]]:
    """bos/eos/pad ids for config.json and generation_config.json. Our prompts start with no BOS and unconditional
    sampling starts from <eos>, so BOS is the tokenizer's own BOS token if it has one, else <eos>."""
    if tok is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    bos = next((tok.token_to_id(t) for t in BOS_CANDIDATES if tok.token_to_id(t) is not None), tok.eos_id)
    return {"bos_token_id": bos, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def tokenizer_files(tok: Tokenizer, block_size: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json beside tokenizer.json.

    `PreTrainedTokenizerFast` makes AutoTokenizer use tokenizer.json verbatim (the model-specific classes would
    rebuild a GPT-2 or Llama pipeline); no space clean-up, so decode gives back exactly the text.
    """
    ids = token_ids(tok)
    name = lambda i: tok.tk.id_to_token(i) if i is not None else None  # noqa: E731
    special = {"bos_token": name(ids["bos_token_id"]), "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id)}
    if tok.unk_id is not None:
        special["unk_token"] = name(tok.unk_id)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


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
