"""Reading a transformers config.json: typed fields, JSON files, the one shape of "cannot represent" errors; and
the `Pair` of tensor names every layout is a list of."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import LlmctlError


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmctlError(f"{path} is not a readable JSON {what} ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(data, dict):
        raise LlmctlError(f"{path} must hold a JSON object ({what})")
    return data


def field(hf: dict, name: str, kind: type, default: Any = ..., source: str = "config.json") -> Any:
    """One field of a transformers config, type-checked; a missing required field is an error that names it."""
    value = hf.get(name, default)
    if value is ...:
        raise LlmctlError(f"{source} lacks the field {name}, which {hf.get('model_type', 'the model')} needs")
    if value is None and default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise LlmctlError(f"{source}: field {name} must be {kind.__name__} (got {value!r})")
    return value


class Reader:
    """The fields of one config.json, each read with `field` and its errors naming `source`."""

    def __init__(self, hf: dict, source: str):
        self.hf, self.source = hf, source

    def __call__(self, name: str, kind: type, default: Any = ...) -> Any:
        return field(self.hf, name, kind, default, self.source)

    def require(self, name: str, allowed: tuple, default: Any, why: str) -> Any:
        """A field llmctl represents for some values only: anything else is refused, naming the field."""
        value = self.hf.get(name, default)
        if value not in allowed:
            raise unrepresentable(self.source, name, value, why)
        return value


def unrepresentable(source: str, name: str, value: Any, why: str) -> LlmctlError:
    return LlmctlError(f"{source}: {name}={json.dumps(value)} cannot be represented in llmctl ({why})")


@dataclass(frozen=True)
class Pair:
    """One of our tensors and the transformers tensor(s) it corresponds to.

    `theirs` holds one name, or several pieces concatenated along dim 0 (q, k, v / gate, up) with `sizes` rows.
    `transpose`: GPT-2's Conv1D stores (in, out), the transpose of our nn.Linear (out, in).
    `zero_shape`: ours may lack this tensor (GPT-2 flavour with bias=False) while transformers needs it: export
    writes zeros of this shape.
    """

    ours: str
    theirs: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    transpose: bool = False
    zero_shape: Optional[tuple[int, ...]] = None
