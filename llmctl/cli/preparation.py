"""`llmctl prepare` and `llmctl config show`: both start without importing torch (their command modules are
imported inside the functions, and neither needs the model code)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from ..console import ConsoleEvents, out
from .app import _print_json, _table, app, config_app, run
from .options import ConfigOpt, JsonOpt, SetOpt


@app.command()
def prepare(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Train the tokenizer and tokenize the corpus into the cache (pretrain does this on demand)."""
    from ..commands import preparation as preparation_cmd

    def go() -> None:
        r = preparation_cmd.prepare(config, overrides or [], events=ConsoleEvents())
        if json_out:
            _print_json(r)
        else:
            out.print(_table("prepared", r))

    run(go)


@config_app.command("show")
def config_show(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Print the resolved config (defaults <- file <- --set) as YAML."""
    from ..commands import preparation as preparation_cmd

    def go() -> None:
        cfg = preparation_cmd.show_config(config, overrides or [])
        events = ConsoleEvents()
        for w in cfg.warnings:
            events.warn(w)
        if json_out:
            _print_json(cfg.to_dict())
        else:
            sys.stdout.write(cfg.to_yaml())

    run(go)
