"""`llmctl prepare` and `llmctl config`: commands that need no model, so they start without importing torch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import Config, load_config
from ..data import OnProgress
from ..data import prepare as prepare_tokens
from . import Log, nolog


def prepare(config: Optional[Path], overrides: list[str], log: Log = nolog,
            on_progress: Optional[OnProgress] = None) -> dict:
    """`llmctl prepare`: tokenize once into the cache; report what is there. `on_progress` (bytes read, total bytes,
    tokens) replaces the progress lines (for a live bar)."""
    cfg = load_config(config, overrides)
    td = prepare_tokens(cfg.data, cfg.tokenizer, log=log, on_progress=on_progress)
    return {"cache": str(td.dir), **td.manifest}


def show_config(config: Optional[Path], overrides: list[str]) -> Config:
    return load_config(config, overrides)
