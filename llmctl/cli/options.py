"""Options that several commands share, defined once: config and overrides, output, the inference precision, the
sampling flags (each shorthand for `--set generate.<field>`)."""

from __future__ import annotations

from typing import Optional

import typer

from ..config import INFER_DTYPES, QUANTIZE_MODES

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


# the inference precision, the same for `infer` and `serve` (`eval` measures float32 unless asked): shorthand for
# generate.dtype and generate.quantize (llmctl.precision.inference_choices resolves them)
DtypeOpt = typer.Option(None, "--dtype", help=f"{', '.join(INFER_DTYPES)}. auto: see docs/inference.md.",
                        show_default="generate.dtype, auto")


QuantizeOpt = typer.Option(None, "--quantize",
                           help=f"{', '.join(QUANTIZE_MODES)} (CPU: dynamic int8; CUDA: weight-only int8). auto: int8 "
                                "on x86 CPUs for models of 10M+ parameters, none below and elsewhere "
                                "(docs/inference.md).", show_default="generate.quantize, auto")


# The sampling flags of infer, serve and eval --tasks, each shorthand for --set generate.<field> (llmctl.sampling
# checks them): field -> (option names, help, the default shown by infer and serve)
SAMPLING_OPTIONS = {
    "max_new_tokens": (("--max-new-tokens", "-n"), "Tokens to generate.", "generate.max_new_tokens, 256"),
    "temperature": (("--temperature", "-t"), "Sampling temperature; 0 = greedy.", "generate.temperature, 0.8"),
    "top_k": (("--top-k",), "Sample among the k most likely tokens (0 or -1: no limit).", "generate.top_k, 200"),
    "top_p": (("--top-p",), "Nucleus sampling: smallest set with this much probability.", "generate.top_p, off"),
    "repetition_penalty": (("--repetition-penalty",), "> 1 discourages repeating tokens.",
                           "generate.repetition_penalty, 1 = off"),
    "stop": (("--stop",), "End the text before this string (repeatable).", "generate.stop, none"),
    "seed": (("--seed",), "Random seed for reproducible samples.", "random"),
}


def _sampling_opt(field: str, shown: Optional[str] = None):
    names, help_text, default = SAMPLING_OPTIONS[field]
    return typer.Option(None, *names, help=help_text, show_default=shown or default)


MaxNewTokensOpt, TemperatureOpt, TopKOpt = (_sampling_opt("max_new_tokens"), _sampling_opt("temperature"),
                                             _sampling_opt("top_k"))


TopPOpt, RepetitionPenaltyOpt = _sampling_opt("top_p"), _sampling_opt("repetition_penalty")


StopOpt, SeedOpt = _sampling_opt("stop"), _sampling_opt("seed")


GenerateSetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", show_default="none",
                              help="Override one generate.* key, e.g. --set generate.top_k=50 (repeatable).")


def _sampling_flags(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed) -> dict:
    """The sampling flags as sampling fields (None: not given)."""
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "repetition_penalty": repetition_penalty, "stop": stop or None, "seed": seed}


TokenizerOpt = typer.Option(None, "--tokenizer",
                            help="A tokenizer.json to use instead of the checkpoint's (needed when it has none).",
                            show_default="the checkpoint's")
