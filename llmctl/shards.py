"""Sharded token files: written shard by shard so an interrupted preparation resumes, read as one memory-mapped
sequence.

A cache entry holds `shard-00000.bin, ...` (raw little-endian uint16 or uint32 token ids, documents joined by <eos>),
beside each its document starts `shard-00000.bin.starts` (little-endian uint32 offsets in the shard: where each
document's separating <eos>, or the corpus's first token, lies; caches prepared before llmctl wrote them have none)
and `index.json`: per shard its token count, documents finished in it, sha256, and the reader's cursor and joining
state after it. While an entry is built it lives in a build folder whose index grows by one atomic rewrite per
complete shard; a restarted build keeps those shards and goes on from the last one's cursor.

`Tokens` is the reader: a read-only view over the shards (or a range of them: the train and validation splits) with
`len`, integer and slice indexing, like the one array it stands for; nothing is loaded until sliced.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .fileio import atomic_file, write_atomic

INDEX = "index.json"


def shard_name(i: int, prefix: str = "shard") -> str:
    return f"{prefix}-{i:05d}.bin"


def starts_name(shard: str) -> str:
    """The file of a shard's document starts."""
    return shard + ".starts"


@dataclass
class ShardInfo:
    name: str
    tokens: int
    docs: int  # documents that end in this shard
    sha256: str
    cursor: dict  # corpus.Cursor after the shard, as a dict
    need_eos: bool  # a document ended at the shard's end and its <eos> is not written yet
    doc_open: bool  # the shard ends inside a document that has tokens


@dataclass
class Index:
    dtype: str
    shards: list[ShardInfo] = field(default_factory=list)
    bytes_read: int = 0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def docs(self) -> int:
        return sum(s.docs for s in self.shards)

    def save(self, directory: Path, name: str = INDEX) -> None:
        write_atomic(directory / name, json.dumps({"dtype": self.dtype, "bytes_read": self.bytes_read,
                                                   "shards": [asdict(s) for s in self.shards]}, indent=1))

    @classmethod
    def load(cls, directory: Path, name: str = INDEX) -> Optional["Index"]:
        try:
            raw = json.loads((directory / name).read_text())
            return cls(raw["dtype"], [ShardInfo(**s) for s in raw["shards"]], raw.get("bytes_read", 0))
        except (OSError, ValueError, KeyError, TypeError):
            return None


PENDING_IDS = 1 << 20  # ids kept as a Python list before one conversion to numpy (about 36 MB at most)


