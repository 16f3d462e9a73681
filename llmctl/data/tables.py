"""Tables: whole files of examples read through `datasets` (classification, instruction tuning, eval --data).

A source is what `llmctl.corpus` resolves (files, folders, globs, hf: names); here it becomes a `datasets.Dataset`,
and a missing column is named with the setting that chooses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import DataConfig
from ..corpus import Source
from ..errors import LlmctlError


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
