"""`llmctl infer`: stream a completion, complete a file of prompts, chat, or classify text."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..console import ConsoleEvents, err, out
from ..errors import LlmctlError
from .app import _print_json, app, run
from .options import (
    BaseOpt,
    DtypeOpt,
    FrequencyPenaltyOpt,
    GenerateSetOpt,
    LogitBiasOpt,
    MaxNewTokensOpt,
    PresencePenaltyOpt,
    QuantizeOpt,
    RepetitionPenaltyOpt,
    SeedOpt,
    StopOpt,
    TemperatureOpt,
    TokenizerOpt,
    TopKOpt,
    TopPOpt,
    _sampling_flags,
    config_help,
    from_config,
)


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
                                                   'sampling fields: max_new_tokens, temperature, ..., '
                                                   'logit_bias) or a text file with one prompt per line.',
                                              show_default="none"),
    output_file: Optional[Path] = typer.Option(None, "--output", "-o",
                                               help="Where --input results go (JSONL, written atomically).",
                                               show_default="stdout"),
    chat: bool = typer.Option(False, "--chat",
                              help="Interactive chat with an instruction-tuned model (/reset clears, /exit or "
                                   "Ctrl-D quits).", show_default="off"),
    overrides: Optional[List[str]] = GenerateSetOpt,
    max_new_tokens: Optional[int] = MaxNewTokensOpt,
    temperature: Optional[float] = TemperatureOpt,
    top_k: Optional[int] = TopKOpt,
    top_p: Optional[float] = TopPOpt,
    seed: Optional[int] = SeedOpt,
    stop: Optional[List[str]] = StopOpt,
    truncate: bool = typer.Option(False, "--truncate",
                                  help="Keep the last tokens of a prompt longer than the context instead of "
                                       "refusing it.", show_default="off"),
    repetition_penalty: Optional[float] = RepetitionPenaltyOpt,
    presence_penalty: Optional[float] = PresencePenaltyOpt,
    frequency_penalty: Optional[float] = FrequencyPenaltyOpt,
    logit_bias: Optional[List[str]] = LogitBiasOpt,
    dtype: Optional[str] = DtypeOpt,
    quantize_mode: Optional[str] = QuantizeOpt,
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="The decode step compiled ahead of time (AOTInductor): several times "
                                                "faster per token. --compile builds it if the cache lacks it (half a "
                                                "minute to a minute on a CPU, once per model, precision and shape); "
                                                "later runs load it in well under a second. By default a cached one is "
                                                "used, and one is built only for an --input job long enough to pay for "
                                                "it (and at the end of a CPU training run of 5+ minutes); without one, "
                                                "a one-row step on a CPU is traced on first use (int8 included); "
                                                "--no-compile always decodes eagerly.",
                                           show_default=from_config("generate.compile")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="--input: prompts decoded together.",
                                             show_default=from_config("generate.batch_size")),
    base: Optional[Path] = BaseOpt,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming: the checkpoint, "
                                  "prompt and completion (classifiers: the label and probabilities).",
                                  show_default="off"),
    tokenizer: Optional[Path] = TokenizerOpt,
    json_schema: Optional[Path] = typer.Option(None, "--json-schema",
                                               help="A JSON schema file: the completion is compact JSON that follows "
                                                    "it (needs the structured extra: xgrammar).",
                                               show_default="none: free text"),
    draft: Optional[str] = typer.Option(None, "--draft",
                                        help=config_help("generate.draft", "--prompt only: the acceptance rate "
                                                         "follows on stderr (and in --json)."),
                                        show_default=from_config("generate.draft")),
) -> None:
    """Generate text from a prompt (streamed to stdout), complete a file of prompts, chat, or classify text."""
    from ..commands import inference as inference_cmd
    from ..loading import for_inference, load_model

    events = ConsoleEvents()

    def go() -> None:
        _check_modes(chat, prompt is not None or prompt_file is not None, input_file, output_file, json_schema,
                     draft)
        loaded = load_model(ckpt, device, base=base, tokenizer=tokenizer)
        if loaded.classifier is not None:
            _infer_classifier(inference_cmd, loaded, prompt, prompt_file, input_file, output_file, json_out, events)
            return
        if batch_size is not None and batch_size < 1:
            raise LlmctlError(f"--batch-size must be at least 1 (got {batch_size})")
        flags = _sampling_flags(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed,
                           presence_penalty, frequency_penalty, logit_bias)
        settings = inference_cmd.sampling_settings(loaded, overrides, flags)
        for_inference(loaded, dtype, quantize_mode, compile, events=events)
        fmt = inference_cmd.json_format(loaded, json_schema)
        if chat:
            _chat(inference_cmd.ChatSession(loaded, settings, events=events))
            return
        if input_file is not None:
            rows = inference_cmd.read_inputs(input_file)
            results = inference_cmd.complete_rows(loaded, rows, settings, truncate, batch_size=batch_size,
                                                  events=events, format=fmt)
            _emit_rows(inference_cmd, results, output_file, events)
            return
        text = inference_cmd.read_prompt(prompt, prompt_file)
        spec = inference_cmd.speculation(loaded, draft, dtype, quantize_mode)
        pieces = inference_cmd.stream(loaded, text, settings, truncate, events=events, format=fmt, draft=spec)
        _emit_prompt(str(loaded.ckpt.path), text, pieces, spec, json_out, events)

    run(go)


def _emit_prompt(ckpt: str, text: str, pieces, spec, json_out: bool, events: ConsoleEvents) -> None:
    """One prompt's completion: streamed to stdout, or one JSON object; with a draft, its acceptance rate."""
    if json_out:
        res = {"checkpoint": ckpt, "prompt": text, "completion": "".join(pieces)}
        _print_json(res if spec is None else {**res, "draft": {"draft": spec.name, **spec.stats.as_dict()}})
        return
    _write_stream(text, pieces)
    if spec is not None:
        st = spec.stats
        events.log(f"draft {spec.name}: {st.accepted} of {st.drafted} drafted tokens accepted "
                   f"({st.acceptance:.1%}), {st.as_dict()['tokens_per_forward']} tokens per target forward")


