"""`llmctl serve`: options in, an OpenAI-compatible server on 127.0.0.1 (unless told otherwise) out."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..console import ConsoleEvents, err
from .app import _print_json, app, run
from .options import (
    BaseOpt,
    DtypeOpt,
    FrequencyPenaltyOpt,
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
    set_option,
)


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
    overrides: Optional[List[str]] = set_option("Override one key, e.g. --set serve.slots=32 (repeatable; serve.* and "
                                                "generate.* only)."),
    max_new_tokens: Optional[int] = MaxNewTokensOpt,
    temperature: Optional[float] = TemperatureOpt,
    top_k: Optional[int] = TopKOpt,
    top_p: Optional[float] = TopPOpt,
    seed: Optional[int] = SeedOpt,
    stop: Optional[List[str]] = StopOpt,
    repetition_penalty: Optional[float] = RepetitionPenaltyOpt,
    presence_penalty: Optional[float] = PresencePenaltyOpt,
    frequency_penalty: Optional[float] = FrequencyPenaltyOpt,
    logit_bias: Optional[List[str]] = LogitBiasOpt,
    dtype: Optional[str] = DtypeOpt,
    quantize_mode: Optional[str] = QuantizeOpt,
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="Decode steps compiled ahead of time for serve.slots rows and "
                                                "for 1, 4, 16, ... of them (the smallest covering the busy rows "
                                                "runs): --compile builds missing ones (half a minute to a minute "
                                                "each on a CPU, once per model, precision and slot count); by "
                                                "default cached ones are used, and on a CPU the one-busy-row step is "
                                                "traced at start (a second or so; what int8 gets); --no-compile "
                                                "decodes eagerly.",
                                           show_default=from_config("generate.compile")),
    base: Optional[Path] = BaseOpt,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    json_out: bool = typer.Option(False, "--json", help="When ready, print one JSON object (url, model, port, "
                                                          "slots, ...) on stdout.", show_default="off"),
    tokenizer: Optional[Path] = TokenizerOpt,
    draft: Optional[str] = typer.Option(None, "--draft",
                                        help=config_help("generate.draft", "/metrics counts what the drafts "
                                                         "achieve (llmctl_draft_*)."),
                                        show_default=from_config("generate.draft")),
) -> None:
    """Serve a checkpoint over OpenAI's HTTP API (completions, chat, streaming, models, health, metrics; classifiers:
    /v1/classify), with continuous batching. SIGTERM or Ctrl-C finishes the requests in flight, then exits 0."""
    from ..commands import serving as serving_cmd

    def ready(info: dict) -> None:
        if json_out:
            _print_json(info)
        key = "API key required" if info["api_key"] else "no API key"
        slots = f"{info['slots']} slots, " if info["kind"] == "lm" else "classifier, "
        step = ", compiled decode step" if info["compiled"] else ""
        step += f", draft {info['draft']}" if info["draft"] else ""
        err.print(f"serving {info['model']} at {info['url']}/v1 ({slots}{info['precision']}{step}, {key}); "
                  "Ctrl-C stops", markup=False, highlight=False, soft_wrap=True)

    flags = _sampling_flags(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed,
                           presence_penalty, frequency_penalty, logit_bias)
    run(lambda: serving_cmd.serve(ckpt, host, port, api_key_file, config, overrides or [], dtype, quantize_mode,
                               compile, device, base, tokenizer, insecure, events=ConsoleEvents(), on_ready=ready,
                               flags=flags, draft=draft))
