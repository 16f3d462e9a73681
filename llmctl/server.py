"""`llmctl serve` over HTTP: the engine thread, the guard (API key, body size, request counts) and the FastAPI app.

Threads: uvicorn's event loop answers HTTP; one engine thread (`Worker`) owns the model and runs the engine's steps
whenever any row is busy or waiting. A request's rows are handed to the engine with `Worker.submit`, and each step
sends every touched row's new text back to the request's asyncio queue (`call_soon_threadsafe`), so the event loop
never waits on the model and the model never waits on a slow client. A cancelled row (client gone, timeout) frees
its slot at the engine's next step. With a draft (`serve --draft`), a step in which one greedy row decodes alone is
a speculative one (`Speculation.engine_step`); every other step is the engine's own.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from . import openai_api as api
from .generate import Engine
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .rows import Row
from .speculative import Speculation, Stats

TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/models", "/health", "/metrics")


def server_metrics() -> Metrics:
    m = Metrics()
    m.counter("requests_total", "HTTP requests answered, by endpoint and status code.")
    m.counter("prompt_tokens_total", "Prompt tokens of accepted generation requests.")
    m.counter("generation_tokens_total", "Tokens generated.")
    m.histogram("time_to_first_token_seconds", "From a request's arrival to its first generated token.", TTFT_BUCKETS)
    m.histogram("time_per_output_token_seconds", "Between consecutive tokens of one request.", TOKEN_BUCKETS)
    return m


def prefix_metrics(m: Metrics, cache: PrefixCache) -> None:
    """The prefix cache's counts, read when scraped (the hit rate: hits / lookups, or hit / lookup tokens)."""
    m.counter("prefix_cache_lookups_total", "Prompt prefills that looked in the prefix cache.", lambda: cache.lookups)
    m.counter("prefix_cache_hits_total", "Lookups that found at least one cached block.", lambda: cache.hits)
    m.counter("prefix_cache_lookup_tokens_total", "Prompt tokens of the lookups.", lambda: cache.lookup_tokens)
    m.counter("prefix_cache_hit_tokens_total", "Prompt tokens restored from the prefix cache, not prefilled.",
              lambda: cache.hit_tokens)
    m.counter("prefix_cache_evictions_total", "Blocks evicted to keep within serve.prefix_cache_mib.",
              lambda: cache.evictions)
    m.gauge("prefix_cache_blocks", "Blocks held by the prefix cache.", lambda: cache.blocks)
    m.gauge("prefix_cache_bytes", "Bytes of keys and values held by the prefix cache.", lambda: cache.bytes)
    m.gauge("prefix_cache_budget_bytes", "The prefix cache's budget (serve.prefix_cache_mib).", lambda: cache.budget)


def draft_metrics(m: Metrics, stats: Stats) -> None:
    """Speculative decoding's counts (serve --draft), read when scraped; acceptance = accepted / drafted."""
    m.counter("draft_tokens_total", "Tokens the draft proposed.", lambda: stats.drafted)
    m.counter("draft_accepted_tokens_total", "Drafted tokens the model kept.", lambda: stats.accepted)
    m.counter("draft_forwards_total", "Forwards that checked drafts (each also adds a token of the model's own).",
              lambda: stats.forwards)
    m.gauge("draft_acceptance_rate", "Drafted tokens kept / drafted, since the start.", lambda: stats.acceptance)


@dataclass(eq=False)
class Ticket:
    """One request's rows in the engine and the queue its updates arrive on: (index, text, reason or None, the
    log-probabilities of the tokens since the last update: a list, or None when the request asked for none)."""

    rows: list[Row]
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    last: list[Optional[float]] = field(default_factory=list)  # per row: when its last token arrived
    logprobs_sent: list[int] = field(default_factory=list)  # per row: its log-probabilities already delivered

    def cancel(self) -> None:
        for r in self.rows:
            r.cancel()


