#!/usr/bin/env python
"""An input-grounded task for speculative decoding (issue 36): rewrite a given Python function with 2-space indents.

Builds, from the Python sources already on this machine (an installed package's directory; default: torch's), a
character-level corpus of documents

    <a function, as written (4-space indents)>
    # rewritten with 2-space indents:
    <the same function, every leading run of 4 spaces now 2>

Functions of --min-chars to --max-chars characters are taken whole (ast), so a document fits a 512-token context of
a character model. Files are split into training and held-out by a hash of their path, so no held-out function's
file was seen in training. A model pretrained on train.txt learns to copy the function with the new indentation;
its answer to a held-out function's opening (the function and the header line) is mostly text of its prompt, which
is what `--draft prompt-lookup` drafts from (scripts/bench_speculative.py --prompt-file).

    python scripts/code_rewrite_corpus.py --out runs/rewrite        # train.txt, heldout.jsonl, prompt.txt
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
from pathlib import Path

HEADER = "\n# rewritten with 2-space indents:\n"


def functions(path: Path, lo: int, hi: int) -> list[str]:
    """Source of each function in `path` of lo..hi characters (methods dedented to column 0)."""
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out, all_lines = [], text.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            lines = all_lines[node.lineno - 1:node.end_lineno]  # (ast.get_source_segment re-splits the file)
            if not lines or node.end_lineno - node.lineno > 40:
                continue
            pad = len(lines[0]) - len(lines[0].lstrip(" "))
            if pad % 4 or any(line.strip() and not line.startswith(" " * pad) for line in lines):
                continue
            src = "\n".join(line[pad:] for line in lines)
            if lo <= len(src) <= hi and "\t" not in src and src.isascii():
                out.append(src)
    return out


def reindent(src: str) -> str:
    """Every leading run of 4k spaces becomes 2k."""
    return "\n".join(re.sub(r"^((?:    )+)", lambda m: "  " * (len(m.group(1)) // 4), line)
                     for line in src.splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=None, help="a folder of .py files (default: the installed torch package)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-chars", type=int, default=80)
    ap.add_argument("--max-chars", type=int, default=230, help="so one document fits 512 characters")
    ap.add_argument("--heldout-percent", type=int, default=2)
    a = ap.parse_args()
    if a.source is None:
        import torch

        a.source = str(Path(torch.__file__).parent)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = [], []
    for path in sorted(Path(a.source).rglob("*.py")):
        bucket = int(hashlib.sha256(str(path.relative_to(a.source)).encode()).hexdigest(), 16) % 100
        for src in functions(path, a.min_chars, a.max_chars):
            (held if bucket < a.heldout_percent else train).append((str(path), src))
    (out / "train.txt").write_text("".join(src + HEADER + reindent(src) + "\n\n" for _, src in train))
    with open(out / "heldout.jsonl", "w") as f:
        for path, src in held:
            f.write(json.dumps({"file": path, "prompt": src + HEADER, "answer": reindent(src)}) + "\n")
    # the benchmark's prompt: the longest held-out function (the most text to copy)
    path, src = max(held, key=lambda r: len(r[1]))
    (out / "prompt.txt").write_text(src + HEADER)
    print(json.dumps({"source": a.source, "train_functions": len(train), "heldout_functions": len(held),
                      "train_chars": sum(len(s) * 2 + len(HEADER) + 2 for _, s in train),
                      "prompt": {"file": path, "chars": len(src + HEADER), "answer_chars": len(reindent(src))}}))


if __name__ == "__main__":
    main()
