"""`llmctl pretrain` and `llmctl finetune`: options in, the run's summary (or its dry run) out."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..console import ConsoleEvents, out
from .app import _print_config, _print_json, _table, app, run
from .options import ConfigOpt, DryRunOpt, GpuMemoryOpt, JsonOpt, QuietOpt, SetOpt


def _train_command(kind: str, config, overrides, out_dir, *, resume: bool, overwrite: bool, json_out: bool,
                   quiet: bool, dry_run: bool, **start) -> None:
    """pretrain and finetune: `start` holds the options beyond these (--resume-from, --from, --gpu-memory)."""
    from .. import views
    from ..commands import training as training_cmd
    from ..commands.decode_step import DecodeStep
    from ..plan import describe

    events = ConsoleEvents(quiet, command=kind)

    def on_plan(plan) -> None:
        _print_config(plan.cfg, events, quiet or dry_run)
        if not quiet and not dry_run:
            for line in views.plan_lines(kind, describe(plan)):
                events.log(line)

    def go() -> None:
        from ..distributed import peer_errors

        fn = training_cmd.pretrain if kind == "pretrain" else training_cmd.finetune
        with peer_errors():  # under torchrun: a failed collective becomes one clear line (exit 4)
            summary = fn(config, overrides or [], out=out_dir, resume=resume, overwrite=overwrite, dry_run=dry_run,
                         events=events, on_plan=on_plan, after_training=[DecodeStep()], **start)
        if summary is None:  # a rank other than 0 under torchrun: rank 0 reports
            return
        if dry_run:
            _print_json(summary) if json_out else out.print(views.dry_run(summary))
            return
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
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory.",
                                           show_default="runs/<config name>"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest good checkpoint.",
                                show_default="off"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run in --out and start again.",
                                   show_default="off"),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from",
                                               help="Continue from this checkpoint (or run) into --out.",
                                               show_default="none"),
    dry_run: bool = DryRunOpt,
    gpu_memory: Optional[str] = GpuMemoryOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Train a model from scratch on data.path (tokenizer and token cache are prepared when needed).

    On a CPU, a language-model run of 5+ minutes ends by compiling the decode step `infer` will use (about half a
    minute; --set generate.compile=false skips it)."""
    _train_command("pretrain", config, overrides, out_dir or _default_out(config, "pretrain"), resume=resume,
                   overwrite=overwrite, json_out=json_out, quiet=quiet, dry_run=dry_run, resume_from=resume_from,
                   gpu_memory=gpu_memory)


@app.command()
def finetune(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    from_: Optional[Path] = typer.Option(None, "--from",
                                         help="Run directory or checkpoint to start from (model and tokenizer come "
                                              "from it). Required, except that finetune.task=distill may train a "
                                              "fresh student of the config's model: section.",
                                         show_default="required"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory.",
                                           show_default="runs/<config name>"),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue the finetune run in --out from its latest good checkpoint.",
                                show_default="off"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run in --out and start again.",
                                   show_default="off"),
    dry_run: bool = DryRunOpt,
    gpu_memory: Optional[str] = GpuMemoryOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Finetune a checkpoint on new data with the same training loop: language modelling, classification,
    instruction tuning or distillation from finetune.teacher (finetune.task), full or LoRA (finetune.method); model
    and tokenizer come from --from.

    On a CPU, a language-model run of 5+ minutes ends by compiling the decode step `infer` will use (about half a
    minute; --set generate.compile=false skips it)."""
    _train_command("finetune", config, overrides, out_dir or _default_out(config, "finetune"), resume=resume,
                   overwrite=overwrite, json_out=json_out, quiet=quiet, dry_run=dry_run, from_=from_,
                   gpu_memory=gpu_memory)
