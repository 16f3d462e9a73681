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
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .chat import render_prompt
from .config import DataConfig, TokenizerConfig
from .errors import LlmctlError
from .fileio import read_jsonl, sha256_file, temp_dir
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
FORMATS = {  # file suffix -> the datasets builder that reads it
    ".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet",
}


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
            h.update(sha256_file(f).encode())
        h.update(f"{self.builder}:{cfg.text_column}".encode())
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
            raise LlmctlError(f"could not download {url}: {e}; check the URL and the network, "
                              "or give a local file as data.path") from None
        os.replace(tmp, dest)
    if sha256:
        got = sha256_file(dest)
        if got != sha256.lower():
            dest.unlink()
            raise LlmctlError(f"{url} downloaded with sha256 {got}, but data.sha256 is {sha256}; "
                              "fix data.sha256 or the URL")
    return dest


def resolve_source(path: Optional[str], cfg: DataConfig, key: str = "data.path") -> Source:
    """Turn `data.path` into files (downloading a URL) or a hub name. A missing local path is an error."""
    if not path:
        raise LlmctlError(f"{key} is not set: give a text file, folder, hf:NAME or URL "
                          f"(for example --set {key}=input.txt)")
    if path.startswith("hf:"):
        return Source(files=[], builder="hub", hub_name=path[3:])
    if path.startswith(("https://", "http://")):
        f = download(path, cfg.cache_dir, cfg.sha256)
        return _local_source([f], key)
    p = Path(path).expanduser()
    if not p.exists():
        raise LlmctlError(f"{key}: {path} does not exist (give an existing file or folder, hf:NAME for a hub dataset, "
                          "or a URL)")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*")
                       if f.is_file() and f.suffix.lower() in FORMATS and not f.name.startswith("."))
        if not files:
            raise LlmctlError(f"{key}: folder {path} has no .txt, .jsonl, .json, .csv, .tsv or .parquet files")
        return _local_source(files, key)
    return _local_source([p], key)


def _local_source(files: list[Path], key: str) -> Source:
    suffixes = {f.suffix.lower() for f in files}
    unknown = [s for s in suffixes if s not in FORMATS]
    if unknown:
        # an unknown suffix is read as plain text, the common case for corpora such as input.txt.1
        suffixes = {".txt" if s in unknown else s for s in suffixes}
    builders = {FORMATS[s] for s in suffixes}
    if len(builders) > 1:
        raise LlmctlError(f"{key}: mixes file formats ({', '.join(sorted(suffixes))}); put one format per folder")
    suffix = sorted(suffixes)[0]
    return Source(files=files, builder=builders.pop(), suffix=suffix)


def load_table(source: Source, cfg: DataConfig, key: str = "data.path"):
    """Load a source as a `datasets.Dataset` with all its columns (a .txt file is one row, column `text`)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    hf_cache = str(Path(cfg.cache_dir).expanduser() / "hf")
    try:
        if source.builder == "hub":
            return datasets.load_dataset(source.hub_name, cfg.hf_config, split=cfg.hf_split, cache_dir=hf_cache)
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
                raise LlmctlError(f"data.path: {data.path} holds no text (the corpus is empty); "
                                  "point it at a non-empty corpus")
            nproc = _auto_num_proc(data, n_chars)
            n_all = _write_tokens(ds, tokenizer, tmp, "all.npy", nproc)
            if val_source is not None:
                os.replace(tmp / "all.npy", tmp / "train.npy")
                n_val = _write_tokens(load_texts(val_source, data, key="data.val_path"),
                                      tokenizer, tmp, "val.npy", nproc)
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
    order = sorted(indices, key=lambda i: len(ex.ids[i]))
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        yield {**pad_batch(ex, rows, pad_id, kind), "rows": torch.tensor(rows)}
