"""Text sources as streams of documents, read piece by piece in bounded memory and resumable at a cursor.

A source (`data.path`) is a local file, a folder or a glob of files of one format (.txt/.md, .jsonl/.json, .csv/.tsv,
.parquet; .jsonl/.json/.txt may be gzip- or zstandard-compressed), `hf:NAME` for a hub dataset (read with
`streaming=True`), or an https:// URL downloaded once into the cache and checked against `data.sha256`.
A .txt file is one document; every row of the other formats is one.

`pieces(source, cfg, cut, start)` yields `Piece`s: text, whether it ends its document, and the cursor just after it
(file index and byte offset or row number), so a reader can stop after any piece and start again there. A .txt
file is read in blocks cut where `cut` allows (for the tokenizer: where no token can span the cut), so the pieces'
tokens are the file's. Every failure to read names the file and where: the byte offset of text that is not UTF-8,
the line of a malformed JSONL row, the row group of a corrupt parquet file.
"""

from __future__ import annotations

import codecs
import csv
import glob as globmod
import gzip
import hashlib
import io
import json
import os
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from .config import DataConfig
from .errors import LlmctlError
from .fileio import atomic_file, sha256_file

FORMATS = {  # file suffix -> how it is read (a compression suffix after it is allowed: .jsonl.gz, .txt.zst)
    ".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet",
}
COMPRESSED = (".gz", ".zst")
BLOCK_BYTES = 4 << 20  # a .txt file is read this much at a time