class ShardWriter:
    """Token ids in, fixed-size shards out. `add` buffers ids; `flush_if_full` (called only where the reader could
    resume: after a whole piece) writes a shard once `shard_tokens` ids are buffered; `close` writes the rest.
    Each shard is written to a temporary name, synced and renamed, then the index is rewritten atomically."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int, eos_id: int, prefix: str = "shard",
                 index_name: str = INDEX, index: Optional[Index] = None):
        self.dir, self.dtype, self.size, self.eos = directory, np.dtype(dtype), shard_tokens, eos_id
        self.prefix, self.index_name = prefix, index_name
        self.index = index or Index(self.dtype.name)
        last = self.index.shards[-1] if self.index.shards else None
        self.need_eos = last.need_eos if last else False
        self.doc_open = last.doc_open if last else False
        self.buf = np.empty(shard_tokens + (1 << 16), dtype=self.dtype)
        self.n = 0  # ids settled in `buf`
        self.pending: list[int] = []  # ids not yet copied into `buf` (one numpy conversion per ~1M ids, not per piece)
        self.docs = 0  # documents finished since the last shard
        self.starts: list[int] = []  # where documents start in the shard being filled (their <eos>, else first id)

    @property
    def buffered(self) -> int:
        """Ids waiting for the next shard."""
        return self.n + len(self.pending)

    def add(self, ids: list[int], doc_end: bool) -> None:
        """The ids of one piece of a document (`doc_end`: its last piece). Documents with no tokens leave nothing;
        the others are joined by one <eos>."""
        if ids:
            if not self.doc_open:
                self.starts.append(self.buffered)
            if self.need_eos:
                self.pending.append(self.eos)
                self.need_eos = False
            self.pending.extend(ids)
            self.doc_open = True
            if len(self.pending) >= PENDING_IDS:
                self._settle()
        if doc_end:
            if self.doc_open:
                self.need_eos, self.docs = True, self.docs + 1
            self.doc_open = False

    def _settle(self) -> None:
        a = np.array(self.pending, dtype=self.dtype)
        self.pending = []
        if self.n + len(a) > len(self.buf):  # the piece that fills the shard overflows it: grow the buffer
            grown = np.empty(self.n + len(a) + (1 << 16), dtype=self.dtype)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n: self.n + len(a)] = a
        self.n += len(a)

    def flush_if_full(self, cursor, bytes_read: int) -> bool:
        if self.buffered < self.size:
            return False
        self._write(cursor, bytes_read)
        return True

    def close(self, cursor, bytes_read: int) -> Index:
        if self.buffered or not self.index.shards:
            self._write(cursor, bytes_read)
        return self.index

    def _write(self, cursor, bytes_read: int) -> None:
        self._settle()
        i = len(self.index.shards)
        name = shard_name(i, self.prefix)
        data = self.buf[: self.n].astype("<" + self.dtype.str[1:], copy=False).tobytes()
        with atomic_file(self.dir / starts_name(name), "wb") as f:
            f.write(np.asarray(self.starts, dtype="<u4").tobytes())
        with atomic_file(self.dir / name, "wb") as f:  # (a full disk: the partial shard goes, freeing its space)
            f.write(data)
        self.index.shards.append(ShardInfo(name, self.n, self.docs, hashlib.sha256(data).hexdigest(),
                                           asdict(cursor), self.need_eos, self.doc_open))
        self.index.bytes_read = bytes_read
        self.index.save(self.dir, self.index_name)
        self.n, self.docs, self.starts = 0, 0, []


class Tokens:
    """Tokens [start, stop) of the concatenated shards, read by memory map."""

    def __init__(self, maps: list[np.ndarray], start: int = 0, stop: Optional[int] = None,
                 starts: Optional[list[Path]] = None):
        self.maps = maps
        self.starts = starts  # each shard's file of document starts; None: the cache has none
        self.bounds = np.cumsum([0] + [len(m) for m in maps])  # (n_shards + 1,)
        self.start = start
        self.stop = int(self.bounds[-1]) if stop is None else stop
        self.dtype = maps[0].dtype if maps else np.dtype(np.uint16)

    @classmethod
    def open(cls, directory: Path, names: list[str], dtype: str) -> "Tokens":
        maps = [np.memmap(directory / n, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
                if (directory / n).stat().st_size else np.zeros(0, dtype=dtype) for n in names]
        starts = [directory / starts_name(n) for n in names]
        return cls(maps, starts=starts if all(p.is_file() for p in starts) else None)

    def __len__(self) -> int:
        return self.stop - self.start

    def range(self, start: int, stop: int) -> "Tokens":
        return Tokens(self.maps, self.start + start, self.start + stop, self.starts)

    def doc_starts(self) -> Optional[np.ndarray]:
        """Where documents start in this range (int64 offsets into it, ascending, 0 always first: a range may begin
        inside a document); None when the cache records no document starts."""
        if self.starts is None:
            return None
        every = np.concatenate([np.zeros(0, np.int64)] + [np.fromfile(p, dtype="<u4").astype(np.int64) + self.bounds[i]
                                                          for i, p in enumerate(self.starts)])
        inside = every[(every > self.start) & (every < self.stop)] - self.start
        return np.concatenate([np.zeros(1, np.int64), inside])

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                return self[a:b][::step]
            return self._read(self.start + a, self.start + max(a, b))
        i = int(key)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._read(self.start + i, self.start + i + 1)[0]

    def _read(self, a: int, b: int) -> np.ndarray:
        if a >= b:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.bounds, a, side="right")) - 1
        last = int(np.searchsorted(self.bounds, b, side="left")) - 1
        if first == last:  # the common case: one shard, a view of the map
            off = int(self.bounds[first])
            return self.maps[first][a - off: b - off]
        parts = []
        for s in range(first, last + 1):
            off = int(self.bounds[s])
            parts.append(self.maps[s][max(a, off) - off: min(b, int(self.bounds[s + 1])) - off])
        return np.concatenate(parts)

    def chunks(self, size: int = 1 << 24):
        """The tokens in consecutive arrays of at most `size` (to scan them in bounded memory)."""
        for a in range(0, len(self), size):
            yield self[a: a + size]

    def __array__(self, dtype=None, copy=None):
        out = self._read(self.start, self.stop)
        return out.astype(dtype) if dtype is not None else out

    def tolist(self) -> list[int]:
        return self[:].tolist()
