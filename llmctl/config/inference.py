"""The `generate:`, `eval:` and `serve:` sections: using a trained model (docs/inference.md, docs/evaluation.md,
docs/serving.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .. import sampling
from .bounds import at_least
from .whole import Whole

# the precisions and weight formats generation runs in (generate.dtype / --dtype, generate.quantize / --quantize)
INFER_DTYPES = ("auto", "float32", "bfloat16")
QUANTIZE_MODES = ("auto", "none", "int8")


@dataclass
class GenerateConfig:
    """How `llmctl infer`, `serve` and `eval --tasks` generate, and the precision they decode in. Flags such as
    --temperature are shorthand for these keys; the sampling keys mean the same and follow the same rules on every
    surface (llmctl.sampling)."""

    max_new_tokens: int = 256
    """The most tokens generated after a prompt (a stop string or the end of text ends sooner)."""
    temperature: float = 0.8
    """Sampling temperature; 0: greedy (always the most likely token)."""
    top_k: Optional[int] = 200
    """Sample only from the k most likely tokens; 0, -1 or null: from all."""
    top_p: Optional[float] = None
    """Nucleus sampling: only from the most likely tokens whose probabilities add up to top_p; null: off."""
    seed: Optional[int] = None
    """Seed of the sampling, for repeatable output; null: a fresh random seed each time."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in the prompt or output (> 1 discourages repeats); 1: off."""
    presence_penalty: float = 0.0
    """OpenAI's presence penalty, -2 to 2: subtracted from the logit of each token already generated; 0: off."""
    frequency_penalty: float = 0.0
    """OpenAI's frequency penalty, -2 to 2: subtracted from a token's logit once per time it was generated; 0: off."""
    logit_bias: Optional[dict] = None
    """Token id -> bias, -100 to 100, added to that token's logit at every step (-100 bans it); null: none."""
    stop: list[str] = field(default_factory=list)
    """The text ends before the first of these strings (at most sampling.MAX_STOPS, 16); []: none."""
    dtype: Literal[INFER_DTYPES] = "auto"
    """Precision of the weights; auto: bfloat16 on CUDA where supported, else float32 (docs/inference.md)."""
    quantize: Literal[QUANTIZE_MODES] = "auto"
    """int8 weights (CPU: dynamic int8, CUDA: weight-only int8) or none; auto: int8 on x86 CPUs for models of 10M
    parameters or more, none below and elsewhere."""
    compile: Literal["auto", True, False] = "auto"
    """The decode step compiled ahead of time (llmctl.aot): auto uses it when cached, true builds it if missing,
    false always decodes eagerly. auto and true also trace the one-row step on a CPU where no compiled step serves
    it (llmctl.traced; int8 on a CPU gets only this)."""
    batch_size: int = 8
    """Prompts decoded together by `infer --input` (continuous batching)."""
    draft: Optional[str] = None
    """Speculative decoding of `infer --prompt` and of `serve` (while one greedy request decodes alone): prompt-lookup
    (n-gram drafts from the prompt and the text so far), or a small llmctl checkpoint with the same tokenizer; null:
    off (docs/inference.md#speculative-decoding)."""
    draft_tokens: int = 4
    """Tokens the draft proposes per target forward (speculative decoding)."""
    lookup_ngram: int = 3
    """The longest n-gram prompt lookup matches (it tries n, n-1, ... 1)."""

    def check(self, cfg: Whole) -> list[str]:
        """Impossible generation settings: the sampling keys by llmctl.sampling's rules."""
        values = {f: getattr(self, f) for f in sampling.FIELDS}
        return [f"generate.{x.field}: {x.message}" for x in sampling.problems(values)] + at_least(
            "generate", self, ["batch_size", "draft_tokens", "lookup_ngram"])


@dataclass
class EvalConfig:
    """`llmctl eval` settings."""

    batch_size: int = 16
    """Sequences per batch of `llmctl eval` and of the validation passes during training."""
    text_column: Optional[str] = None
    """Text column of the file given to `eval --data`; null: data.text_column."""
    label_column: Optional[str] = None
    """Label column of the file given to `eval --data` (classifiers); null: data.label_column."""

    def check(self, cfg: Whole) -> list[str]:
        """Impossible evaluation settings."""
        return at_least("eval", self, ["batch_size"])


@dataclass
class ServeConfig:
    """`llmctl serve` settings (docs/serving.md)."""

    slots: int = 16
    """Requests decoded together (continuous batching): the KV cache holds this many sequences."""
    max_queue: int = 256
    """Requests waiting for a slot; one more is refused with 429 and Retry-After."""
    max_tokens: int = 4096
    """The most new tokens one request may ask for (more: 400)."""
    max_body_bytes: int = 1 << 20
    """Larger request bodies are refused with 413."""
    request_timeout: float = 600.0
    """Seconds from a request's arrival to its last token; then it ends with 504."""
    drain_timeout: float = 30.0
    """Seconds a SIGTERM or SIGINT waits for the requests in flight before the server exits."""
    model_name: Optional[str] = None
    """The model's id in the API; null: the run directory's name."""
    prefix_cache: bool = True
    """Keep the keys and values of prompt prefixes (in blocks of tokens) after their prefill, so a prompt that starts
    with text already seen (a system prompt, a chat's history) prefills only the rest; false: prefill every prompt
    whole."""
    prefix_cache_mib: int = 512
    """The prefix cache's budget in MiB of keys and values; past it the least recently used blocks go."""

    def check(self, cfg: Whole) -> list[str]:
        """Impossible serving settings."""
        p = at_least("serve", self, ["slots", "max_queue", "max_tokens", "max_body_bytes"]
                     + (["prefix_cache_mib"] if self.prefix_cache else []))
        for name in ("request_timeout", "drain_timeout"):
            if getattr(self, name) <= 0:
                p.append(f"serve.{name}: must be a positive number of seconds (got {getattr(self, name)})")
        if self.model_name is not None and not self.model_name.strip():
            p.append("serve.model_name: must not be empty (or null for the run directory's name)")
        return p
