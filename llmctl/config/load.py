"""Reading a configuration: defaults <- YAML files that hold only what differs <- dotted `--set` overrides.

`load_config(path, overrides)` merges them, checks every key and value, and raises one `LlmctlError` that lists
every problem at once. Values that are merely odd are adjusted and reported through `Config.warnings` (the CLI
prints them).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ..errors import LlmctlError
from .root import Config, sections

# --------------------------------------------------------------------------------------------------------------
# Type checking and coercion of raw (YAML / --set) values


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def _coerce(value: Any, tp: Any) -> tuple[Any, Optional[str]]:
    """Return (converted value, None) or (None, reason) for a value against a type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp))
    if origin is Literal:
        return _coerce_choice(value, typing.get_args(tp))
    if origin in (list, tuple):
        return _coerce_list(value, (typing.get_args(tp)[:1] or (Any,))[0])
    scalar = _SCALARS.get(tp)
    return scalar(value) if scalar else (value, None)  # Any, and annotations no key uses yet


def _coerce_union(value: Any, args: tuple) -> tuple[Any, Optional[str]]:
    """Optional[X] (and X | Y): null where allowed, else the first member type that takes the value."""
    if value is None and type(None) in args:
        return None, None
    reasons = []
    for a in args:
        if a is type(None):
            continue
        v, why = _coerce(value, a)
        if why is None:
            return v, None
        reasons.append(why)
    return None, reasons[0] if reasons else "must be null"


def _coerce_choice(value: Any, choices: tuple) -> tuple[Any, Optional[str]]:
    """Literal[...]: one of the choices; a Literal that also takes true/false reads `--set k=false` as a bool."""
    if isinstance(value, str) and True in choices and value.lower() in _TRUE + _FALSE:
        value = value.lower() in _TRUE
    if value in choices:
        return value, None
    names = [str(c).lower() if isinstance(c, bool) else str(c) for c in choices]
    return None, f"must be one of {', '.join(names)} (got {value!r})"