def _check_modes(chat: bool, prompted: bool, input_file, output_file, json_schema, draft) -> None:
    """The option combinations infer refuses: one mode at a time (chat, a prompt, or --input)."""
    if chat and (prompted or input_file is not None):
        raise LlmctlError("--chat reads messages from the terminal; drop --prompt, --prompt-file and --input")
    if input_file is not None and prompted:
        raise LlmctlError("give --input or --prompt/--prompt-file, not both")
    if chat and json_schema is not None:
        raise LlmctlError("--json-schema goes with --prompt or --input, not --chat")
    if output_file is not None and input_file is None:
        raise LlmctlError("--output goes with --input")
    if draft is not None and (chat or input_file is not None):
        raise LlmctlError("--draft goes with --prompt (one row at a time), not --input or --chat")


def _write_stream(text: str, pieces) -> None:
    """The prompt, then each piece of the completion as it comes."""
    sys.stdout.write(text)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _emit_rows(inference_cmd, rows: list, output_file: Optional[Path], events: ConsoleEvents) -> None:
    if output_file is None:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False), flush=True)
    else:
        inference_cmd.write_outputs(output_file, rows)
        events.log(f"wrote {len(rows)} rows to {output_file}")


def _infer_classifier(inference_cmd, loaded, prompt, prompt_file, input_file, output_file, json_out, events) -> None:
    if input_file is not None:
        rows = inference_cmd.read_inputs(input_file)
        results = inference_cmd.classify_texts(loaded, [r["prompt"] for r in rows], events=events)
        _emit_rows(inference_cmd, [{**r, **res} for r, res in zip(rows, results)], output_file, events)
        return
    text = inference_cmd.read_prompt(prompt, prompt_file)
    if not text.strip():
        raise LlmctlError("the text to classify is empty")
    res = inference_cmd.classify_texts(loaded, [text], events=events, what="the text")[0]
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
