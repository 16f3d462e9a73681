"""Tokenizers through the `tokenizers` library: character-level, byte-level BPE, or an existing tokenizer.json.

Special tokens are reserved from the start (`<eos>`, `<pad>`, and `<unk>` for the char tokenizer) at ids 0, 1, 2,
so later finetuning on text with unseen characters or that needs padding never resizes the model.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Optional

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import LlmctlError
from .interrupt import in_thread

EOS, PAD, UNK = "<eos>", "<pad>", "<unk>"
# end-of-text and padding spellings of tokenizers made elsewhere (GPT-2, Llama 2/3, ChatML)
EOS_CANDIDATES = (EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
PAD_CANDIDATES = (PAD, "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
# an encoder's special tokens: the masked-LM mask, and the classification token and separator around each text
MASK, CLS, SEP = "[MASK]", "[CLS]", "[SEP]"
ENCODER_TOKENS = {"mask_token": (MASK, "<mask>"), "cls_token": (CLS, "<cls>"), "sep_token": (SEP, "<sep>")}
# characters per piece of a long text, and per native call: one call takes well under a second (~1-2 MB/s on
# a CPU core), so a signal is heard between calls (llmctl.interrupt) and pieces spread over the cores
PIECE_CHARS = 1 << 18
CALL_CHARS = 1 << 20


class Tokenizer:
    """A thin wrapper that knows its special ids; encode/decode work on plain lists of ints.

    `special_tokens` (tokenizer.special_tokens: the names an imported tokenizer_config.json gives, bos_token,
    eos_token, ...) name the end-of-text, padding and beginning-of-text tokens; without them they are found by
    their usual spellings. `end_ids` (tokenizer.end_ids: generation_config.json's eos_token_id) end generation
    besides the end-of-text token."""

    def __init__(self, tk: HFTokenizer, special_tokens: Optional[dict] = None, end_ids: Iterable[int] = ()):
        self.tk = tk
        vocab = tk.get_vocab(with_added_tokens=True)
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.named = None if special_tokens is None else dict(special_tokens)
        named = self.named or {}
        for name, text in named.items():
            if text not in vocab:
                raise LlmctlError(f"tokenizer.special_tokens: {name} {text!r} is not a token of the tokenizer; "
                                  "name one of its tokens (or give the tokenizer_config.json that belongs to it)")
        first = lambda names, default=None: next((vocab[t] for t in names if t in vocab), default)  # noqa: E731
        self.eos_id = vocab[named["eos_token"]] if "eos_token" in named else first(EOS_CANDIDATES)
        self.pad_id = vocab[named["pad_token"]] if "pad_token" in named else first(PAD_CANDIDATES, self.eos_id)
        self.unk_id = vocab.get(named.get("unk_token", UNK))
        # a tokenizer_config.json that names no bos_token has none (Qwen); without one, the usual spellings
        self.bos_id = vocab[named["bos_token"]] if "bos_token" in named else \
            (None if self.named is not None else first(BOS_CANDIDATES))
        if self.eos_id is None:
            raise LlmctlError(
                "the tokenizer has no end-of-text token (one of " + ", ".join(EOS_CANDIDATES)
                + "); add one to tokenizer.json, or name it in tokenizer.special_tokens.eos_token"
            )
        bad = [i for i in end_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise LlmctlError(f"tokenizer.end_ids: {bad[0]} is not a token id of the tokenizer (it has "
                              f"{self.vocab_size} tokens); give the generation_config.json of this model")
        self.end_ids = tuple(dict.fromkeys([self.eos_id, *end_ids]))  # the end-of-text token first
        # the encoder's tokens: named ones (an imported tokenizer_config.json), else their usual spellings
        self.mask_id, self.cls_id, self.sep_id = (
            vocab[named[name]] if name in named else first(spellings) for name, spellings in ENCODER_TOKENS.items())

    def with_encoder_tokens(self) -> "Tokenizer":
        """This tokenizer with [MASK], [CLS] and [SEP] added as special tokens (after every existing id) where it
        has no such token: what an encoder's masked-LM pretraining and classification need."""
        missing = [spellings[0] for spellings, have in zip(ENCODER_TOKENS.values(),
                                                           (self.mask_id, self.cls_id, self.sep_id)) if have is None]
        if not missing:
            return self
        tk = HFTokenizer.from_str(self.tk.to_str())
        tk.add_special_tokens(missing)
        return Tokenizer(tk, self.named, self.end_ids[1:])

    def configured(self, tc) -> "Tokenizer":
        """This tokenizer with the model's settings of the `tokenizer:` section (tc: TokenizerConfig):
        special_tokens and end_ids."""
        return Tokenizer(self.tk, tc.special_tokens, tc.end_ids or ())

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens a chat template sees (transformers' special_tokens_map): the imported ones, or
        for a tokenizer without names eos_token, pad_token and the bos_token/unk_token it has."""
        if self.named is not None:
            return dict(self.named)
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id, "pad_token": self.pad_id}
        return {name: self.tk.id_to_token(i) for name, i in ids.items() if i is not None}

    # --- construction ------------------------------------------------------------------------------------------
    @classmethod
    def train_char(cls, texts: Iterable[str]) -> "Tokenizer":
        """One token per distinct character of the corpus, plus <eos>, <pad>, <unk>."""
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        vocab = {EOS: 0, PAD: 1, UNK: 2}
        for c in sorted(chars):
            vocab.setdefault(c, len(vocab))
        # a BPE model with no merges splits text into characters and maps unseen ones to <unk>
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
        tk.decoder = decoders.Fuse()
        tk.add_special_tokens([EOS, PAD, UNK])
        return cls(tk)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Byte-level BPE (GPT-2 style pre-tokenization) with `vocab_size` tokens in all."""
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        in_thread(lambda: tk.train_from_iterator(texts, trainer=trainer))  # minutes on a big corpus: stay stoppable
        return cls(tk)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        p = Path(path)
        if not p.is_file():
            raise LlmctlError(f"tokenizer file not found: {p} (give the path of a tokenizer.json)")
        try:
            return cls(HFTokenizer.from_file(str(p)))
        except LlmctlError:
            raise
        except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
            raise LlmctlError(f"{p} is not a valid tokenizer.json: {str(e).splitlines()[0][:200]}") from None

    @classmethod
    def from_str(cls, text: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(text))

    def to_str(self) -> str:
        return self.tk.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")

    @property
    def eos_token(self) -> str:
        """The end-of-text token's text (how a rendered chat closes an answer)."""
        return self.tk.id_to_token(self.eos_id)

    @property
    def sha256(self) -> str:
        """The identity of the tokenizer, the one home of "the same tokenizer" (token caches, a teacher's and
        student's match, a policy's and its reference's): what it is, never how it was written down. Its
        tokenizer.json's content (key order and layout aside), the special tokens a template sees, and the ids it
        resolved (end-of-text, padding, BOS, end ids...; another end-of-text token joins documents differently);
        whether the ids were named (an imported tokenizer_config.json) or found by their usual spellings does not
        count, so a tokenizer exported and imported again, or saved again, keeps its identity. (to_str is the
        tokenizers library writing what it holds, whatever the file it read looked like.)"""
        ids = {"eos": self.eos_id, "pad": self.pad_id, "unk": self.unk_id, "bos": self.bos_id, "mask": self.mask_id,
               "cls": self.cls_id, "sep": self.sep_id, "end": list(self.end_ids)}
        settings = json.dumps({"special_tokens": self.special_tokens, "ids": ids}, sort_keys=True)
        return hashlib.sha256((self.to_str() + "\x1f" + settings).encode()).hexdigest()

    @property
    def kind(self) -> str:
        model = type(self.tk.model).__name__
        if model == "BPE" and isinstance(self.tk.decoder, decoders.Fuse):
            return "char"
        return "bpe" if model == "BPE" else model.lower()

    # --- use ---------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """The ids of `text`, no special tokens added: training text, and chat text (its template writes them)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """The ids of a plain prompt, with the special tokens the tokenizer's post-processor adds (a Llama 2 or
        Gemma BOS), as transformers' tokenizer(text) does; llmctl's own tokenizers add none."""
        return self.tk.encode(text, add_special_tokens=True).ids

    def added_specials(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a plain prompt's own ids (e.g. ([bos], []))."""
        plain = self.tk.encode("a", add_special_tokens=False).ids
        full = self.tk.encode("a", add_special_tokens=True).ids
        for k in range(len(full) - len(plain) + 1):
            if full[k : k + len(plain)] == plain:
                return full[:k], full[k + len(plain):]
        return [], []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text. Long texts are encoded in pieces (the same ids: see `pieces`), a bounded amount
        per native call; a long text that cannot be cut is encoded in a worker thread."""
        if sum(len(t) for t in texts) <= CALL_CHARS:
            return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]
        out: list[list[int]] = []
        for text in texts:
            parts = self.pieces(text)
            if len(parts) == 1 and len(text) > CALL_CHARS:
                out.append(in_thread(lambda: self.encode(text)))
                continue
            ids: list[int] = []
            group: list[str] = []
            for i, part in enumerate(parts):
                group.append(part)
                if i == len(parts) - 1 or sum(map(len, group)) + len(parts[i + 1]) > CALL_CHARS:
                    for e in self.tk.encode_batch(group, add_special_tokens=False):
                        ids.extend(e.ids)
                    group = []
            out.append(ids)
        return out

    def pieces(self, text: str, size: int = PIECE_CHARS) -> list[str]:
        """`text` cut into pieces of about `size` characters whose ids, concatenated, are the ids of the whole.

        Cuts go after a single newline between two non-space characters (`safe_cut`). A character tokenizer could be
        cut anywhere but for its special tokens spelled out in the text (no newline in them); GPT-2-style byte-level
        BPE (a ByteLevel pre-tokenizer with its regex, no prefix space, no normalizer: llmctl's own and GPT-2's) has
        no pre-token that spans such a newline. Any other tokenizer keeps the text whole."""
        if len(text) <= size or not self._cuts_at_lines:
            return [text]
        out, start = [], 0
        while len(text) - start > size:
            cut = text.find("\n", start + size - 1)
            while cut != -1 and not safe_cut(text, cut + 1):
                cut = text.find("\n", cut + 1)
            if cut == -1 or cut + 1 >= len(text):
                break
            out.append(text[start : cut + 1])
            start = cut + 1
        out.append(text[start:])
        return out

    def last_cut(self, text: str) -> int:
        """Where `text` may be cut last so that tokenizing the two parts gives the ids of the whole (the rule of
        `pieces`), or -1 when it cannot be cut."""
        return line_cut(text) if self._cuts_at_lines else -1

    @cached_property
    def _cuts_at_lines(self) -> bool:
        if self.kind == "char":
            return True
        spec = json.loads(self.to_str())
        pre = spec.get("pre_tokenizer") or {}
        return bool(spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                    and not pre.get("add_prefix_space", False) and type(self.tk.model).__name__ == "BPE")

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text` (no special tokens added: a rendered chat writes its own) and each token's character
        span in it, [start, end)."""
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    @cached_property
    def special_texts(self) -> frozenset[str]:
        """The text of every special token (added tokens marked special), and of the end-of-text token."""
        added = self.tk.get_added_tokens_decoder().values()
        return frozenset([t.content for t in added if t.special] + [self.eos_token])

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tk.token_to_id(token)

    def unseen(self, texts: str | Iterable[str]) -> "Unseen":
        """What of `texts` this tokenizer can only map to <unk> (characters a char tokenizer never saw in training):
        the distinct pieces in order of first appearance, how many there are in all, and which texts hold them.

        Found from the encoding itself (ids equal to the <unk> id, sliced out by their offsets), so it holds for any
        tokenizer with an <unk> token; byte-level BPE has none and never reports anything. `<unk>` spelled out in
        a text is the special token on purpose, not an unseen character."""
        found = Unseen()
        if self.unk_id is None:
            return found
        for n, text in enumerate([texts] if isinstance(texts, str) else texts):
            text = text if isinstance(text, str) else ""
            for part in self.pieces(text):  # one bounded native call each: a long --data file stays stoppable
                enc = self.tk.encode(part, add_special_tokens=False)
                if self.unk_id not in enc.ids:
                    continue
                for i, (start, end) in zip(enc.ids, enc.offsets):
                    if i == self.unk_id and part[start:end] != UNK:
                        found.add(part[start:end], n)
        return found

    def stream(self, ids: Iterable[int], skip_special: bool = True) -> Iterator[str]:
        """Decode incrementally: yield each new piece of text once it is complete UTF-8 (joined, the pieces are
        `decode(ids, skip_special)`)."""
        dec = StreamDecoder(self, skip_special)
        for i in ids:
            piece = dec.push(i)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail


class StreamDecoder:
    """Incremental detokenization of one sequence.

    Byte-level tokens can end inside a multi-byte character, so a piece is held back while it ends in the
    replacement character, and only a short window of recent ids is decoded again at each step. The window keeps the
    token before the new ones, so decoders that treat the first token apart (SentencePiece's Metaspace and Strip
    drop its leading space) see the new tokens as they are in the middle of the text.
    """

    def __init__(self, tok: Tokenizer, skip_special: bool = True):
        self.tok, self.skip = tok, skip_special
        self.ids: list[int] = []
        self.prefix = 0  # start of the window that is decoded again
        self.read = 0  # ids[prefix:read] decode to text already emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix :], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        tail = self.tok.decode(self.ids[self.prefix :], self.skip)
        self.prefix = self.read = len(self.ids)
        return tail[len(before) :] if len(tail) > len(before) else ""


class Unseen:
    """What `Tokenizer.unseen` found: `pieces` (distinct, in order), `count` (all occurrences), `texts` (the indices
    of the texts holding any). Falsy when nothing was found; `message(what)` is the one warning line."""

    SHOWN = 5  # distinct pieces named in the message

    def __init__(self) -> None:
        self.pieces: dict[str, int] = {}  # piece -> occurrences
        self.count = 0
        self.texts: list[int] = []

    def add(self, piece: str, text: int) -> None:
        self.pieces[piece] = self.pieces.get(piece, 0) + 1
        self.count += 1
        if not self.texts or self.texts[-1] != text:
            self.texts.append(text)

    def __bool__(self) -> bool:
        return self.count > 0

    def message(self, what: str) -> str:
        """The warning, e.g. "the prompt: 3 characters the tokenizer never saw in training became <unk> (2 distinct:
        '🙂', '🎉'); the model reads nothing there" (`what`: the prompt, --input rows 2, 5, --data FILE...)."""
        names = [repr(p) for p in list(self.pieces)[: self.SHOWN]]
        more = len(self.pieces) - len(names)
        shown = ", ".join(names) + (f" and {more} more" if more else "")
        one = self.count == 1
        distinct = f"{len(self.pieces)} distinct: " if len(self.pieces) != self.count else ""
        return (f"{what}: {self.count} character{'' if one else 's'} the tokenizer never saw in training "
                f"became <unk> ({distinct}{shown}); the model reads nothing there")


def safe_cut(text: str, at: int) -> bool:
    """Whether `text` may be cut at `at`: right after a newline that has a non-space character on both sides. The
    byte-level regex gives such a newline a pre-token of its own either way; next to other whitespace it would not
    (two newlines ending a piece are one pre-token, but two before a word are two)."""
    return (0 < at - 1 and at < len(text) and text[at - 1] == "\n" and not text[at - 2].isspace()
            and not text[at].isspace())


def line_cut(text: str) -> int:
    """The index of the last `safe_cut` of `text` (-1: none): no pre-token of a character tokenizer or of GPT-2-style
    byte-level BPE spans it."""
    i = text.rfind("\n", 0, len(text) - 1)
    while i != -1 and not safe_cut(text, i + 1):
        i = text.rfind("\n", 0, i)
    return i + 1 if i != -1 else -1