def _coerce_list(value: Any, inner: Any) -> tuple[Any, Optional[str]]:
    """list[X]: a YAML list, or a comma-separated string (`--set finetune.lora_targets=attn.qkv,mlp.fc`)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        return None, f"must be a list (got {value!r})"
    out = []
    for v in value:
        c, why = _coerce(v, inner)
        if why:
            return None, why
        out.append(c)
    return out, None


def _coerce_bool(value: Any) -> tuple[Any, Optional[str]]:
    if isinstance(value, bool):
        return value, None
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE, None
    return None, f"must be true or false (got {value!r})"


def _coerce_int(value: Any) -> tuple[Any, Optional[str]]:
    """Integers, whole floats (1e6) and strings of them (`1_000`, `1e6`); never a bool."""
    if isinstance(value, bool):
        return None, f"must be an integer (got {value!r})"
    if isinstance(value, int):
        return value, None
    if isinstance(value, float) and value.is_integer():
        return int(value), None
    if isinstance(value, str):
        try:
            f = float(value.replace("_", ""))
            if f.is_integer():
                return int(f), None
        except ValueError:
            pass
    return None, f"must be an integer (got {value!r})"


def _coerce_float(value: Any) -> tuple[Any, Optional[str]]:
    if isinstance(value, bool):
        return None, f"must be a number (got {value!r})"
    if isinstance(value, (int, float)):
        return float(value), None
    if isinstance(value, str):
        try:
            return float(value), None
        except ValueError:
            pass
    return None, f"must be a number (got {value!r})"


def _coerce_str(value: Any) -> tuple[Any, Optional[str]]:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value), None
    return None, f"must be a string (got {value!r})"


def _coerce_dict(value: Any) -> tuple[Any, Optional[str]]:
    if isinstance(value, dict):
        return value, None
    return None, f"must be a mapping (got {value!r})"


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str, dict: _coerce_dict}


# A section written with nothing under it (`model:`, `model: null`, or every key commented out) is an error, the
# same one wherever it comes from (config show, pretrain, finetune; with or without --set model.* given too):
# null is never "the default" for a key (`train.lr: null` is an error too), so an empty section is more likely a
# half-deleted one than a wish for defaults, and the fix is one line either way. Before, a --set for that section
# silently replaced the null (so pretrain accepted what config show refused).
EMPTY_SECTION = "is empty (null); give it keys, or remove the line"


def _merge_section(obj: Any, raw: dict, prefix: str, problems: list[str]) -> None:
    """Set the fields of dataclass `obj` from `raw`, recording unknown keys and bad types."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj) if f.name != "warnings"]
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            problems.append(f"{where}: unknown key{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                problems.append(f"{where}: {EMPTY_SECTION}")  # (from --set {key}=null or a dict)
                continue
            if not isinstance(value, dict):
                problems.append(f"{where}: must be a mapping of {key} settings (got {value!r})")
                continue
            _merge_section(getattr(obj, key), value, f"{where}.", problems)
            continue
        converted, why = _coerce(value, tp)
        if why:
            problems.append(f"{where}: {why}")
        else:
            setattr(obj, key, converted)


def parse_overrides(overrides: list[str] | None) -> dict:
    """Turn ['train.lr=3e-4', 'model.n_layer=2'] into a nested dict; values are parsed as YAML scalars."""
    nested: dict = {}
    problems = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected KEY=VALUE, for example --set train.lr=3e-4")
            continue
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            problems.append(f"--set {item!r}: the key must be dotted, for example train.lr")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        d = nested
        parts = key.split(".")
        for part in parts[:-1]:
            d = d.setdefault(part, {})
            if not isinstance(d, dict):
                problems.append(f"--set {item!r}: {part} is set both as a value and as a section")
                break
        else:
            d[parts[-1]] = value
    if problems:
        raise LlmctlError(_format_problems(problems))
    return nested


def merge_settings(base: dict, extra: dict) -> dict:
    """Raw settings `extra` layered over `base` (nested sections merged key by key): the one way configs stack."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_settings(out[k], v)
        else:
            out[k] = v
    return out


def user_settings(path: str | Path | None, overrides: list[str] | None) -> dict:
    """What the user asked for, as raw settings: the YAML file, then the `--set` overrides over it."""
    return merge_settings(read_yaml(path) if path is not None else {}, parse_overrides(overrides))


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning every failure into one clear LlmctlError."""
    p = Path(path)
    if not p.exists():
        raise LlmctlError(f"config file not found: {p} (check the path given to -c/--config)")
    if p.is_dir():
        raise LlmctlError(f"config path is a directory, not a YAML file: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LlmctlError(f"config file {p} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise LlmctlError(f"config file {p} is not UTF-8 text") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LlmctlError(f"config file {p} must be a mapping of sections (model:, train:, ...), "
                          f"not {type(raw).__name__}")
    # sections are checked here, before a --set for one can be merged over a null or a scalar (see EMPTY_SECTION)
    names = {f.name for f in sections(Config)}
    bad = [f"{k}: in {p} {EMPTY_SECTION}" if v is None else f"{k}: in {p} must be a mapping of {k} settings (got {v!r})"
           for k, v in raw.items() if k in names and not isinstance(v, dict)]
    if bad:
        raise LlmctlError(_format_problems(bad))
    return raw


def _format_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"bad config: {problems[0]}"
    return f"bad config ({len(problems)} problems):\n" + "\n".join(f"  - {p}" for p in problems)


def from_dict(raw: dict, *, validate: bool = True, cls: type = None) -> Config:
    """Build a Config from a nested dict (defaults fill the rest) and check it."""
    cfg = (cls or Config)()
    problems: list[str] = []
    _merge_section(cfg, raw, "", problems)
    if validate:
        problems += _check_values(cfg)
    if problems:
        raise LlmctlError(_format_problems(problems))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Defaults <- `base` (for example a checkpoint's config) <- YAML file <- `--set` overrides."""
    return from_dict(merge_settings(dict(base or {}), user_settings(path, overrides)))


# --------------------------------------------------------------------------------------------------------------
# Value checks: impossible values are errors, odd ones are adjusted with a warning


def _check_values(cfg: Config) -> list[str]:
    """Every section's own check (each lives beside its fields); merely odd values are adjusted with a warning
    once the whole config is valid."""
    problems = [p for f in sections(cfg) for p in getattr(cfg, f.name).check(cfg)]
    if not problems:  # adjustments only make sense on an otherwise valid config
        cfg.warnings += cfg.train.adjust()
    return problems
