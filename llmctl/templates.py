"""Jinja chat templates rendered as transformers' `apply_chat_template` renders them (tokenize=False).

The environment is the one transformers gives a template: jinja2's immutable sandbox (a template from a model repository
is untrusted code: it cannot mutate lists or dicts it is given, nor reach Python internals), `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension (`break`, `continue`), a `{% generation %}` block that renders its body
(transformers uses it to mark assistant text), and these names:
  - `raise_exception(message)`: the template refuses the conversation; `render` raises LlmctlError with the message
  - `strftime_now(format)`: the current time formatted (Llama 3.2 prints today's date); `render(now=...)` pins it
  - `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`: json.dumps, no HTML escaping
  - `namespace(...)` refusing attribute names that start with an underscore, and `dict(...)`
The variables are `messages`, `tools` (None when not given), `documents` (None), `add_generation_prompt`, the
tokenizer's special tokens (`special`: bos_token, eos_token, ...; transformers passes its special_tokens_map) and any
`extra` keyword (e.g. `enable_thinking`), which wins over a special token of the same name, as in transformers.
Messages are normalised as transformers does first: keys whose value is None are dropped (OpenAI clients send
`content: null` beside tool calls), and a reasoning text given as `reasoning_content`, `thinking` or `reasoning` is
visible under `reasoning_content` and `thinking`.

jinja2 is a runtime dependency for this module (pyproject.toml); it is installed with torch anyway.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any, Optional

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import LlmctlError

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the first is what templates read
_NOW: ContextVar[Optional[datetime]] = ContextVar("llmctl_template_now", default=None)


class TemplateRefused(jinja2.exceptions.TemplateError):
    """raise_exception(message) called by a template."""


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it; here it renders as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing names that start with an underscore (no way to Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja2's own signature trick: self may be a key)
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with an underscore ({name!r})")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)`, and nothing else of the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: Any) -> None:
    raise TemplateRefused(str(message))


def _strftime_now(fmt: str) -> str:
    return (_NOW.get() or datetime.now()).strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached: a server renders the same one for every request). A syntax error raises
    LlmctlError naming the line."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LlmctlError(f"the chat template has a syntax error on line {e.lineno}: {one_line(e.message)}; fix "
                          "the template (tokenizer.chat_template)") from None


def normalize(messages: list) -> list[dict]:
    """Messages as transformers hands them to a template: None-valued keys dropped, reasoning under both names."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LlmctlError(f"messages[{i}]: each message must be an object (a dict), got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = False, tools: Optional[list] = None,
           special: Optional[dict[str, str]] = None, now: Optional[datetime] = None, **extra: Any) -> str:
    """The text `template` makes of `messages` (see the module docstring for what the template sees). `now` pins
    `strftime_now` (tests; None: the clock). A template that refuses the conversation (raise_exception) or fails
    while rendering raises LlmctlError with its message on one line."""
    compiled = compile_template(template)
    variables = {**(special or {}), **extra}
    documents = variables.pop("documents", None)
    token = _NOW.set(now)
    try:
        return compiled.render(messages=normalize(messages), tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    except TemplateRefused as e:
        raise LlmctlError(f"the chat template refused the conversation: {one_line(e.message)}") from None
    except LlmctlError:
        raise
    except Exception as e:  # the template is the model's data: anything it raises is its failure on these messages
        raise LlmctlError(f"the chat template failed on these messages ({type(e).__name__}: "
                          f"{one_line(str(e))})") from None
    finally:
        _NOW.reset(token)


def one_line(text: Optional[str]) -> str:
    """A message on one line: runs of whitespace (newlines included) become one space."""
    return " ".join(str(text or "").split())[:500]
