"""Text sources -> tokenizer -> sharded, memory-mapped token files, cached; batch iterators.

Sources and how they are read are `llmctl.corpus`'s (files, folders, globs, compressed JSONL, parquet, hf: streaming,
URLs); the token files are `llmctl.shards`'. Documents are joined with <eos>; line breaks inside a document are kept
(a .txt file is one document).

Cache layout under `data.cache_dir`:
  downloads/<sha256>/<name>                      a downloaded URL
  tokenizers/<key>/tokenizer.json                a tokenizer trained on a corpus (key: corpus + tokenizer config)
  tokens/<key>/shard-*.bin, index.json, manifest.json   token ids (key: corpus + tokenizer + split settings)
  tokens/.build-<key>/                           an entry being built (complete shards survive an interruption)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import random
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from . import corpus
from .chat import render_prompt
from .config import DataConfig, TokenizerConfig
from .corpus import Source, download, resolve_source  # noqa: F401  (the data module's public names)
from .errors import LlmctlError
from .fileio import read_jsonl, temp_dir, write_atomic
from .shards import INDEX, Index, ShardWriter, Tokens
from .tokenizer import Tokenizer, line_cut

FORMAT_VERSION = 2  # 2: sharded token files (1: train.npy / val.npy, never reused: see prepare)


# ------------------------------------------------------------------------------------------------------------------
# Tables (classification, instruction tuning and eval --data read whole files of examples through datasets)


def load_table(source: Source, cfg: DataConfig, key: str = "data.path"):
    """Load a source as a `datasets.Dataset` with all its columns (a .txt file is one row, column `text`)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    hf_cache = str(Path(cfg.cache_dir).expanduser() / "hf")
    try:
        if source.builder == "hub":
            return datasets.load_dataset(source.hub_name, cfg.hf_config, split=cfg.hf_split, cache_dir=hf_cache,
                                         revision=cfg.hf_revision)
        kwargs = {}
        if source.builder == "text":
            kwargs["sample_by"] = "document"  # one row per file: keeps line breaks
        if source.suffix == ".tsv":
            kwargs["delimiter"] = "\t"
            kwargs["quoting"] = 3  # csv.QUOTE_NONE: TSV corpora such as SST-2 contain bare quotes
        return datasets.load_dataset(source.builder, data_files=[str(f) for f in source.files], split="train",
                                     cache_dir=hf_cache, **kwargs)
    except LlmctlError:
        raise
    except Exception as e:
        what = source.hub_name or ", ".join(str(f) for f in source.files[:3])
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise LlmctlError(f"{key}: could not read {what}: {first}") from None


def require_columns(ds, columns: dict[str, str], key: str) -> None:
    """Every needed column exists; the message names the missing one, what there is, and the setting to change."""
    for setting, column in columns.items():
        if column not in ds.column_names:
            raise LlmctlError(f"{key}: no column '{column}' in the data (columns: {', '.join(ds.column_names)}); "
                              f"set {setting}")


def load_texts(source: Source, cfg: DataConfig, column: Optional[str] = None, key: str = "data.path"):
    """Load a source as a `datasets.Dataset` with a single `text` column (rows are documents)."""
    ds = load_table(source, cfg, key)
    column = "text" if source.builder == "text" else (column or cfg.text_column)
    require_columns(ds, {"data.text_column": column}, key)
    if column != "text":
        ds = (ds.rename_column(column, "text") if "text" not in ds.column_names
              else ds.map(lambda r: {"text": r[column]}))
    return ds.select_columns(["text"])


