"""The `llmctl` command line: parse options, call a function in `commands`, print results.

stdout carries only results (generated text, tables, JSON); the resolved config, progress and logs go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.table import Table

from .config import INFER_DTYPES, QUANTIZE_MODES
from .console import bytes_bar, err, out, reporter
from .errors import EXIT_BROKEN_PIPE, EXIT_SIGINT, EXIT_UNEXPECTED, LlmctlError

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
import_app = typer.Typer(help="Bring in checkpoints made elsewhere (Hugging Face transformers).", no_args_is_help=True)
app.add_typer(import_app, name="import")

STATE = {"debug": bool(os.environ.get("LLMCTL_DEBUG"))}

ConfigOpt = typer.Option(None, "--config", "-c",
                         help="YAML config; it holds only what differs from the defaults in code.",
                         show_default="defaults in code")
SetOpt = typer.Option(None, "--set", "-s", help="Override one key, e.g. --set train.lr=3e-4 (repeatable).",
                      metavar="KEY=VALUE", show_default="none")
JsonOpt = typer.Option(False, "--json", help="Print the result as one JSON object on stdout.", show_default="off")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines on stderr.", show_default="off")
DryRunOpt = typer.Option(False, "--dry-run",
                         help="Build everything, time a few steps (then undo them) and report parameters, "
                              "FLOPs, memory, time and a sample batch; train nothing, write no run directory.",
                         show_default="off")
BaseOpt = typer.Option(None, "--base", help="Base checkpoint of a LoRA adapter, if it moved since training.",
                       show_default="the base recorded at training")
# the inference precision, the same for `infer` and `serve` (`eval` measures float32 unless asked)
DtypeOpt = typer.Option("auto", "--dtype", help=f"{', '.join(INFER_DTYPES)}. auto: see docs/inference.md.")
QuantizeOpt = typer.Option("auto", "--quantize",
                           help=f"{', '.join(QUANTIZE_MODES)} (CPU: dynamic int8; CUDA: weight-only int8). auto: int8 "
                                "on x86 CPUs for models of 10M+ parameters, none below and elsewhere "
                                "(docs/inference.md).")
TokenizerOpt = typer.Option(None, "--tokenizer",
                            help="A tokenizer.json to use instead of the checkpoint's (needed when it has none).",
                            show_default="the checkpoint's")


def run(fn: Callable[[], Optional[int]]) -> None:
    """Call a command, turning expected failures into one clear line and an exit status."""
    from .interrupt import STOP, Stopped, as_stop

    try:
        with STOP.handling():  # SIGINT / SIGTERM stop the command within seconds (llmctl.interrupt)
            try:
                code = fn()
            except Exception as e:
                stop = as_stop(e)  # a library's error on the way out of an interrupted call is the stop
                if stop is None:
                    raise
                raise stop from None
    except LlmctlError as e:
        if STATE["debug"]:
            traceback.print_exc()
        _print_error(e.message)
        raise typer.Exit(e.status)
    except Stopped as e:
        _print_error(f"interrupted by {e.name}")
        raise typer.Exit(e.status)
    except KeyboardInterrupt:
        _print_error("interrupted")
        raise typer.Exit(EXIT_SIGINT)
    except typer.Exit:
        raise
    except BrokenPipeError:  # the reader went away (`llmctl eval ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        raise typer.Exit(EXIT_BROKEN_PIPE)
    except Exception as e:  # an unexpected failure: say so plainly, the traceback only on request
        if STATE["debug"]:
            traceback.print_exc()
        _print_error(f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback, and please report it)")
        raise typer.Exit(EXIT_UNEXPECTED)
    raise typer.Exit(code or 0)


def _print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _log(message: str) -> None:
    err.print(message, soft_wrap=True)  # one line per message: long paths and commands stay copyable and greppable


def _warn(message: str) -> None:
    """One warning line on stderr, never wrapped, its text shown as is (no rich markup or emoji codes in it)."""
    from rich.text import Text

    err.print(Text.assemble(("warning:", "yellow"), " ", message), soft_wrap=True)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str), flush=True)


def _table(title: str, rows: dict) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rows.items():
        if isinstance(v, bool):
            v = "yes" if v else "no"
        elif isinstance(v, float):
            v = f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
        elif isinstance(v, int):
            v = f"{v:,}"
        t.add_row(k, "" if v is None else str(v))
    return t


def _print_config(cfg, quiet: bool) -> None:
    for w in cfg.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}", soft_wrap=True)
    if quiet:
        return
    for section, values in cfg.to_dict().items():
        line = " ".join(f"{k}={v}" for k, v in values.items())
        err.print(f"[dim]{section}: {line}[/dim]")


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors (also LLMCTL_DEBUG=1).",
                               show_default="off"),
) -> None:
    """llmctl: from your own text to a trained, measured language model."""
    if debug:
        STATE["debug"] = True


def _train_command(kind: str, config, overrides, out_dir, resume, overwrite, json_out, quiet, dry_run=False,
                   **extra) -> None:
    from . import commands, views

    rep = reporter(kind, quiet)

    def on_plan(plan) -> None:
        _print_config(plan.cfg, quiet or dry_run)
        if not quiet and not dry_run:
            for line in views.plan_lines(kind, commands.describe(plan)):
                err.print(line, soft_wrap=True, markup=False)

    def go() -> None:
        from .distributed import peer_errors

        fn = commands.pretrain if kind == "pretrain" else commands.finetune
        with peer_errors():  # under torchrun: a failed collective becomes one clear line (exit 4)
            summary = fn(config, overrides or [], out=out_dir, resume=resume, overwrite=overwrite, reporter=rep,
                         log=(lambda m: None) if quiet else _log, on_plan=on_plan, dry_run=dry_run, **extra)
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
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Train a model from scratch on data.path (tokenizer and token cache are prepared when needed).

    On a CPU, a language-model run of 5+ minutes ends by compiling the decode step `infer` will use (about half a
    minute; --set generate.compile=false skips it)."""
    _train_command("pretrain", config, overrides, out_dir or _default_out(config, "pretrain"), resume, overwrite,
                   json_out, quiet, dry_run, resume_from=resume_from)


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
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Finetune a checkpoint on new data with the same training loop: language modelling, classification,
    instruction tuning or distillation from finetune.teacher (finetune.task), full or LoRA (finetune.method); model
    and tokenizer come from --from.

    On a CPU, a language-model run of 5+ minutes ends by compiling the decode step `infer` will use (about half a
    minute; --set generate.compile=false skips it)."""
    _train_command("finetune", config, overrides, out_dir or _default_out(config, "finetune"), resume, overwrite,
                   json_out, quiet, dry_run, from_=from_)


@app.command()
def infer(
    ckpt: Path = typer.Option(..., "--ckpt",
                              help="Run directory (its latest checkpoint), a step-* checkpoint, or RUN/best."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p",
                                         help="Prompt text; an empty string samples unconditionally.",
                                         show_default="none"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="A file whose whole content is one prompt.",
                                               show_default="none"),
    input_file: Optional[Path] = typer.Option(None, "--input", "-i",
                                              help='Many prompts: JSONL rows {"prompt": ...} (optional per-row '
                                                   'max_new_tokens, temperature, top_k, top_p, stop, seed) or a text '
                                                   'file with one prompt per line.', show_default="none"),
    output_file: Optional[Path] = typer.Option(None, "--output", "-o",
                                               help="Where --input results go (JSONL, written atomically).",
                                               show_default="stdout"),
    chat: bool = typer.Option(False, "--chat",
                              help="Interactive chat with an instruction-tuned model (/reset clears, /exit or "
                                   "Ctrl-D quits).", show_default="off"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Tokens to generate.",
                                                 show_default="generate.max_new_tokens, 256"),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="Sampling temperature; 0 = greedy.",
                                                show_default="generate.temperature, 0.8"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the k most likely tokens.",
                                        show_default="generate.top_k, 200"),
    top_p: Optional[float] = typer.Option(None, "--top-p",
                                          help="Nucleus sampling: smallest set with this much probability.",
                                          show_default="generate.top_p, off"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for reproducible samples.",
                                       show_default="random"),
    truncate: bool = typer.Option(False, "--truncate",
                                  help="Keep the last tokens of a prompt longer than the context instead of "
                                       "refusing it.", show_default="off"),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty",
                                                       help="> 1 discourages repeating tokens.",
                                                       show_default="generate.repetition_penalty, 1 = off"),
    dtype: str = DtypeOpt,
    quantize_mode: str = QuantizeOpt,
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="The decode step compiled ahead of time (AOTInductor): several times "
                                                "faster per token. --compile builds it if the cache lacks it (half a "
                                                "minute to a minute on a CPU, once per model, precision and shape); "
                                                "later runs load it in well under a second. By default a cached one is "
                                                "used, and one is built only for an --input job long enough to pay for "
                                                "it (and at the end of a CPU training run of 5+ minutes); --no-compile "
                                                "always decodes eagerly.", show_default="generate.compile, auto"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="--input: prompts decoded together.",
                                             show_default="generate.batch_size, 8"),
    base: Optional[Path] = BaseOpt,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming: the checkpoint, "
                                  "prompt and completion (classifiers: the label and probabilities).",
                                  show_default="off"),
    tokenizer: Optional[Path] = TokenizerOpt,
) -> None:
    """Generate text from a prompt (streamed to stdout), complete a file of prompts, chat, or classify text."""
    from . import commands

    def go() -> None:
        if chat and (prompt is not None or prompt_file is not None or input_file is not None):
            raise LlmctlError("--chat reads messages from the terminal; drop --prompt, --prompt-file and --input")
        if input_file is not None and (prompt is not None or prompt_file is not None):
            raise LlmctlError("give --input or --prompt/--prompt-file, not both")
        if output_file is not None and input_file is None:
            raise LlmctlError("--output goes with --input")
        loaded = commands.load_model(ckpt, device, base=base, tokenizer=tokenizer)
        if loaded.classifier is not None:
            _infer_classifier(commands, loaded, prompt, prompt_file, input_file, output_file, json_out)
            return
        if batch_size is not None and batch_size < 1:
            raise LlmctlError(f"--batch-size must be at least 1 (got {batch_size})")
        settings = commands.sampling(loaded, max_new_tokens, temperature, top_k, top_p, seed, repetition_penalty)
        commands.for_inference(loaded, dtype, quantize_mode, compile, notify=lambda msg: err.print(msg))
        if chat:
            _chat(commands.ChatSession(loaded, settings, warn=_warn))
            return
        if input_file is not None:
            rows = commands.read_inputs(input_file)
            with _row_progress(len(rows)) as advance:
                results = commands.complete_rows(loaded, rows, settings, truncate, on_row=advance,
                                                 batch_size=batch_size, warn=_warn)
            _emit_rows(commands, results, output_file)
            return
        text = commands.read_prompt(prompt, prompt_file)
        pieces = commands.stream(loaded, text, settings, truncate, warn=_warn)
        if json_out:
            _print_json({"checkpoint": str(loaded.ckpt.path), "prompt": text, "completion": "".join(pieces)})
            return
        sys.stdout.write(text)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()

    run(go)


@contextlib.contextmanager
def _row_progress(total: int):
    """A progress bar over prompts on stderr (plain start and end lines when stderr is not a terminal)."""
    if not err.is_terminal:
        err.print(f"completing {total} prompts")
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]infer"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err) as p:
        task = p.add_task("infer", total=total)
        yield lambda: p.advance(task)


def _emit_rows(commands, rows: list, output_file: Optional[Path]) -> None:
    if output_file is None:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False), flush=True)
    else:
        commands.write_outputs(output_file, rows)
        err.print(f"wrote {len(rows)} rows to {output_file}")


def _infer_classifier(commands, loaded, prompt, prompt_file, input_file, output_file, json_out) -> None:
    if input_file is not None:
        rows = commands.read_inputs(input_file)
        results = commands.classify_texts(loaded, [r["prompt"] for r in rows], warn=_warn)
        _emit_rows(commands, [{**r, **res} for r, res in zip(rows, results)], output_file)
        return
    text = commands.read_prompt(prompt, prompt_file)
    if not text.strip():
        raise LlmctlError("the text to classify is empty")
    res = commands.classify_texts(loaded, [text], warn=_warn, what="the text")[0]
    if json_out:
        _print_json(res)
        return
    t = Table(title=f"label: {res['label']}", header_style="bold")
    t.add_column("label")
    t.add_column("probability", justify="right")
    for name, p in res["probabilities"].items():
        t.add_row(name, f"{p:.4f}")
    out.print(t)


def _chat(session) -> None:
    """A read-eval-print loop: prompts on stderr when interactive, replies streamed to stdout."""
    interactive = sys.stdin.isatty()
    if interactive:
        err.print("[dim]chat: /reset clears the conversation, /exit or Ctrl-D quits[/dim]")
    while True:
        if interactive:
            err.print("[bold]you>[/bold] ", end="")
        line = sys.stdin.readline()
        if not line:
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            session.reset()
            continue
        for piece in session.reply(message):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


@app.command()
def serve(
    ckpt: Path = typer.Option(..., "--ckpt",
                              help="Run directory (its latest checkpoint), a step-* checkpoint, or RUN/best."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on. Any address other than loopback needs an API key "
                                  "(or --insecure)."),
    port: int = typer.Option(8000, "--port", help="TCP port; 0 picks a free one (printed when ready)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file",
                                                help="File whose first line is the API key clients must send as "
                                                     "'Authorization: Bearer KEY' (every endpoint but /health).",
                                                show_default="$LLMCTL_API_KEY, else no key"),
    insecure: bool = typer.Option(False, "--insecure",
                                  help="Allow a non-loopback --host without an API key.", show_default="off"),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="YAML with serve: and generate: sections (slots, queue, limits, "
                                               "timeouts, sampling defaults).", show_default="defaults in code"),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                                  help="Override one key, e.g. --set serve.slots=32 (repeatable; "
                                                       "serve.* and generate.* only).", metavar="KEY=VALUE",
                                                  show_default="none"),
    dtype: str = DtypeOpt,
    quantize_mode: str = QuantizeOpt,
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="Decode steps compiled ahead of time for serve.slots rows and "
                                                "for 1, 4, 16, ... of them (the smallest covering the busy rows "
                                                "runs): --compile builds missing ones (half a minute to a minute "
                                                "each on a CPU, once per model, precision and slot count); by "
                                                "default cached ones are used; --no-compile decodes eagerly.",
                                           show_default="generate.compile, auto"),
    base: Optional[Path] = BaseOpt,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    json_out: bool = typer.Option(False, "--json", help="When ready, print one JSON object (url, model, port, "
                                                          "slots, ...) on stdout.", show_default="off"),
    tokenizer: Optional[Path] = TokenizerOpt,
) -> None:
    """Serve a checkpoint over OpenAI's HTTP API (completions, chat, streaming, models, health, metrics; classifiers:
    /v1/classify), with continuous batching. SIGTERM or Ctrl-C finishes the requests in flight, then exits 0."""
    from . import commands

    def ready(info: dict) -> None:
        if json_out:
            _print_json(info)
        key = "API key required" if info["api_key"] else "no API key"
        slots = f"{info['slots']} slots, " if info["kind"] == "lm" else "classifier, "
        step = ", compiled decode step" if info["compiled"] else ""
        err.print(f"serving {info['model']} at {info['url']}/v1 ({slots}{info['precision']}{step}, {key}); "
                  "Ctrl-C stops", markup=False, highlight=False, soft_wrap=True)

    run(lambda: commands.serve(ckpt, host, port, api_key_file, config, overrides or [], dtype, quantize_mode,
                               compile, device, base, tokenizer, insecure, log=_log, on_ready=ready))


@app.command("eval")
def eval_(
    ckpt: Path = typer.Option(..., "--ckpt",
                              help="Run directory (its latest checkpoint), a step-* checkpoint, or RUN/best."),
    data: Optional[str] = typer.Option(None, "--data",
                                       help="Evaluate on this file (all of it) instead of the run's held-out "
                                            "validation split.", show_default="the run's validation split"),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="Classifiers: text column of --data.",
                                              show_default="eval.text_column, else data.text_column"),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Classifiers: label column of --data.",
                                               show_default="eval.label_column, else data.label_column"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per forward pass.",
                                             show_default="eval.batch_size, 16"),
    base: Optional[Path] = BaseOpt,
    dtype: str = typer.Option("float32", "--dtype",
                              help=f"Language models: {', '.join(INFER_DTYPES)} (auto: what infer uses)."),
    quantize_mode: str = typer.Option("none", "--quantize",
                                      help=f"Language models: {', '.join(QUANTIZE_MODES)} (auto: what infer uses)."),
    tasks: Optional[str] = typer.Option(None, "--tasks",
                                        help="lm-evaluation-harness tasks, comma-separated (needs llmctl\\[eval]); "
                                             "instead of --data.", show_default="none"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="--tasks: few-shot examples per prompt.",
                                              show_default="each task's own"),
    limit: Optional[float] = typer.Option(None, "--limit",
                                          help="--tasks: examples per task (a number), or a fraction below 1.",
                                          show_default="all"),
    include_path: Optional[Path] = typer.Option(None, "--include-path",
                                                help="--tasks: a directory of local task YAML files.",
                                                show_default="lm-eval's own tasks only"),
    log_samples: bool = typer.Option(False, "--log-samples",
                                     help="--tasks: keep every example's inputs and loglikelihoods in the result.",
                                     show_default="off"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    json_out: bool = JsonOpt,
    tokenizer: Optional[Path] = TokenizerOpt,
) -> None:
    """Measure a checkpoint: loss, perplexity and bits per byte (language models, one full pass of non-overlapping
    blocks); accuracy, precision, recall, F1 and confusion matrix (classifiers); response loss (instruction-tuned);
    with --tasks, lm-evaluation-harness tasks (results also saved in RUN/evals/)."""
    from . import commands

    def go() -> None:
        if tasks is not None:
            if data is not None:
                raise LlmctlError("--tasks and --data are exclusive: lm-eval tasks bring their own data")
            r = commands.evaluate_tasks(ckpt, tasks, num_fewshot, limit, include_path, batch_size, device, base,
                                        tokenizer, dtype, quantize_mode, log_samples, log=_log)
            if json_out:
                _print_json(r)
                return
            from .harness import table

            t = Table(title=f"lm-eval: {r['checkpoint']}", header_style="bold")
            for col in ("task", "metric", "filter", "value", "stderr"):
                t.add_column(col, justify="right" if col in ("value", "stderr") else "left")
            for row in table(r):
                t.add_row(row["task"], row["metric"], row["filter"], f"{row['value']:.4f}",
                          "" if row["stderr"] is None else f"{row['stderr']:.4f}")
            out.print(t)
            if r.get("saved"):
                err.print(f"saved {r['saved']}", markup=False, highlight=False, soft_wrap=True)
            return
        if any(x is not None for x in (num_fewshot, limit, include_path)) or log_samples:
            raise LlmctlError("--num-fewshot, --limit, --include-path and --log-samples go with --tasks")
        r = commands.evaluate(ckpt, data, batch_size, device, log=_log, text_column=text_column,
                              label_column=label_column, base=base, tokenizer=tokenizer, dtype=dtype,
                              quantize_mode=quantize_mode, warn=_warn)
        if json_out:
            _print_json(r)
        elif "confusion" in r:
            _print_classification(r)
        else:
            out.print(_table(f"eval: {r['data']}", {k: v for k, v in r.items() if k not in ("data",)}))

    run(go)


def _print_classification(r: dict) -> None:
    keys = ("checkpoint", "examples", "loss", "accuracy", "macro_precision", "macro_recall", "macro_f1", "truncated")
    out.print(_table(f"eval: {r['data']}", {k: r[k] for k in keys}))
    t = Table(title="per class", header_style="bold")
    for col in ("label", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="left" if col == "label" else "right")
    for name, m in r["per_class"].items():
        t.add_row(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    out.print(t)
    labels, matrix = r["confusion"]["labels"], r["confusion"]["matrix"]
    c = Table(title="confusion matrix (rows: true, columns: predicted)", header_style="bold")
    c.add_column("")
    for name in labels:
        c.add_column(name, justify="right")
    for name, row in zip(labels, matrix):
        c.add_row(name, *[str(v) for v in row])
    out.print(c)


@app.command()
def prepare(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Train the tokenizer and tokenize the corpus into the cache (pretrain does this on demand)."""
    from . import commands

    def go() -> None:
        bar = bytes_bar()
        try:
            r = commands.prepare(config, overrides or [], log=_log, on_progress=bar)
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
    from . import commands

    def go() -> None:
        cfg = commands.show_config(config, overrides or [])
        for w in cfg.warnings:
            err.print(f"[yellow]warning:[/yellow] {w}", soft_wrap=True)
        if json_out:
            _print_json(cfg.to_dict())
        else:
            sys.stdout.write(cfg.to_yaml())

    run(go)


