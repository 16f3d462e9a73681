"""The text of instructions and chats: the one place that turns an instruction, or a conversation, into the prompt
the model was tuned on. Training (instruction examples), `infer --chat`, `serve`'s chat endpoint and the chat
template of exported tokenizers all render through here.

A model's chat template is its own (`tokenizer.chat_template`, imported with it) or llmctl's instruction template
written as Jinja (`chat_template`); `template_of` picks it and `render_messages` renders a conversation with it
through llmctl.templates, as transformers' apply_chat_template would."""

from __future__ import annotations

from typing import Any, Optional

from . import templates
from .errors import LlmctlError

ROLES = ("system", "user", "assistant")


def render_prompt(instruction: str, input_text: str, ft) -> str:
    """One instruction (and optional input) in the checkpoint's template (ft: FinetuneConfig)."""
    if input_text and input_text.strip():
        return ft.prompt_template.format(instruction=instruction, input=input_text)
    return ft.prompt_template_no_input.format(instruction=instruction, input="")


def render_chat(messages: list[dict], ft, eos: str) -> str:
    """The prompt text of a conversation, ending where the assistant's next answer starts.

    `messages`: dicts with `role` (system, user, assistant) and `content` (a string). A system message may come
    first; its text opens the prompt, followed by a blank line. Then each user turn is rendered as an instruction
    without input, and each assistant answer follows its instruction, closed by the end-of-text token `eos` (as
    in training, where every response ends with it). The last message must be the user's. Consecutive messages of
    one role are joined by a blank line. Raises LlmctlError naming the message at fault."""
    turns = check_messages(messages)
    text = ""
    if turns[0][0] == "system":
        text = turns.pop(0)[1] + "\n\n"
    for role, content in turns:
        text += render_prompt(content, "", ft) if role == "user" else content + eos
    return text


def check_messages(messages: list[dict]) -> list[list]:
    """The conversation as [role, text] turns (consecutive messages of one role joined by a blank line), checked
    for llmctl's template: roles system, user, assistant; a system message only first; a user message first (after
    the system one) and last. Raises LlmctlError naming the message at fault."""
    if not messages:
        raise LlmctlError("messages: give at least one message")
    turns: list[list] = []  # [role, text]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LlmctlError(f"messages[{i}]: each message needs a role (system, user or assistant) and a string "
                              "content")
        if m["role"] == "system" and i > 0:
            raise LlmctlError(f"messages[{i}]: a system message may only come first")
        if turns and turns[-1][0] == m["role"]:
            turns[-1][1] += "\n\n" + m["content"]
        else:
            turns.append([m["role"], m["content"]])
    rest = turns[1:] if turns[0][0] == "system" else turns
    if not rest or rest[-1][0] != "user":
        raise LlmctlError("messages: the last message must be the user's (the model answers it)")
    if rest[0][0] != "user":
        raise LlmctlError("messages: the conversation must start with a user message (after an optional system one)")
    return turns


def chat_template(ft, eos: str) -> str:
    """`render_chat` as a Jinja chat template (tokenizer_config.json's `chat_template`, GGUF's
    `tokenizer.chat_template`), so `tokenizer.apply_chat_template(messages, tokenize=False)` in transformers gives the
    same text. Consecutive messages of one role are joined as `render_chat` joins them; the checks (roles, order)
    stay llmctl's: the template renders what it is given."""
    before, after = ft.prompt_template_no_input.format(instruction="\x00", input="").split("\x00")

    def lit(s: str) -> str:  # a Jinja string literal (Jinja reads Python's escapes)
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    return (
        "{%- for m in messages -%}"
        "{%- set prev = loop.previtem['role'] if loop.previtem is defined else '' -%}"
        "{%- set next = loop.nextitem['role'] if loop.nextitem is defined else '' -%}"
        "{%- if m['role'] == 'system' -%}{{ m['content'] + " + lit("\n\n") + " }}"
        "{%- elif m['role'] == 'user' -%}"
        "{{ (" + lit("\n\n") + " if prev == 'user' else " + lit(before) + ") + m['content'] }}"
        "{%- if next != 'user' -%}{{ " + lit(after) + " }}{%- endif -%}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{ (" + lit("\n\n") + " if prev == 'assistant' else '') + m['content'] }}"
        "{%- if next != 'assistant' -%}{{ " + lit(eos) + " }}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def own_template(cfg) -> Optional[str]:
    """The model's own chat template (`tokenizer.chat_template`), None when it has none (cfg: Config)."""
    return cfg.tokenizer.chat_template


def template_of(cfg, tok) -> str:
    """The chat template every conversation of this model renders with: its own when it has one, else llmctl's
    instruction template as Jinja (`chat_template`, closing answers with the tokenizer's end-of-text token)."""
    return own_template(cfg) or chat_template(cfg.finetune, tok.eos_token)


def exported_template(cfg, tok) -> Optional[str]:
    """The chat template an export carries (hf's tokenizer_config.json and chat_template.jinja, GGUF's
    tokenizer.chat_template): the model's own, else llmctl's for an instruction- or preference-tuned model, else
    none."""
    if own_template(cfg) is not None:
        return own_template(cfg)
    return chat_template(cfg.finetune, tok.eos_token) if cfg.finetune.task in ("instruct", "dpo", "grpo") else None


def render_messages(cfg, tok, messages: list[dict], *, add_generation_prompt: bool = True,
                    tools: Optional[list] = None, **extra: Any) -> str:
    """A conversation as the prompt text of the model's template (`template_of`), ending where the assistant's
    answer starts (`add_generation_prompt`). llmctl's own template takes system, user and assistant messages ending
    with the user's (`check_messages`) and no tools; a model's own template decides for itself (it may refuse with
    raise_exception: LlmctlError with its message). The text is encoded without added special tokens: the template
    writes them."""
    if own_template(cfg) is None:
        check_messages(messages)
        if tools:
            raise LlmctlError("tools: this model has no chat template of its own, and llmctl's instruction template "
                              "has no place for tools")
    return templates.render(template_of(cfg, tok), messages, add_generation_prompt=add_generation_prompt,
                            tools=tools, special=tok.special_tokens, **extra)
