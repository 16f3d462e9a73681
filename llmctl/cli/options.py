"""Options that several commands share, defined once: config and overrides, output, the inference precision, the
sampling flags (each shorthand for `--set generate.<field>`)."""

from __future__ import annotations

from typing import Optional

import typer

from ..config import INFER_DTYPES, QUANTIZE_MODES, field_info

ConfigOpt = typer.Option(None, "--config", "-c",
                         help="YAML config; it holds only what differs from the defaults in code.",
                         show_default="defaults in code")


def set_option(help_text: str):
    """`--set KEY=VALUE` (repeatable): every command's config overrides, with what that command accepts."""
    return typer.Option(None, "--set", "-s", help=help_text, metavar="KEY=VALUE", show_default="none")


SetOpt = set_option("Override one key, e.g. --set train.lr=3e-4 (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print the result as one JSON object on stdout.", show_default="off")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines on stderr.", show_default="off")
DryRunOpt = typer.Option(False, "--dry-run",
                         help="Build everything, time a few steps (then undo them) and report parameters, "
                              "FLOPs, memory, time and a sample batch; train nothing, write no run directory.",
                         show_default="off")
GpuMemoryOpt = typer.Option(None, "--gpu-memory",
                            help="With --dry-run: estimate memory for a CUDA GPU of this size and say whether the "
                                 "run fits it, e.g. 24GB (10^9 bytes) or 80GiB (2^30).",
                            show_default="this device's memory")
BaseOpt = typer.Option(None, "--base", help="Base checkpoint of a LoRA adapter, if it moved since training.",
                       show_default="the base recorded at training")


def from_config(key: str) -> str:
    """The default a flag shows in --help when it is shorthand for a config key: "KEY, DEFAULT", both read from
    the config's own field (llmctl.config.field_info), so help cannot go stale when a default changes."""
    return f"{key}, {field_info(key).default_text}"


def config_help(key: str, extra: str = "") -> str:
    """A flag's help when it is shorthand for a config key: that key's doc line (the one the docs' configuration
    reference prints), plus what only the flag adds."""
    return " ".join(x for x in (field_info(key).doc, extra) if x)


# the inference precision, the same for `infer` and `serve` (`eval` measures float32 unless asked): shorthand for
# generate.dtype and generate.quantize (llmctl.precision.inference_choices resolves them)
DtypeOpt = typer.Option(None, "--dtype", help=config_help("generate.dtype", f"One of {', '.join(INFER_DTYPES)}."),
                        show_default=from_config("generate.dtype"))
QuantizeOpt = typer.Option(None, "--quantize",
                           help=config_help("generate.quantize", f"One of {', '.join(QUANTIZE_MODES)}."),
                           show_default=from_config("generate.quantize"))

# The sampling flags of infer, serve and eval --tasks, each shorthand for --set generate.<field> (llmctl.sampling
# checks them): field -> its option names; help and default come from the generate.<field> key
SAMPLING_OPTIONS = {
    "max_new_tokens": ("--max-new-tokens", "-n"),
    "temperature": ("--temperature", "-t"),
    "top_k": ("--top-k",),
    "top_p": ("--top-p",),
    "repetition_penalty": ("--repetition-penalty",),
    "presence_penalty": ("--presence-penalty",),
    "frequency_penalty": ("--frequency-penalty",),
    "logit_bias": ("--logit-bias",),
    "stop": ("--stop",),
    "seed": ("--seed",),
}


def _sampling_opt(field: str, shown: Optional[str] = None):
    """The flag of generate.<field>; `shown` replaces the config default in --help where a command has another
    (eval --tasks: the task's own)."""
    extra = {"stop": "Repeatable.", "logit_bias": "ID=BIAS, repeatable."}.get(field, "")
    return typer.Option(None, *SAMPLING_OPTIONS[field], help=config_help(f"generate.{field}", extra),
                        show_default=shown or from_config(f"generate.{field}"))


MaxNewTokensOpt, TemperatureOpt, TopKOpt = (_sampling_opt("max_new_tokens"), _sampling_opt("temperature"),
                                             _sampling_opt("top_k"))
TopPOpt, RepetitionPenaltyOpt = _sampling_opt("top_p"), _sampling_opt("repetition_penalty")
StopOpt, SeedOpt = _sampling_opt("stop"), _sampling_opt("seed")
PresencePenaltyOpt, FrequencyPenaltyOpt = _sampling_opt("presence_penalty"), _sampling_opt("frequency_penalty")
LogitBiasOpt = _sampling_opt("logit_bias")
GenerateSetOpt = set_option("Override one generate.* key, e.g. --set generate.top_k=50 (repeatable).")


def _sampling_flags(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed,
                    presence_penalty=None, frequency_penalty=None, logit_bias=None) -> dict:
    """The sampling flags as sampling fields (None: not given)."""
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "repetition_penalty": repetition_penalty, "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty, "logit_bias": logit_bias or None, "stop": stop or None,
            "seed": seed}


TokenizerOpt = typer.Option(None, "--tokenizer",
                            help="A tokenizer.json to use instead of the checkpoint's (needed when it has none).",
                            show_default="the checkpoint's")
