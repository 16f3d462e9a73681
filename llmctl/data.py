"""Text sources -> tokenizer -> memory-mapped token files, cached by content hash; batch iterators.

A source (`data.path`) is a local file or folder (.txt, .jsonl/.json, .csv/.tsv, .parquet), `hf:NAME` for a hub
dataset, or an https:// URL downloaded once into the cache and checked against `data.sha256`. Documents are
joined with <eos>; line breaks inside a document are kept (a .txt file is one document).

Cache layout under `data.cache_dir`:
  downloads/<sha256>/<name>                      a downloaded URL
  tokenizers/<key>/tokenizer.json                a tokenizer trained on a corpus (key: corpus + tokenizer config)
  tokens/<key>/{train,val}.bin, manifest.json    token ids (key: corpus + tokenizer + split settings)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .config import DataConfig, TokenizerConfig
from .errors import LlmctlError
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


# ------------------------------------------------------------------------------------------------------------------
# Sources


@dataclass
class Source:
    """A resolved text source: local files of one format, or a hub dataset."""

    files: list[Path]
    builder: str  # text | json | csv | parquet | hub
    hub_name: Optional[str] = None
    suffix: str = ""

    def fingerprint(self, cfg: DataConfig) -> str:
        """Content hash of the inputs (and the settings that change what is read)."""
        h = hashlib.sha256()
        if self.hub_name:
            h.update(f"hub:{self.hub_name}:{cfg.hf_config}:{cfg.hf_split}".encode())
        for f in self.files:
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
        h.update(f"{self.builder}:{cfg.text_column}".encode())
        return h.hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, cache_dir: str, sha256: Optional[str]) -> Path:
    """Fetch `url` once into the cache; verify it against `sha256` when given (and on every reuse)."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    key = sha256.lower() if sha256 else hashlib.sha256(url.encode()).hexdigest()
    dest = Path(cache_dir).expanduser() / "downloads" / key / name
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except Exception as e:  # network errors come in many types
            tmp.unlink(missing_ok=True)
            raise LlmctlError(f"could not download {url}: {e}; check the URL and the network, or give a local file as data.path") from None
        os.replace(tmp, dest)
    if sha256:
        got = file_sha256(dest)
        if got != sha256.lower():
            dest.unlink()
            raise LlmctlError(f"{url} downloaded with sha256 {got}, but data.sha256 is {sha256}; fix data.sha256 or the URL")
    return dest


def resolve_source(path: Optional[str], cfg: DataConfig, key: str = "data.path") -> Source:
    """Turn `data.path` into files (downloading a URL) or a hub name. A missing local path is an error."""
    if not path:
        raise LlmctlError(f"{key} is not set: give a text file, folder, hf:NAME or URL (for example --set {key}=input.txt)")
    if path.startswith("hf:"):
        return Source(files=[], builder="hub", hub_name=path[3:])
    if path.startswith(("https://", "http://")):
        f = download(path, cfg.cache_dir, cfg.sha256)
        return _local_source([f], key)
    p = Path(path).expanduser()
    if not p.exists():
        raise LlmctlError(f"{key}: {path} does not exist (give an existing file or folder, hf:NAME for a hub dataset, or a URL)")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS and not f.name.startswith("."))
        if not files:
            raise LlmctlError(f"{key}: folder {path} has no .txt, .jsonl, .json, .csv, .tsv or .parquet files")
        return _local_source(files, key)
    return _local_source([p], key)


def _local_source(files: list[Path], key: str) -> Source:
    suffixes = {f.suffix.lower() for f in files}
    unknown = [s for s in suffixes if s not in BUILDERS]
    if unknown:
        # an unknown suffix is read as plain text, the common case for corpora such as input.txt.1
        suffixes = {".txt" if s in unknown else s for s in suffixes}
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise LlmctlError(f"{key}: mixes file formats ({', '.join(sorted(suffixes))}); put one format per folder")
    suffix = sorted(suffixes)[0]
    return Source(files=files, builder=builders.pop(), suffix=suffix)


