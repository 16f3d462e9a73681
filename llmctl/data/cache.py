"""The token cache: a corpus tokenized once into sharded, memory-mapped token files, found again by its key.

Sources and how they are read are `llmctl.corpus`'s (files, folders, globs, compressed JSONL, parquet, hf:
streaming, URLs); the token files are `llmctl.shards`'. Documents are joined with <eos>; line breaks inside a
document are kept (a .txt file is one document).

Cache layout under `data.cache_dir`:
  downloads/<sha256>/<name>                      a downloaded URL
  tokenizers/<key>/tokenizer.json                a tokenizer trained on a corpus (key: corpus + tokenizer config)
  tokens/<key>/shard-*.bin, index.json, manifest.json   token ids (key: corpus + tokenizer + split settings)
  tokens/.build-<key>/                           an entry being built (complete shards survive an interruption)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from .. import corpus
from ..config import DataConfig, TokenizerConfig
from ..corpus import Source, resolve_source
from ..errors import LlmctlError
from ..events import SILENT, Events
from ..fileio import atomic_dir, publish_dir, write_atomic
from ..shards import INDEX, Tokens
from ..tokenizer import Tokenizer, line_cut
from .streaming import stream_to_shards

FORMAT_VERSION = 2  # 2: sharded token files (1: train.npy / val.npy, never reused: see prepare)


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def _training_sample(source: Source, cfg: DataConfig, limit: Optional[int], seed: int = 0) -> Iterator[str]:
    """The text a tokenizer learns from: all of it up to `limit` characters, else a seeded sample of whole pieces
    (each kept with probability limit / corpus bytes) stopping at `limit`: bounded memory at any corpus size."""
    total = source.total_bytes()
    keep = 1.0 if limit is None or total is None or total <= limit else limit / total
    rng, taken = random.Random(seed), 0
    for piece in corpus.pieces(source, cfg, line_cut):
        if piece.text and (keep >= 1.0 or rng.random() < keep):
            yield piece.text
            taken += len(piece.text)
            if limit is not None and taken >= limit:
                return


def get_tokenizer(cfg_tok: TokenizerConfig, cfg: DataConfig, source: Source, identity: str,
                  events: Events = SILENT) -> Tokenizer:
    """Load `tokenizer.path`, or train (once per corpus and setting, cached) a char or BPE tokenizer: BPE from at most
    `tokenizer.train_chars` characters of the corpus, char from all of it (every character needs its token)."""
    if cfg_tok.path:
        return Tokenizer.from_file(cfg_tok.path)
    key = _sha(identity, cfg_tok.kind, str(cfg_tok.vocab_size), str(cfg_tok.train_chars), str(FORMAT_VERSION))
    path = Path(cfg.cache_dir).expanduser() / "tokenizers" / key / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(path)
    t0 = time.time()
    if cfg_tok.kind == "char":
        tok = Tokenizer.train_char(_training_sample(source, cfg, None))
    else:
        events.log(f"training a {cfg_tok.vocab_size}-token BPE tokenizer on {cfg.path} "
                   f"(at most {cfg_tok.train_chars:,} characters)")
        tok = Tokenizer.train_bpe(_training_sample(source, cfg, cfg_tok.train_chars), cfg_tok.vocab_size)
        events.log(f"tokenizer trained in {time.time() - t0:.1f}s")
    with atomic_dir(path.parent) as d:
        tok.save(d / "tokenizer.json")
    return tok


@dataclass
class TokenData:
    """Prepared token files: the train and validation token sequences (memory-mapped), the tokenizer, the
    manifest."""

    dir: Path
    train: Tokens
    val: Tokens
    tokenizer: Tokenizer
    manifest: dict


def _build_lock(directory: Path):
    """An exclusive lock on a build folder: a second process preparing the same corpus waits, then finds it done."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    fh = open(directory / ".lock", "w")
    fcntl.flock(fh, fcntl.LOCK_EX)
    return fh


