"""`llmctl runs`, `llmctl plot` and `llmctl prune`: look at runs side by side, draw their curves, make a smaller
model from one."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..console import ConsoleEvents, out
from ..errors import LlmctlError
from .app import _print_json, app, run
from .options import JsonOpt, QuietOpt, set_option


@app.command("runs")
def runs_(
    args: Optional[List[str]] = typer.Argument(None, metavar="DIR | compare RUN_A RUN_B",
                                               help="A folder of runs to list, or: compare RUN_A RUN_B.",
                                               show_default="runs"),
    json_out: bool = JsonOpt,
) -> None:
    """List runs (name, status, steps, best val loss, tokens seen, tokens/s), or compare two: config keys that differ and final metrics."""  # noqa: E501 (typer's command list keeps a docstring's line breaks)
    from .. import runs as runs_mod
    from .. import views

    def go() -> None:
        items = list(args or [])
        if items and items[0] == "compare":
            if len(items) != 3:
                raise LlmctlError("usage: llmctl runs compare RUN_A RUN_B (two run directories)")
            c = runs_mod.compare(Path(items[1]), Path(items[2]))
            _print_json(c) if json_out else out.print(views.comparison(c))
            return
        if len(items) > 1:
            raise LlmctlError("give one folder of runs (llmctl runs DIR) or compare two runs (llmctl runs compare A B)")
        directory = Path(items[0]) if items else Path("runs")
        rows = runs_mod.list_runs(directory)
        _print_json({"directory": str(directory), "runs": rows}) if json_out else out.print(
            views.runs_table(rows, str(directory)))

    run(go)


@app.command("plot")
def plot_(
    run_dirs: List[Path] = typer.Argument(..., metavar="RUN...", help="Run directories to draw on one chart."),
    output: Path = typer.Option(Path("curves.png"), "--output", "-o", help="Image file to write (.png, .svg or .pdf).",
                                show_default="curves.png"),
    title: Optional[str] = typer.Option(None, "--title", help="Chart title.", show_default="the run names"),
    log_x: bool = typer.Option(False, "--log-x", help="Logarithmic tokens axis.", show_default="off"),
    json_out: bool = JsonOpt,
) -> None:
    """Training and validation loss against tokens seen, several runs on one chart (needs llmctl\\[plot])."""
    from ..plot import plot

    def go() -> None:
        r = plot(run_dirs, output, title, log_x)
        _print_json(r) if json_out else out.print(f"wrote {r['output']} ({len(r['runs'])} runs, {r['points']} points)")

    run(go)


@app.command("prune")
def prune_(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run directory (its latest checkpoint) or a step-* checkpoint to "
                                                  "prune; a LoRA adapter is merged into its base first."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o",
                                           help="Run directory for the pruned model (its checkpoint is step-0000000).",
                                           show_default="required unless --dry-run"),
    data: Optional[str] = typer.Option(None, "--data",
                                       help="Calibration text the importance is measured on (any data.path source).",
                                       show_default="the checkpoint's data.path"),
    overrides: Optional[List[str]] = set_option(
        "The shape to keep: model.n_layer, model.n_head, model.n_kv_head, model.n_embd, model.mlp_hidden "
        "(repeatable; each at most the parent's)."),
    target_params: Optional[int] = typer.Option(
        None, "--target-params", show_default="none",
        help="Pick the shape for this many non-embedding parameters (blocks and final norm) instead, along --by."),
    by: str = typer.Option(
        "width", "--by",
        help="With --target-params: width keeps every layer and shrinks the attention heads (whole key/value groups) "
             "and MLP channels in balance, keeping n_embd (Minitron found width pruning keeps more quality); depth "
             "removes the least influential layers (ShortGPT), the only way to cut per-token overhead at small "
             "sizes; both takes layers in proportion to the square root of the kept fraction, then width."),
    samples: int = typer.Option(256, "--samples", help="Calibration blocks of model.block_size tokens, evenly spaced "
                                                        "over --data."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the shapes, parameter counts before and after and "
                                                         "the importance ranking; write nothing.", show_default="off"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --out.", show_default="off"),
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Structured pruning: remove the least important layers, attention heads, MLP channels or embedding channels
    (activation-based importance on calibration text) and write a smaller checkpoint; distil it back with
    finetune.task=distill (docs/compression.md)."""
    from .. import views
    from ..commands import compression as compression_cmd

    def go() -> None:
        r = compression_cmd.prune(ckpt, out_dir, data, list(overrides or []), target_params, by, samples, dry_run,
                           overwrite, events=ConsoleEvents(quiet))
        _print_json(r) if json_out else out.print(views.pruning(r))

    run(go)
