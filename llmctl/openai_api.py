"""OpenAI's HTTP API, as plain data: request bodies checked and turned into engine requests, and the response,
stream-chunk and error shapes. No web framework here (llmctl.server serves these over HTTP).

Supported per request: `max_tokens` (chat also `max_completion_tokens`), `temperature`, `top_p`, `top_k` and
`repetition_penalty` (extensions), `stop`, `seed`, `stream` (with `stream_options.include_usage`), and `truncate`
(extension: keep a too-long prompt's last tokens instead of refusing it). The sampling fields change the server's
defaults (`generate.*`) by llmctl.sampling's rules, the same as everywhere else (temperature has no cap at 2; top_k
0 or -1 is no limit; at most sampling.MAX_STOPS stop strings): this module only maps OpenAI's names onto them and
the problems onto OpenAI's error shape (400, `param` naming the field). A null field means the server's default.
`presence_penalty`, `frequency_penalty` and `logit_bias` are sampling fields too (ids checked against the model's
vocabulary). `n` (1..serve.slots) gives each prompt n choices, each its own row (with a `seed`, choice j samples
with seed + j, so the choices differ and the whole answer is reproducible). Completions take `logprobs` (0..20) and
`echo` (the prompt's text and log-probabilities before the completion; `max_tokens: 0` with it scores the prompt
without generating); chat takes `logprobs` (true/false) and `top_logprobs` (0..20); streamed, each chunk carries
the log-probabilities of its tokens (`echo` is refused with `stream`). `best_of` other than n is refused.
`response_format` (`json_object`, or `json_schema` with its `schema`; llmctl.structured, the optional xgrammar
extra) makes the text compact JSON that follows the schema; a schema xgrammar cannot compile, an unknown type or
the extra missing is a 400 naming `response_format`.
`tools` reach a chat template that takes them (a model without its own template: a 400 naming `tools`); tool calls
are not parsed or forced yet, so `tool_choice` other than "auto" or "none" and the legacy `functions` /
`function_call` are a 400 naming them. Unknown fields are ignored, as OpenAI's own clients send extras: those with
no behaviour here (`user`, `metadata`, `store`, `parallel_tool_calls`, `service_tier`) among them.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Optional

from . import sampling, structured
from .chat import render_messages
from .errors import LlmctlError
from .rows import MAX_LOGPROBS, Request, Row, bias_problem, fit_prompt
from .sampling import SEED_MAX, SEED_MIN, Sampling
from .tokenizer import StreamDecoder, Tokenizer

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "length"}  # engine -> OpenAI


class ApiError(Exception):
    """An error answer: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Limits:
    """What the server allows and the settings a request starts from."""

    block_size: int
    max_tokens: int  # serve.max_tokens: the most new tokens one request may ask for
    defaults: Sampling  # generate.* (and serve's sampling flags); a request changes the fields it gives
    slots: int = 16  # serve.slots: the most choices (`n`) one prompt may ask for
    vocab_size: Optional[int] = None  # the model's, for logit_bias ids (None: not checked here)


@dataclass
class Job:
    """A checked request: the engine requests (one per prompt) and how to answer."""

    kind: str  # "completion" or "chat"
    requests: list[Request]  # prompt by prompt, each prompt's n choices together
    stream: bool
    include_usage: bool
    n: int = 1
    logprobs: Optional[int] = None  # alternatives per position (None: no log-probabilities in the answer)
    echo: bool = False


# ------------------------------------------------------------------------------------------------------------------
# Checking fields


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false (got {type(v).__name__})", name)
    return v


def _count(body: dict, name: str, low: int, high: int, why: str = "") -> Optional[int]:
    """An optional integer field within [low, high] (null: None)."""
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise bad(f"'{name}' must be an integer from {low} to {high}{why} (got {v!r})", name)
    return v


def _choices(body: dict, limits: Limits, stream: bool, kind: str) -> tuple[int, Optional[int]]:
    """(n, logprobs: alternatives per position or None) of a request."""
    n = _count(body, "n", 1, limits.slots, " (serve.slots)") or 1
    if body.get("best_of") not in (None, n):
        raise bad("'best_of' is not supported (other than equal to 'n')", "best_of")
    if kind == "chat":
        want = _flag(body, "logprobs")
        k = _count(body, "top_logprobs", 0, MAX_LOGPROBS)
        if k is not None and not want:
            raise bad("'top_logprobs' goes with \"logprobs\": true", "top_logprobs")
        k = (k or 0) if want else None
    else:
        k = _count(body, "logprobs", 0, MAX_LOGPROBS)
    if stream and body.get("echo"):
        raise bad("'echo' is not supported with \"stream\": true; send the request without streaming", "echo")
    return n, k