# ------------------------------------------------------------------------------------------------------------------
# Preparing token files


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def _atomic_dir(final: Path, build: Callable[[Path], None]) -> None:
    """Build into a temporary sibling directory, then rename it into place (complete or absent)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(final.parent, prefix=f".{final.name}.")  # with the user's umask, not mkdtemp's 0700
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():  # another process may have finished the same entry first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
                  log: Callable[[str], None] = lambda s: None) -> Tokenizer:
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
        log(f"training a {cfg_tok.vocab_size}-token BPE tokenizer on {cfg.path} "
            f"(at most {cfg_tok.train_chars:,} characters)")
        tok = Tokenizer.train_bpe(_training_sample(source, cfg, cfg_tok.train_chars), cfg_tok.vocab_size)
        log(f"tokenizer trained in {time.time() - t0:.1f}s")
    _atomic_dir(path.parent, lambda d: tok.save(d / "tokenizer.json"))
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


OnProgress = Callable[[int, Optional[int], int], None]  # (bytes read, total bytes or None, tokens) while tokenizing


class _Progress:
    """One plain line every few seconds while tokenizing: bytes read, tokens, tokens/s and the time left; or, given
    `on_progress` (a live bar on a terminal), that called instead."""

    def __init__(self, log: Callable[[str], None], total: Optional[int], done: int, tokens: int, every: float = 5.0,
                 on_progress: Optional[OnProgress] = None):
        self.log, self.total, self.every, self.on_progress = log, total, every, on_progress
        self.t0 = self.last = time.time()
        self.base_bytes, self.base_tokens = done, tokens
        if on_progress:
            on_progress(done, total, tokens)

    def __call__(self, done: int, tokens: int) -> None:
        if self.on_progress:
            self.on_progress(done, self.total, tokens)
            return
        now = time.time()
        if now - self.last < self.every:
            return
        self.last = now
        rate = (tokens - self.base_tokens) / max(now - self.t0, 1e-9)
        line = f"prepare: {done / 1e6:,.1f}"
        if self.total:
            speed = (done - self.base_bytes) / max(now - self.t0, 1e-9)
            eta = (self.total - done) / speed if speed > 0 else 0.0
            line += f" / {self.total / 1e6:,.1f} MB read ({100 * done / self.total:.0f}%)"
        else:
            line += " MB read"
        line += f", {tokens:,} tokens, {rate:,.0f} tokens/s"
        if self.total:
            line += f", eta {eta:.0f}s"
        self.log(line)


ENCODE_CHARS = 1 << 20  # texts per native encode_batch call (it runs them on all cores)
BATCH_CHARS = 4 << 20  # text read ahead of the tokenizer, at most: memory stays bounded


def _tokenize(source: Source, cfg: DataConfig, tok: Tokenizer, writer: ShardWriter, start: corpus.Cursor,
              key: str, progress: _Progress) -> corpus.Cursor:
    """Read `source` from `start` in a reader thread, tokenize batches on all cores (`tokenizers` releases the GIL)
    and hand the ids to `writer`, which writes a shard whenever one is full. Returns the cursor at the end."""
    q: queue.Queue = queue.Queue(maxsize=3)
    done = threading.Event()

    def read() -> None:
        try:
            batch, chars = [], 0
            for piece in corpus.pieces(source, cfg, tok.last_cut, start, key):
                batch.append(piece)
                chars += len(piece.text)
                if chars >= BATCH_CHARS:
                    q.put(batch)
                    batch, chars = [], 0
                    if done.is_set():
                        return
            q.put(batch)
            q.put(None)
        except BaseException as e:  # re-raised in the main thread
            q.put(e)

    reader = threading.Thread(target=read, daemon=True, name="llmctl-corpus-reader")
    reader.start()
    cursor = start
    try:
        while True:
            batch = q.get()
            if batch is None:
                return cursor
            if isinstance(batch, BaseException):
                raise batch
            i = 0
            while i < len(batch):  # groups of about ENCODE_CHARS: one parallel native call each
                j, chars = i, 0
                while j < len(batch) and (j == i or chars + len(batch[j].text) <= ENCODE_CHARS):
                    chars += len(batch[j].text)
                    j += 1
                for piece, ids in zip(batch[i:j], tok.encode_batch([p.text for p in batch[i:j]])):
                    writer.add(ids, piece.doc_end)
                    writer.flush_if_full(piece.after, piece.bytes_read)
                    cursor = piece.after
                progress(batch[j - 1].bytes_read, writer.index.tokens + writer.buffered)
                i = j
    finally:
        done.set()


def _build_lock(directory: Path):
    """An exclusive lock on a build folder: a second process preparing the same corpus waits, then finds it done."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    fh = open(directory / ".lock", "w")
    fcntl.flock(fh, fcntl.LOCK_EX)
    return fh


def _resume_index(build: Path, name: str, prefix: str) -> Optional[Index]:
    """The complete shards of an earlier, interrupted build (their files checked by size); the rest is removed."""
    index = Index.load(build, name)
    if index is not None:
        good = []
        for s in index.shards:
            f = build / s.name
            if not f.is_file() or f.stat().st_size != s.tokens * np.dtype(index.dtype).itemsize:
                break
            good.append(s)
        index.shards = good
    keep = {s.name for s in index.shards} if index else set()
    for f in build.glob(f"*{prefix}-*.bin*"):
        if f.name not in keep:
            f.unlink()
    return index if index and index.shards else None