def load_texts(source: Source, cfg: DataConfig, column: Optional[str] = None, key: str = "data.path"):
    """Load a source as a `datasets.Dataset` with a single `text` column (rows are documents)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    column = column or cfg.text_column
    hf_cache = str(Path(cfg.cache_dir).expanduser() / "hf")
    try:
        if source.builder == "hub":
            ds = datasets.load_dataset(source.hub_name, cfg.hf_config, split=cfg.hf_split, cache_dir=hf_cache)
        else:
            files = [str(f) for f in source.files]
            kwargs = {}
            if source.builder == "text":
                kwargs["sample_by"] = "document"  # one row per file: keeps line breaks
                column = "text"
            if source.suffix == ".tsv":
                kwargs["delimiter"] = "\t"
                kwargs["quoting"] = 3  # csv.QUOTE_NONE: TSV corpora such as SST-2 contain bare quotes
            ds = datasets.load_dataset(source.builder, data_files=files, split="train", cache_dir=hf_cache, **kwargs)
    except LlmctlError:
        raise
    except Exception as e:
        what = source.hub_name or ", ".join(str(f) for f in source.files[:3])
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise LlmctlError(f"{key}: could not read {what}: {first}") from None
    if column not in ds.column_names:
        raise LlmctlError(
            f"{key}: no column '{column}' in the data (columns: {', '.join(ds.column_names)}); set data.text_column"
        )
    if column != "text":
        ds = ds.rename_column(column, "text") if "text" not in ds.column_names else ds.map(lambda r: {"text": r[column]})
    ds = ds.select_columns(["text"])
    return ds


# ------------------------------------------------------------------------------------------------------------------
# Preparing token files


@dataclass
class TokenData:
    """Prepared token files: train/val memmaps, the tokenizer and the manifest."""

    dir: Path
    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    manifest: dict


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def _auto_num_proc(cfg: DataConfig, n_chars: int) -> int:
    if cfg.num_proc:
        return cfg.num_proc
    if n_chars < 64_000_000:  # process start-up costs more than it saves on small corpora
        return 1
    return max(1, min(8, os.cpu_count() or 1))


def _atomic_dir(final: Path, build: Callable[[Path], None]) -> None:
    """Build into a temporary sibling directory, then rename it into place (complete or absent)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
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


def _iter_texts(ds, batch: int = 256) -> Iterator[str]:
    for rows in ds.iter(batch_size=batch):
        for t in rows["text"]:
            yield t if isinstance(t, str) else ("" if t is None else str(t))


def get_tokenizer(cfg_tok: TokenizerConfig, cfg: DataConfig, source: Source, fingerprint: str, ds_loader) -> Tokenizer:
    """Load `tokenizer.path`, or train (once per corpus and setting, cached) a char or BPE tokenizer."""
    if cfg_tok.path:
        return Tokenizer.from_file(cfg_tok.path)
    key = _sha(fingerprint, cfg_tok.kind, str(cfg_tok.vocab_size), str(FORMAT_VERSION))
    path = Path(cfg.cache_dir).expanduser() / "tokenizers" / key / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(path)
    ds = ds_loader()
    if cfg_tok.kind == "char":
        tok = Tokenizer.train_char(_iter_texts(ds))
    else:
        tok = Tokenizer.train_bpe(_iter_texts(ds), cfg_tok.vocab_size)
    _atomic_dir(path.parent, lambda d: tok.save(d / "tokenizer.json"))
    return tok


def _write_tokens(ds, tok: Tokenizer, dest: Path, name: str, num_proc: int) -> int:
    """Tokenize every document (parallel `datasets.map`) and write one flat token file joined by <eos>."""
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32

    def encode(batch):
        return {"ids": tok.encode_batch([t if isinstance(t, str) else "" for t in batch["text"]])}

    ids_ds = ds.map(encode, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                    remove_columns=["text"], keep_in_memory=num_proc <= 1)
    lengths = [len(x) for x in ids_ds["ids"]] if len(ids_ds) < 100_000 else None
    if lengths is None:
        lengths = [len(x) for rows in ids_ds.iter(batch_size=10_000) for x in rows["ids"]]
    nonempty = sum(1 for n in lengths if n)
    total = sum(lengths) + max(0, nonempty - 1)
    out = np.lib.format.open_memmap(dest / name, mode="w+", dtype=dtype, shape=(total,)) if total else None
    pos, first = 0, True
    if out is not None:
        for rows in ids_ds.iter(batch_size=1000):
            for ids in rows["ids"]:
                if not ids:
                    continue
                if not first:
                    out[pos] = tok.eos_id
                    pos += 1
                first = False
                out[pos : pos + len(ids)] = ids
                pos += len(ids)
        out.flush()
        del out
    return total