def check_model(body: dict, name: str) -> None:
    """404 when the body names another model (a missing `model` means this one)."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    if model != name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{name}' (GET /v1/models)",
                       param="model", code="model_not_found")


def _prompt_ids(tok: Tokenizer, prompt: str | list[int], limits: Limits, truncate: bool, param: str) -> list[int]:
    try:
        return fit_prompt(tok, prompt, limits.block_size, truncate, how='send "truncate": true')
    except LlmctlError as e:
        raise bad(e.message, param, "context_length_exceeded") from None


def _sampling(body: dict, limits: Limits, max_name: str = "max_tokens", score_only: bool = False) -> Sampling:
    """The server's defaults changed by the request's sampling fields (null or absent: the default).
    `score_only`: max_tokens is 0 (with echo), which the engine's rows see as 1 with no generation."""
    if body.get(max_name) is None and max_name != "max_tokens":
        max_name = "max_tokens"  # chat takes either; max_completion_tokens wins when both are given
    param = {"max_new_tokens": max_name}  # the field -> OpenAI's name, where they differ
    given = {f: body[param.get(f, f)] for f in sampling.FIELDS if body.get(param.get(f, f)) is not None}
    given.setdefault("max_new_tokens", min(limits.defaults.max_new_tokens, limits.max_tokens))
    if score_only:
        given["max_new_tokens"] = 1
    try:
        s = sampling.replace(limits.defaults, given, name=lambda f: f"'{param.get(f, f)}'")
    except sampling.SamplingError as e:
        raise bad(e.message, param.get(e.problems[0].field, e.problems[0].field)) from None
    if s.max_new_tokens > limits.max_tokens:
        raise bad(f"'{max_name}' is {s.max_new_tokens}, over this server's limit of {limits.max_tokens} "
                  "(serve.max_tokens)", max_name)
    why = bias_problem(s, limits.vocab_size) if limits.vocab_size else None
    if why:
        raise bad(f"'logit_bias' {why}", "logit_bias")
    return s


def _format(body: dict, tok: Tokenizer, limits: Limits) -> Optional[structured.Format]:
    """The compiled `response_format` of a request (None: plain text)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    try:
        schema = structured.spec(rf)
        return None if schema is None else \
            structured.compile_schema(schema, tok, limits.vocab_size or tok.vocab_size)
    except LlmctlError as e:
        raise bad(e.message, "response_format") from None


def _rows(prompts: list[list[int]], s: Sampling, n: int, **kw) -> list[Request]:
    """n requests per prompt, prompt by prompt; with a seed, choice j samples with seed + j (wrapping)."""
    def seeded(j: int) -> Sampling:
        if s.seed is None or j == 0:
            return s
        seed = s.seed + j
        return sampling.replace(s, {"seed": seed if seed <= SEED_MAX else seed - SEED_MAX - 1 + SEED_MIN})
    return [Request(p, seeded(j), **kw) for p in prompts for j in range(n)]


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    if not stream:
        raise bad("'stream_options' goes with \"stream\": true", "stream_options")
    return bool(opts.get("include_usage"))


def parse_completion(body: Any, tok: Tokenizer, limits: Limits) -> Job:
    """POST /v1/completions: `prompt` is a string, a list of strings, a list of token ids or a list of those."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required", "prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise bad("'prompt' must be a string, a list of strings, or token ids (a list of integers, or of lists)",
                  "prompt")
    truncate, stream, echo = _flag(body, "truncate"), _flag(body, "stream"), _flag(body, "echo")
    n, k = _choices(body, limits, stream, "completion")
    score_only = echo and body.get("max_tokens") == 0
    s = _sampling(body, limits, score_only=score_only)
    fmt = _format(body, tok, limits)
    ids = []
    for i, p in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if not isinstance(p, str) and not all(isinstance(t, int) and not isinstance(t, bool)
                                              and 0 <= t < tok.vocab_size for t in p):
            raise bad(f"'{param}' holds something other than token ids below {tok.vocab_size}", param)
        ids.append(_prompt_ids(tok, p, limits, truncate, param))
    requests = _rows(ids, s, n, logprobs=k, prompt_logprobs=echo and k is not None, generate=not score_only,
                     format=fmt)
    return Job("completion", requests, stream, _stream_options(body, stream), n, k, echo)


def _tools(body: dict) -> Optional[list]:
    """The `tools` a chat template renders (None: none). llmctl does not parse or force a model's tool calls yet,
    so a field that asks for that (`tool_choice` other than "auto" or "none", the legacy `functions` and
    `function_call`) is refused naming it; "none" leaves the tools out of the prompt."""
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise bad(f"'{legacy}' is not supported (llmctl does not parse tool calls yet); leave it out", legacy)
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad(f"'tool_choice' {choice!r} is not supported: llmctl does not force or parse tool calls yet "
                  "(\"auto\" and \"none\" are taken)", "tool_choice")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise bad("'tools' must be a list of tool objects", "tools")
    return None if choice == "none" else tools


