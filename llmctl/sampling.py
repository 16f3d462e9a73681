"""Generation settings: `Sampling`, the one carrier of how to continue a prompt, and the one rule set for its values.

Every surface that takes these settings builds or changes a `Sampling` here, and no other place checks them: the
config (`generate.*` in a YAML file or `--set`), the flags of `infer`, `serve` and `eval --tasks` (shorthand for
`--set generate.*`), the rows of `infer --input`, OpenAI-style requests to `serve`, and the generation kwargs of
lm-eval tasks. A `Problem` names the field it is about; each surface shows it under its own name for that field
(`generate.top_p` in the config, `--top-p` for a flag, `top_p` in a JSONL row, OpenAI's `max_tokens` over HTTP), so
one rule gives the same verdict everywhere, in each surface's words.

What each value means, on every surface (null, where allowed, means the same as leaving the key out of a config):
  max_new_tokens      the most tokens to generate; at least 1.
  temperature         0 = greedy; otherwise the logits are divided by it. Any finite value >= 0: there is no upper
                      cap (OpenAI's API stops at 2; vLLM and llama.cpp take any value, and a hot sample is a
                      legitimate if noisy choice), so `temperature: 3` is accepted everywhere.
  top_k               sample among the k most likely tokens; 0, -1 (what vLLM's clients send) and null all mean no
                      limit (stored as None); below -1 is refused.
  top_p               nucleus sampling: the smallest set of tokens whose probability reaches p, 0 < p <= 1; null
                      means no limit.
  repetition_penalty  > 0; 1 = off, above 1 discourages tokens already in the prompt or output (CTRL's penalty).
  presence_penalty    -2..2 (OpenAI's): subtracted once from the logit of every token already generated (not the
                      prompt's); 0 = off.
  frequency_penalty   -2..2 (OpenAI's): subtracted from a token's logit once per time it was generated; 0 = off.
  logit_bias          token id -> -100..100, added to that token's logit at every step (-100 bans it, 100 all but
                      forces it); given as a mapping (JSON's keys are strings of the ids) or `ID=BIAS` strings (the
                      CLI's repeatable --logit-bias); stored as sorted (id, bias) pairs; ids must be in the model's
                      vocabulary, which the engine and the server check (this carrier does not know it).
  stop                strings that end the text before the first of them; at most MAX_STOPS, empty ones dropped.
  seed                an integer for a reproducible sample (what torch's generators take); null = a fresh one.

Numbers arrive typed from the config and the CLI, and as JSON values from JSONL rows and HTTP bodies: an integer
field takes an integer (or a float with no fraction, as YAML and JSON may write it), a number field an integer or a
float; booleans and strings are refused for both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from .errors import LlmctlError

# lm-eval adds the end-of-text token to a task's own stop sequences, so a task may bring a handful; 16 leaves room
MAX_STOPS = 16
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes

FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "presence_penalty",
          "frequency_penalty", "logit_bias", "stop", "seed")
PENALTY_MAX = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI's range)
BIAS_MAX = 100.0  # a logit_bias value lies in [-100, 100] (OpenAI's range)
MAX_BIASES = 1024  # logit_bias entries (OpenAI allows 300; vLLM leaves it open)


@dataclass(frozen=True)
class Problem:
    """What is wrong with one field's value, without the name: each surface puts its own name in front."""

    field: str
    message: str  # e.g. "must not be negative (got -1.0)"

    def render(self, name: str) -> str:
        return f"{name} {self.message}"


class SamplingError(LlmctlError):
    """Bad sampling settings (exit 2): every problem, each under the surface's name for its field, on one line."""

    def __init__(self, problems: list[Problem], name: Callable[[str], str] = str):
        self.problems = list(problems)
        super().__init__("; ".join(p.render(name(p.field)) for p in self.problems))


def flag(field: str) -> str:
    """The CLI flag of a field (`top_p` -> `--top-p`): the same for infer, serve and eval."""
    return "--" + field.replace("_", "-")


def _integer(v: Any) -> Optional[int]:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _number(v: Any) -> Optional[float]:
    return None if isinstance(v, bool) or not isinstance(v, (int, float)) else float(v)


def _stops(v: Any) -> Optional[tuple[str, ...]]:
    if isinstance(v, str):
        v = [v]
    if isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v):
        return tuple(s for s in v if s)
    return None


def _bias_pairs(v: Any) -> Optional[list]:
    """logit_bias as [(id, bias), ...] as given (unchecked), or None when its shape is wrong."""
    if isinstance(v, Mapping):
        return list(v.items())
    if not isinstance(v, (list, tuple)):
        return None
    pairs = []
    for x in v:
        if isinstance(x, str) and x.count("=") == 1:
            k, b = x.split("=")
            try:
                pairs.append((k.strip(), float(b)))
            except ValueError:
                return None
        elif isinstance(x, (list, tuple)) and len(x) == 2:
            pairs.append(tuple(x))
        else:
            return None
    return pairs


