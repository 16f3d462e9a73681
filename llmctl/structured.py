"""Structured output: JSON that follows a schema, through xgrammar (the optional `structured` extra).

A `Format` is a JSON schema compiled for one tokenizer and one model vocabulary (`compile_schema`): a request carries it
(`generate.Request.format`), and each of its rows gets a `Matcher` that says which tokens may come next and
follows the tokens sampled. The engine masks a constrained row's logits with it before sampling, so constrained and
free rows share a batch and the decode step is the same compiled one. The JSON is compact (no whitespace between
its parts: `max_tokens` is not spent on spaces), and the row ends at the model's end id, the only token left once
the JSON is complete.

What is asked for (`spec`): OpenAI's `response_format`: `{"type": "json_object"}` (any JSON object),
`{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}` (strict or not, the
schema is followed), or `{"type": "text"}` (no constraint). xgrammar is imported only here and only when a format
is asked for (it brings transformers along; llmctl's own code never imports that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import LlmctlError
from .fileio import read_text
from .tokenizer import Tokenizer

TYPES = ("text", "json_object", "json_schema")
ANY_OBJECT = '{"type": "object"}'
_COMPILERS: dict = {}  # (id of the tokenizer object, vocab size) -> (tokenizer, xgrammar.GrammarCompiler)


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise LlmctlError("response_format needs the optional xgrammar package: pip install 'llmctl[structured]'"
                          ) from None
    return xgrammar


def spec(response_format: Any, name: str = "response_format") -> Optional[str]:
    """The JSON schema (text) that OpenAI's `response_format` asks for, or None for plain text; LlmctlError naming
    `name` when its shape is wrong or its type unknown."""
    if not isinstance(response_format, dict):
        raise LlmctlError(f"{name} must be an object such as {{\"type\": \"json_object\"}} (got {response_format!r})")
    kind = response_format.get("type")
    if kind not in TYPES:
        raise LlmctlError(f"{name} type must be one of {', '.join(TYPES)} (got {kind!r})")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    js = response_format.get("json_schema")
    schema = js.get("schema") if isinstance(js, dict) else None
    if not isinstance(schema, dict):
        raise LlmctlError(f"{name} json_schema needs a \"schema\" object: "
                          "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}")
    return json.dumps(schema)


# A JSON string's characters that need no escape; xgrammar 0.2.9 compiles `minLength`/`maxLength` into a character
# class that lets raw control characters (U+0000..U+001F but \n and \r) in, which JSON forbids unescaped
_PLAIN = r'[^"\\\x00-\x1f]'
_NOT_SCHEMAS = ("enum", "const", "default", "examples")  # keys whose values are data, not schemas


def _bounded_strings(node: Any) -> Any:
    """The schema with every length-bounded string that has no `pattern` or `format` of its own rewritten as a
    `pattern` of that many plain characters (no escapes: no quote, backslash or control character), which xgrammar
    compiles into valid JSON; the values it allows are a subset of the schema's, so they validate against it."""
    if isinstance(node, list):
        return [_bounded_strings(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in _NOT_SCHEMAS else _bounded_strings(v)) for k, v in node.items()}
    low, high = out.get("minLength"), out.get("maxLength")
    if out.get("type") == "string" and (low is not None or high is not None) and "pattern" not in out \
            and "format" not in out and all(isinstance(x, int) for x in (low or 0, high or 0)):
        out.pop("minLength", None), out.pop("maxLength", None)
        out["pattern"] = f"^{_PLAIN}{{{low or 0},{'' if high is None else high}}}$"
    return out


def read_schema(path) -> str:
    """The schema in a JSON file (`infer --json-schema FILE`), as text."""
    try:
        schema = json.loads(read_text(path, "--json-schema"))
    except json.JSONDecodeError as e:
        raise LlmctlError(f"--json-schema {path} is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise LlmctlError(f"--json-schema {path} must hold a JSON object (a JSON schema)")
    return json.dumps(schema)


def _compiler(tok: Tokenizer, vocab_size: int):
    """xgrammar's compiler for this tokenizer (its tokenizer.json says the vocabulary's kind) padded to the model's
    vocabulary, with the tokenizer's end ids as the stop tokens; made once per tokenizer and vocabulary."""
    key = (id(tok), vocab_size)
    if key not in _COMPILERS:
        xgr = _xgrammar()
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
        encoded = [""] * tok.vocab_size
        for text, i in tok.tk.get_vocab(with_added_tokens=True).items():
            encoded[i] = text
        info = xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=max(vocab_size, tok.vocab_size),
                                 stop_token_ids=list(tok.end_ids), add_prefix_space=meta["add_prefix_space"])
        _COMPILERS[key] = (tok, xgr.GrammarCompiler(info))
    return _COMPILERS[key][1]


