"""`llmctl prepare` and `llmctl config`: commands that need no model, so they start without importing torch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import Config, load_config
from ..data import prepare as prepare_tokens
from ..events import SILENT, Events


def prepare(config: Optional[Path], overrides: list[str], events: Events = SILENT) -> dict:
    """`llmctl prepare`: tokenize once into the cache; report what is there. `events` hears the "prepare" progress
    (bytes read, tokens) and what is done."""
    cfg = load_config(config, overrides)
    td = prepare_tokens(cfg.data, cfg.tokenizer, events=events, encoder=cfg.train.objective == "mlm")
    return {"cache": str(td.dir), **td.manifest}


def show_config(config: Optional[Path], overrides: list[str]) -> Config:
    return load_config(config, overrides)