@import_app.command("hf")
def import_hf(
    source: str = typer.Argument(..., help="A transformers checkpoint directory, or hf:NAME to download from the hub.",
                                 metavar="DIR|hf:NAME"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run directory to create (its checkpoint is step-0000000)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                             help="A tokenizer.json to store instead of (or when missing) "
                                                  "the directory's.", show_default="the checkpoint's"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --out.", show_default="off"),
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Import a GPT2LMHeadModel or LlamaForCausalLM checkpoint; finetune, infer and eval then take it."""
    from . import commands

    def go() -> None:
        r = commands.import_hf(source, out_dir, tokenizer, overwrite, log=(lambda m: None) if quiet else _log)
        if json_out:
            _print_json(r)
        else:
            out.print(_table("imported", r))

    run(go)


@app.command("runs")
def runs_(
    args: Optional[List[str]] = typer.Argument(None, metavar="DIR | compare RUN_A RUN_B",
                                               help="A folder of runs to list, or: compare RUN_A RUN_B.",
                                               show_default="runs"),
    json_out: bool = JsonOpt,
) -> None:
    """List runs (name, status, steps, best val loss, tokens seen, tokens/s), or compare two: config keys that differ and final metrics."""  # noqa: E501 (typer's command list keeps a docstring's line breaks)
    from . import runs as runs_mod
    from . import views

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
    from .plot import plot

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
    overrides: Optional[List[str]] = typer.Option(
        None, "--set", "-s", metavar="KEY=VALUE", show_default="none",
        help="The shape to keep: model.n_layer, model.n_head, model.n_kv_head, model.n_embd, model.mlp_hidden "
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
    from . import commands, views

    def go() -> None:
        r = commands.prune(ckpt, out_dir, data, list(overrides or []), target_params, by, samples, dry_run,
                           overwrite, log=(lambda m: None) if quiet else _log)
        _print_json(r) if json_out else out.print(views.pruning(r))

    run(go)


@app.command("export")
def export(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run directory (its latest checkpoint) or a step-* checkpoint."),
    fmt: str = typer.Option("hf", "--format", "-f",
                            help="Target format: hf (a transformers directory) or gguf (one file for llama.cpp; "
                                 "needs llmctl\\[gguf])."),
    out_dir: Path = typer.Option(..., "--out", "-o",
                                 help="hf: the directory from_pretrained(DIR) loads; gguf: the FILE.gguf to write."),
    outtype: str = typer.Option("f16", "--outtype",
                                help="gguf: f32, f16 (matrices; norms and biases stay f32) or q8_0."),
    tokenizer: Optional[Path] = TokenizerOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export in --out.",
                                   show_default="off"),
    merge_lora_adapter: bool = typer.Option(False, "--merge-lora",
                                            help="For a LoRA adapter: fold it into its base's weights and export the "
                                                 "merged model.", show_default="off"),
    base: Optional[Path] = BaseOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Export a checkpoint as a Hugging Face transformers model (config, safetensors, tokenizer) or as a GGUF file
    for llama.cpp; a LoRA adapter with --merge-lora."""
    from . import commands

    def go() -> None:
        r = commands.export(ckpt, fmt, out_dir, tokenizer, overwrite, log=_log, base=base,
                            merge_lora_adapter=merge_lora_adapter, outtype=outtype)
        if json_out:
            _print_json(r)
        else:
            out.print(_table("exported", {**r, "files": ", ".join(r["files"])}))

    run(go)


def entry() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    entry()
