"""The `llmctl` command line: parse options, call a function in `commands`, print results.

stdout carries only results (generated text, tables, JSON); the resolved config, progress and logs go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.table import Table

from .console import err, out, reporter
from .errors import EXIT_SIGINT, EXIT_UNEXPECTED, LlmctlError

app = typer.Typer(
    name="llmctl",
    help="Train, finetune, sample from and measure GPT- and LLaMA-style language models on your own text.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")

STATE = {"debug": bool(os.environ.get("LLMCTL_DEBUG"))}

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config; it holds only what differs from the defaults in code.",
                         show_default="defaults in code")
SetOpt = typer.Option(None, "--set", "-s", help="Override one key, e.g. --set train.lr=3e-4 (repeatable).", metavar="KEY=VALUE",
                      show_default="none")
JsonOpt = typer.Option(False, "--json", help="Print the result as one JSON object on stdout.", show_default="off")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines on stderr.", show_default="off")
DryRunOpt = typer.Option(False, "--dry-run", help="Build everything, time a few steps (then undo them) and report parameters, "
                         "FLOPs, memory, time and a sample batch; train nothing, write no run directory.", show_default="off")


def run(fn: Callable[[], Optional[int]]) -> None:
    """Call a command, turning expected failures into one clear line and an exit status."""
    try:
        code = fn()
    except LlmctlError as e:
        if STATE["debug"]:
            traceback.print_exc()
        _print_error(e.message)
        raise typer.Exit(e.status)
    except KeyboardInterrupt:
        _print_error("interrupted")
        raise typer.Exit(EXIT_SIGINT)
    except typer.Exit:
        raise
    except Exception as e:  # an unexpected failure: say so plainly, the traceback only on request
        if STATE["debug"]:
            traceback.print_exc()
        _print_error(f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback, and please report it)")
        raise typer.Exit(EXIT_UNEXPECTED)
    raise typer.Exit(code or 0)


def _print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _log(message: str) -> None:
    err.print(message)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str), flush=True)


def _table(title: str, rows: dict) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
        elif isinstance(v, int):
            v = f"{v:,}"
        t.add_row(k, "" if v is None else str(v))
    return t


def _print_config(cfg, quiet: bool) -> None:
    for w in cfg.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}")
    if quiet:
        return
    for section, values in cfg.to_dict().items():
        line = " ".join(f"{k}={v}" for k, v in values.items())
        err.print(f"[dim]{section}: {line}[/dim]")


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors (also LLMCTL_DEBUG=1).", show_default="off"),
) -> None:
    """llmctl: from your own text to a trained, measured language model."""
    if debug:
        STATE["debug"] = True


def _train_command(kind: str, config, overrides, out_dir, resume, overwrite, json_out, quiet, dry_run=False, **extra) -> None:
    from . import commands, estimate, views

    rep = reporter(kind, quiet)
    perf: dict = {}

    def on_plan(plan) -> None:
        _print_config(plan.cfg, quiet or dry_run)
        if not dry_run:  # MFU in the progress bar and the summary
            perf["flops"] = estimate.flops_per_token(commands.unwrap(plan.model), plan.cfg.model)["train"]
            perf["peak"] = estimate.peak_flops(plan.device, plan.amp, plan.cfg.data.cache_dir)["flops"]
            getattr(rep, "set_mfu", lambda *a: None)(perf["flops"], perf["peak"])
        if not quiet and not dry_run:
            info = commands.describe(plan)
            err.print(
                f"{kind}: {info['parameters']:,} parameters ({info['parameters_non_embedding']:,} non-embedding), "
                f"{info['tokens_per_step']:,} tokens per step, {info['train_tokens']:,} train / {info['val_tokens']:,} val tokens "
                f"(~{info['epochs']} epochs), {info['device']}, {info['precision']}"
            )

    def go() -> None:
        fn = commands.pretrain if kind == "pretrain" else commands.finetune
        summary = fn(config, overrides or [], out=out_dir, resume=resume, overwrite=overwrite, reporter=rep,
                     log=(lambda m: None) if quiet else _log, on_plan=on_plan, dry_run=dry_run, **extra)
        if dry_run:
            _print_json(summary) if json_out else out.print(views.dry_run(summary))
            return
        summary["mfu"] = estimate.mfu(summary.get("tokens_per_sec"), perf.get("flops", 0), perf.get("peak"))
        if json_out:
            _print_json(summary)
        else:
            out.print(_table(f"{kind} finished", summary))

    run(go)


def _default_out(config: Optional[Path], kind: str) -> Path:
    return Path("runs") / (config.stem if config else kind)


@app.command()
def pretrain(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory.", show_default="runs/<config name>"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest good checkpoint.", show_default="off"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run in --out and start again.", show_default="off"),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Continue from this checkpoint (or run) into --out.", show_default="none"),
    dry_run: bool = DryRunOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Train a model from scratch on data.path (tokenizer and token cache are prepared when needed)."""
    _train_command("pretrain", config, overrides, out_dir or _default_out(config, "pretrain"), resume, overwrite,
                   json_out, quiet, dry_run, resume_from=resume_from)