def parse_chat(body: Any, tok: Tokenizer, limits: Limits, cfg) -> Job:
    """POST /v1/chat/completions: `messages` (and `tools`) rendered by the model's chat template
    (llmctl.chat.render_messages: its own, or llmctl's instruction template), encoded as they are (the template
    writes the special tokens); generation stops at the model's end ids. cfg: the checkpoint's Config."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad("'messages' is required: a list of {\"role\", \"content\"} objects", "messages")
    for m in messages:  # content given as a list of text parts (newer clients) is joined
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in parts):
                raise bad("message content parts must be text parts ({\"type\": \"text\", \"text\": ...})",
                          "messages")
            m["content"] = "".join(p["text"] for p in parts)
    tools = _tools(body)
    try:
        text = render_messages(cfg, tok, messages, add_generation_prompt=True, tools=tools or None)
    except LlmctlError as e:
        raise bad(e.message, "tools" if e.message.startswith("tools:") else "messages") from None
    truncate, stream = _flag(body, "truncate"), _flag(body, "stream")
    n, k = _choices(body, limits, stream, "chat")
    s = _sampling(body, limits, "max_completion_tokens")
    fmt = _format(body, tok, limits)
    ids = _prompt_ids(tok, tok.encode(text), limits, truncate, "messages")
    return Job("chat", _rows([ids], s, n, logprobs=k, format=fmt), stream, _stream_options(body, stream), n, k)


def parse_classify(body: Any) -> list[str]:
    """POST /v1/classify: `input` is a string or a list of strings."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad("'input' must be a string or a non-empty list of strings", "input")
    return texts


# ------------------------------------------------------------------------------------------------------------------
# Answers


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def prompt_tokens(job: Job) -> int:
    """The prompt tokens of a job, each prompt once (its n choices share it, as OpenAI counts)."""
    return sum(len(r.prompt) for r in job.requests[:: job.n])


def _pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    """The text of each token in sequence (a token that ends inside a character: "", the next holds it)."""
    dec = StreamDecoder(tok, skip_special=False)
    out = [dec.push(t) for t in ids]
    if out:
        out[-1] += dec.flush()
    return out


def choice_logprobs(job: Job, tok: Tokenizer, row: Row) -> tuple[str, Optional[dict]]:
    """(the echoed prompt text, or "", and the choice's `logprobs` object, or None) of a finished row: OpenAI's
    completions shape (tokens, token_logprobs, top_logprobs as {token: logprob}, text_offset into the choice's
    text) or chat's ({"content": [{token, logprob, bytes, top_logprobs}]})."""
    if job.logprobs is None:
        return ("".join(_pieces(tok, row.request.prompt)) if job.echo else ""), None
    first = [(row.request.prompt[0], None, None)] if job.echo else []
    entries: list = first + (row.prompt_logprobs if job.echo else []) + row.logprobs
    obj, pieces = logprobs_object(job.kind, tok, entries)
    return "".join(pieces[: len(entries) - len(row.logprobs)]), obj


def logprobs_object(kind: str, tok: Tokenizer, entries: list, offset: int = 0) -> tuple[dict, list[str]]:
    """(OpenAI's `logprobs` object of these positions, their tokens' text): a whole choice's, or a streamed chunk's
    (`offset`: the characters of the choice before it, where its `text_offset`s start)."""
    pieces = _pieces(tok, [t for t, _, _ in entries])
    name = {}
    for _, _, top in entries:
        for t, _ in top or ():
            name.setdefault(t, tok.decode([t], skip_special=False))
    if kind == "chat":
        def one(text: str, lp: float) -> dict:
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}
        return {"content": [{**one(p, lp), "top_logprobs": [one(name[t], x) for t, x in top]}
                            for p, (_, lp, top) in zip(pieces, entries)]}, pieces
    offsets, at = [], offset
    for p in pieces:
        offsets.append(at)
        at += len(p)
    return {"tokens": pieces, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if top is None else {name[t]: x for t, x in top} for _, _, top in entries],
            "text_offset": offsets}, pieces


def response(kind: str, rid: str, model: str, created: int, texts: list[str], reasons: list[str],
             prompt_tokens: int, completion_tokens: int, logprobs: Optional[list[Optional[dict]]] = None) -> dict:
    lps = logprobs or [None] * len(texts)
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp,
                    "finish_reason": FINISH[r]} for i, (t, r, lp) in enumerate(zip(texts, reasons, lps))]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": FINISH[r]}
                   for i, (t, r, lp) in enumerate(zip(texts, reasons, lps))]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(kind: str, rid: str, model: str, created: int, index: int, text: Optional[str],
          reason: Optional[str] = None, first: bool = False, logprobs: Optional[dict] = None) -> dict:
    """One streamed piece; `reason` set on a choice's last chunk (its text then empty); `logprobs`: those of the
    tokens since the last chunk (`logprobs_object`)."""
    finish = FINISH[reason] if reason else None
    if kind == "chat":
        delta: dict = {"role": "assistant", "content": text or ""} if first else \
            ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk(kind: str, rid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def models(name: str, created: int, block_size: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "llmctl",
                                        "max_model_len": block_size}]}


def now() -> int:
    return int(time.time())
