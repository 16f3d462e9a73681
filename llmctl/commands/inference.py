"""infer: turn a prompt into streamed text."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional


from ..errors import LlmctlError
from ..generate import generate
from ..tokenizer import Tokenizer
from .common import load_model


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if prompt is not None and prompt_file is not None:
        raise LlmctlError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        p = Path(prompt_file)
        if not p.is_file():
            raise LlmctlError(f"--prompt-file {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LlmctlError(f"--prompt-file {p} is not UTF-8 text") from None
        if not text.strip():
            raise LlmctlError(f"--prompt-file {p} is empty; put the prompt text in it")
        return text
    if prompt is None:
        raise LlmctlError("no prompt: give --prompt TEXT or --prompt-file FILE")
    return prompt


def encode_prompt(tok: Tokenizer, text: str, block_size: int, truncate: bool) -> list[int]:
    """Prompt ids that fit the context; an empty prompt starts from <eos> (unconditional sampling)."""
    ids = tok.encode(text) if text else []
    if not ids:
        return [tok.eos_id]
    if len(ids) > block_size:
        if not truncate:
            raise LlmctlError(
                f"the prompt is {len(ids)} tokens but the model's context is {block_size}; "
                "shorten it or pass --truncate to keep its last tokens"
            )
        ids = ids[-block_size:]
    return ids


def infer(
    ckpt: Path,
    prompt: str,
    max_new_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    truncate: bool = False,
    device: str = "auto",
    tokenizer: Optional[Path] = None,
) -> Iterator[str]:
    """`llmctl infer`: stream the completion of one prompt as text pieces."""
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise LlmctlError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if temperature is not None and temperature < 0:
        raise LlmctlError(f"--temperature must not be negative (got {temperature})")
    if top_k is not None and top_k < 1:
        raise LlmctlError(f"--top-k must be at least 1 (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise LlmctlError(f"--top-p must be in (0, 1] (got {top_p})")
    loaded = load_model(ckpt, device, tokenizer=tokenizer)
    g = loaded.cfg.generate
    ids = encode_prompt(loaded.tokenizer, prompt, loaded.cfg.model.block_size, truncate)
    stream = generate(
        loaded.model, ids,
        max_new_tokens=max_new_tokens or g.max_new_tokens,
        temperature=g.temperature if temperature is None else temperature,
        top_k=g.top_k if top_k is None else top_k,
        top_p=g.top_p if top_p is None else top_p,
        eos_id=loaded.tokenizer.eos_id,
        seed=g.seed if seed is None else seed,
    )
    return loaded.tokenizer.stream(stream)