@dataclass
class Source:
    """A resolved text source: local files of one format, or a hub dataset."""

    files: list[Path]
    builder: str  # text | json | csv | parquet | hub
    hub_name: Optional[str] = None
    suffix: str = ""

    def identity(self, cfg: DataConfig) -> str:
        """What names this corpus in the cache without reading it: each file's path, size and modification time
        (a changed file is a new corpus), or the hub name, configuration, split and revision; plus the settings
        that change what is read. The content hash is taken while the corpus is read and kept in the manifest."""
        h = hashlib.sha256()
        if self.hub_name:
            h.update(f"hub:{self.hub_name}:{cfg.hf_config}:{cfg.hf_split}:{cfg.hf_revision}".encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(f"{self.builder}:{cfg.text_column}".encode())
        return h.hexdigest()

    def content_hash(self) -> Optional[str]:
        """sha256 over every file's sha256 (None for hub data)."""
        if self.hub_name:
            return None
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
        return h.hexdigest()

    def total_bytes(self) -> Optional[int]:
        return None if self.hub_name else sum(f.stat().st_size for f in self.files)


def download(url: str, cache_dir: str, sha256: Optional[str]) -> Path:
    """Fetch `url` once into the cache; verify it against `sha256` when given (and on every reuse)."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    key = sha256.lower() if sha256 else hashlib.sha256(url.encode()).hexdigest()
    dest = Path(cache_dir).expanduser() / "downloads" / key / name
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(url, timeout=60) as r, atomic_file(dest, "wb") as f:
                shutil.copyfileobj(r, f)
        except Exception as e:  # network errors come in many types
            raise LlmctlError(f"could not download {url}: {e}; check the URL and the network, "
                              "or give a local file as data.path") from None
    if sha256:
        got = sha256_file(dest)
        if got != sha256.lower():
            dest.unlink()
            raise LlmctlError(f"{url} downloaded with sha256 {got}, but data.sha256 is {sha256}; "
                              "fix data.sha256 or the URL")
    return dest


def _format(f: Path) -> str:
    """The format suffix of a file, past a compression suffix; an unknown suffix reads as text (input.txt.1)."""
    name = f.name.lower()
    for c in COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    suffix = Path(name).suffix
    return suffix if suffix in FORMATS else ".txt"


def _listed(f: Path) -> bool:
    name = f.name.lower()
    for c in COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    return f.is_file() and Path(name).suffix in FORMATS and not f.name.startswith(".")


def is_named(path: str) -> bool:
    """A hub dataset (hf:NAME) or a URL: a source known by its name, not by files on this machine."""
    return path.startswith(("hf:", "https://", "http://"))


def resolve_source(path: Optional[str], cfg: DataConfig, key: str = "data.path") -> Source:
    """Turn `data.path` into files (downloading a URL, expanding a folder or a glob) or a hub name."""
    if not path:
        raise LlmctlError(f"{key} is not set: give a text file, folder, glob, hf:NAME or URL "
                          f"(for example --set {key}=input.txt)")
    if path.startswith("hf:"):
        return Source(files=[], builder="hub", hub_name=path[3:])
    if path.startswith(("https://", "http://")):
        return _local_source([download(path, cfg.cache_dir, cfg.sha256)], key)
    if any(c in path for c in "*?["):
        files = sorted(Path(p) for p in globmod.glob(os.path.expanduser(path), recursive=True) if Path(p).is_file())
        if not files:
            raise LlmctlError(f"{key}: the pattern {path} matches no file; check the pattern and the folder")
        return _local_source(files, key)
    p = Path(path).expanduser()
    if not p.exists():
        raise LlmctlError(f"{key}: {path} does not exist (give an existing file, folder or glob, hf:NAME for a hub "
                          "dataset, or a URL)")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if _listed(f))
        if not files:
            raise LlmctlError(f"{key}: folder {path} has no .txt, .jsonl, .json, .csv, .tsv or .parquet files "
                              "(or .gz / .zst of them)")
        return _local_source(files, key)
    return _local_source([p], key)


def _local_source(files: list[Path], key: str) -> Source:
    suffixes = {_format(f) for f in files}
    builders = {FORMATS[s] for s in suffixes}
    if len(builders) > 1:
        raise LlmctlError(f"{key}: mixes file formats ({', '.join(sorted(suffixes))}); put one format per folder")
    return Source(files=files, builder=builders.pop(), suffix=sorted(suffixes)[0])


# ------------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class Cursor:
    """Where to go on reading: file `file` (index into Source.files; rows for hub data), at byte offset `pos` of a
    text file or row `pos` of the other formats."""

    file: int = 0
    pos: int = 0


@dataclass
class Piece:
    text: str
    doc_end: bool  # the last piece of its document
    after: Cursor  # where reading goes on after this piece
    bytes_read: int  # bytes of input consumed so far (for progress; 0 for hub data)


def _open_binary(f: Path, key: str):
    """(stream, raw): a binary stream of the file's content, decompressed when it is .gz or .zst, and the file on
    disk under it (`raw.tell()`: how much of the file has been read, for progress)."""
    name = f.name.lower()
    raw = open(f, "rb")
    try:
        if name.endswith(".gz"):
            if raw.read(2) != b"\x1f\x8b":
                raise LlmctlError(f"{key}: {f} is named .gz but is not gzip data; decompress it or fix its name")
            raw.seek(0)
            return gzip.GzipFile(fileobj=raw, mode="rb"), raw
        if name.endswith(".zst"):
            try:
                import zstandard
            except ImportError:
                raise LlmctlError(f"{key}: {f} is zstandard-compressed; install the extra (pip install 'llmctl[zstd]') "
                                  "or decompress it") from None
            if raw.read(4) != b"\x28\xb5\x2f\xfd":
                raise LlmctlError(f"{key}: {f} is named .zst but is not zstandard data; decompress it or fix its name")
            raw.seek(0)
            reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=False)
            return io.BufferedReader(reader, 1 << 20), raw
        return raw, raw
    except BaseException:
        raw.close()
        raise


def _not_utf8(f: Path, offset: int, key: str, line: Optional[int] = None) -> LlmctlError:
    where = f"line {line} (byte offset {offset:,})" if line else f"the bytes at offset {offset:,}"
    return LlmctlError(f"{key}: {f} is not UTF-8 text ({where} is not UTF-8); convert it, for example: "
                       "iconv -f latin1 -t utf-8")


def _text_pieces(f: Path, index: int, start: int, cut: Callable[[str], int], key: str,
                 consumed: int) -> Iterator[Piece]:
    """One .txt document from byte `start` on, in pieces cut where `cut(text)` says (the index after which the
    text may be cut, or -1): the whole of a file with no cut point is one piece."""
    compressed = f.name.lower().endswith(COMPRESSED)
    stream, raw = _open_binary(f, key)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pos, read, carry = start, start, ""  # pos: the offset where `carry` begins; read: bytes read so far
    try:
        if start:
            if compressed:  # no seeking in a compressed stream: read past what was done
                left = start
                while left:
                    left -= len(stream.read(min(left, BLOCK_BYTES)))
            else:
                stream.seek(start)
        while True:
            block = stream.read(BLOCK_BYTES)
            pending = len(decoder.getstate()[0])
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise _not_utf8(f, read - pending + e.start, key) from None
            read += len(block)
            if not block:
                yield Piece(text, True, Cursor(index + 1, 0), consumed + raw.tell())
                return
            at = cut(text)
            if at <= 0:  # nothing to cut at yet: keep reading
                carry = text
                continue
            head, carry = text[:at], text[at:]
            pos += len(head.encode("utf-8"))
            yield Piece(head, False, Cursor(index, pos), consumed + raw.tell())
    finally:
        stream.close()
        raw.close()


def _json_rows(f: Path, start: int, column: str, key: str) -> Iterator[tuple[int, object, int]]:
    """(row number, text value, bytes of the file read) of each JSON Lines row from row `start`; a .json file
    holding one array is read whole. Lines are read as bytes and decoded one by one: rows before `start` are
    skipped undecoded, and a line that is not UTF-8 is named with its byte offset."""
    stream, raw = _open_binary(f, key)
    try:
        line_no, row_no, offset = 0, 0, 0  # offset: of the line's first byte in the (decompressed) content
        for line in stream:
            line_no += 1
            at, offset = offset, offset + len(line)
            if not line.strip():
                continue
            if row_no == 0 and line.lstrip().startswith(b"[") and _format(f) == ".json":
                yield from _json_array(f, line + stream.read(), start, column, key, raw)
                return
            if row_no >= start:
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _not_utf8(f, at + e.start, key, line_no) from None
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise LlmctlError(f"{key}: {f} line {line_no} is not valid JSON ({e.msg}); fix or remove "
                                      "that line") from None
                yield row_no, _column(row, column, f, line_no, key), raw.tell()
            row_no += 1
    finally:
        stream.close()
        raw.close()


def _json_array(f: Path, content: bytes, start: int, column: str, key: str, raw) -> Iterator[tuple[int, object, int]]:
    try:
        rows = json.loads(content.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _not_utf8(f, e.start, key) from None
    except json.JSONDecodeError as e:
        raise LlmctlError(f"{key}: {f} is not valid JSON ({e}); fix the file") from None
    if not isinstance(rows, list):
        raise LlmctlError(f"{key}: {f} is one JSON value but not an array of rows; write one object per row")
    for i, row in enumerate(rows):
        if i >= start:
            yield i, _column(row, column, f, i + 1, key), raw.tell()


def _column(row, column: str, f: Path, line: int, key: str):
    if not isinstance(row, dict):
        raise LlmctlError(f"{key}: {f} line {line} is not a JSON object; every row must be one")
    if column not in row:
        raise LlmctlError(f"{key}: no column '{column}' in {f} line {line} (columns: {', '.join(map(str, row))}); "
                          "set data.text_column")
    return row[column]


def _csv_rows(f: Path, start: int, column: str, tsv: bool, key: str) -> Iterator[tuple[int, object, int]]:
    binary, raw = _open_binary(f, key)
    stream = io.TextIOWrapper(binary, encoding="utf-8", errors="strict", newline="")
    try:
        reader = csv.reader(stream, delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)  # TSV corpora hold bare quotes
        try:
            header = next(reader, None)
        except UnicodeDecodeError as e:
            raise _not_utf8(f, e.start, key) from None
        if header is None:
            return
        if column not in header:
            raise LlmctlError(f"{key}: no column '{column}' in {f} (columns: {', '.join(header)}); "
                              "set data.text_column")
        at = header.index(column)
        row_no = 0
        while True:
            try:
                row = next(reader, None)
            except UnicodeDecodeError:
                raise LlmctlError(f"{key}: {f} row {row_no + 2} is not UTF-8 text; convert the file, for example: "
                                  "iconv -f latin1 -t utf-8") from None
            except csv.Error as e:
                raise LlmctlError(f"{key}: {f} row {row_no + 2} cannot be read as CSV ({e})") from None
            if row is None:
                return
            if row_no >= start:
                yield row_no, row[at] if at < len(row) else None, raw.tell()
            row_no += 1
    finally:
        stream.close()
        raw.close()


def _parquet_rows(f: Path, start: int, column: str, key: str) -> Iterator[tuple[int, object, int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:
        raise LlmctlError(f"{key}: {f} is not a readable parquet file ({str(e).splitlines()[0][:200]}); "
                          "replace or remove it") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise LlmctlError(f"{key}: no column '{column}' in {f} (columns: {', '.join(names)}); set data.text_column")
    row0, size = 0, f.stat().st_size
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row0 + n <= start:
            row0 += n
            continue
        try:
            values = pf.read_row_group(g, columns=[column]).column(0).to_pylist()
        except Exception as e:
            raise LlmctlError(f"{key}: {f} row group {g} cannot be read ({str(e).splitlines()[0][:200]}); "
                              "the file is corrupt: replace or remove it") from None
        done = size * (g + 1) // pf.num_row_groups  # (bytes read, for progress: row groups are of similar size)
        for i, v in enumerate(values):
            if row0 + i >= start:
                yield row0 + i, v, done
        row0 += n


def _hub_rows(source: Source, cfg: DataConfig, start: int, column: str, key: str) -> Iterator[tuple[int, object]]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(source.hub_name, cfg.hf_config, split=cfg.hf_split, streaming=True,
                                   revision=cfg.hf_revision)
        if start:
            ds = ds.skip(start)
        for i, row in enumerate(ds, start):
            if column not in row:
                raise LlmctlError(f"{key}: no column '{column}' in {source.hub_name} (columns: {', '.join(row)}); "
                                  "set data.text_column")
            yield i, row[column]
    except LlmctlError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise LlmctlError(f"{key}: could not read {source.hub_name}: {first}") from None


def pieces(source: Source, cfg: DataConfig, cut: Callable[[str], int], start: Cursor = Cursor(),
           key: str = "data.path") -> Iterator[Piece]:
    """Every document of `source` from `start` on, as pieces (see the module docstring)."""
    column = cfg.text_column
    if source.builder == "hub":
        for i, value in _hub_rows(source, cfg, start.pos, column, key):
            yield Piece(_text(value), True, Cursor(0, i + 1), 0)
        return
    consumed = sum(f.stat().st_size for f in source.files[: start.file])
    for index in range(start.file, len(source.files)):
        f = source.files[index]
        begin = start.pos if index == start.file else 0
        if not os.access(f, os.R_OK):
            raise LlmctlError(f"{key}: {f} cannot be read (permission denied)")
        size = f.stat().st_size
        if source.builder == "text":
            yield from _text_pieces(f, index, begin, cut, key, consumed)
        else:
            if source.builder == "json":
                rows = _json_rows(f, begin, column, key)
            elif source.builder == "csv":
                rows = _csv_rows(f, begin, column, _format(f) == ".tsv", key)
            else:
                rows = _parquet_rows(f, begin, column, key)
            for i, value, read in rows:
                yield Piece(_text(value), True, Cursor(index, i + 1), consumed + read)
            yield Piece("", False, Cursor(index + 1, 0), consumed + size)  # (the file is done: for the cursor)
        consumed += size


def _text(value) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))
