"""Reading and writing files safely: atomic small writes, content hashes, and text / JSONL input whose every
problem becomes one clear `LlmctlError` naming the file (and the line)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .errors import LlmctlError


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file given through `what` (an option or key name, used in messages)."""
    p = Path(path)
    if not p.is_file():
        raise LlmctlError(f"{what} {p} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlmctlError(f"{what} {p} is not UTF-8 text") from None


def read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-empty line; a .json file may instead hold one array of objects."""
    text = read_text(path, what)
    if Path(path).suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlmctlError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        rows = list(enumerate(data, 1))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise LlmctlError(f"{what} {path} line {n} is not valid JSON ({e.msg}); fix or remove that line") from None
    for n, obj in rows:
        if not isinstance(obj, dict):
            raise LlmctlError(f"{what} {path} line {n} must be a JSON object")
    return rows