class Worker:
    """The engine thread. `submit` is called on the event loop; everything else runs on the thread."""

    def __init__(self, engine: Engine, slots: int, max_queue: int, timeout: float, metrics: Metrics,
                 warn: Callable[[str], None], draft: Optional[Speculation] = None):
        # `warn`: how the thread reports a failure it survives (the CLI's events.warn; the server goes on);
        # `draft`: speculative steps while one greedy row decodes alone (Speculation.engine_step)
        self.engine, self.slots, self.max_queue, self.timeout = engine, slots, max_queue, timeout
        self.draft = draft
        self.metrics, self.warn = metrics, warn
        self._tickets: dict[Row, tuple[Ticket, int]] = {}
        self._timed_out: set[Row] = set()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="llmctl-engine", daemon=True)
        metrics.gauge("queue_depth", "Requests (rows) waiting for a slot.", lambda: len(self.engine.waiting))
        metrics.gauge("busy_slots", "Slots decoding a request.", lambda: self.engine.busy)
        metrics.gauge("slots", "Slots of the engine (serve.slots).", lambda: self.slots)
        if engine.prefix is not None:
            prefix_metrics(metrics, engine.prefix)
        if draft is not None:
            draft_metrics(metrics, draft.stats)

    def start(self) -> None:
        self.engine.model.eval()
        self.engine.open(self.slots, build_all_sizes=True)  # (with --compile: steps for 1, 4, 16, ... slots too)
        self._thread.start()

    def stop(self) -> None:
        """Cancel whatever is left and end the thread."""
        for row in list(self._tickets):
            row.cancel()
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.close()

    def submit(self, requests: list, loop: asyncio.AbstractEventLoop) -> Ticket:
        waiting = len(self.engine.waiting)
        if waiting + len(requests) > self.max_queue:
            raise api.ApiError(429, f"the server is busy: {waiting} requests are waiting for a slot "
                                    f"(serve.max_queue={self.max_queue}); retry shortly",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        try:
            rows = [self.engine.new_row(r) for r in requests]
        except ValueError as e:
            raise api.bad(str(e), "prompt") from None
        ticket = Ticket(rows, asyncio.Queue(), loop, [None] * len(rows), [0] * len(rows))
        for i, row in enumerate(rows):
            self._tickets[row] = (ticket, i)
            self.engine.submit(row)  # (after the ticket is known: the engine thread may touch the row at once)
        self._wake.set()
        return ticket

    # -- the engine thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            if self.engine.idle:
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            self._expire()
            try:
                touched = self.draft.engine_step(self.engine) if self.draft else None
                if touched is None:
                    touched = self.engine.step()
            except Exception as e:  # a failure in the model must not take the server down: fail what was in it
                self.warn(f"the engine failed ({type(e).__name__}: {e}); the requests in flight get a 500")
                self._fail_all()
                continue
            now = time.perf_counter()
            updates: dict[asyncio.AbstractEventLoop, list] = {}
            for row in touched:
                self._deliver(row, now, updates)
            for loop, batch in updates.items():  # one wake-up of the event loop per step, not one per row
                self._send(loop, batch)

    def _expire(self) -> None:
        now = time.perf_counter()
        for row in list(self._tickets):
            if not row.cancelled and now - row.submitted > self.timeout:
                self._timed_out.add(row)
                row.cancel()

    def _deliver(self, row: Row, now: float, updates: dict) -> None:
        entry = self._tickets.get(row)
        if entry is None:
            return
        ticket, i = entry
        n = len(row.new_tokens)
        row.new_tokens.clear()
        if n:
            self.metrics.inc("generation_tokens_total", n)
            if ticket.last[i] is None:
                self.metrics.observe("time_to_first_token_seconds", now - row.submitted)
            else:
                self.metrics.observe("time_per_output_token_seconds", (now - ticket.last[i]) / n)
            ticket.last[i] = now
        reason = row.finish_reason
        if row.done:
            del self._tickets[row]
            if row in self._timed_out:
                self._timed_out.discard(row)
                reason = "timeout"
        lps = None
        if row.request.logprobs is not None:
            lps = row.logprobs[ticket.logprobs_sent[i]:]
            ticket.logprobs_sent[i] += len(lps)
        updates.setdefault(ticket.loop, []).append((ticket, (i, row.take_text(), reason, lps)))

    def _fail_all(self) -> None:
        updates: dict[asyncio.AbstractEventLoop, list] = {}
        for row, (ticket, i) in list(self._tickets.items()):
            updates.setdefault(ticket.loop, []).append((ticket, (i, "", "error", None)))
        for loop, batch in updates.items():
            self._send(loop, batch)
        self._tickets.clear()
        self.engine.close()
        self.engine.open(self.slots)

    @staticmethod
    def _send(loop: asyncio.AbstractEventLoop, batch: list) -> None:
        def put() -> None:
            for ticket, update in batch:
                ticket.queue.put_nowait(update)
        try:
            loop.call_soon_threadsafe(put)
        except RuntimeError:  # the event loop is gone (forced shutdown)
            pass


# ------------------------------------------------------------------------------------------------------------------
# The HTTP side


class Guard:
    """ASGI middleware in front of every endpoint: the API key (all but /health, constant-time comparison), the
    body size limit (413), and the count of answers by endpoint and status for /metrics."""

    def __init__(self, app, api_key: Optional[str], max_body: int, metrics: Metrics):
        self.app, self.max_body, self.metrics = app, max_body, metrics
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
            if self.key is not None and path != "/health":
                given = headers.get("authorization", b"")
                token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
                if not hmac.compare_digest(token, self.key):
                    why = "no API key given" if not given else "the API key is wrong"
                    return await _send_error(counted_send, api.ApiError(
                        401, f"{why}: send the header 'Authorization: Bearer KEY'", type="authentication_error",
                        code="invalid_api_key"))
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                return await _send_error(counted_send, self._too_large(int(length)))
            seen = {"n": 0}

            async def limited_receive():
                message = await receive()
                if message["type"] == "http.request":
                    seen["n"] += len(message.get("body", b""))
                    if seen["n"] > self.max_body:
                        raise self._too_large(seen["n"])
                return message

            await self.app(scope, limited_receive, counted_send)
        finally:
            self.metrics.inc("requests_total", endpoint=endpoint, status=str(status["code"]))

    def _too_large(self, n: int) -> api.ApiError:
        return api.ApiError(413, f"the request body is {n} bytes, over this server's limit of {self.max_body} "
                                 "(serve.max_body_bytes)", code="request_too_large")


async def _send_error(send, e: api.ApiError) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Served:
    """What the app serves: the model's name, its tokenizer and config (its chat template), the limits, and either
    the engine's worker (language models) or a `classify(texts) -> [{label, probabilities}]` function."""

    name: str
    tokenizer: Any
    config: Any
    limits: api.Limits
    worker: Optional[Worker] = None
    classify: Optional[Callable[[list[str]], list[dict]]] = None
    created: int = field(default_factory=api.now)
    draining: bool = False


def create_app(served: Served, api_key: Optional[str], max_body: int, metrics: Metrics):
    """The ASGI app: FastAPI routes behind the Guard."""
    app = FastAPI(title="llmctl", docs_url=None, redoc_url=None, openapi_url=None)
    _error_handlers(app)
    _info_routes(app, served, metrics)
    _generation_routes(app, served, metrics)
    _classify_route(app, served)
    return Guard(app, api_key, max_body, metrics)


def _error_handlers(app: FastAPI) -> None:
    """Every failure answers in OpenAI's error shape; the server never dies from a request."""

    @app.exception_handler(api.ApiError)
    async def api_error(request, e: api.ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        message = {404: f"no such endpoint: {request.method} {request.url.path} (see GET /v1/models)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(api.ApiError(e.status_code, message, kind).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse(api.bad(str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):
        return JSONResponse(api.ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body(),
                            status_code=500)


async def _read_json(s: Served, request: Request) -> Any:
    """The body of a POST as JSON (503 once the server drains); for a JSON object, 404 when it names another
    model."""
    if s.draining:
        raise api.ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise api.bad(f"the request body is not valid JSON ({e})") from None
    if isinstance(body, dict):
        api.check_model(body, s.name)
    return body


def _info_routes(app: FastAPI, s: Served, metrics: Metrics) -> None:
    """GET /health, /v1/models[/{id}] and /metrics."""

    @app.get("/health")
    async def health():
        w = s.worker
        return {"status": "draining" if s.draining else "ok", "model": s.name,
                "slots": w.slots if w else 0, "busy_slots": w.engine.busy if w else 0,
                "queued": len(w.engine.waiting) if w else 0}

    @app.get("/v1/models")
    async def list_models():
        return api.models(s.name, s.created, s.limits.block_size)

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str):
        api.check_model({"model": model_id}, s.name)
        return api.models(s.name, s.created, s.limits.block_size)["data"][0]

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")


def _generation_routes(app: FastAPI, s: Served, metrics: Metrics) -> None:
    """POST /v1/completions and /v1/chat/completions: checked into a job, handed to the engine thread, answered
    whole or streamed."""

    async def generation(request: Request, kind: str):
        body = await _read_json(s, request)
        if s.worker is None:
            raise api.ApiError(404, f"'{s.name}' is a classifier: POST /v1/classify with {{\"input\": [texts]}}",
                               code="model_is_classifier")
        job = (api.parse_chat(body, s.tokenizer, s.limits, s.config) if kind == "chat"
               else api.parse_completion(body, s.tokenizer, s.limits))
        ticket = s.worker.submit(job.requests, asyncio.get_running_loop())
        prompt_tokens = api.prompt_tokens(job)
        metrics.inc("prompt_tokens_total", prompt_tokens)
        rid, created = api.new_id(kind), api.now()
        if job.stream:
            return StreamingResponse(_stream(s, ticket, job, rid, created, prompt_tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _whole(s, ticket, job, rid, created, prompt_tokens)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation(request, "chat")


async def _whole(s: Served, ticket: Ticket, job: api.Job, rid: str, created: int, prompt_tokens: int) -> dict:
    """The answer of a request that does not stream, once every row of it finished (with `echo`, the prompt's
    text before each choice's; with `logprobs`, read from the finished rows, which the engine no longer touches)."""
    texts, reasons = [""] * len(ticket.rows), [""] * len(ticket.rows)
    try:
        left = len(ticket.rows)
        while left:
            i, text, reason, _ = await ticket.queue.get()
            texts[i] += text
            if reason is not None:
                reasons[i], left = reason, left - 1
    finally:
        ticket.cancel()  # (a no-op for finished rows; frees the slots if this handler is cancelled)
    for r in reasons:
        _raise_for(r)
    completion_tokens = sum(r.produced for r in ticket.rows)
    extras = [api.choice_logprobs(job, s.tokenizer, r) for r in ticket.rows]
    texts = [echoed + t for (echoed, _), t in zip(extras, texts)]
    return api.response(job.kind, rid, s.name, created, texts, reasons, prompt_tokens, completion_tokens,
                        [lp for _, lp in extras])


async def _stream(s: Served, ticket: Ticket, job: api.Job, rid: str, created: int, prompt_tokens: int):
    """The server-sent events of a streamed request, piece by piece as the engine thread delivers them; with
    `logprobs`, each chunk carries those of the tokens since the last chunk (a token whose text is held back, or
    the end id, goes with the next chunk of its choice, the last at the latest)."""
    pending: list[list] = [[] for _ in ticket.rows]  # per choice: log-probabilities not sent yet
    sent = [0] * len(ticket.rows)  # per choice: characters of log-probability tokens sent (text_offset)

    def logprobs(i: int) -> Optional[dict]:
        if job.logprobs is None or not pending[i]:
            return None
        obj, pieces = api.logprobs_object(job.kind, s.tokenizer, pending[i], sent[i])
        pending[i], sent[i] = [], sent[i] + sum(map(len, pieces))
        return obj

    try:
        left = len(ticket.rows)
        if job.kind == "chat":  # the role comes first, as OpenAI's streams do
            for i in range(len(ticket.rows)):
                yield _sse(api.chunk("chat", rid, s.name, created, i, "", first=True))
        while left:
            i, text, reason, lps = await ticket.queue.get()
            if reason in ("timeout", "error"):
                yield _sse(_error_for(reason).body())
                return
            pending[i] += lps or []
            if text:
                yield _sse(api.chunk(job.kind, rid, s.name, created, i, text, logprobs=logprobs(i)))
            if reason is not None:
                left -= 1
                yield _sse(api.chunk(job.kind, rid, s.name, created, i, None, reason, logprobs=logprobs(i)))
        if job.include_usage:
            yield _sse(api.usage_chunk(job.kind, rid, s.name, created, prompt_tokens,
                                       sum(r.produced for r in ticket.rows)))
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()  # the client went away (or the stream ended): free the slots at the next step


def _classify_route(app: FastAPI, s: Served) -> None:
    """POST /v1/classify: one forward pass at a time on the classifier, off the event loop."""
    lock = threading.Lock()

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await _read_json(s, request)
        if s.classify is None:
            raise api.ApiError(404, f"'{s.name}' is a language model, not a classifier: use /v1/completions or "
                                    "/v1/chat/completions", code="model_is_not_a_classifier")
        texts = api.parse_classify(body)

        def run() -> list[dict]:
            with lock:
                return s.classify(texts)

        results = await asyncio.to_thread(run)
        return {"object": "list", "model": s.name,
                "data": [{"index": i, **r} for i, r in enumerate(results)]}


def _error_for(reason: str) -> api.ApiError:
    if reason == "timeout":
        return api.ApiError(504, "the request took longer than serve.request_timeout", "timeout",
                            code="request_timeout")
    return api.ApiError(500, "the engine failed while generating this request", "server_error")


def _raise_for(reason: str) -> None:
    if reason in ("timeout", "error"):
        raise _error_for(reason)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
