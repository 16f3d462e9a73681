"""Prompt rows (GRPO's training prompts, `eval --reward`'s held-out ones): JSONL rows with a prompt and any other
columns, which are handed to reward functions as they are.

A row's prompt is its `prompt` column (finetune.prompt_field): a string (plain text, continued as `infer` continues
it) or a list of OpenAI-style messages (rendered with the model's chat template, ending where the answer starts);
or, without that column, its `messages` list. Every other column is kept, in the row's order, for the rewards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..config import DataConfig
from ..corpus import resolve_source
from ..errors import LlmctlError
from ..fileio import read_jsonl

MESSAGES = "messages"


@dataclass
class PromptRow:
    """One prompt as given (what reward functions receive), the row's other columns, and where it came from."""

    prompt: Union[str, list]
    columns: dict = field(default_factory=dict)
    where: str = ""  # "FILE:LINE", for messages about the row

    @property
    def chat(self) -> bool:
        """Whether the prompt is a conversation (its completions are then assistant messages, as TRL passes them)."""
        return not isinstance(self.prompt, str)


def _prompt(row: dict, prompt_field: str, where: str) -> tuple[str, Union[str, list]]:
    """(the column the prompt is in, the prompt) of one row."""
    name = prompt_field if prompt_field in row else MESSAGES if MESSAGES in row else None
    if name is None:
        raise LlmctlError(f"{where}: a prompt row needs a {prompt_field!r} column (a string or a list of messages) "
                          f"or a {MESSAGES!r} list; found {', '.join(row) or 'no columns'}. Set finetune.prompt_field")
    value = row[name]
    if isinstance(value, str):
        return name, value
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise LlmctlError(f"{where}: {name} must be a string or a non-empty list of messages with role and content")
    return name, value


def prompt_rows(path: str, data: DataConfig, prompt_field: str = "prompt", key: str = "data.path") -> list[PromptRow]:
    """Every row of the JSONL file(s) at `path`, in order. Raises LlmctlError naming the row at fault."""
    source = resolve_source(path, data, key)
    if source.builder != "json":
        raise LlmctlError(f"{key}: prompts are read from JSONL (one object per line), not {source.suffix} files")
    rows = []
    for f in source.files:
        for n, row in read_jsonl(f, f"{key}:"):
            where = f"{key}: {f}:{n}"
            if not isinstance(row, dict):
                raise LlmctlError(f"{where}: each line must be a JSON object")
            name, prompt = _prompt(row, prompt_field, where)
            rows.append(PromptRow(prompt, {k: v for k, v in row.items() if k != name}, f"{f}:{n}"))
    if not rows:
        raise LlmctlError(f"{key}: {path} holds no prompts")
    return rows