BUILD_NOTE = "build.json"  # in a build folder: the source settings and identity it was started for


def _sweep_abandoned(root: Path, events: Events) -> None:
    """Remove the build folders of interrupted preparations that no command can resume: their corpus has changed
    or gone since (the cache key holds its identity, so the same command now builds under another key). A build
    in progress holds its lock and is left alone, and so is one whose corpus is unchanged (run again, it resumes)."""
    import fcntl

    for build in root.glob(".build-*"):
        try:
            note = json.loads((build / BUILD_NOTE).read_text())
            cfg = DataConfig(**note["data"])
            if not any(_changed(path, identity, cfg) for path, identity in note["sources"]):
                continue
            with open(build / ".lock", "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (raises if a process is building it now)
                size = sum(f.stat().st_size for f in build.iterdir() if f.is_file())
                shutil.rmtree(build)
            events.log(f"removed {build.name}, an interrupted preparation of {cfg.path} that cannot resume: the "
                       f"corpus has changed or gone since ({size / 1e6:,.1f} MB freed)")
        except (OSError, ValueError, KeyError, TypeError):
            continue  # (no note: an older build, or one being created; locked: in progress)


def _absolute(path: str) -> str:
    """A local path or glob made absolute (a later command may run elsewhere); hub names and URLs as they are."""
    return path if corpus.is_named(path) else os.path.abspath(os.path.expanduser(path))


def _changed(path: str, identity: str, cfg: DataConfig) -> bool:
    """Whether a local corpus no longer has `identity` (hub datasets and URLs are named, not stat-ed: never)."""
    if corpus.is_named(path):
        return False
    try:
        return resolve_source(path, cfg, "").identity(cfg) != identity
    except LlmctlError:  # gone
        return True


def _old_caches(root: Path) -> bool:
    return root.is_dir() and any((d / "train.npy").exists() for d in root.iterdir() if d.is_dir())


def prepare(
    data: DataConfig,
    tok_cfg: TokenizerConfig,
    tokenizer: Optional[Tokenizer] = None,
    events: Events = SILENT,
    encoder: bool = False,
) -> TokenData:
    """Tokenize the configured corpus into cached token shards (reused when inputs and tokenizer match).

    `encoder` (an mlm run): the tokenizer gets [MASK], [CLS] and [SEP] where it lacks them
    (`Tokenizer.with_encoder_tokens`), and the cache is that tokenizer's.

    Streaming and resumable (see `llmctl.shards`): memory stays bounded at any corpus size, a killed preparation
    goes on from its last complete shard, and the cache entry appears (by one rename) only when complete."""
    source = resolve_source(data.path, data)
    val_source = resolve_source(data.val_path, data, "data.val_path") if data.val_path else None
    if data.num_proc:  # the tokenizers thread pool, read once when it first starts
        os.environ.setdefault("RAYON_NUM_THREADS", str(data.num_proc))
    ident = source.identity(data)
    val_ident = val_source.identity(data) if val_source else ""
    if tokenizer is None:
        tokenizer = get_tokenizer(tok_cfg, data, source, ident, events)
    if encoder:
        tokenizer = tokenizer.with_encoder_tokens()
    key = _sha(ident, val_ident, tokenizer.sha256, str(data.val_fraction), str(FORMAT_VERSION))
    root = Path(data.cache_dir).expanduser() / "tokens"
    final = root / key
    if not (final / "manifest.json").exists():
        _sweep_abandoned(root, events)
        if _old_caches(root):
            events.log("note: token caches written by llmctl before sharded token files (train.npy / val.npy) "
                       "are not reused; this corpus is tokenized again once")
        build = root / f".build-{key}"
        lock = _build_lock(build)
        try:
            if not (final / "manifest.json").exists():
                events.log(f"tokenizing {data.path} (cache miss) into {final}")
                sources = [[_absolute(data.path), ident]] + ([[_absolute(data.val_path), val_ident]]
                                                              if data.val_path else [])
                write_atomic(build / BUILD_NOTE, json.dumps({"data": asdict(data), "sources": sources}))
                _build(build, final, data, source, val_source, tokenizer, events)
        finally:
            lock.close()
    return open_tokens(final, tokenizer)


def _build(build: Path, final: Path, data: DataConfig, source: Source, val_source: Optional[Source],
           tokenizer: Tokenizer, events: Events) -> None:
    t0 = time.time()
    train = stream_to_shards(build, source, data, tokenizer, "shard", INDEX, "data.path", events)
    if train.tokens == 0:
        raise LlmctlError(f"data.path: {data.path} holds no text (the corpus or its text column is empty); "
                          "point it at a non-empty corpus")
    n_all = train.tokens
    if val_source is not None:
        val = stream_to_shards(build, val_source, data, tokenizer, "val", "val-index.json", "data.val_path", events)
        n_train, n_val, val_shards = n_all, val.tokens, [s.name for s in val.shards]
    else:  # contiguous split: the first (1 - val_fraction) of the tokens train, the rest validate
        n_train = int(n_all * (1 - data.val_fraction))
        n_val, val_shards = n_all - n_train, []
    seconds = time.time() - t0
    manifest = {
        "format": FORMAT_VERSION,
        "source": data.path,
        "source_sha256": source.content_hash(),
        "val_source": data.val_path,
        "text_column": data.text_column,
        "val_fraction": data.val_fraction,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "dtype": train.dtype,
        "shards": [s.name for s in train.shards],
        "val_shards": val_shards,
        "documents": train.docs,
        "bytes": source.total_bytes(),
        "train_tokens": int(n_train),
        "val_tokens": int(n_val),
        "seconds": round(seconds, 2),
        "tokens_per_sec": round((n_all + (n_val if val_source else 0)) / max(seconds, 1e-9)),
    }
    tokenizer.save(build / "tokenizer.json")
    (build / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (build / ".lock").unlink(missing_ok=True)
    publish_dir(build, final)
    events.log(f"prepared {n_all:,} tokens in {len(train.shards) + len(val_shards)} shard"
               f"{'s' if len(train.shards) + len(val_shards) > 1 else ''} in {seconds:.1f}s "
               f"({manifest['tokens_per_sec']:,} tokens/s)")


def open_tokens(directory: Path, tokenizer: Optional[Tokenizer] = None) -> TokenData:
    manifest = json.loads((directory / "manifest.json").read_text())
    tokens = Tokens.open(directory, manifest["shards"], manifest["dtype"])
    if manifest["val_shards"]:
        train, val = tokens, Tokens.open(directory, manifest["val_shards"], manifest["dtype"])
    else:
        n = manifest["train_tokens"]
        train, val = tokens.range(0, n), tokens.range(n, len(tokens))
    return TokenData(directory, train, val, tokenizer or Tokenizer.from_file(directory / "tokenizer.json"), manifest)


def document_starts(td: TokenData) -> tuple:
    """Where documents start in the train and validation splits (`Tokens.doc_starts`), for data.document_mask."""
    train, val = td.train.doc_starts(), td.val.doc_starts()
    if train is None or val is None:
        raise LlmctlError(f"data.document_mask: the token cache {td.dir} records no document boundaries (prepared by "
                          "an older llmctl); delete that folder and run again to rebuild it")
    return train, val


def tokenize_file(path: str, data: DataConfig, tokenizer: Tokenizer, key: str = "--data") -> Tokens:
    """All tokens of one source (no split), for evaluating on a given file. Cached like `prepare`."""
    d = DataConfig(**{**data.__dict__, "path": path, "val_path": None, "val_fraction": 0.0})
    resolve_source(path, d, key)  # a missing file is reported under the option's name
    return prepare(d, TokenizerConfig(), tokenizer=tokenizer).train

