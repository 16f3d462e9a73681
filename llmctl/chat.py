"""The text of instructions and chats: the one place that turns an instruction, or a conversation, into the prompt
the model was tuned on. Training (instruction examples), `infer --chat`, `serve`'s chat endpoint and the chat
template of exported tokenizers all render through here."""

from __future__ import annotations

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
    text = ""
    if turns[0][0] == "system":
        text = turns.pop(0)[1] + "\n\n"
    if not turns or turns[-1][0] != "user":
        raise LlmctlError("messages: the last message must be the user's (the model answers it)")
    if turns[0][0] != "user":
        raise LlmctlError("messages: the conversation must start with a user message (after an optional system one)")
    for role, content in turns:
        text += render_prompt(content, "", ft) if role == "user" else content + eos
    return text


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
