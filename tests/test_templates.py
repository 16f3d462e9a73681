"""llmctl.templates renders every real chat template character for character as transformers renders it."""

from __future__ import annotations

from datetime import datetime

import pytest

from conftest import SHARED
from llmctl import templates
from llmctl.errors import LlmctlError

TEMPLATES = SHARED / "chat_templates"
FILES = sorted(TEMPLATES.glob("*.jinja")) + sorted(TEMPLATES.glob("extracted/*.jinja"))
NOW = datetime(2024, 7, 23, 9, 30)  # Llama 3.2 prints today's date: pinned on both sides
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}},
                   "required": ["city"]}}}
CALL = {"id": "abc123XYZ", "type": "function",  # Mistral's template wants nine alphanumeric characters
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

# (name, messages, add_generation_prompt, tools, extra variables)
CONVERSATIONS = [
    ("system turn", [{"role": "system", "content": "You answer in one word."},
                     {"role": "user", "content": "Capital of France?"}], True, None, {"enable_thinking": False}),
    ("multi-turn", [{"role": "user", "content": "Hi! 你好 🙂"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Write `x = 1` in Python."}], True, None, {}),
    ("ends with the answer", [{"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
                              {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}],
     False, None, {}),
    ("no generation prompt", [{"role": "user", "content": "Say nothing."}], False, None, {}),
    ("tool call", [{"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": "", "tool_calls": [CALL]},
                   {"role": "tool", "tool_call_id": "abc123XYZ", "name": "get_weather", "content": "22 C, sunny"}],
     True, [WEATHER], {}),
]


def reference(monkeypatch, template: str, messages: list, add_generation_prompt: bool, tools, extra: dict):
    """What transformers' apply_chat_template renders (its own function), or the message of what it raises."""
    import jinja2
    from transformers.utils import chat_template_utils as ctu

    class Pinned(datetime):
        @classmethod
        def now(cls, tz=None):
            return NOW

    monkeypatch.setattr(ctu, "datetime", Pinned)
    messages = ctu._normalize_chat_messages(messages)  # what apply_chat_template does before rendering
    try:
        rendered, _ = ctu.render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                                add_generation_prompt=add_generation_prompt, **SPECIAL, **extra)
    except jinja2.exceptions.TemplateError as e:
        return None, str(e)
    return rendered[0], None


def test_every_template_is_there():
    if not TEMPLATES.is_dir():
        pytest.skip(f"no shared chat templates at {TEMPLATES}")
    assert len(FILES) == 14  # 12 shipped .jinja files and 2 extracted from tokenizer_config.json


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("conv", CONVERSATIONS, ids=lambda c: c[0])
def test_renders_as_transformers(monkeypatch, path, conv):
    pytest.importorskip("transformers")
    _, messages, gen, tools, extra = conv
    template = path.read_text(encoding="utf-8")
    if tools and "tools" not in template:
        pytest.skip(f"{path.name} takes no tools")
    want, refused = reference(monkeypatch, template, messages, gen, tools, extra)
    if refused is not None:  # the template refuses this conversation: the same message, on one line
        with pytest.raises(LlmctlError) as e:
            templates.render(template, messages, add_generation_prompt=gen, tools=tools, special=SPECIAL, now=NOW,
                             **extra)
        assert " ".join(refused.split()) in e.value.message and "\n" not in e.value.message
        return
    got = templates.render(template, messages, add_generation_prompt=gen, tools=tools, special=SPECIAL, now=NOW,
                           **extra)
    assert got == want


def test_the_pinned_date_reaches_the_template():
    path = TEMPLATES / "meta-llama-Llama-3.2-3B-Instruct.jinja"
    if not path.is_file():
        pytest.skip(f"no {path}")
    text = templates.render(path.read_text(encoding="utf-8"), [{"role": "user", "content": "hi"}],
                            special=SPECIAL, now=NOW)
    assert "Today Date: 23 Jul 2024" in text


def test_a_template_that_raises_gives_its_message_on_one_line():
    t = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role\n not supported') }}{% endif %}ok"
    with pytest.raises(LlmctlError) as e:
        templates.render(t, [{"role": "system", "content": "x"}])
    assert e.value.message == "the chat template refused the conversation: System role not supported"
    assert templates.render(t, [{"role": "user", "content": "x"}]) == "ok"


def test_a_syntax_error_names_its_line():
    with pytest.raises(LlmctlError, match="syntax error on line 2"):
        templates.render("ok\n{% if %}", [])


def test_a_template_failing_on_the_messages_is_one_line():
    with pytest.raises(LlmctlError, match="failed on these messages.*UndefinedError"):
        templates.render("{{ messages[0].content.nope.deeper }}", [{"role": "user", "content": "x"}])


def test_the_sandbox_refuses_python_internals():
    with pytest.raises(LlmctlError, match="SecurityError|unsafe"):
        templates.render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [])
    with pytest.raises(LlmctlError, match="underscore"):
        templates.render("{% set ns = namespace(_x=1) %}", [])
    with pytest.raises(LlmctlError):  # immutable: a template cannot change the caller's messages
        templates.render("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])


def test_messages_are_normalised_as_transformers_does():
    # OpenAI clients send content: null beside tool calls (dropped, so `is defined` is false); reasoning under any
    # of its names is visible as reasoning_content and thinking
    t = "{% for m in messages %}{{ m.content is defined }} {{ m.reasoning_content }} {{ m.thinking }};{% endfor %}"
    msgs = [{"role": "assistant", "content": None, "reasoning": "r"}, {"role": "user", "content": "x"}]
    assert templates.render(t, msgs) == "False r r;True  ;"


def test_transformers_extras():
    # tojson keeps non-ASCII and takes json.dumps' arguments; loop controls; {% generation %}; extra variables
    t = ("{{ messages[0] | tojson(indent=1, sort_keys=true) }}|{% for m in messages %}{% if loop.index > 1 %}"
         "{% break %}{% endif %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}|{{ flag }}")
    out = templates.render(t, [{"role": "user", "content": "é"}, {"role": "user", "content": "no"}], flag=True)
    assert out == '{\n "content": "é",\n "role": "user"\n}|é|True'