def _logit_bias(v: Any) -> tuple[Any, Optional[str]]:
    pairs = _bias_pairs(v)
    if pairs is None:
        return None, f"must map token ids to numbers, e.g. {{\"50256\": -100}} or 50256=-100 (got {v!r})"
    if len(pairs) > MAX_BIASES:
        return None, f"takes at most {MAX_BIASES} token ids (got {len(pairs)})"
    out = {}
    for k, b in pairs:
        t = int(k) if isinstance(k, str) and k.strip().isdigit() else _integer(k)
        x = _number(b)
        if t is None or t < 0:
            return None, f"keys must be token ids, integers >= 0 (got {k!r})"
        if x is None or not math.isfinite(x) or not -BIAS_MAX <= x <= BIAS_MAX:
            return None, f"values must be numbers between -100 and 100 (got {b!r} for token {t})"
        out[t] = x
    return tuple(sorted(out.items())), None


def _check(field: str, v: Any) -> tuple[Any, Optional[str]]:
    """(the value in its one form, None) or (None, what is wrong with it)."""
    if field == "logit_bias":
        return ((), None) if v is None else _logit_bias(v)
    if field == "stop":
        stops = _stops(v)
        if stops is None:
            return None, f"must be a string or a list of strings (got {v!r})"
        if len(stops) > MAX_STOPS:
            return None, f"takes at most {MAX_STOPS} strings (got {len(stops)})"
        return stops, None
    if v is None and field in ("top_k", "top_p", "seed"):
        return None, None
    if field in ("max_new_tokens", "top_k", "seed"):
        n = _integer(v)
        if n is None:
            return None, f"must be an integer (got {v!r})"
        if field == "max_new_tokens" and n < 1:
            return None, f"must be at least 1 (got {n})"
        if field == "top_k" and n < -1:
            return None, f"must be at least 1, or 0 or -1 for no limit (got {n})"
        if field == "seed" and not SEED_MIN <= n <= SEED_MAX:
            return None, f"must be between -2**63 and 2**64-1 (got {n})"
        return (None if field == "top_k" and n < 1 else n), None
    x = _number(v)
    if x is None:
        return None, f"must be a number (got {v!r})"
    if not math.isfinite(x):
        return None, f"must be a finite number (got {v!r})"
    if field == "temperature" and x < 0:
        return None, f"must not be negative; 0 = greedy (got {v!r})"
    if field == "top_p" and not 0 < x <= 1:
        return None, f"must be above 0 and at most 1 (got {v!r})"
    if field == "repetition_penalty" and x <= 0:
        return None, f"must be positive; 1 = off (got {v!r})"
    if field in ("presence_penalty", "frequency_penalty") and not -PENALTY_MAX <= x <= PENALTY_MAX:
        return None, f"must be between -2 and 2; 0 = off (got {v!r})"
    return x, None


def normalize(values: Mapping[str, Any]) -> tuple[dict, list[Problem]]:
    """The given fields in their one form (top_k 0/-1 -> None, stop a tuple, numbers float), and every problem."""
    out, found = {}, []
    for field, v in values.items():
        if field not in FIELDS:
            raise KeyError(f"not a sampling field: {field}")
        out[field], why = _check(field, v)
        if why is not None:
            found.append(Problem(field, why))
    return out, found


def problems(values: Mapping[str, Any]) -> list[Problem]:
    """Every problem of the given fields' values (the config's check and the surfaces' checks are this)."""
    return normalize(values)[1]


def check(values: Mapping[str, Any], name: Callable[[str], str] = str) -> dict:
    """The given fields normalized, or SamplingError naming each bad one by `name(field)`."""
    out, found = normalize(values)
    if found:
        raise SamplingError(found, name)
    return out


@dataclass(frozen=True)
class Sampling:
    """How to continue a prompt. Checked when built, so every `Sampling` that exists is valid; change one with
    `replace`. The defaults leave the model's distribution as it is (temperature 1, no top-k or top-p); the
    defaults a user sees are the config's (`generate.*`, `from_config`)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        for field, v in check({f: getattr(self, f) for f in FIELDS}).items():
            object.__setattr__(self, field, v)  # (frozen: the one form is set once, here)

    @classmethod
    def from_config(cls, g: Any, flags: Optional[Mapping[str, Any]] = None) -> "Sampling":
        """From a `generate` config section (llmctl.config.GenerateConfig, already checked by these rules), and
        the CLI's sampling `flags` over it (shorthand for the same keys; see `given_flags`)."""
        return replace(cls(**{f: getattr(g, f) for f in FIELDS}), given_flags(flags))

    @property
    def greedy(self) -> bool:
        """Always the most likely token of the model's own logits: no random draw, and nothing changes them."""
        return self.temperature == 0 and not self.processed

    @property
    def processed(self) -> bool:
        """Whether the logits are changed before sampling (a penalty or a bias): what log-probabilities see too."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0 or self.frequency_penalty != 0
                or bool(self.logit_bias))


def given_flags(flags: Optional[Mapping[str, Any]]) -> dict:
    """The sampling flags a command was given (field -> value; None = not given), checked under their flag
    names (--top-p ...)."""
    return check({f: v for f, v in (flags or {}).items() if v is not None}, flag)


def replace(s: Sampling, changes: Mapping[str, Any], name: Callable[[str], str] = str) -> Sampling:
    """`s` with `changes` (field -> raw value) applied by the same rules, or SamplingError naming each bad field by
    `name(field)`: how flags, JSONL rows, HTTP requests and lm-eval tasks change the settings they start from. The
    check is `Sampling`'s own, run once as the new one is built (the fields kept from `s` are valid already)."""
    try:
        return dataclasses.replace(s, **changes)
    except SamplingError as e:
        raise SamplingError(e.problems, name) from None