@dataclass(frozen=True)
class Format:
    """A schema compiled for a tokenizer and a vocabulary of `vocab_size` ids; `stop_ids` end the JSON."""

    schema: str
    vocab_size: int
    stop_ids: tuple[int, ...]
    compiled: Any  # xgrammar.CompiledGrammar
    not_stop: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)  # (1, words) int32: every
    # bit set but the stop ids' (what `Matcher.complete` checks)

    def __post_init__(self) -> None:
        words = [0xFFFFFFFF] * ((self.vocab_size + 31) // 32)
        for t in self.stop_ids:
            if t < self.vocab_size:
                words[t // 32] &= ~(1 << (t % 32)) & 0xFFFFFFFF
        signed = [w - (1 << 32) if w >= 1 << 31 else w for w in words]
        object.__setattr__(self, "not_stop", torch.tensor([signed], dtype=torch.int32))


def compile_schema(schema: str, tok: Tokenizer, vocab_size: int, name: str = "response_format") -> Format:
    """`schema` (JSON text) compiled into a compact-JSON `Format`; LlmctlError naming `name` when xgrammar cannot
    compile it (or is not installed)."""
    compiler = _compiler(tok, vocab_size)
    try:
        fixed = json.dumps(_bounded_strings(json.loads(schema)))
        compiled = compiler.compile_json_schema(fixed, any_whitespace=False, separators=(",", ":"))
    except Exception as e:  # xgrammar raises RuntimeError (or ValueError) with its reason on the last line
        why = [x for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
        raise LlmctlError(f"{name}: the schema cannot be compiled: {why[-1].split('] ')[-1][:300]}") from None
    fmt = Format(schema, vocab_size, tuple(tok.end_ids), compiled)
    if not bool(Matcher(fmt).allowed().any()):
        raise LlmctlError(f"{name}: no token of this model's tokenizer can start JSON that follows the schema (a "
                          "character-level tokenizer has only the characters of its training text)")
    return fmt


class Matcher:
    """One row's place in its format: the tokens allowed next (`allowed`, `mask`), the tokens taken (`accept`).
    Each step reads xgrammar's bitmask of the next tokens once (bit j of int32 word i = token 32 i + j) and works on
    its words: a step's mask and the end check cost a few small tensor operations, not one per token."""

    def __init__(self, fmt: Format):
        xgr = _xgrammar()
        self.fmt, self._apply = fmt, xgr.apply_token_bitmask_inplace
        self.m = xgr.GrammarMatcher(fmt.compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, fmt.vocab_size)
        self._filled = False

    def _words(self) -> torch.Tensor:
        if not self._filled:
            self.m.fill_next_token_bitmask(self.bitmask)
            self._filled = True
        return self.bitmask

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that may come next."""
        bits = (self._words()[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.bool().reshape(-1)[: self.fmt.vocab_size]

    def mask(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        """logits (V,) as float32 with every token the format does not allow next at -inf (a copy: `logits` stay
        as they are); None when it allows none (the tokenizer cannot write what the schema needs here)."""
        words = self._words()
        if not bool(words.any()):
            return None
        out = logits.to(torch.float32, copy=True)
        self._apply(out[None], words.to(out.device), vocab_size=self.fmt.vocab_size)
        return out

    def accept(self, token: int) -> bool:
        """Follow a sampled token (False: the format does not allow it)."""
        self._filled = False
        return bool(self.m.accept_token(token))

    @property
    def complete(self) -> bool:
        """The JSON is complete and nothing but an end id may follow: the row is done."""
        if self.m.is_terminated():
            return True
        return not bool((self._words() & self.fmt.not_stop).any())