@app.command()
def finetune(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    from_: Path = typer.Option(..., "--from", help="Run directory or checkpoint to start from (model and tokenizer come from it)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory.", show_default="runs/<config name>"),
    resume: bool = typer.Option(False, "--resume", help="Continue the finetune run in --out from its latest good checkpoint.", show_default="off"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run in --out and start again.", show_default="off"),
    dry_run: bool = DryRunOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Finetune a checkpoint on new data with the same training loop (full finetune, language-model objective)."""
    _train_command("finetune", config, overrides, out_dir or _default_out(config, "finetune"), resume, overwrite,
                   json_out, quiet, dry_run, from_=from_)


@app.command()
def infer(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run directory (its latest checkpoint) or a step-* checkpoint."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text; an empty string samples unconditionally.", show_default="none"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="A file whose whole content is one prompt.", show_default="none"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Tokens to generate.", show_default="generate.max_new_tokens of the checkpoint, 256"),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="Sampling temperature; 0 = greedy.", show_default="generate.temperature, 0.8"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k most likely tokens.", show_default="generate.top_k, 200"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling: smallest set with this much probability.", show_default="generate.top_p, off"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for reproducible samples.", show_default="random"),
    truncate: bool = typer.Option(False, "--truncate", help="Keep the last tokens of a prompt longer than the context instead of refusing it.", show_default="off"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    json_out: bool = typer.Option(False, "--json", help="Print {prompt, completion} as one JSON object when done instead of streaming.", show_default="off"),
) -> None:
    """Generate text from a prompt; it streams to stdout as it is produced."""
    from . import commands

    def go() -> None:
        text = commands.read_prompt(prompt, prompt_file)
        pieces = commands.infer(ckpt, text, max_new_tokens, temperature, top_k, top_p, seed, truncate, device)
        if json_out:
            _print_json({"checkpoint": str(ckpt), "prompt": text, "completion": "".join(pieces)})
            return
        sys.stdout.write(text)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()

    run(go)


@app.command("eval")
def eval_(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run directory (its latest checkpoint) or a step-* checkpoint."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluate on this file (all of it) instead of the validation split.", show_default="the validation split"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Blocks per forward pass.", show_default="eval.batch_size, 16"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    json_out: bool = JsonOpt,
) -> None:
    """Loss, perplexity and bits per byte over one full pass of non-overlapping blocks."""
    from . import commands

    def go() -> None:
        if batch_size is not None and batch_size < 1:
            raise LlmctlError(f"--batch-size must be at least 1 (got {batch_size})")
        r = commands.evaluate(ckpt, data, batch_size, device, log=_log)
        if json_out:
            _print_json(r)
        else:
            out.print(_table(f"eval: {r['data']}", {k: v for k, v in r.items() if k not in ("data",)}))

    run(go)


@app.command()
def prepare(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Train the tokenizer and tokenize the corpus into the cache (pretrain does this on demand)."""
    from . import commands

    def go() -> None:
        r = commands.prepare(config, overrides or [], log=_log)
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
    from . import commands

    def go() -> None:
        cfg = commands.show_config(config, overrides or [])
        for w in cfg.warnings:
            err.print(f"[yellow]warning:[/yellow] {w}")
        if json_out:
            _print_json(cfg.to_dict())
        else:
            sys.stdout.write(cfg.to_yaml())

    run(go)


@app.command("runs")
def runs_(
    args: Optional[List[str]] = typer.Argument(None, metavar="DIR | compare RUN_A RUN_B",
                                               help="A folder of runs to list, or: compare RUN_A RUN_B.", show_default="runs"),
    json_out: bool = JsonOpt,
) -> None:
    """List runs (name, status, steps, best val loss, tokens seen, tokens/s), or compare two: config keys that differ and final metrics."""
    from . import runs as runs_mod, views

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
        _print_json({"directory": str(directory), "runs": rows}) if json_out else out.print(views.runs_table(rows, str(directory)))

    run(go)


@app.command("plot")
def plot_(
    run_dirs: List[Path] = typer.Argument(..., metavar="RUN...", help="Run directories to draw on one chart."),
    output: Path = typer.Option(Path("curves.png"), "--output", "-o", help="Image file to write (.png, .svg or .pdf)."),
    title: Optional[str] = typer.Option(None, "--title", help="Chart title.", show_default="the run names"),
    log_x: bool = typer.Option(False, "--log-x", help="Logarithmic tokens axis.", show_default="off"),
    json_out: bool = JsonOpt,
) -> None:
    """Training and validation loss against tokens seen, several runs on one chart (needs llmctl\\[plot])."""
    from .plot import plot

    def go() -> None:
        r = plot(run_dirs, output, title, log_x)
        _print_json(r) if json_out else out.print(f"wrote {r['output']} ({len(r['runs'])} runs, {r['points']} points)")

    run(go)


def entry() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    entry()
