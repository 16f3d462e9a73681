"""infer: stream a completion, complete a file of prompts, chat, or classify text."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, Optional

from .. import sampling, speculative, structured
from ..chat import render_messages
from ..data import Examples, classification_ids, eval_batches
from ..errors import LlmctlError
from ..evaluate import classify
from ..events import SILENT, Events
from ..fileio import read_jsonl, read_text, write_atomic
from ..generate import Engine
from ..loading import Loaded, apply_settings, for_inference, load_model
from ..rows import Request, fit_prompt
from ..sampling import Sampling
from ..speculative import Speculation
from ..tokenizer import Tokenizer


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if prompt is not None and prompt_file is not None:
        raise LlmctlError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        p = Path(prompt_file)
        text = read_text(p, "--prompt-file")
        if not text.strip():
            raise LlmctlError(f"--prompt-file {p} is empty; put the prompt text in it")
        return text
    if prompt is None:
        raise LlmctlError("no prompt: give --prompt TEXT or --prompt-file FILE")
    return prompt


def warn_unseen(tok: Tokenizer, texts: str | list[str], what: str, events: Events) -> None:
    """One warning line when `texts` hold characters the tokenizer maps to <unk> (generation goes on: exit 0).
    For several texts (--input rows), `what` is followed by the numbers of the rows that hold them."""
    found = tok.unseen(texts)
    if not found:
        return
    if not isinstance(texts, str):
        rows = [str(i + 1) for i in found.texts[:5]] + (["..."] if len(found.texts) > 5 else [])
        what = f"{what} row{'s' if len(found.texts) > 1 else ''} {', '.join(rows)}"
    events.warn(found.message(what))


def sampling_settings(loaded: Loaded, overrides: Optional[list[str]] = None, flags: Optional[dict] = None,
                      command: str = "infer") -> Sampling:
    """The sampling settings of `infer` (and `eval --reward`): the checkpoint's `generate` section, the user's
    `--set generate.*` over it (checked as config; also sets generate.dtype and the like for `for_inference`), then
    the flags (field -> value, None = not given; shorthand for the same keys, checked under their own names:
    --temperature ...)."""
    return Sampling.from_config(apply_settings(loaded, None, overrides or [], ("generate",), command).generate, flags)


def json_format(loaded: Loaded, path: Optional[Path]) -> Optional[structured.Format]:
    """`infer --json-schema FILE`: the schema in FILE compiled for this model (None without one)."""
    if path is None:
        return None
    return structured.compile_schema(structured.read_schema(path), loaded.tokenizer, loaded.cfg.model.vocab_size,
                                     name=f"--json-schema {path}")


def stream(loaded: Loaded, prompt: str, s: Sampling, truncate: bool = False, events: Events = SILENT,
           format: Optional[structured.Format] = None, draft: Optional[Speculation] = None) -> Iterator[str]:
    """`llmctl infer --prompt`: the completion of one prompt as text pieces, as they are generated (JSON following
    `format` when given; speculatively with `draft`, whose `stats` count what it achieved). `events` hears about
    characters of the prompt the tokenizer has never seen."""
    ids = fit_prompt(loaded.tokenizer, prompt, loaded.cfg.model.block_size, truncate)
    warn_unseen(loaded.tokenizer, prompt, "the prompt", events)
    request = Request(ids, s, format=format)
    if draft is not None:
        return _released(draft.run(loaded.engine, request))
    return texts(loaded.engine, [request])


def speculation(loaded: Loaded, draft: Optional[str], dtype: Optional[str] = None,
                quantize_mode: Optional[str] = None) -> Optional[Speculation]:
    """`infer --draft`: prompt lookup, or the checkpoint at `draft` loaded beside the model (same device and
    precision settings, decoding eagerly), with `generate.draft_tokens` and `generate.lookup_ngram`; `draft` None
    takes `generate.draft` (None: no speculation)."""
    g = loaded.cfg.generate
    draft = draft if draft is not None else g.draft
    if not draft:
        return None
    if draft == speculative.PROMPT_LOOKUP:
        return Speculation(speculative.PromptLookup(g.lookup_ngram), g.draft_tokens)
    try:
        small = load_model(draft, str(loaded.device), require_tokenizer=False)
    except LlmctlError as e:
        raise LlmctlError(f"--draft {draft}: {e.message} (or give --draft {speculative.PROMPT_LOOKUP})") from None
    try:
        drafter = speculative.DraftModel(small.model, loaded.cfg.model.vocab_size, str(draft))
    except LlmctlError as e:
        raise LlmctlError(f"--draft: {e.message}") from None
    ours, theirs = loaded.tokenizer, small.tokenizer
    if ours is not None and theirs is not None and ours.sha256 != theirs.sha256:
        # exact all the same (the model verifies every token), but its drafts would be other tokens' ids: no speed-up
        raise LlmctlError(f"--draft: {draft} has another tokenizer than the model (same vocabulary size, other "
                          "tokens); give a draft trained with the model's tokenizer (prune + distill makes one)")
    for_inference(small, dtype, quantize_mode, compile=False)
    return Speculation(drafter, g.draft_tokens)


def texts(engine: Engine, requests: list[Request]) -> Iterator[str]:
    """The released text of a one-row job, piece by piece as it is generated."""
    return _released(engine.run(requests))


def _released(rows) -> Iterator[str]:
    for row in rows:
        piece = row.take_text()
        if piece:
            yield piece


def _row_settings(row: dict, s: Sampling, n: int) -> Sampling:
    """A row's own sampling fields (null or absent: `s`'s) over `s`, by the same rules; `n` numbers the row in
    messages."""
    given = {f: row[f] for f in sampling.FIELDS if row.get(f) is not None}
    try:
        return sampling.replace(s, given)
    except sampling.SamplingError as e:
        raise LlmctlError(f"--input row {n}: {e.message}") from None


AUTO_BUILD_AFTER_S = 120.0  # generate.compile auto builds a compiled step when the rest of a job would take longer


def complete_rows(loaded: Loaded, rows: list[dict], s: Sampling, truncate: bool = False,
                  batch_size: Optional[int] = None, events: Events = SILENT,
                  format: Optional[structured.Format] = None) -> list[dict]:
    """`llmctl infer --input`: complete every row, `generate.batch_size` rows decoding at a time (a row joins as
    soon as another finishes), each with its own settings where it gives them. Output rows repeat the input and add
    `completion`, `finish_reason` (length, stop, eos), `prompt_tokens` and `completion_tokens`, in input order.
    `events` hears the "infer" progress (rows completed) and about characters of the prompts the tokenizer has never
    seen (one warning for all rows). `format`: every completion is JSON that follows it."""
    tok, T = loaded.tokenizer, loaded.cfg.model.block_size
    settings = [_row_settings(r, s, n) for n, r in enumerate(rows, 1)]
    ids = []
    for n, r in enumerate(rows, 1):
        try:
            ids.append(fit_prompt(tok, r["prompt"], T, truncate))
        except LlmctlError as e:
            raise LlmctlError(f"--input row {n}: {e.message}") from None
    warn_unseen(tok, [r["prompt"] for r in rows], "--input", events)  # one line for all rows
    reqs = [Request(ids[i], settings[i], format=format) for i in range(len(rows))]
    index = {id(q): i for i, q in enumerate(reqs)}
    results: list[dict] = [{} for _ in rows]
    started, total, done_tokens = time.perf_counter(), sum(q.sampling.max_new_tokens for q in reqs), 0
    engine = loaded.engine
    asked = engine.mode != "auto"

    def on_step(e: Engine) -> None:
        # auto compile pays for itself on a long job: build the step once the eager rate says the rest would take
        # over AUTO_BUILD_AFTER_S (a build takes ~0.5 min on a CPU and the step is >= 2x faster)
        nonlocal asked
        if not asked and done_tokens >= 16:
            if (total - done_tokens) * (time.perf_counter() - started) / done_tokens > AUTO_BUILD_AFTER_S:
                e.build_compiled()
            asked = True

    with events.progress("infer", len(rows)) as progress:
        completed = 0
        for row in engine.run(reqs, slots=batch_size or loaded.cfg.generate.batch_size, on_step=on_step):
            done_tokens += len(row.new_tokens)
            if row.done:
                i = index[id(row.request)]
                results[i] = {**rows[i], "completion": row.text, "finish_reason": row.finish_reason,
                              "prompt_tokens": len(ids[i]), "completion_tokens": row.produced}
                completed += 1
                progress.update(completed)
    return results


# ------------------------------------------------------------------------------------------------------------------
# Classification checkpoints


def classify_texts(loaded: Loaded, texts: list[str], batch_size: int = 32, events: Events = SILENT,
                   what: str = "--input") -> list[dict]:
    """Label and class probabilities for each text (cut to the context like training does). `events` hears about
    unseen characters; `what` names the texts there ("--input", followed by the row numbers, or "the text")."""
    tok, T = loaded.tokenizer, loaded.cfg.model.block_size
    warn_unseen(tok, texts[0] if len(texts) == 1 else texts, what, events)
    ids, _ = classification_ids(tok, texts, T, encoder=not loaded.cfg.model.causal)
    ex = Examples(ids, [0] * len(ids))
    rows, pred, probs, _ = classify(loaded.classifier, eval_batches(ex, list(range(len(ids))), "classification",
                                                                    tok.pad_id, batch_size), loaded.device)
    out: list[dict] = [{} for _ in texts]
    for r, p, pr in zip(rows.tolist(), pred.tolist(), probs.tolist()):
        out[r] = {"label": loaded.labels[p], "probabilities": {name: round(x, 6) for name, x in zip(loaded.labels, pr)}}
    return out


# ------------------------------------------------------------------------------------------------------------------
# Files of prompts


def read_inputs(path: Path) -> list[dict]:
    """Rows of an --input file: JSONL objects with `prompt` (or `text`), or plain text with one prompt per line."""
    p = Path(path)
    rows: list[dict] = []
    if p.suffix in (".jsonl", ".json"):
        for n, obj in read_jsonl(p, "--input"):
            if not isinstance(obj.get("prompt", obj.get("text")), str):
                raise LlmctlError(f"--input {p} line {n} needs a \"prompt\" (or \"text\") string field")
            obj.setdefault("prompt", obj.get("text"))
            rows.append(obj)
    else:
        rows = [{"prompt": line} for line in read_text(p, "--input").splitlines() if line.strip()]
    if not rows:
        raise LlmctlError(f"--input {p} holds no prompts")
    return rows


def write_outputs(path: Path, rows: list[dict]) -> None:
    """Write the rows as JSONL, atomically: a half-written file never looks finished."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------------------------------
# Completions with stop strings, and chat


class ChatSession:
    """`infer --chat`: the conversation so far is rendered at every turn by the model's chat template (its own, or
    the instruction template it was tuned with: llmctl.chat.render_messages); the oldest tokens are dropped when it
    outgrows the context, and the answer ends at any of the model's end ids."""

    def __init__(self, loaded: Loaded, s: Sampling, events: Events = SILENT):
        self.loaded, self.messages, self.s, self.events = loaded, [], s, events

    def reset(self) -> None:
        self.messages = []

    def reply(self, message: str) -> Iterator[str]:
        tok = self.loaded.tokenizer
        warn_unseen(tok, message, "your message", self.events)
        messages = self.messages + [{"role": "user", "content": message}]
        s, block = self.s, self.loaded.cfg.model.block_size
        room = max(1, block - min(s.max_new_tokens, block // 2))  # the oldest turns go first, to leave room to reply
        text = render_messages(self.loaded.cfg, tok, messages, add_generation_prompt=True)
        ids = fit_prompt(tok, tok.encode(text), room, truncate=True)  # the template wrote the special tokens
        pieces = []
        for piece in texts(self.loaded.engine, [Request(ids, s)]):
            pieces.append(piece)
            yield piece
        self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]
