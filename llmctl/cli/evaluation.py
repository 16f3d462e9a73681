"""`llmctl eval`: loss, perplexity and bits per byte on text, accuracy of a classifier, or lm-evaluation-harness
tasks; a table or `--json`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..config import INFER_DTYPES, QUANTIZE_MODES
from ..console import ConsoleEvents, out
from ..errors import LlmctlError
from .app import _print_json, _table, app, run
from .options import (
    BaseOpt,
    JsonOpt,
    TokenizerOpt,
    _sampling_flags,
    _sampling_opt,
    from_config,
    set_option,
)


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
                                             show_default=from_config("eval.batch_size")),
    base: Optional[Path] = BaseOpt,
    dtype: str = typer.Option("float32", "--dtype",
                              help=f"Language models: {', '.join(INFER_DTYPES)} (auto: chosen by the hardware, as "
                                   "infer does by default)."),
    quantize_mode: str = typer.Option("none", "--quantize",
                                      help=f"Language models: {', '.join(QUANTIZE_MODES)} (auto: chosen by the "
                                           "hardware, as infer does by default)."),
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
    reward: Optional[List[str]] = typer.Option(
        None, "--reward", help="Sample completions of --prompts and report their mean reward and the KL to "
                               "--reference: module:function, path.py:function or classifier:RUN:LABEL (repeatable: "
                               "the rewards are added).", show_default="none"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="--reward: a JSONL file of prompts (a prompt or "
                                                                   "messages column; other columns go to the "
                                                                   "rewards).", show_default="none"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="--reward: the checkpoint the KL is measured "
                                                                       "against.",
                                             show_default="the checkpoint the run started from"),
    samples: int = typer.Option(1, "--samples", help="--reward: completions sampled per prompt."),
    overrides: Optional[List[str]] = set_option(
        "--tasks and --reward: override one sampling key, e.g. --set generate.temperature=0 "
        "(repeatable; generate.* sampling keys only)."),
    max_new_tokens: Optional[int] = _sampling_opt("max_new_tokens", "the task's max_gen_toks; --reward: the run's"),
    temperature: Optional[float] = _sampling_opt("temperature", "the task's, else 0; --reward: the run's"),
    top_k: Optional[int] = _sampling_opt("top_k", "the task's, else off; --reward: the run's"),
    top_p: Optional[float] = _sampling_opt("top_p", "the task's, else off; --reward: the run's"),
    seed: Optional[int] = _sampling_opt("seed", "the task's, else random; --reward: the run's"),
    stop: Optional[List[str]] = _sampling_opt("stop", "the task's until, and end of text; --reward: the run's"),
    repetition_penalty: Optional[float] = _sampling_opt("repetition_penalty", "1 = off; --reward: the run's"),
    presence_penalty: Optional[float] = _sampling_opt("presence_penalty", "0 = off; --reward: the run's"),
    frequency_penalty: Optional[float] = _sampling_opt("frequency_penalty", "0 = off; --reward: the run's"),
    logit_bias: Optional[List[str]] = _sampling_opt("logit_bias", "none; --reward: the run's"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    json_out: bool = JsonOpt,
    tokenizer: Optional[Path] = TokenizerOpt,
) -> None:
    """Measure a checkpoint: loss, perplexity and bits per byte (language models, one full pass of non-overlapping
    blocks); accuracy, precision, recall, F1 and confusion matrix (classifiers); response loss (instruction-tuned);
    with --tasks, lm-evaluation-harness tasks (results also saved in RUN/evals/); with --reward and --prompts, the
    mean reward of sampled completions and their KL to a reference; the sampling flags and --set generate.* change
    how --tasks and --reward generate."""
    from ..commands import evaluation as evaluation_cmd

    flags = _sampling_flags(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed,
                           presence_penalty, frequency_penalty, logit_bias)

    def go() -> None:
        events = ConsoleEvents()
        if reward or prompts is not None or reference is not None or samples != 1:
            _eval_reward(ckpt, reward, prompts, reference, samples, data, tasks, batch_size, device, base, tokenizer,
                         overrides or [], flags, events, json_out)
            return
        if tasks is not None:
            if data is not None:
                raise LlmctlError("--tasks and --data are exclusive: lm-eval tasks bring their own data")
            r = evaluation_cmd.evaluate_tasks(ckpt, tasks, num_fewshot, limit, include_path, batch_size, device, base,
                                        tokenizer, dtype, quantize_mode, log_samples, events=events,
                                        overrides=overrides or [], flags=flags)
            _print_json(r) if json_out else _print_tasks(r, events)
            return
        if any(x is not None for x in (num_fewshot, limit, include_path)) or log_samples:
            raise LlmctlError("--num-fewshot, --limit, --include-path and --log-samples go with --tasks")
        if overrides or any(v is not None for v in flags.values()):
            raise LlmctlError("--set and the sampling flags (--temperature, ...) go with --tasks: only lm-eval's "
                              "generation tasks generate")
        _print_measures(evaluation_cmd.evaluate(ckpt, data, batch_size, device, events=events, text_column=text_column,
                                                label_column=label_column, base=base, tokenizer=tokenizer,
                                                dtype=dtype, quantize_mode=quantize_mode), json_out)

    run(go)


def _print_measures(r: dict, json_out: bool) -> None:
    """`eval` of a language model or a classifier: --json, or the tables."""
    if json_out:
        _print_json(r)
    elif "confusion" in r:
        _print_classification(r)
    else:
        out.print(_table(f"eval: {r['data']}", {k: v for k, v in r.items() if k not in ("data",)}))


def _eval_reward(ckpt, reward, prompts, reference, samples, data, tasks, batch_size, device, base, tokenizer,
                 overrides, flags, events, json_out) -> None:
    """`eval --reward SPEC --prompts FILE`: a table, or --json with exactly reward, reward_std, kl, samples."""
    from ..commands import evaluation as evaluation_cmd

    if not reward or prompts is None:
        raise LlmctlError("--reward and --prompts go together (with --reference and --samples): give both")
    if data is not None or tasks is not None:
        raise LlmctlError("--reward measures completions of --prompts; --data and --tasks are other measurements")
    r = evaluation_cmd.evaluate_reward(ckpt, reward, prompts, reference, samples, batch_size, device, base, tokenizer,
                                       overrides, flags, events)
    _print_json(r) if json_out else out.print(_table(f"eval --reward: {prompts}", r))


def _print_tasks(r: dict, events: ConsoleEvents) -> None:
    """`eval --tasks` results: one row per task and metric, then where they were saved."""
    from ..harness import table

    t = Table(title=f"lm-eval: {r['checkpoint']}", header_style="bold")
    for col in ("task", "metric", "filter", "value", "stderr"):
        t.add_column(col, justify="right" if col in ("value", "stderr") else "left")
    for row in table(r):
        t.add_row(row["task"], row["metric"], row["filter"], f"{row['value']:.4f}",
                  "" if row["stderr"] is None else f"{row['stderr']:.4f}")
    out.print(t)
    if r.get("saved"):
        events.log(f"saved {r['saved']}")


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