def prepare(
    data: DataConfig,
    tok_cfg: TokenizerConfig,
    tokenizer: Optional[Tokenizer] = None,
    log: Callable[[str], None] = lambda s: None,
) -> TokenData:
    """Tokenize the configured corpus into cached token files (reused when inputs and tokenizer match)."""
    source = resolve_source(data.path, data)
    val_source = resolve_source(data.val_path, data, "data.val_path") if data.val_path else None
    fp = source.fingerprint(data)
    val_fp = val_source.fingerprint(data) if val_source else ""
    cache: dict = {}

    def ds_loader():
        if "train" not in cache:
            cache["train"] = load_texts(source, data)
        return cache["train"]

    if tokenizer is None:
        tokenizer = get_tokenizer(tok_cfg, data, source, fp, ds_loader)
    key = _sha(fp, val_fp, tokenizer.sha256, str(data.val_fraction), str(FORMAT_VERSION))
    final = Path(data.cache_dir).expanduser() / "tokens" / key
    if not (final / "manifest.json").exists():
        t0 = time.time()
        log(f"tokenizing {data.path} (cache miss) into {final}")

        def build(tmp: Path) -> None:
            ds = ds_loader()
            n_chars = sum(len(t) for t in _iter_texts(ds))
            if n_chars == 0 or not any(t.strip() for t in _iter_texts(ds)):
                raise LlmctlError(f"data.path: {data.path} holds no text (the corpus is empty); point it at a non-empty corpus")
            nproc = _auto_num_proc(data, n_chars)
            n_all = _write_tokens(ds, tokenizer, tmp, "all.npy", nproc)
            if val_source is not None:
                os.replace(tmp / "all.npy", tmp / "train.npy")
                n_val = _write_tokens(load_texts(val_source, data, key="data.val_path"), tokenizer, tmp, "val.npy", nproc)
                n_train = n_all
            else:
                # contiguous split: the first (1 - val_fraction) of the tokens train, the rest validate
                all_ = np.load(tmp / "all.npy", mmap_mode="r")
                n_train = int(n_all * (1 - data.val_fraction))
                np.save(tmp / "train.npy", np.asarray(all_[:n_train]))
                np.save(tmp / "val.npy", np.asarray(all_[n_train:]))
                n_val = n_all - n_train
                del all_
                (tmp / "all.npy").unlink()
            manifest = {
                "format": FORMAT_VERSION,
                "source": data.path,
                "val_source": data.val_path,
                "text_column": data.text_column,
                "val_fraction": data.val_fraction,
                "tokenizer_sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size,
                "train_tokens": int(n_train),
                "val_tokens": int(n_val),
                "chars": int(n_chars),
                "seconds": round(time.time() - t0, 2),
            }
            tokenizer.save(tmp / "tokenizer.json")
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

        _atomic_dir(final, build)
    return open_tokens(final, tokenizer)


def open_tokens(directory: Path, tokenizer: Optional[Tokenizer] = None) -> TokenData:
    manifest = json.loads((directory / "manifest.json").read_text())
    train = np.load(directory / "train.npy", mmap_mode="r")
    val = np.load(directory / "val.npy", mmap_mode="r")
    return TokenData(directory, train, val, tokenizer or Tokenizer.from_file(directory / "tokenizer.json"), manifest)


def tokenize_file(path: str, data: DataConfig, tokenizer: Tokenizer, key: str = "--data") -> np.ndarray:
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
                 rank: int = 0, world_size: int = 1):
        if len(tokens) < block_size + 2:
            raise LlmctlError(
                f"the training split has {len(tokens)} tokens, fewer than one block of model.block_size={block_size} + 1; "
                "use more text or a smaller model.block_size"
            )
        self.tokens, self.T, self.B, self.accum = tokens, block_size, batch_size, grad_accum
        self.seed, self.rank, self.world = seed, rank, world_size

    def offsets(self, step: int) -> np.ndarray:
        """Block start offsets of the whole global batch for `step`: (grad_accum, world_size, batch_size)."""
        rng = np.random.default_rng([self.seed, step])
        n = self.accum * self.world * self.B
        return rng.integers(0, len(self.tokens) - self.T - 1, size=n).reshape(self.accum, self.world, self.B)

    def get(self, step: int) -> list[dict]:
        """The micro-batches of this rank for `step`, each {'input_ids': (B, T), 'labels': (B, T)}."""
        out = []
        for micro in self.offsets(step)[:, self.rank]:
            rows = np.stack([self.tokens[o : o + self.T + 1] for o in micro]).astype(np.int64)  # (B, T+1)
            t = torch.from_numpy(rows)
            out.append({"input_ids": t[:, :-1], "labels": t[:, 1:]})
        return out


def eval_blocks(tokens: np.ndarray, block_size: int, batch_size: int, max_batches: Optional[int] = None) -> Iterator[dict]:
    """Non-overlapping blocks covering every token once (the last, shorter block included).

    Yields {'input_ids': (b, t), 'labels': (b, t)}; every token but the first is predicted exactly once.
    With `max_batches`, an evenly spaced subset of the full blocks is used (a cheaper estimate).
    """
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