def _stream_to_shards(build: Path, source: Source, cfg: DataConfig, tok: Tokenizer, prefix: str, index_name: str,
                      key: str, log: Callable[[str], None], on_progress: Optional[OnProgress]) -> Index:
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    index = _resume_index(build, index_name, prefix)
    start = corpus.Cursor()
    if index is not None:
        last = index.shards[-1]
        start = corpus.Cursor(**last.cursor)
        where = (f"{source.files[start.file]} at byte {start.pos:,}" if start.file < len(source.files)
                 and source.builder == "text" else f"file {start.file + 1}, row {start.pos:,}")
        log(f"resuming the interrupted preparation after shard {len(index.shards) - 1} "
            f"({index.tokens:,} tokens done), at {where}")
    writer = ShardWriter(build, dtype, cfg.shard_tokens, tok.eos_id, prefix=prefix, index_name=index_name,
                         index=index)
    progress = _Progress(log, source.total_bytes(), index.bytes_read if index else 0, writer.index.tokens,
                         on_progress=on_progress)
    try:
        end = _tokenize(source, cfg, tok, writer, start, key, progress)
        return writer.close(end, source.total_bytes() or 0)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise LlmctlError(f"the disk is full while writing token shards to {build} ({len(writer.index.shards)} "
                              "complete); free space and run the same command again: it resumes from the last "
                              "complete shard") from None
        raise


BUILD_NOTE = "build.json"  # in a build folder: the source settings and identity it was started for


def _sweep_abandoned(root: Path, log: Callable[[str], None]) -> None:
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
            log(f"removed {build.name}, an interrupted preparation of {cfg.path} that cannot resume: the "
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
    log: Callable[[str], None] = lambda s: None,
    on_progress: Optional[OnProgress] = None,
) -> TokenData:
    """Tokenize the configured corpus into cached token shards (reused when inputs and tokenizer match).

    Streaming and resumable (see `llmctl.shards`): memory stays bounded at any corpus size, a killed preparation
    goes on from its last complete shard, and the cache entry appears (by one rename) only when complete."""
    source = resolve_source(data.path, data)
    val_source = resolve_source(data.val_path, data, "data.val_path") if data.val_path else None
    if data.num_proc:  # the tokenizers thread pool, read once when it first starts
        os.environ.setdefault("RAYON_NUM_THREADS", str(data.num_proc))
    ident = source.identity(data)
    val_ident = val_source.identity(data) if val_source else ""
    if tokenizer is None:
        tokenizer = get_tokenizer(tok_cfg, data, source, ident, log)
    key = _sha(ident, val_ident, tokenizer.sha256, str(data.val_fraction), str(FORMAT_VERSION))
    root = Path(data.cache_dir).expanduser() / "tokens"
    final = root / key
    if not (final / "manifest.json").exists():
        _sweep_abandoned(root, log)
        if _old_caches(root):
            log("note: token caches written by llmctl before sharded token files (train.npy / val.npy) are not "
                "reused; this corpus is tokenized again once")
        build = root / f".build-{key}"
        lock = _build_lock(build)
        try:
            if not (final / "manifest.json").exists():
                log(f"tokenizing {data.path} (cache miss) into {final}")
                sources = [[_absolute(data.path), ident]] + ([[_absolute(data.val_path), val_ident]]
                                                              if data.val_path else [])
                write_atomic(build / BUILD_NOTE, json.dumps({"data": asdict(data), "sources": sources}))
                _build(build, final, data, source, val_source, tokenizer, log, on_progress)
        finally:
            lock.close()
    return open_tokens(final, tokenizer)


