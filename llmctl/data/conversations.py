"""Chat SFT rows: a conversation (OpenAI-style `messages`, ShareGPT's `conversations`) rendered with the model's chat
template, labelled on its assistant turns only.

The conversation is rendered once, whole (templates rewrite earlier turns: Qwen3 drops the reasoning of past
answers), and each assistant message is found in that text in order, from a cursor that moves past every user and
tool message and every answer already found. An answer's span runs from the end of the assistant header before it
(the template's generation prompt, `<|im_start|>assistant\n`; so what a template writes between header and content,
Qwen3's empty `<think>` block, is learned too, as the model must write it when it answers) through the template's
end-of-turn marker after it (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`...), so the model learns to stop. Character
spans become token labels through the tokenizer's offsets: a token is learned when its characters overlap a span.
docs/finetuning.md ("Conversations") states the method and its limits.
"""

from __future__ import annotations

from functools import cached_property
from typing import Callable, Optional

from .. import templates
from ..chat import own_template, template_of
from ..errors import LlmctlError
from ..tokenizer import Tokenizer

FIELDS = ("messages", "conversations")  # the row keys that hold a conversation, in the order they are looked for
ROLES = {r: r for r in ("system", "user", "assistant", "tool")}  # OpenAI-style `role`
SHAREGPT = {"system": "system", "human": "user", "gpt": "assistant", "tool": "tool"}  # ShareGPT's `from`
THINK_END = "</think>"  # closes a reasoning block a template may drop from past answers
PROBE = ("llmctl probe question", "llmctl probe answer")

Render = Callable[[list[dict], bool], str]  # a conversation, add_generation_prompt -> the template's text of it


def chat_examples(cfg, tok: Tokenizer) -> "ChatExamples":
    """Training examples in the model's chat template (`chat.template_of`; cfg: Config): whole conversations
    rendered with no generation prompt, the tokenizer's named special tokens given to the template. A model with a
    template of its own has its instruction pairs rendered with it too, as one user turn and one answer."""
    template = template_of(cfg, tok)
    render = lambda messages, prompt=False: templates.render(  # noqa: E731
        template, messages, add_generation_prompt=prompt, special=tok.special_tokens)
    return ChatExamples(render, tok, pairs=own_template(cfg) is not None)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def conversation(row: dict, where: str) -> Optional[tuple[str, list[dict]]]:
    """(field, messages as [{role, content}]) of a conversation row, or None when the row has another layout.

    Each message is OpenAI-style (`role`: system, user, assistant, tool; `content`) or ShareGPT's (`from`: system,
    human, gpt, tool; `value`); other keys are not passed on. Raises LlmctlError naming the message at fault."""
    field = next((f for f in FIELDS if f in row), None)
    if field is None:
        return None
    items = row[field]
    if not isinstance(items, list) or not items:
        raise LlmctlError(f"{where}: '{field}' must be a non-empty list of messages (got {_kind(items)})")
    messages = [_message(m, f"{where}: {field}[{i}]") for i, m in enumerate(items)]
    if not any(m["role"] == "assistant" for m in messages):
        raise LlmctlError(f"{where}: '{field}' has no assistant message, so there is nothing to learn; add the "
                          "assistant's answer or remove the row")
    return field, messages


def _message(m, at: str) -> dict:
    if not isinstance(m, dict) or not ("role" in m or "from" in m):
        raise LlmctlError(f"{at} must be an object with role and content (or ShareGPT's from and value)")
    key, text, names = ("from", "value", SHAREGPT) if "from" in m else ("role", "content", ROLES)
    role = names.get(m[key]) if isinstance(m[key], str) else None
    if role is None:
        raise LlmctlError(f"{at} has {key} {m[key]!r}; use one of {', '.join(names)}")
    if m.get("tool_calls"):
        raise LlmctlError(f"{at} has tool_calls; chat SFT learns an answer's text only: write the call into "
                          f"{text} or remove the message")
    content = m.get(text)
    if not isinstance(content, str):
        raise LlmctlError(f"{at} ({m[key]}) has {'no' if content is None else _kind(content)} {text}; give it as "
                          "one string")
    if role == "assistant" and not content.strip():
        raise LlmctlError(f"{at} is an empty assistant message; fill it or remove it")
    return {"role": role, "content": content}


def _forms(content: str) -> list[str]:
    """What an answer may look like in the rendered text, in the order tried: as given, trimmed (Llama and Gemma
    trim), and the answer after a reasoning block that the template drops (Qwen3's past turns)."""
    forms = [content, content.strip()]
    if THINK_END in content:
        answer = content.split(THINK_END)[-1]
        forms += [answer.lstrip("\n"), answer.strip()]
    return [f for f in dict.fromkeys(forms) if f]


