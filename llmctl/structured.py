"""Structured output: JSON that follows a schema, through xgrammar (the optional `structured` extra).

A `Format` is a JSON schema compiled for one tokenizer and one model vocabulary (`compile_schema`): a request carries it
(`rows.Request.format`), and each of its rows gets a `Matcher` that says which tokens may come next and
follows the tokens sampled; the engine's `Masks` fills the masks of all its constrained rows in one call and masks
the batch's logits with them in one before sampling, so constrained and free rows share a batch and the decode step
is the same compiled one. Every mask is AND-ed with the vocabulary's `Utf8` guard (no invalid UTF-8). The JSON is
compact (no whitespace between its parts: `max_tokens` is not spent on spaces), and the row ends at the model's end
id, the only token left once the JSON is complete.

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
_COMPILERS: dict = {}  # (id of the tokenizer object, vocab size) -> (tokenizer, xgrammar.GrammarCompiler, Utf8)


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
    vocabulary, with the tokenizer's end ids as the stop tokens, and the vocabulary's `Utf8` guard; made once per
    tokenizer and vocabulary."""
    key = (id(tok), vocab_size)
    if key not in _COMPILERS:
        xgr = _xgrammar()
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
        encoded = [""] * tok.vocab_size
        for text, i in tok.tk.get_vocab(with_added_tokens=True).items():
            encoded[i] = text
        info = xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=max(vocab_size, tok.vocab_size),
                                 stop_token_ids=list(tok.end_ids), add_prefix_space=meta["add_prefix_space"])
        _COMPILERS[key] = (tok, xgr.GrammarCompiler(info), Utf8.of(info.decoded_vocab[:vocab_size], vocab_size))
    return _COMPILERS[key][1:]


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """(n, V) bool -> (n, words) int32 bitmask in xgrammar's layout (bit j of word i = token 32 i + j; ids past V
    unset)."""
    n, v = allowed.shape
    padded = torch.zeros(n, (v + 31) // 32 * 32, dtype=torch.int64)
    padded[:, :v] = allowed
    words = (padded.view(n, -1, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


# UTF-8: the byte ranges a character's second byte may take after these first bytes (the rest of the continuation
# bytes are 0x80..0xBF): no overlong form (E0, F0), no surrogate (ED), nothing past U+10FFFF (F4)
_SECOND = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}
LEADS = tuple(_SECOND)


def _broken(b: bytes) -> bool:
    """Whether a token's bytes can be part of no valid UTF-8 text: a byte UTF-8 never uses (C0, C1, F5..FF), a stray
    continuation byte, or a character begun in the token and continued wrongly in it (up to 3 continuation bytes at
    its start may finish a character begun before it; a character left open at its end is fine)."""
    i = 0
    while i < len(b) and 0x80 <= b[i] <= 0xBF:
        i += 1
    if i > 3:
        return True
    need, (lo, hi) = 0, (0x80, 0xBF)
    for x in b[i:]:
        if need:
            if not lo <= x <= hi:
                return True
            need, (lo, hi) = need - 1, (0x80, 0xBF)
        elif x >= 0x80:
            if not 0xC2 <= x <= 0xF4:
                return True
            need, (lo, hi) = (1 if x < 0xE0 else 2 if x < 0xF0 else 3), _SECOND.get(x, (0x80, 0xBF))
    return False


@dataclass(frozen=True)
class Utf8:
    """What keeps a vocabulary's tokens to valid UTF-8, which xgrammar 0.2.9 does not quite (it lets a byte-level
    vocabulary write a surrogate, ED A0..BF, inside a string). `table` (1 + len(LEADS), words) int32 bitmasks: row 0
    the tokens whose bytes can be part of valid UTF-8 (no `_broken` one), row k those of them that may follow a token
    whose last byte is LEADS[k - 1] (their first byte is in its second-byte range, or they have no bytes). `after`
    (one byte per token): the row the token after it must be in. AND-ed into every xgrammar mask (`Matcher`)."""

    table: torch.Tensor
    after: bytes

    @classmethod
    def of(cls, vocab: list[bytes], vocab_size: int) -> Optional["Utf8"]:
        """For each token id's bytes (xgrammar's decoded vocabulary; ids past it have none); None when no token
        is broken or ends in one of LEADS (a vocabulary of whole characters, which then needs no guard)."""
        vocab = list(vocab) + [b""] * (vocab_size - len(vocab))
        ok = torch.tensor([not _broken(b) for b in vocab])
        after = bytes(1 + LEADS.index(b[-1]) if b and b[-1] in _SECOND else 0 for b in vocab)
        if bool(ok.all()) and not any(after):
            return None
        first = torch.tensor([b[0] if b else -1 for b in vocab])
        rows = [ok] + [ok & ((first < 0) | ((first >= lo) & (first <= hi))) for lo, hi in _SECOND.values()]
        return cls(_pack(torch.stack(rows)), after)


@dataclass(frozen=True)
class Format:
    """A schema compiled for a tokenizer and a vocabulary of `vocab_size` ids; `stop_ids` end the JSON."""

    schema: str
    vocab_size: int
    stop_ids: tuple[int, ...]
    compiled: Any  # xgrammar.CompiledGrammar
    utf8: Optional[Utf8] = field(default=None, compare=False, repr=False)  # the vocabulary's guard (None: none)
    not_stop: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)  # (1, words) int32: every
    # bit set but the stop ids' (what `Masks.complete` checks)

    def __post_init__(self) -> None:
        keep = torch.ones(1, self.vocab_size, dtype=torch.bool)
        keep[0, [t for t in self.stop_ids if t < self.vocab_size]] = False
        object.__setattr__(self, "not_stop", _pack(keep))


def compile_schema(schema: str, tok: Tokenizer, vocab_size: int, name: str = "response_format") -> Format:
    """`schema` (JSON text) compiled into a compact-JSON `Format`; LlmctlError naming `name` when xgrammar cannot
    compile it (or is not installed)."""
    compiler, utf8 = _compiler(tok, vocab_size)
    try:
        fixed = json.dumps(_bounded_strings(json.loads(schema)))
        compiled = compiler.compile_json_schema(fixed, any_whitespace=False, separators=(",", ":"))
    except Exception as e:  # xgrammar raises RuntimeError (or ValueError) with its reason on the last line
        why = [x for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
        raise LlmctlError(f"{name}: the schema cannot be compiled: {why[-1].split('] ')[-1][:300]}") from None
    fmt = Format(schema, vocab_size, tuple(tok.end_ids), compiled, utf8)
    if not bool(Matcher(fmt).allowed().any()):
        raise LlmctlError(f"{name}: no token of this model's tokenizer can start JSON that follows the schema (a "
                          "character-level tokenizer has only the characters of its training text)")
    return fmt


class Matcher:
    """One row's place in its format: the tokens allowed next (`allowed`), the tokens taken (`accept`). Its bitmask
    of the next tokens (xgrammar's, AND-ed with the `Utf8` guard; bit j of int32 word i = token 32 i + j) is its own,
    or its slot's row of an engine's `Masks`, which fills and applies the masks of a batch's rows together; it is
    filled once per token taken."""

    def __init__(self, fmt: Format):
        xgr = _xgrammar()
        self.fmt = fmt
        self.m = xgr.GrammarMatcher(fmt.compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, fmt.vocab_size)  # (1, words): a view into `home`'s when bound
        self.home: Optional[tuple] = None  # (Masks, slot) whose bitmask row this is
        self.after = 0  # the `Utf8.table` row the next token must be in (what the last token's last byte allows)
        self.filled = False

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that may come next."""
        if not self.filled:
            _fill([self], self.bitmask, [0])
        bits = (self.bitmask[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.bool().reshape(-1)[: self.fmt.vocab_size]

    def accept(self, token: int) -> bool:
        """Follow a sampled token (False: the format does not allow it)."""
        self.filled = False
        if self.fmt.utf8 is not None:
            self.after = self.fmt.utf8.after[token] if token < len(self.fmt.utf8.after) else 0
        return bool(self.m.accept_token(token))


def _fill(ms: list[Matcher], bits: torch.Tensor, rows: list[int], batch: Any = None) -> None:
    """Fill each matcher's next-token mask into row rows[i] of `bits` (through xgrammar's `batch` matcher in one call
    when given), AND-ed with its format's `Utf8` guard."""
    if batch is not None and len(ms) > 1:
        batch.batch_fill_next_token_bitmask([m.m for m in ms], bits, rows)
    else:
        for m, i in zip(ms, rows):
            m.m.fill_next_token_bitmask(bits, i)
    guard = ms[0].fmt.utf8
    if len({id(m.fmt.utf8) for m in ms}) == 1:  # (one vocabulary: one operation for all)
        if guard is not None:
            idx = torch.tensor(rows)
            bits[idx] = bits[idx] & guard.table[[m.after for m in ms]]
    else:
        for m, i in zip(ms, rows):
            if m.fmt.utf8 is not None:
                bits[i] &= m.fmt.utf8.table[m.after]
    for m in ms:
        m.filled = True


class Masks:
    """The next-token masks of an engine's constrained rows: one (slots, words) int32 bitmask whose row s is slot s's,
    filled for all stale rows in one call and applied to the batch's logits in one (`mask`); `complete` tells which
    rows are done. Each row's `Matcher` is bound to its slot's row on first use."""

    def __init__(self, slots: int, vocab_size: int):
        xgr = _xgrammar()
        self.vocab_size, self._apply = vocab_size, xgr.apply_token_bitmask_inplace
        self.bits = xgr.allocate_token_bitmask(slots, vocab_size)
        self._batch = xgr.BatchGrammarMatcher(1)

    def _ready(self, rows: list[tuple[int, Matcher]]) -> None:
        """Bind each (slot, matcher) to its row here and fill the stale ones."""
        for s, m in rows:
            if m.home != (self, s):
                if m.filled:
                    self.bits[s] = m.bitmask[0]
                m.bitmask, m.home = self.bits[s : s + 1], (self, s)
        stale = [(s, m) for s, m in rows if not m.filled]
        if stale:
            _fill([m for _, m in stale], self.bits, [s for s, _ in stale], self._batch)

    def mask(self, logits: torch.Tensor, rows: list[tuple[int, Matcher]]) -> list[bool]:
        """Set logits (float32, row s = slot s) to -inf in place where each (slot, matcher) does not allow the token
        next; whether each allows any token (none: the tokenizer cannot write what the schema needs there)."""
        self._ready(rows)
        slots = [s for s, _ in rows]
        alive = self.bits[slots].any(-1).tolist()
        self._apply(logits, self.bits.to(logits.device), vocab_size=self.vocab_size, indices=slots)
        return alive

    def complete(self, rows: list[tuple[int, Matcher]]) -> list[bool]:
        """Whether each (slot, matcher)'s JSON is complete and nothing but an end id may follow (the row is done);
        fills the next step's masks."""
        live = [(s, m) for s, m in rows if not m.m.is_terminated()]
        self._ready(live)
        if not live:
            return [True] * len(rows)
        slots = [s for s, _ in live]
        stops = {id(m.fmt.not_stop): m.fmt.not_stop for _, m in live}
        not_stop = next(iter(stops.values())) if len(stops) == 1 else torch.cat([m.fmt.not_stop for _, m in live])
        going = dict(zip(slots, (self.bits[slots] & not_stop).any(-1).tolist()))
        return [not going.get(s, False) for s, _ in rows]
