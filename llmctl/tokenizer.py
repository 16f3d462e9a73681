"""Tokenizers through the `tokenizers` library: character-level, byte-level BPE, or an existing tokenizer.json.

Special tokens are reserved from the start (`<eos>`, `<pad>`, and `<unk>` for the char tokenizer) at ids 0, 1, 2,
so later finetuning on text with unseen characters or that needs padding never resizes the model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator, Optional

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import LlmctlError

EOS, PAD, UNK = "<eos>", "<pad>", "<unk>"
# end-of-text and padding spellings of tokenizers made elsewhere (GPT-2, Llama 2/3, ChatML)
EOS_CANDIDATES = (EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
PAD_CANDIDATES = (PAD, "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class Tokenizer:
    """A thin wrapper that knows its special ids; encode/decode work on plain lists of ints."""

    def __init__(self, tk: HFTokenizer):
        self.tk = tk
        vocab = tk.get_vocab(with_added_tokens=True)
        self.eos_id = next((vocab[t] for t in EOS_CANDIDATES if t in vocab), None)
        self.pad_id = next((vocab[t] for t in PAD_CANDIDATES if t in vocab), self.eos_id)
        self.unk_id = vocab.get(UNK)
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        if self.eos_id is None:
            raise LlmctlError(
                "the tokenizer has no end-of-text token (one of " + ", ".join(EOS_CANDIDATES) + "); add one to tokenizer.json"
            )

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
        tk.train_from_iterator(texts, trainer=trainer)
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
    def sha256(self) -> str:
        return hashlib.sha256(self.to_str().encode()).hexdigest()

    @property
    def kind(self) -> str:
        model = type(self.tk.model).__name__
        if model == "BPE" and isinstance(self.tk.decoder, decoders.Fuse):
            return "char"
        return "bpe" if model == "BPE" else model.lower()

    # --- use ---------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tk.token_to_id(token)

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Decode incrementally: yield each new piece of text once it is complete UTF-8."""
        dec = StreamDecoder(self)
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
    replacement character, and only a short window of recent ids is decoded again at each step.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # start of the window that is decoded again
        self.read = 0  # ids[prefix:read] decode to text already emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read])
        tail = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return tail[len(before) :] if len(tail) > len(before) else ""
