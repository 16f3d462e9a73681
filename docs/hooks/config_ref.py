"""MkDocs hook: the configuration reference of docs/configuration.md, written from llmctl's config dataclasses at
build time (`llmctl.config.all_fields`: each key's type, default and doc line), so the page cannot drift from code.

docs/configuration.md holds the prose and one MARKER line; the tables replace that line. The defaults are those of
a clean environment (LLMCTL_CACHE_DIR unset, the home directory written ~), whoever builds the site.
"""

from __future__ import annotations

import html
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = "configuration.md"
MARKER = "<!-- config-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its {MARKER} line: the configuration reference has nowhere to go")
    return markdown.replace(MARKER, reference())


def reference() -> str:
    """The reference as Markdown: one heading per section (its docstring under it) and a table of its keys."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # document this checkout's llmctl, whatever else is installed
    import inspect

    from llmctl.config.fields import section_classes, section_fields

    out = []
    with _clean_environment():
        for section, cls in section_classes().items():
            out += [f"### {section}", "", _cell(inspect.getdoc(cls) or ""), "",
                    "| key | type | default | what it does |", "| --- | --- | --- | --- |"]
            for f in section_fields(section):
                doc = _cell(f.doc) or "**no doc line**"  # (tests/test_docs.py fails on it first)
                out.append(f"| `{f.key}` | {_cell(f.type_text)} | `{_code(f.default_text)}` | {doc} |")
            out.append("")
    return "\n".join(out)


@contextmanager
def _clean_environment():
    """Defaults as a fresh shell sees them: data.cache_dir would otherwise name the builder's LLMCTL_CACHE_DIR."""
    saved = os.environ.pop("LLMCTL_CACHE_DIR", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["LLMCTL_CACHE_DIR"] = saved


def _cell(text: str) -> str:
    """Text for a table cell: HTML-escaped (`<eos>`), pipes escaped so they do not split the row, and a page named
    as docs/PAGE.md (how code names them) made a link to it."""
    text = html.escape(text, quote=False).replace("|", "\\|")
    return re.sub(r"docs/([\w-]+)\.md", r"[\1](\1.md)", text)


def _code(text: str) -> str:
    return text.replace("|", "\\|")
