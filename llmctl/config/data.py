"""The `tokenizer:` and `data:` sections: what text is read and how it becomes tokens (docs/data.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional

from .whole import Whole


def default_cache_dir() -> str:
    """Where token caches and downloads live unless `data.cache_dir` says otherwise."""
    return os.environ.get("LLMCTL_CACHE_DIR") or str(Path.home() / ".cache" / "llmctl")


@dataclass
class TokenizerConfig:
    """A character-level or byte-level BPE tokenizer trained on the corpus, or an existing tokenizer.json."""

    kind: Literal["char", "bpe"] = "char"
    """char: one token per character of the corpus; bpe: byte-level BPE learned from the corpus."""
    vocab_size: int = 4096
    """Total tokens of a BPE tokenizer, special tokens included (bpe only)."""
    path: Optional[str] = None
    """An existing tokenizer.json to use, so nothing is trained; null: train one on the corpus."""
    train_chars: int = 2_000_000_000
    """BPE learns from at most this many characters of the corpus (a seeded sample of it when larger)."""
    chat_template: Optional[str] = None
    """The model's own Jinja chat template (`import hf` reads it from chat_template.jinja or tokenizer_config.json),
    rendered as transformers renders it by infer --chat, serve and instruction SFT; null: llmctl's instruction
    template (finetune.prompt_template)."""
    special_tokens: Optional[dict] = None
    """The named special tokens of an imported tokenizer (bos_token, eos_token, pad_token, ... as its
    tokenizer_config.json names them): its chat template sees them, and eos_token is the end-of-text token; null:
    found by their usual spellings (<eos>, <pad>, </s>, <|endoftext|>, ...)."""
    end_ids: Optional[list[int]] = None
    """Token ids that end generation besides the end-of-text token (generation_config.json's eos_token_id, e.g.
    128001, 128008, 128009 for Llama 3.1); null: the end-of-text token only."""

    # the settings that belong to the model's tokenizer: a finetune takes them from its checkpoint
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("chat_template", "special_tokens", "end_ids")

    def check(self, cfg: Whole) -> list[str]:
        """A tokenizer that cannot be trained."""
        p: list[str] = []
        if self.train_chars < 1:
            p.append(f"tokenizer.train_chars: must be positive (got {self.train_chars})")
        if self.kind == "bpe" and self.vocab_size < 260:
            p.append(f"tokenizer.vocab_size: a byte-level BPE needs at least 260 tokens (got {self.vocab_size})")
        if self.special_tokens is not None and not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.special_tokens.items()):
            p.append("tokenizer.special_tokens: must map names (bos_token, eos_token, ...) to token texts")
        if any(i < 0 for i in self.end_ids or []):
            p.append(f"tokenizer.end_ids: token ids cannot be negative (got {self.end_ids})")

        return p


@dataclass
class DataConfig:
    """Where the text comes from and how it is split; see docs/data.md."""

    path: Optional[str] = None
    """The corpus: a file, a folder or a glob of files of one format, hf:NAME (a hub dataset) or an https:// URL."""
    sha256: Optional[str] = None
    """Expected sha256 of a downloaded URL; null: not checked."""
    text_column: str = "text"
    """Column holding the text in .jsonl, .json, .csv, .tsv, .parquet and hub data."""
    label_column: str = "label"
    """Column holding the label, for classification finetuning."""
    hf_config: Optional[str] = None
    """Configuration name of a hub dataset; null: its default."""
    hf_split: str = "train"
    """Split of a hub dataset to read."""
    val_path: Optional[str] = None
    """A separate validation source, prepared as its own shards; null: the last val_fraction of path validates."""
    val_fraction: float = 0.1
    """Share held out for validation: the last fraction of the tokens (classification: a seeded share of the rows)."""
    hf_revision: Optional[str] = None
    """Revision (a commit or tag) of a hub dataset, part of the cache key; null: the newest."""
    cache_dir: str = field(default_factory=default_cache_dir)
    """Where token caches and downloads live; the default is $LLMCTL_CACHE_DIR, else ~/.cache/llmctl."""
    num_proc: int = 0
    """Threads the tokenizer uses while preparing; 0: all CPU cores."""
    shard_tokens: int = 1 << 24
    """Tokens per cache shard (it closes at the first piece of text past this); a killed preparation resumes after
    the last complete shard."""
    document_mask: bool = False
    """Language modelling on packed documents: rows start at a document's start (its <eos> acts as a BOS),
    attention never crosses into another document and positions restart in each, in training and validation."""

    def check(self, cfg: Whole) -> list[str]:
        """Impossible split and source settings."""
        d = self
        p: list[str] = []
        if not 0.0 <= d.val_fraction < 1.0:
            p.append(f"data.val_fraction: must be in [0, 1) (got {d.val_fraction})")
        if d.num_proc < 0:
            p.append(f"data.num_proc: must be 0 (auto) or more (got {d.num_proc})")
        if d.shard_tokens < 1024:
            p.append(f"data.shard_tokens: must be at least 1024 (got {d.shard_tokens})")
        if d.sha256 is not None and (len(d.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in d.sha256)):
            p.append("data.sha256: must be 64 hexadecimal characters")

        return p
