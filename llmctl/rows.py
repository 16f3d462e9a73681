"""Requests and rows: what a caller asks the engine for (`Request`, with `fit_prompt`, the one rule for a prompt
longer than the context, and `bias_problem`, the part of a request's check that needs the model) and what the
engine keeps per row while it runs (`Row`: slot, tokens, position, sampler, text released past stop strings, and
how it finished). llmctl.generate's `Engine` moves rows through slots; the server and speculative decoding read
them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import LlmctlError
from .logits import LogProb
from .sampling import Sampling
from .structured import Format, Matcher
from .tokenizer import StreamDecoder, Tokenizer

FINISH_REASONS = ("eos", "length", "stop", "cancelled")


MAX_LOGPROBS = 20  # the most alternatives per position a request may ask for (OpenAI's limit)
@dataclass
class Request:
    """One prompt (token ids that fit the context: `fit_prompt`) and how to continue it (checked when built; stop
    strings need the engine's tokenizer).

    `logprobs`: record, for each generated token (an end id included), its log-probability and the `logprobs` most
    likely alternatives (0..MAX_LOGPROBS; None: record nothing). `prompt_logprobs`: record the same for every prompt
    token after the first, from the prefill (what `echo` shows). `generate` False: only score the prompt (the row
    ends after its prefill with reason "length", nothing generated). Log-probabilities are the log-softmax of the
    logits the row samples from after the penalties and `logit_bias` and before temperature, top-k and top-p (the
    model's own distribution when no penalty or bias is set, so a prompt's values equal `llmctl eval`'s)."""

    prompt: list[int]
    sampling: Sampling
    logprobs: Optional[int] = None
    prompt_logprobs: bool = False
    generate: bool = True
    format: Optional[Format] = None


def bias_problem(s: Sampling, vocab: int) -> Optional[str]:
    """What is wrong with `s.logit_bias` for a model of `vocab` tokens (None: nothing): the one part of its check
    that needs the model."""
    out = [t for t, _ in s.logit_bias if t >= vocab]
    return f"names token id {out[0]}, outside the model's vocabulary of {vocab} (ids 0..{vocab - 1})" if out else None


def fit_prompt(tok: Tokenizer, prompt: str | list[int], context: int, truncate: bool,
               how: str = "pass --truncate") -> list[int]:
    """The ids of `prompt` (ids already, or a plain prompt's text: encoded with the special tokens the tokenizer's
    post-processor adds, `Tokenizer.encode_prompt`) that fit in `context` tokens, the one rule of infer, chat, serve
    and the lm-eval harness: an empty prompt starts from end-of-text (unconditional sampling); a longer one keeps
    its last `context` tokens when `truncate`, else it is refused, `how` telling how to ask for that instead."""
    ids = tok.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        return [tok.eos_id]
    if len(ids) > context:
        if not truncate:
            raise LlmctlError(f"the prompt is {len(ids)} tokens but the model's context is {context} tokens; "
                              f"shorten it or {how} to keep its last tokens")
        ids = ids[-context:]
    return ids


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (not released yet)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


@dataclass(eq=False)
class Row:
    """A request in the engine: everything that is per row lives here (slot, tokens, position, sampler, text).

    `tokens` holds the prompt and every generated token (for sliding and the repetition penalty); `pos` is how
    many of the newest of them the slot's cache holds. With a tokenizer the row also keeps its text: `text` is
    what was generated so far minus anything from a stop string on, and `take_text()` returns the part that is
    released (a piece that could still grow into a stop string is held back until it cannot)."""

    request: Request
    tokens: list[int]
    generator: Optional[torch.Generator] = None
    decoder: Optional[StreamDecoder] = None
    matcher: Optional[Matcher] = None  # with request.format: where the row is in it
    slot: Optional[int] = None
    pos: int = 0
    produced: int = 0
    finish_reason: Optional[str] = None  # one of FINISH_REASONS once done
    end_id: Optional[int] = None  # the end id that ended the row (finish_reason "eos"), not in `tokens`
    cancelled: bool = False  # set from any thread; the engine frees the slot at its next step
    text: str = ""
    released: int = 0  # characters of `text` that may be shown
    taken: int = 0  # characters of `text` handed out by take_text
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    new_tokens: list[int] = field(default_factory=list)  # generated since the caller last looked
    logprobs: list[LogProb] = field(default_factory=list)  # per generated token, with request.logprobs set
    prompt_logprobs: list[LogProb] = field(default_factory=list)  # per prompt token after the first (echo)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self.cancelled = True

    def take_text(self) -> str:
        piece = self.text[self.taken : self.released]
        self.taken = self.released
        return piece

    def _push(self, token: int) -> None:
        """Append a generated token (not <eos>); ends the row at its budget or at a stop string."""
        self.tokens.append(token)
        self.produced += 1
        self.new_tokens.append(token)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.decoder is not None:
            self._add_text(self.decoder.push(token))
        if not self.done and self.produced >= self.request.sampling.max_new_tokens:
            self._finish("length")

    def _take(self, token: int, end_ids: frozenset) -> None:
        """The row's next token: an end id ends it (kept in `end_id`, not in `tokens`), any other is pushed."""
        if token in end_ids:
            self.end_id = token
            self._finish("eos")
        else:
            self._push(token)

    def _add_text(self, piece: str) -> None:
        stops = self.request.sampling.stop
        start = max(0, len(self.text) - max((len(s) for s in stops), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in stops if s) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.released = len(self.text)
            self.finish_reason = "stop"
        else:
            self.released = len(self.text) - held_back(self.text, stops)

    def _finish(self, reason: str) -> None:
        if self.decoder is not None and reason != "stop":
            self._add_text(self.decoder.flush())
            if self.finish_reason == "stop":  # the last bytes completed a stop string
                return
            self.released = len(self.text)
        self.finish_reason = reason
