"""One source streamed into token shards: read, tokenized on all cores, written shard by shard into a build folder.

Memory stays bounded at any corpus size (the reader runs at most a few batches ahead of the tokenizer), and a build
that was killed goes on from its last complete shard (`llmctl.shards` keeps each shard's reader cursor). While it
works it reports "prepare" progress: bytes read (of the source's total, when known), with the tokens so far.
"""

from __future__ import annotations

import errno
import queue
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from .. import corpus
from ..config import DataConfig
from ..corpus import Source
from ..errors import LlmctlError
from ..events import Events, Progress
from ..shards import Index, ShardWriter, starts_name
from ..tokenizer import Tokenizer

ENCODE_CHARS = 1 << 20  # texts per native encode_batch call (it runs them on all cores)
BATCH_CHARS = 4 << 20  # text read ahead of the tokenizer, at most: memory stays bounded


def _tokenize(source: Source, cfg: DataConfig, tok: Tokenizer, writer: ShardWriter, start: corpus.Cursor,
              key: str, progress: Progress) -> corpus.Cursor:
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
                progress.update(batch[j - 1].bytes_read, tokens=writer.index.tokens + writer.buffered)
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
            if (not f.is_file() or f.stat().st_size != s.tokens * np.dtype(index.dtype).itemsize
                    or not (build / starts_name(s.name)).is_file()):  # (a build begun before starts were written)
                break
            good.append(s)
        index.shards = good
    keep = {n for s in index.shards for n in (s.name, starts_name(s.name))} if index else set()
    for f in build.glob(f"*{prefix}-*.bin*"):
        if f.name not in keep:
            f.unlink()
    return index if index and index.shards else None


def stream_to_shards(build: Path, source: Source, cfg: DataConfig, tok: Tokenizer, prefix: str, index_name: str,
                     key: str, events: Events) -> Index:
    """Tokenize `source` into the shards `{prefix}-*.bin` of the build folder `build`, listed in `index_name`; an
    earlier, interrupted build there goes on after its last complete shard. Returns the finished index."""
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    index = _resume_index(build, index_name, prefix)
    start = corpus.Cursor()
    if index is not None:
        last = index.shards[-1]
        start = corpus.Cursor(**last.cursor)
        where = (f"{source.files[start.file]} at byte {start.pos:,}" if start.file < len(source.files)
                 and source.builder == "text" else f"file {start.file + 1}, row {start.pos:,}")
        events.log(f"resuming the interrupted preparation after shard {len(index.shards) - 1} "
                   f"({index.tokens:,} tokens done), at {where}")
    writer = ShardWriter(build, dtype, cfg.shard_tokens, tok.eos_id, prefix=prefix, index_name=index_name,
                         index=index)
    done = index.bytes_read if index else 0
    try:
        with events.progress("prepare", source.total_bytes(), done) as progress:
            progress.update(done, tokens=writer.index.tokens)  # where it starts (a resumed build has tokens)
            end = _tokenize(source, cfg, tok, writer, start, key, progress)
        return writer.close(end, source.total_bytes() or 0)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise LlmctlError(f"the disk is full while writing token shards to {build} ({len(writer.index.shards)} "
                              "complete); free space and run the same command again: it resumes from the last "
                              "complete shard") from None
        raise
