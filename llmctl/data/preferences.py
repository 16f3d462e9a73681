"""Preference pairs (DPO): rows of a prompt and two answers, the chosen and the rejected one (TRL's columns), as
token ids labelled on the answers only, cut to the context by one rule.

A row is plain text or a conversation:
  - strings: the prompt's tokens, then the answer's and <eos> (as TRL's standard format: no template is applied);
  - messages: the prompt a list of OpenAI-style messages (or a string: one user message), each answer a list of
    messages (or a string: one assistant message), rendered whole with the model's chat template (`conversations`);
    the answer's assistant messages are learned. Without a prompt, chosen and rejected are whole conversations and
    the messages they share from the start are the prompt (TRL's implicit prompt).
A pair longer than the context keeps the end of its prompt (at most half the context when its longer answer needs
the rest) and the start of each answer; a pair whose answers are the same once cut is dropped. Both are counted.
"""

from __future__ import annotations

from typing import Optional

from ..config import DataConfig
from ..corpus import resolve_source
from ..errors import LlmctlError
from ..fileio import read_jsonl
from ..tokenizer import Tokenizer
from .conversations import ChatExamples, conversation
from .examples import Examples

Seq = tuple[list[int], list[int]]  # token ids, labels (-100 outside the answer)


def _messages(value, role: str) -> list:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _shared_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def _chat_pair(prompt, chosen, rejected, chat: Optional[ChatExamples], where: str) -> tuple[Seq, Seq]:
    if chat is None:
        raise LlmctlError(f"{where}: a conversation row needs the model's chat template to render it")
    if prompt is None:  # implicit prompt: the messages both conversations start with
        n = _shared_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    prompt = _messages(prompt, "user")
    out = []
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        answer = _messages(answer, "assistant")
        if not isinstance(prompt, list) or not isinstance(answer, list) or not answer:
            raise LlmctlError(f"{where}: prompt and {name} must be strings or non-empty lists of messages")
        _, msgs = conversation({"messages": prompt + answer}, f"{where}: prompt + {name}")
        k = sum(m["role"] == "assistant" for m in msgs[len(prompt):])
        if not k:
            raise LlmctlError(f"{where}: the {name} answer has no assistant message; give the answer as one")
        out.append(chat.example("messages", msgs, f"{where}: {name}", answers=k))
    return out[0], out[1]


def _text_pair(prompt: str, chosen: str, rejected: str, tok: Tokenizer) -> tuple[Seq, Seq]:
    p = tok.encode(prompt)
    out = []
    for answer in (chosen, rejected):
        a = tok.encode(answer) + [tok.eos_id]
        out.append((p + a, [-100] * len(p) + a))
    return out[0], out[1]


def pair(row: dict, tok: Tokenizer, ft, chat: Optional[ChatExamples], where: str) -> tuple[Seq, Seq]:
    """(chosen, rejected) of one row, each as (ids, labels). Raises LlmctlError naming the row at fault."""
    names = {"prompt": ft.prompt_field, "chosen": ft.chosen_field, "rejected": ft.rejected_field}
    missing = [f for f in (ft.chosen_field, ft.rejected_field) if f not in row]
    if missing:
        raise LlmctlError(f"{where}: a preference row needs fields {ft.chosen_field} and {ft.rejected_field} "
                          f"(and {ft.prompt_field}); {', '.join(missing)} missing, found {', '.join(row) or 'none'}. "
                          "Set finetune.chosen_field / rejected_field / prompt_field")
    prompt, chosen, rejected = row.get(ft.prompt_field), row[ft.chosen_field], row[ft.rejected_field]
    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not (isinstance(value, (str, list)) or (key == "prompt" and value is None)):
            raise LlmctlError(f"{where}: {names[key]} must be a string or a list of messages")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not value or (isinstance(value, str) and not value.strip()):
            raise LlmctlError(f"{where}: {names[key]} is empty; fill it or remove the row")
    if chosen == rejected:
        raise LlmctlError(f"{where}: {names['chosen']} and {names['rejected']} are identical, so there is no "
                          "preference to learn; remove the row")
    if isinstance(chosen, str) and isinstance(rejected, str) and isinstance(prompt, str):
        return _text_pair(prompt, chosen, rejected, tok)
    if prompt is None and not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise LlmctlError(f"{where}: the row has no {names['prompt']}; give one (only conversations as chosen and "
                          "rejected may leave it out: the messages they share are the prompt)")
    return _chat_pair(prompt, chosen, rejected, chat, where)


def _answer_start(labels: list[int]) -> int:
    return next((i for i, x in enumerate(labels) if x != -100), len(labels))


def cut_pair(chosen: Seq, rejected: Seq, budget: int) -> tuple[Seq, Seq, bool]:
    """Both sequences in at most `budget` tokens: the prompt keeps its last min(its length, max(budget // 2, budget
    - the longer answer)) tokens, each answer its start in what is left. (chosen, rejected, whether it cut)."""
    if max(len(chosen[0]), len(rejected[0])) <= budget:
        return chosen, rejected, False
    starts = [_answer_start(s[1]) for s in (chosen, rejected)]
    longest = max(len(s[0]) - p for s, p in zip((chosen, rejected), starts))
    keep = max(budget // 2, budget - longest)
    out = []
    for (ids, lab), p in zip((chosen, rejected), starts):
        k = min(p, keep)
        out.append((ids[p - k: p - k + budget], lab[p - k: p - k + budget]))
    return out[0], out[1], True


def preference_examples(path: str, data: DataConfig, tok: Tokenizer, block_size: int, ft,
                        chat: Optional[ChatExamples] = None, key: str = "data.path") -> Examples:
    """Every row of the JSONL file(s) as a pair: `ids`/`targets` the chosen answers, `rejected` the others, in
    order; `truncated` counts pairs cut to the context, `dropped` those left out once cut (answers the same)."""
    source = resolve_source(path, data, key)
    if source.builder != "json":
        raise LlmctlError(f"{key}: preference tuning reads JSONL (one object per line), not {source.suffix} files")
    chosen, rejected, truncated, dropped = Examples([], []), Examples([], []), 0, 0
    for f in source.files:
        for n, row in read_jsonl(f, f"{key}:"):
            c, r = pair(row, tok, ft, chat, f"{key}: {f}:{n}")
            c, r, cut = cut_pair(c, r, block_size + 1)
            truncated += cut
            if c == r:
                dropped += 1
                continue
            for ex, (ids, lab) in ((chosen, c), (rejected, r)):
                ex.ids.append(ids)
                ex.targets.append(lab)
    if not chosen.ids:
        raise LlmctlError(f"{key}: {path} has no usable preference pairs")
    return Examples(chosen.ids, chosen.targets, truncated, rejected=rejected, dropped=dropped)
