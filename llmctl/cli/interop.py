"""`llmctl import hf` and `llmctl export`: checkpoints in from transformers, out to transformers or GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..console import ConsoleEvents, out
from .app import _print_json, _table, app, import_app, run
from .options import BaseOpt, JsonOpt, QuietOpt, TokenizerOpt


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
    """Import a transformers checkpoint (GPT-2, Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3); finetune, infer, eval,
    serve and export then take it."""
    from ..commands import interop as interop_cmd

    def go() -> None:
        r = interop_cmd.import_hf(source, out_dir, tokenizer, overwrite, events=ConsoleEvents(quiet))
        if json_out:
            _print_json(r)
        else:
            out.print(_table("imported", r))

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
    from ..commands import interop as interop_cmd

    def go() -> None:
        r = interop_cmd.export(ckpt, fmt, out_dir, tokenizer, overwrite, events=ConsoleEvents(), base=base,
                            merge_lora_adapter=merge_lora_adapter, outtype=outtype)
        if json_out:
            _print_json(r)
        else:
            out.print(_table("exported", {**r, "files": ", ".join(r["files"])}))

    run(go)