def _build(build: Path, final: Path, data: DataConfig, source: Source, val_source: Optional[Source],
           tokenizer: Tokenizer, log: Callable[[str], None], on_progress: Optional[OnProgress]) -> None:
    t0 = time.time()
    train = _stream_to_shards(build, source, data, tokenizer, "shard", INDEX, "data.path", log, on_progress)
    if train.tokens == 0:
        raise LlmctlError(f"data.path: {data.path} holds no text (the corpus or its text column is empty); "
                          "point it at a non-empty corpus")
    n_all = train.tokens
    if val_source is not None:
        val = _stream_to_shards(build, val_source, data, tokenizer, "val", "val-index.json", "data.val_path", log,
                                on_progress)
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
    os.rename(build, final)
    log(f"prepared {n_all:,} tokens in {len(train.shards) + len(val_shards)} shard"
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


def tokenize_file(path: str, data: DataConfig, tokenizer: Tokenizer, key: str = "--data") -> Tokens:
    """All tokens of one source (no split), for evaluating on a given file. Cached like `prepare`."""
    d = DataConfig(**{**data.__dict__, "path": path, "val_path": None, "val_fraction": 0.0})
    resolve_source(path, d, key)  # a missing file is reported under the option's name
    return prepare(d, TokenizerConfig(), tokenizer=tokenizer).train


# ------------------------------------------------------------------------------------------------------------------
# Batches


class LMBatches:
    """Random contiguous blocks for language modelling, a pure function of (seed, step, micro-step, rank).

    Each optimizer step draws one global batch of `batch_size * grad_accum * world_size` block offsets from
    `numpy.random.default_rng([seed, step])`; a rank takes its own slice. The data a run sees therefore does not
    depend on the world size, and resuming at step k needs nothing but k.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, grad_accum: int, seed: int,
                 rank: int = 0, world_size: int = 1, labels: Optional[np.ndarray] = None):
        if len(tokens) < block_size + 2:
            raise LlmctlError(
                f"the training split has {len(tokens)} tokens, fewer than one block of "
                f"model.block_size={block_size} + 1; "
                "use more text or a smaller model.block_size"
            )
        self.tokens, self.T, self.B, self.accum = tokens, block_size, batch_size, grad_accum
        self.seed, self.rank, self.world = seed, rank, world_size
        self.labels = labels  # per-token labels aligned with tokens (packed instruct data); None: the tokens

    def offsets(self, step: int) -> np.ndarray:
        """Block start offsets of the whole global batch for `step`: (grad_accum, world_size, batch_size)."""
        rng = np.random.default_rng([self.seed, step])
        n = self.accum * self.world * self.B
        return rng.integers(0, len(self.tokens) - self.T - 1, size=n).reshape(self.accum, self.world, self.B)

    def get(self, step: int) -> list[dict]:
        """The micro-batches of this rank for `step`, each {'input_ids': (B, T), 'labels': (B, T)}."""
        import torch  # (here, not at the top: `llmctl prepare` starts without torch)
        out = []
        for micro in self.offsets(step)[:, self.rank]:
            rows = np.stack([self.tokens[o : o + self.T + 1] for o in micro]).astype(np.int64)  # (B, T+1)
            t = torch.from_numpy(rows)
            labels = t[:, 1:]
            if self.labels is not None:
                labels = torch.from_numpy(
                    np.stack([self.labels[o + 1 : o + self.T + 1] for o in micro]).astype(np.int64))
            out.append({"input_ids": t[:, :-1], "labels": labels})
        return out


def eval_blocks(tokens: np.ndarray, block_size: int, batch_size: int,
                max_batches: Optional[int] = None) -> Iterator[dict]:
    """Non-overlapping blocks covering every token once (the last, shorter block included).

    Yields {'input_ids': (b, t), 'labels': (b, t)}; every token but the first is predicted exactly once.
    With `max_batches`, an evenly spaced subset of the full blocks is used (a cheaper estimate).
    """
    import torch  # (here, not at the top: `llmctl prepare` starts without torch)
    n = len(tokens) - 1  # number of predictions
    if n < 1:
        return
    n_full = n // block_size
    starts = np.arange(n_full) * block_size
    if max_batches is not None and n_full > max_batches * batch_size:
        starts = starts[np.linspace(0, n_full - 1, max_batches * batch_size).round().astype(np.int64)]
        tail = False
    else:
        tail = n % block_size > 0
    for i in range(0, len(starts), batch_size):
        rows = np.stack([tokens[s : s + block_size + 1] for s in starts[i : i + batch_size]]).astype(np.int64)
        t = torch.from_numpy(rows)
        yield {"input_ids": t[:, :-1], "labels": t[:, 1:]}
    if tail:
        rest = torch.from_numpy(np.asarray(tokens[n_full * block_size :]).astype(np.int64))[None]
        yield {"input_ids": rest[:, :-1], "labels": rest[:, 1:]}


# ------------------------------------------------------------------------------------------------------------------
# Supervised examples: classification and instruction tuning


@dataclass
class Examples:
    """Tokenized examples. `targets[i]` is a class id (classification) or per-token labels (instruct, -100 = masked)."""

    ids: list[list[int]]
    targets: list
    truncated: int = 0  # examples cut to the context


def _label_key(v) -> tuple:
    s = str(v)
    return (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s)


def classification_examples(
    path: str, data: DataConfig, tokenizer: Tokenizer, block_size: int, text_column: str, label_column: str,
    labels: Optional[list[str]] = None, key: str = "data.path",
) -> tuple[Examples, list[str]]:
    """Read text/label rows; texts become ids + <eos> (the token the classifier reads), cut to the context.

    Texts longer than the context keep their first `block_size - 1` tokens and the <eos>; how many were cut is
    counted. Labels may be names or integers; the label set is `labels` or the sorted values found here.
    """
    ds = load_table(resolve_source(path, data, key), data, key)
    settings = "data" if key == "data.path" else "eval"
    require_columns(ds, {f"{settings}.text_column": text_column, f"{settings}.label_column": label_column}, key)
    texts, raw = ds[text_column], ds[label_column]
    if not texts:
        raise LlmctlError(f"{key}: {path} has no rows")
    for i, (t, y) in enumerate(zip(texts, raw)):
        if t is None or not str(t).strip():
            raise LlmctlError(f"{key}: row {i + 1} of {path} has an empty text in column '{text_column}'; "
                              "remove or fill it")
        if y is None or str(y).strip() == "":
            raise LlmctlError(f"{key}: row {i + 1} of {path} has no label in column '{label_column}'")
    values = [str(y).strip() for y in raw]
    if labels is None:
        labels = sorted(set(values), key=_label_key)
        if len(labels) < 2:
            raise LlmctlError(f"{key}: column '{label_column}' has a single label ({labels[0]}); "
                              "a classifier needs two or more")
    index = {name: i for i, name in enumerate(labels)}
    unseen = sorted({v for v in values if v not in index}, key=_label_key)
    if unseen:
        raise LlmctlError(
            f"{key}: label {unseen[0]!r} in column '{label_column}' is not one the model was trained on "
            f"({', '.join(labels)})"
        )
    ids, truncated = [], 0
    for enc in tokenizer.encode_batch([str(t) for t in texts]):
        if len(enc) > block_size - 1:
            enc, truncated = enc[: block_size - 1], truncated + 1
        ids.append(enc + [tokenizer.eos_id])
    return Examples(ids, [index[v] for v in values], truncated), labels


def instruct_pairs(row: dict, ft, where: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs of one JSONL row in any of the accepted layouts."""
    if ft.instances_field in row and ft.instruction_field in row:  # seed_tasks.jsonl
        return [(render_prompt(row[ft.instruction_field], inst.get(ft.input_field) or "", ft),
                 inst.get(ft.output_field) or "")
                for inst in row[ft.instances_field] or []]
    if ft.instruction_field in row and ft.output_field in row:  # instruction / input / output
        return [(render_prompt(row[ft.instruction_field], row.get(ft.input_field) or "", ft),
                 row[ft.output_field] or "")]
    if ft.prompt_field in row and ft.response_field in row:  # prompt / response
        return [(render_prompt(row[ft.prompt_field], "", ft), row[ft.response_field] or "")]
    raise LlmctlError(
        f"{where}: expected fields {ft.instruction_field}/{ft.output_field} (optionally {ft.input_field} or "
        f"{ft.instances_field}) or {ft.prompt_field}/{ft.response_field}; found {', '.join(row)}. "
        "Set the finetune.*_field names"
    )


def instruct_examples(path: str, data: DataConfig, tokenizer: Tokenizer, block_size: int, ft,
                      key: str = "data.path") -> Examples:
    """Prompt + response + <eos> per example; labels are -100 on the prompt, so only the response is learned."""
    source = resolve_source(path, data, key)
    if source.builder != "json":
        raise LlmctlError(f"{key}: instruction tuning reads JSONL (one object per line), not {source.suffix} files")
    rows = [row for f in source.files for row in read_jsonl(f, f"{key}:")]
    ids, targets, truncated = [], [], 0
    for n, row in rows:
        for prompt, response in instruct_pairs(row, ft, f"{key} line {n}"):
            if not response.strip():
                raise LlmctlError(f"{key} line {n}: an empty response; remove the example or fill it")
            p, r = tokenizer.encode(prompt), tokenizer.encode(response) + [tokenizer.eos_id]
            seq, lab = p + r, [-100] * len(p) + r
            if len(seq) > block_size + 1:  # keep the start of the response; drop the tail
                seq, lab, truncated = seq[: block_size + 1], lab[: block_size + 1], truncated + 1
                if all(x == -100 for x in lab[1:]):
                    continue  # the prompt alone fills the context: nothing to learn from
            ids.append(seq)
            targets.append(lab)
    if not ids:
        raise LlmctlError(f"{key}: {path} has no usable examples")
    return Examples(ids, targets, truncated)


def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of n examples into (train, val) indices; val is `fraction` of them (at least 1)."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    n_val = max(1, int(round(n * fraction))) if fraction > 0 and n > 1 else 0
    return np.sort(order[: n - n_val]), np.sort(order[n - n_val :])


def pad_batch(ex: Examples, rows: list[int] | np.ndarray, pad_id: int, kind: str) -> dict:
    """Right-pad the chosen examples to the longest one.

    classification: input_ids (B, T), lengths (B,), labels (B,)
    instruct:       input_ids (B, T), labels (B, T) shifted by one, -100 on prompt and padding
    """
    import torch  # (here, not at the top: `llmctl prepare` starts without torch)
    seqs = [ex.ids[i] for i in rows]
    if kind == "classification":
        T = max(len(s) for s in seqs)
        x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        for j, s in enumerate(seqs):
            x[j, : len(s)] = torch.tensor(s)
        return {"input_ids": x, "lengths": torch.tensor([len(s) for s in seqs]),
                "labels": torch.tensor([ex.targets[i] for i in rows])}
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for j, i in enumerate(rows):
        s, lab = ex.ids[i], ex.targets[i]
        x[j, : len(s) - 1] = torch.tensor(s[:-1])
        y[j, : len(s) - 1] = torch.tensor(lab[1:])
    return {"input_ids": x, "labels": y}


class ExampleBatches:
    """Padded batches of examples, a pure function of (seed, step, rank).

    Each epoch is a seeded permutation of the training examples. To pad little, every pool of `POOL` global batches
    is sorted by length, cut into global batches, and those are shuffled: a step's examples have similar lengths,
    yet the order stays random. Everything depends on the global batch (not on how it is split over ranks and
    micro-batches), so every example is seen once per epoch, resuming needs only the step, and the data do not
    depend on the world size.
    """

    POOL = 50

    def __init__(self, ex: Examples, indices: np.ndarray, kind: str, pad_id: int, batch_size: int, grad_accum: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.ex, self.idx, self.kind, self.pad = ex, np.asarray(indices), kind, pad_id
        self.B, self.accum, self.seed, self.rank, self.world = batch_size, grad_accum, seed, rank, world_size
        self.lengths = np.array([len(ex.ids[i]) for i in self.idx])
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """Positions into `indices` in the order epoch `epoch` visits them."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            g = self.accum * self.world * self.B
            perm = rng.permutation(len(self.idx))
            groups = []
            for start in range(0, len(perm), g * self.POOL):
                pool = perm[start : start + g * self.POOL]
                pool = pool[np.argsort(self.lengths[pool], kind="stable")]
                groups += [pool[i : i + g] for i in range(0, len(pool), g)]
            if len(self._orders) > 1:  # a step spans at most two epochs
                self._orders.clear()
            self._orders[epoch] = np.concatenate([groups[j] for j in rng.permutation(len(groups))])
        return self._orders[epoch]

    def rows(self, step: int) -> np.ndarray:
        """Example indices of the whole global batch of `step`: (grad_accum, world_size, batch_size)."""
        n, g = len(self.idx), self.accum * self.world * self.B
        pos = step * g + np.arange(g)
        out = np.empty(g, dtype=np.int64)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            out[sel] = self.idx[self.order(int(epoch))[pos[sel] % n]]
        return out.reshape(self.accum, self.world, self.B)

    def get(self, step: int) -> list[dict]:
        return [pad_batch(self.ex, micro, self.pad, self.kind) for micro in self.rows(step)[:, self.rank]]

    def epochs(self, steps: int) -> float:
        return steps * self.accum * self.world * self.B / max(1, len(self.idx))


def packed_tokens(ex: Examples, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Instruct packing: all examples end to end as one token stream and its labels (for LM-style blocks)."""
    ids = np.fromiter((t for s in ex.ids for t in s), dtype=np.int64)
    labels = np.fromiter((t for s in ex.targets for t in s), dtype=np.int64)
    return ids, labels


def eval_batches(ex: Examples, indices, kind: str, pad_id: int, batch_size: int) -> Iterator[dict]:
    """Every chosen example once, in batches of similar length (less padding); order does not change the metrics."""
    import torch  # (here, not at the top: `llmctl prepare` starts without torch)
    order = sorted(indices, key=lambda i: len(ex.ids[i]))
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        yield {**pad_batch(ex, rows, pad_id, kind), "rows": torch.tensor(rows)}
