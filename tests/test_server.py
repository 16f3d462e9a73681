"""`llmctl serve`: a real server in a subprocess on 127.0.0.1, talked to with the official openai client and plain
HTTP (httpx2 or httpx, whichever the installed openai package is built on)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import BAD_SAMPLING, SHAKESPEARE

openai = pytest.importorskip("openai")
try:
    import httpx2 as httpx  # what openai 3.x is built on
except ImportError:
    import httpx
KEY = "test-key-0123456789"
PROMPTS = [SHAKESPEARE.read_text()[i * 97 : i * 97 + 1 + (i * 7) % 25] for i in range(32)]  # 1..25 characters


class Server:
    """`llmctl serve --port 0 ...` in a subprocess; `url` once it says it is ready."""

    def __init__(self, ckpt: Path, *args, key_file: Path | None = None, timeout: float = 300):
        cmd = [sys.executable, "-m", "llmctl", "serve", "--ckpt", str(ckpt), "--port", "0", *map(str, args)]
        if key_file is not None:
            cmd += ["--api-key-file", str(key_file)]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.p.stderr:
                self.lines.append(line)
                if line.startswith("serving "):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(timeout)
        found = [re.search(r" at (http://\S+)/v1 ", x) for x in self.lines]
        found = [m for m in found if m]
        assert found, "".join(self.lines)
        self.url = found[0].group(1)
        self.headers = {"Authorization": f"Bearer {KEY}"} if key_file is not None else {}

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def post(self, path: str, body, **kw) -> httpx.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=data, headers={**self.headers, **kw.pop("headers", {})},
                          timeout=kw.pop("timeout", 60), **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, headers={**self.headers, **kw.pop("headers", {})}, timeout=30, **kw)

    def metrics(self) -> dict:
        from llmctl.metrics import parse

        return parse(self.get("/metrics").text)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        if self.p.poll() is None:  # a failed test must not leave a server decoding in the background
            self.p.kill()
            self.p.wait()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("key") / "api-key"
    p.write_text(KEY + "\n")
    return p


@pytest.fixture(scope="module")
def server(tiny_run, key_file):
    with Server(tiny_run, "--dtype", "float32", "--no-compile", key_file=key_file) as s:
        yield s
        assert s.stop() == 0


@pytest.fixture(scope="module")
def alone(tiny_run) -> dict:
    """What `llmctl infer --temperature 0 --dtype float32` gives for each prompt alone (the same code in-process;
    test_infer_cli_equals_the_in_process_reference ties the two)."""
    from llmctl import loading
    from llmctl.commands import inference as inference_cmd

    loaded = loading.for_inference(loading.load_model(tiny_run), "float32", "none", compile=False)
    out = {}
    for i, p in enumerate(PROMPTS):
        s = inference_cmd.sampling_settings(loaded, flags={"max_new_tokens": 5 + (i * 11) % 40, "temperature": 0})
        out[i] = "".join(inference_cmd.stream(loaded, p, s))
    return out


def _body(i: int, **extra) -> dict:
    return {"model": "tiny", "prompt": PROMPTS[i], "max_tokens": 5 + (i * 11) % 40, "temperature": 0, **extra}


# ------------------------------------------------------------------------------------------------------------------
# The API with the openai client


def test_openai_client_completions_chat_streaming_and_models(server, alone):
    c = server.client()
    r = c.completions.create(**_body(3))
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-") and r.created > 0
    assert r.choices[0].text == alone[3] and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens == len(alone[3]) and r.usage.prompt_tokens == len(PROMPTS[3])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    pieces = [ch.choices[0].text for ch in c.completions.create(**_body(3), stream=True)]
    assert "".join(pieces) == alone[3] and len(pieces) > 2  # streamed piece by piece
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Who art thou?"}],
                                     max_tokens=12, temperature=0, extra_body={"truncate": True})  # 32-token context
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].message.content) > 0 and chat.usage.completion_tokens <= 12
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                                    {"role": "user", "content": "Who art thou?"}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"truncate": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens and not chunks[-1].choices
    assert [m.id for m in c.models.list()] == ["tiny"]
    # stop strings end the text before them
    cut = alone[3][4:7]
    r = c.completions.create(**_body(3), stop=[cut])
    assert r.choices[0].text == alone[3][: alone[3].index(cut)] and r.choices[0].finish_reason == "stop"
    # a seeded sample is reproducible; a list of prompts gets one choice each, in order
    a = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=1.0, seed=5)
    b = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=1.0, seed=5)
    assert a.choices[0].text == b.choices[0].text
    both = c.completions.create(model="tiny", prompt=[PROMPTS[1], PROMPTS[2]], max_tokens=16, temperature=0)
    assert [x.index for x in both.choices] == [0, 1]
    assert [x.text for x in both.choices] == [alone[1][:16], alone[2][:16]]  # (1: 16 tokens; 2: the first 16 of 27)


def test_health_needs_no_key_and_metrics_count_requests(server):
    h = httpx.get(server.url + "/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["slots"] == 16
    before = server.metrics()
    server.post("/v1/completions", _body(0))
    m = server.metrics()
    done = 'llmctl_requests_total{endpoint="/v1/completions",status="200"}'
    assert m[done] == before.get(done, 0) + 1
    assert m["llmctl_generation_tokens_total"] > before.get("llmctl_generation_tokens_total", 0)
    assert m["llmctl_busy_slots"] == 0 and m["llmctl_queue_depth"] == 0 and m["llmctl_slots"] == 16
    assert m["llmctl_time_to_first_token_seconds_count"] >= 1
    assert 'llmctl_time_per_output_token_seconds_bucket{le="+Inf"}' in m


ERRORS = [
    # (id, path, body, headers, status, param, words)
    ("malformed-json", "/v1/completions", b'{"prompt": ', {}, 400, None, ["not valid JSON"]),
    ("not-an-object", "/v1/completions", b"[1, 2]", {}, 400, None, ["JSON object"]),
    ("missing-prompt", "/v1/completions", {"max_tokens": 3}, {}, 400, "prompt", ["'prompt' is required"]),
    ("wrong-type", "/v1/completions", {"prompt": "a", "max_tokens": "ten"}, {}, 400, "max_tokens",
     ["'max_tokens' must be an integer (got 'ten')"]),
    ("temperature-type", "/v1/completions", {"prompt": "a", "temperature": "hot"}, {}, 400, "temperature",
     ["'temperature' must be a number"]),
    ("prompt-too-long", "/v1/completions", {"prompt": "x" * 50}, {}, 400, "prompt",
     ["50 tokens", "context is 32 tokens", "truncate"]),
    ("max-tokens-over-limit", "/v1/completions", {"prompt": "a", "max_tokens": 5000}, {}, 400, "max_tokens",
     ["5000", "limit of 4096", "serve.max_tokens"]),
    ("n-zero", "/v1/completions", {"prompt": "a", "n": 0}, {}, 400, "n", ["'n' must be an integer from 1 to 16"]),
    ("n-over-the-slots", "/v1/completions", {"prompt": "a", "n": 17}, {}, 400, "n", ["1 to 16 (serve.slots)"]),
    ("logprobs-21", "/v1/completions", {"prompt": "a", "logprobs": 21}, {}, 400, "logprobs",
     ["'logprobs' must be an integer from 0 to 20 (got 21)"]),
    ("chat-top-logprobs-21", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21}, {}, 400,
     "top_logprobs", ["from 0 to 20"]),
    ("chat-top-logprobs-without-logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, {}, 400, "top_logprobs",
     ["goes with \"logprobs\": true"]),
    ("echo-streamed", "/v1/completions", {"prompt": "a", "echo": True, "stream": True}, {}, 400, "echo",
     ["not supported with \"stream\": true"]),
    ("best-of", "/v1/completions", {"prompt": "a", "best_of": 3}, {}, 400, "best_of", ["not supported"]),
    ("max-tokens-0-without-echo", "/v1/completions", {"prompt": "a", "max_tokens": 0}, {}, 400, "max_tokens",
     ["at least 1"]),
    ("logit-bias-outside-the-vocab", "/v1/completions", {"prompt": "a", "logit_bias": {"100000": 5}}, {}, 400,
     "logit_bias", ["'logit_bias' names token id 100000, outside the model's vocabulary"]),
    ("logit-bias-value", "/v1/completions", {"prompt": "a", "logit_bias": {"5": -101}}, {}, 400, "logit_bias",
     ["'logit_bias' values must be numbers between -100 and 100"]),
    ("bad-messages", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "a"}]}, {}, 400,
     "messages", ["messages[0]", "role"]),
    ("chat-ends-with-assistant", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, {}, 400, "messages",
     ["last message must be the user's"]),
    ("tools-without-a-template-that-takes-them", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     {}, 400, "tools", ["tools: this model has no chat template of its own"]),
    ("tool-choice-required", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "tool_choice": "required"}, {}, 400, "tool_choice",
     ["'tool_choice' 'required' is not supported"]),
    ("legacy-functions", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "functions": [{"name": "f"}]}, {}, 400, "functions",
     ["'functions' is not supported"]),
    ("unknown-model", "/v1/completions", {"model": "gpt-5", "prompt": "a"}, {}, 404, "model",
     ["'gpt-5' does not exist", "'tiny'"]),
    ("no-key", "/v1/completions", {"prompt": "a"}, {"Authorization": ""}, 401, None, ["no API key given"]),
    ("wrong-key", "/v1/completions", {"prompt": "a"}, {"Authorization": "Bearer nope"}, 401, None,
     ["the API key is wrong"]),
    ("wrong-key-models", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, None, ["API key is wrong"]),
    ("classify-on-a-language-model", "/v1/classify", {"input": ["a"]}, {}, 404, None, ["not a classifier"]),
    ("unknown-endpoint", "/v1/engines", {"prompt": "a"}, {}, 404, None, ["no such endpoint"]),
    ("response-format-unknown-type", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "xml"}}, {}, 400,
     "response_format", ["response_format type must be one of text, json_object, json_schema (got 'xml')"]),
    ("response-format-without-a-schema", "/v1/completions",
     {"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, {}, 400,
     "response_format", ["json_schema needs a \"schema\" object"]),
    # a schema xgrammar cannot compile; without the structured extra, the same request names the extra
    ("response-format-schema-that-cannot-compile", "/v1/completions",
     {"prompt": "a", "response_format": {"type": "json_schema",
                                         "json_schema": {"name": "x", "schema": {"type": "foo"}}}}, {}, 400,
     "response_format",
     ["response_format: the schema cannot be compiled", 'Unsupported type "foo"']
     if importlib.util.find_spec("xgrammar") else ["xgrammar", "llmctl[structured]"]),
]


OPENAI_NAME = {"max_new_tokens": "max_tokens"}  # the sampling fields whose OpenAI name differs
# the bad values every surface refuses by the same rule (tests/test_sampling.py has the others), under OpenAI's names
ERRORS += [(f"sampling-{f}", "/v1/completions", {"prompt": "a", OPENAI_NAME.get(f, f): v}, {}, 400,
            OPENAI_NAME.get(f, f), [f"'{OPENAI_NAME.get(f, f)}' {words}"]) for f, v, words in BAD_SAMPLING]
ERRORS += [("sampling-chat-max-completion-tokens", "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 0, "max_tokens": 5}, {}, 400,
            "max_completion_tokens", ["'max_completion_tokens' must be at least 1 (got 0)"])]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_requests_get_openai_error_json(server, case):
    _, path, body, headers, status, param, words = case
    r = server.get(path, headers=headers) if body is None else server.post(path, body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    for w in words:
        assert w in err["message"], (w, err)
    assert server.get("/health").status_code == 200  # the server never dies from a request


def test_temperature_3_and_top_k_minus_1_are_accepted_as_everywhere_else(server):
    r = server.post("/v1/completions", {"prompt": "a", "max_tokens": 3, "temperature": 3, "top_k": -1, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3


def test_truncate_keeps_the_last_tokens_of_a_long_prompt(server, alone):
    long = "x" * 40 + PROMPTS[5]
    r = server.post("/v1/completions", {**_body(5), "prompt": long, "truncate": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 32


def test_the_openai_client_raises_its_own_errors(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError, match="context is 32 tokens"):
        c.completions.create(model="tiny", prompt="x" * 50)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="other", prompt="a")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0).models.list()


# ------------------------------------------------------------------------------------------------------------------
# Continuous batching


async def _concurrent(server: Server, bodies: list[dict], max_delay: float = 1.0, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    delays = [rng.uniform(0, max_delay) for _ in bodies]
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=300,
                                 limits=httpx.Limits(max_connections=100)) as client:
        async def one(body, delay):
            await asyncio.sleep(delay)
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()
        return await asyncio.gather(*(one(b, d) for b, d in zip(bodies, delays)))


def test_concurrent_greedy_requests_equal_each_prompt_alone(server, alone):
    got = asyncio.run(_concurrent(server, [_body(i) for i in range(32)]))
    assert [g["choices"][0]["text"] for g in got] == [alone[i] for i in range(32)]


def test_a_repeated_prompt_starts_from_the_prefix_cache_and_answers_the_same(server, alone):
    i = next(i for i, p in enumerate(PROMPTS) if len(p) > 17)  # (characters: more than one 16-token block)
    before = server.metrics()
    for _ in range(2):
        assert server.post("/v1/completions", _body(i)).json()["choices"][0]["text"] == alone[i]
    m = server.metrics()
    assert m["llmctl_prefix_cache_hits_total"] >= before["llmctl_prefix_cache_hits_total"] + 1
    assert m["llmctl_prefix_cache_hit_tokens_total"] >= before["llmctl_prefix_cache_hit_tokens_total"] + 16
    assert m["llmctl_prefix_cache_lookups_total"] >= before["llmctl_prefix_cache_lookups_total"] + 2
    assert m["llmctl_prefix_cache_blocks"] >= 1
    assert 0 < m["llmctl_prefix_cache_bytes"] <= m["llmctl_prefix_cache_budget_bytes"] == 512 << 20


def test_concurrent_greedy_requests_equal_alone_with_the_compiled_step(tiny_run, key_file, alone):
    with Server(tiny_run, "--dtype", "float32", "--compile", "--set", "serve.slots=4", key_file=key_file,
                timeout=600) as s:
        assert "compiled decode step" in "".join(s.lines)
        got = asyncio.run(_concurrent(s, [_body(i) for i in range(32)], seed=1))
        assert [g["choices"][0]["text"] for g in got] == [alone[i] for i in range(32)]
        assert s.stop() == 0


def test_prompt_lookup_drafts_keep_greedy_outputs_and_count_their_acceptance(tiny_run, key_file, alone):
    # one request at a time is drafted for (the rows slide past the 32-token context too); concurrent ones decode
    # batched, and rows pass from one kind of step to the other as requests come and go: every text stays the same
    with Server(tiny_run, "--dtype", "float32", "--no-compile", "--draft", "prompt-lookup", key_file=key_file) as s:
        assert "draft prompt-lookup" in "".join(s.lines)
        for i in range(8):
            assert s.post("/v1/completions", _body(i)).json()["choices"][0]["text"] == alone[i]
        m = s.metrics()
        drafted, kept = m["llmctl_draft_tokens_total"], m["llmctl_draft_accepted_tokens_total"]
        assert 0 < kept <= drafted and m["llmctl_draft_forwards_total"] > 0
        assert m["llmctl_draft_acceptance_rate"] == pytest.approx(kept / drafted, abs=1e-9)
        got = asyncio.run(_concurrent(s, [_body(i) for i in range(8, 24)], seed=2))
        assert [g["choices"][0]["text"] for g in got] == [alone[i] for i in range(8, 24)]
        sampled = s.post("/v1/completions", _body(3, temperature=0.9, seed=1))  # sampled rows decode plainly
        assert sampled.status_code == 200 and s.metrics()["llmctl_draft_tokens_total"] >= drafted
        assert s.stop() == 0


def test_infer_cli_equals_the_in_process_reference(tiny_run, alone):
    for i in (0, 7):
        r = subprocess.run([sys.executable, "-m", "llmctl", "infer", "--ckpt", str(tiny_run), "--prompt", PROMPTS[i],
                            "--temperature", "0", "--dtype", "float32", "-n", str(5 + (i * 11) % 40), "--json"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["completion"] == alone[i]


def test_a_request_arriving_while_others_decode_starts_before_they_finish(server):
    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=300) as client:
            finished = {}

            async def one(name, body, delay=0.0):
                await asyncio.sleep(delay)
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 200
                finished[name] = time.perf_counter()

            longs = [one(f"long{i}", {"prompt": "A", "max_tokens": 1500, "temperature": 0}) for i in range(3)]
            await asyncio.gather(*longs, one("short", {"prompt": "B", "max_tokens": 3, "temperature": 0}, 0.5))
            return finished

    finished = asyncio.run(go())
    assert finished["short"] < min(finished[f"long{i}"] for i in range(3))


# ------------------------------------------------------------------------------------------------------------------
# Limits, faults and signals


@pytest.fixture(scope="module")
def small(tiny_run):
    with Server(tiny_run, "--no-compile", "--set", "serve.slots=1", "--set", "serve.max_queue=1", "--set",
                "serve.max_body_bytes=4096", "--set", "serve.max_tokens=1000000", "--set",
                "serve.request_timeout=4", "--set", "serve.prefix_cache=false") as s:
        yield s
        assert s.stop() == 0


def _wait(cond, timeout=20.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_body_over_the_limit_is_413(small):
    r = small.post("/v1/completions", {"prompt": "a" * 5000})
    assert r.status_code == 413 and "limit of 4096" in r.json()["error"]["message"]
    chunked = httpx.post(small.url + "/v1/completions", content=iter([b'{"prompt": "', b"a" * 5000, b'"}']),
                         timeout=30)  # no Content-Length: counted as it arrives
    assert chunked.status_code == 413


def test_queue_full_is_429_with_retry_after_and_a_stream_that_goes_away_frees_its_slot(small):
    with httpx.stream("POST", small.url + "/v1/completions", timeout=60,
                      json={"prompt": "A", "max_tokens": 100000, "temperature": 0, "stream": True}) as first:
        lines = first.iter_lines()
        assert next(lines).startswith("data: ")  # decoding in the only slot
        waiting = threading.Thread(target=lambda: small.post("/v1/completions", {"prompt": "B", "max_tokens": 2}))
        waiting.start()  # takes the one queue place
        assert _wait(lambda: small.metrics()["llmctl_queue_depth"] == 1)
        r = small.post("/v1/completions", {"prompt": "C", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    # the client closed the stream: its slot is freed, the waiting request runs, the server is idle again
    waiting.join(30)
    assert _wait(lambda: small.metrics()["llmctl_busy_slots"] == 0 and small.metrics()["llmctl_queue_depth"] == 0)


def test_a_request_over_the_timeout_is_504(small):
    r = small.post("/v1/completions", {"prompt": "A", "max_tokens": 1000000, "temperature": 0})
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert _wait(lambda: small.metrics()["llmctl_busy_slots"] == 0)
    assert not [k for k in small.metrics() if "prefix" in k]  # serve.prefix_cache=false: no cache to count


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(tiny_run):
    with Server(tiny_run, "--no-compile", "--set", "serve.drain_timeout=300") as s:
        _drain(s)


def _drain(s: Server) -> None:
    out = {}
    t = threading.Thread(target=lambda: out.update(r=s.post("/v1/completions", {"prompt": "A", "max_tokens": 1500,
                                                                                "temperature": 0})))
    t.start()
    assert _wait(lambda: s.metrics()["llmctl_busy_slots"] == 1)
    assert s.stop(signal.SIGTERM) == 0
    t.join(30)
    assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] == 1500
    assert any("stopping: finishing 1 request(s) in flight" in x for x in s.lines)
    with pytest.raises(httpx.ConnectError):  # no longer listening
        httpx.get(s.url + "/health", timeout=5)


def test_a_second_signal_exits_at_once(tiny_run):
    with Server(tiny_run, "--no-compile", "--set", "serve.drain_timeout=600", "--set", "serve.max_tokens=1000000") as s:
        _force(s)


def _force(s: Server) -> None:
    t = threading.Thread(target=lambda: _ignore(lambda: s.post("/v1/completions", {"prompt": "A", "temperature": 0,
                                                                                   "max_tokens": 1000000},
                                                               timeout=120)))
    t.start()
    assert _wait(lambda: s.metrics()["llmctl_busy_slots"] == 1)
    s.p.send_signal(signal.SIGTERM)
    assert _wait(lambda: any("stopping" in x for x in s.lines))
    start = time.time()
    assert s.stop(signal.SIGINT, timeout=30) == 130 and time.time() - start < 10
    assert any("stopped at once by a second SIGINT" in x for x in s.lines)
    assert not any("Traceback" in x for x in s.lines)


def _ignore(fn):
    try:
        fn()
    except httpx.HTTPError:
        pass


def test_load_with_disconnects_leaves_the_server_idle_and_its_memory_flat(tiny_run):
    """500 requests from 32 concurrent clients; a quarter stream and hang up at a random point."""
    with Server(tiny_run, "--no-compile") as s:
        _load_and_faults(s)


def _load_and_faults(s: Server) -> None:
    rng = random.Random(0)
    plan = [(rng.random() < 0.25, rng.randint(1, 30), rng.randint(5, 60)) for _ in range(500)]
    rss = {}

    async def go():
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=s.url, timeout=300, limits=httpx.Limits(max_connections=64)) as c:
            async def one(i, hang_up, after, n):
                async with sem:
                    body = {"prompt": PROMPTS[i % 32], "max_tokens": n, "temperature": 0.8, "seed": i}
                    if hang_up:
                        async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                            seen = 0
                            async for line in r.aiter_lines():
                                seen += line.startswith("data: ")
                                if seen >= min(after, n):
                                    break
                        return None
                    r = await c.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    res = r.json()
                    reason, used = res["choices"][0]["finish_reason"], res["usage"]["completion_tokens"]
                    assert (reason == "length" and used == n) or (reason == "stop" and used < n), res
                    assert res["object"] == "text_completion" and res["id"].startswith("cmpl-")
                    return res

            first = await asyncio.gather(*(one(i, *plan[i]) for i in range(50)))
            rss["first50"] = s.rss()
            rest = await asyncio.gather(*(one(i, *plan[i]) for i in range(50, 500)))
            return first + rest

    results = asyncio.run(go())
    answered = [r for r in results if r is not None]
    assert len(answered) == sum(not p[0] for p in plan) and all(r["choices"][0]["text"] is not None
                                                                for r in answered)
    assert _wait(lambda: s.metrics()["llmctl_busy_slots"] == 0 and s.metrics()["llmctl_queue_depth"] == 0)
    assert s.rss() <= 1.10 * rss["first50"], (s.rss(), rss["first50"])
    assert s.stop() == 0


def test_a_classifier_serves_classify_only(tiny_run, tmp_path):
    from llmctl import loading
    from llmctl.commands import inference as inference_cmd
    from llmctl.commands import training as training_cmd

    data = tmp_path / "train.tsv"
    data.write_text("label\tsentence\n" + "".join(f"{i % 2}\tword {i}\n" for i in range(40)))
    out = tmp_path / "cls"
    training_cmd.finetune(None, ["finetune.task=classification", f"data.path={data}", "data.text_column=sentence",
                             "train.max_steps=2", "train.dtype=float32"], tiny_run, out)
    want = inference_cmd.classify_texts(loading.load_model(out), ["word 3", "word 4"])
    with Server(out) as s:
        r = s.post("/v1/classify", {"input": ["word 3", "word 4"]})
        assert r.status_code == 200, r.text
        got = r.json()["data"]
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert all(abs(g["probabilities"][k] - w["probabilities"][k]) < 1e-5 for g, w in zip(got, want)
                   for k in w["probabilities"])
        r = s.post("/v1/completions", {"prompt": "a"})
        assert r.status_code == 404 and "is a classifier" in r.json()["error"]["message"]
        assert s.post("/v1/classify", {"input": []}).status_code == 400
        assert s.stop() == 0


def test_serve_without_the_extra_is_one_line(runner, tiny_run, monkeypatch):
    from conftest import invoke

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    r = invoke(runner, "serve", "--ckpt", tiny_run)
    assert r.exit_code == 2 and "needs the serve extra" in r.stderr and "pip install 'llmctl[serve]'" in r.stderr
    assert "Traceback" not in r.output
    assert os.environ.get("LLMCTL_CACHE_DIR")


# ------------------------------------------------------------------------------------------------------------------
# logprobs, echo, n, penalties: what lm-eval's local-completions and other clients send


def test_echo_logprobs_equal_llmct_evals_per_token_loglikelihoods(server, tiny_run):
    pytest.importorskip("lm_eval")
    from llmctl import loading
    from llmctl.harness import make_lm

    loaded = loading.for_inference(loading.load_model(tiny_run), "float32", "none", compile=False)
    lm = make_lm(loaded, 4)
    ids = [loaded.tokenizer.encode(p) for p in PROMPTS[3:7]]
    ids = [x for x in ids if len(x) >= 2]
    # lm-eval's own request: token ids, one generated token, echo, logprobs 1, greedy
    r = server.post("/v1/completions", {"prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True,
                                        "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == len(ids)
    for x, ch in zip(ids, choices):
        lp = ch["logprobs"]
        assert len(lp["token_logprobs"]) == len(x) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(lp["text_offset"]) == len(x) + 1
        want = [s for s, _ in lm._loglikelihood_tokens([(None, x[:i], [x[i]]) for i in range(1, len(x))])]
        assert lp["token_logprobs"][1:-1] == pytest.approx(want, abs=1e-4)
        # greedy: the generated token is the top alternative; the text is the prompt's, then the completion's
        last = lp["top_logprobs"][-1]
        assert len(last) == 1 and list(last.values())[0] == pytest.approx(lp["token_logprobs"][-1], abs=1e-6)
        assert ch["text"].startswith("".join(lp["tokens"][: len(x)]))
        assert lp["text_offset"][1] == len(lp["tokens"][0])
    # max_tokens 0 with echo: the prompt scored, nothing generated
    r = server.post("/v1/completions", {"prompt": ids[0], "max_tokens": 0, "logprobs": 3, "echo": True})
    assert r.status_code == 200, r.text
    body = r.json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids[0]) and body["usage"]["completion_tokens"] == 0
    assert lp["token_logprobs"][1:] == pytest.approx(choices[0]["logprobs"]["token_logprobs"][1:-1], abs=1e-6)
    assert all(len(t) == 3 for t in lp["top_logprobs"][1:])


def test_n_choices_greedy_identical_seeded_different_and_reproducible(server):
    c = server.client()
    same = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=0, n=4)
    assert [x.index for x in same.choices] == [0, 1, 2, 3] and len({x.text for x in same.choices}) == 1
    assert same.usage.prompt_tokens == len(PROMPTS[2])  # the prompt counted once
    a = c.completions.create(model="tiny", prompt=["ROMEO:", "JULIET:"], max_tokens=16, temperature=1.0, seed=7, n=4)
    b = c.completions.create(model="tiny", prompt=["ROMEO:", "JULIET:"], max_tokens=16, temperature=1.0, seed=7, n=4)
    assert len(a.choices) == 8 and [x.text for x in a.choices] == [x.text for x in b.choices]
    assert len({x.text for x in a.choices[:4]}) == 4
    # choice 0 of a seeded request is the request with n=1 and that seed
    one = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=16, temperature=1.0, seed=7)
    assert one.choices[0].text == a.choices[0].text
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Who art thou?"}],
                                     max_tokens=6, temperature=1.0, seed=3, n=3, logprobs=True, top_logprobs=2,
                                     extra_body={"truncate": True}, user="u1", metadata={"k": "v"}, store=False,
                                     service_tier="auto", tool_choice="none",
                                     tools=[{"type": "function", "function": {"name": "f"}}])
    assert len(chat.choices) == 3 and len({x.message.content for x in chat.choices}) > 1
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content).startswith(chat.choices[0].message.content)


def test_streamed_logprobs_equal_the_whole_answers(server):
    body = {"prompt": PROMPTS[4], "max_tokens": 12, "temperature": 0, "logprobs": 2, "stop": ["\n\n"]}
    whole = server.post("/v1/completions", body).json()["choices"][0]
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=server.headers,
                      timeout=60) as r:
        chunks = [json.loads(x[6:])["choices"][0] for x in r.iter_lines() if x.startswith("data: {")]
    got = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ch in chunks:
        for k, v in (ch["logprobs"] or {}).items():
            got[k] += v
    assert "".join(ch["text"] for ch in chunks) == whole["text"] and chunks[-1]["finish_reason"]
    assert got["tokens"] == whole["logprobs"]["tokens"] and got["text_offset"] == whole["logprobs"]["text_offset"]
    assert got["token_logprobs"] == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-6)
    assert [list(t) for t in got["top_logprobs"]] == [list(t) for t in whole["logprobs"]["top_logprobs"]]
    c = server.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Who art thou?"}], max_tokens=8, temperature=0,
              logprobs=True, top_logprobs=2, extra_body={"truncate": True})
    want = c.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [t for ch in c.chat.completions.create(**kw, stream=True) for x in ch.choices
                for t in (x.logprobs.content if x.logprobs else [])]
    assert [t.token for t in streamed] == [t.token for t in want] and len(want) > 1
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in want], abs=1e-6)


def test_penalties_and_logit_bias_reach_the_engine(server, tiny_run):
    from llmctl import loading
    from llmctl.commands import inference as inference_cmd

    loaded = loading.for_inference(loading.load_model(tiny_run), "float32", "none", compile=False)
    for extra in ({"presence_penalty": 1.5}, {"frequency_penalty": 2.0, "logit_bias": {"5": 3.0}},
                  {"logit_bias": {str(loaded.tokenizer.encode("e")[0]): 100}}):
        s = inference_cmd.sampling_settings(loaded, flags={"max_new_tokens": 12, "temperature": 0, **extra})
        want = "".join(inference_cmd.stream(loaded, PROMPTS[5], s))
        r = server.post("/v1/completions", {"prompt": PROMPTS[5], "max_tokens": 12, "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
    assert want == "e" * 12  # (a bias of 100 all but forces the token)
