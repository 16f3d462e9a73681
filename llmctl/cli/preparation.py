"""`llmctl prepare` and `llmctl config show`: both start without importing torch (their command modules are
imported inside the functions, and neither needs the model code)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from ..console import bytes_bar, err, out
from .app import _log, _print_json, _table, app, config_app, run
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
        bar = bytes_bar()
        try:
            r = preparation_cmd.prepare(config, overrides or [], log=_log, on_progress=bar)
        finally:
            if bar:
                bar.close()
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
        for w in cfg.warnings:
            err.print(f"[yellow]warning:[/yellow] {w}", soft_wrap=True)
        if json_out:
            _print_json(cfg.to_dict())
        else:
            sys.stdout.write(cfg.to_yaml())

    run(go)