def assistant_spans(text: str, messages: list[dict], turn_end: str, field: str, where: str,
                    header: str = "") -> list[tuple[int, int]]:
    """[start, end) of every assistant message in `text`, the end-of-turn marker `turn_end` included, and from the
    end of the assistant `header` before it when there is one after the previous message.

    An answer followed by another assistant message need not be followed by the marker (a template may join
    them). An answer not found is an error: labels are never guessed."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] == "system":  # templates move it (Mistral: into the last user turn); it does not move the cursor
            continue
        if m["role"] != "assistant":
            for form in dict.fromkeys((m["content"], m["content"].strip())):
                at = text.find(form, cursor) if form else -1
                if at >= 0:
                    cursor = at + len(form)
                    break
            continue
        joined = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        span = _locate(text, _forms(m["content"]), turn_end, cursor, joined)
        if span is None:
            raise LlmctlError(
                f"{where}: the chat template does not write {field}[{i}] (assistant) as given, so what to learn "
                "cannot be placed; give the message as the template writes it, or remove the row"
            )
        if header:
            h = text.rfind(header, cursor, span[0])
            span = (h + len(header), span[1]) if h >= 0 else span
        spans.append(span)
        cursor = span[1]
    return spans


def _locate(text: str, forms: list[str], turn_end: str, cursor: int, joined: bool) -> Optional[tuple[int, int]]:
    for form in forms:
        at = text.find(form + turn_end, cursor)
        if at >= 0:
            return at, at + len(form) + len(turn_end)
    if joined:
        for form in forms:
            at = text.find(form, cursor)
            if at >= 0:
                return at, at + len(form)
    return None


def token_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token's id where its characters overlap a span (an empty token counts as its first character), else
    -100."""
    labels, j = [-100] * len(ids), 0
    for k, (start, end) in enumerate(offsets):
        end = max(end, start + 1)
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and spans[j][0] < end:
            labels[k] = ids[k]
    return labels


class ChatExamples:
    """A model's chat template and tokenizer, turning conversations into (ids, labels). `pairs`: instruction pairs
    are rendered as conversations too (a model's own template), not with llmctl's prompt template."""

    def __init__(self, render: Render, tokenizer: Tokenizer, pairs: bool = False):
        self.render, self.tok, self.pairs = render, tokenizer, pairs

    @cached_property
    def turn_end(self) -> str:
        """What the template writes right after an answer, through the first special token: found once by rendering
        a probe conversation (one user message, one answer). Whitespace may come before the token, nothing else."""
        question, answer = PROBE
        text = self._render([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                            "chat template")
        at = text.rfind(answer)
        if at < 0:
            raise LlmctlError("chat template: it does not write an assistant message's content as given, so chat "
                              "SFT cannot find the answers to learn; use a template that does")
        rest = text[at + len(answer):]
        hits = [(rest.find(s), -len(s), s) for s in self.tok.special_texts if s and s in rest]
        if not hits or rest[: min(hits)[0]].strip():
            raise LlmctlError(f"chat template: it ends an answer with {rest[:40]!r}, not with a special token, so a "
                              "model tuned on it would not learn to stop; use a template whose turns end with one")
        first, _, token = min(hits)
        return rest[: first + len(token)]

    @cached_property
    def header(self) -> str:
        """The assistant header: what the generation prompt adds after a user turn ('' when it adds nothing, or
        does not just append)."""
        probe = [{"role": "user", "content": PROBE[0]}]
        bare, prompted = self._render(probe, "chat template"), self._render(probe, "chat template", True)
        return prompted[len(bare):] if prompted.startswith(bare) else ""

    def _render(self, messages: list[dict], where: str, prompt: bool = False) -> str:
        try:
            return self.render(messages, prompt)
        except LlmctlError as e:
            raise LlmctlError(f"{where}: {e}") from None

    def example(self, field: str, messages: list[dict], where: str,
                answers: Optional[int] = None) -> tuple[list[int], list[int]]:
        """The token ids of the whole rendered conversation and their labels (-100 outside the answers; with
        `answers`, outside the last `answers` assistant messages: a preference pair's answer after its prompt)."""
        text = self._render(messages, where)
        spans = assistant_spans(text, messages, self.turn_end, field, where, self.header)
        spans = spans[len(spans) - answers:] if answers is not None else spans
        ids, offsets = self.tok.encode_offsets(text)
        return ids, token_labels(ids, offsets, spans)
