#!/usr/bin/env python
"""Serving throughput: `llmctl serve` (continuous batching) against one request at a time and the offline ceiling.

For each model and each number of concurrent clients C, in interleaved rounds (the median is reported):
  - serve:    `llmctl serve` with its default serve.slots (16); C clients from one asyncio load generator, each
              sending streamed requests of a 16-token prompt and 128 new tokens back to back for a fixed time;
  - one-at-a-time: the same server with serve.slots=1, which serves one request at a time (what litgpt serve does);
  - offline:  `llmctl infer --input`'s code (commands.inference.complete_rows) on min(C, 16) rows at once, timed
              inside its process (no HTTP, no load generator): the ceiling for that batch size.
The load generator speaks HTTP/1.1 over raw asyncio streams (`--client raw`, the default): on two shared cores every
percent it takes is lost to the server, and httpx (`--client httpx`, what the openai package runs on) takes about
four times as much. Reported: generated tokens/s over the window (tokens that arrived in it), time to first token
p50/p99 (of requests whose first token arrived in the window; `waiting` counts those still without one at its end),
inter-token latency p50/p99 (gaps between a request's streamed pieces), requests completed in the window (and how
many of them ended before max_tokens), and the load generator's own CPU use (it runs on the same cores as the server).

With --llama-server PATH (llama.cpp's C++ server, built by scripts/build_llama_server.sh), the GPT-2 shape is also
exported with `llmctl export --format gguf` (f32 and q8_0) and served by llama-server (--slots parallel slots,
continuous batching, threads = cores, a KV cache of slots x context tokens) beside `llmctl serve` at the closest
precision (float32 vs f32, int8 vs q8_0), all four servers up at once and measured in turn for every (round,
clients): the same load generator and requests (streamed /v1/completions, token-id prompts), exactly 128 new tokens
on both sides (llama-server: ignore_eos; llmctl: its end ids banned by logit_bias), and each server's CPU use over
the window (its process CPU time / wall time; 100 = one core). Rows under the model's "vs_llama_server".

Models: a GPT-2-124M shape (random weights from one seed, 12x768, context 1024, and a 50257-token vocabulary: a BPE
tokenizer trained on Tiny Shakespeare padded with added tokens, so every id decodes), made with `llmctl pretrain`
for one step; and the model of configs/shakespeare-bpe.yaml (--bpe RUN, trained beforehand). Both at llmctl's
default precision (int8 for the GPT-2 shape on an x86 CPU, float32 for the small one, with its compiled step).

    python scripts/bench_serve.py --bpe runs/shakespeare-bpe           # about 15 minutes on 2 cores
    python scripts/bench_serve.py --bpe runs/shakespeare-bpe --clients 1,16 --seconds 10 --rounds 1   # a quick look
    python scripts/bench_serve.py --llama-server /work/peers/llama.cpp-build/bin/llama-server --peer-only \
        --seconds 12 --rounds 2                                        # llmctl serve vs llama-server
    python scripts/bench_serve.py --llama-server PATH --quick         # a smoke run of the script (under a minute)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PROMPT_TOKENS, NEW_TOKENS = 16, 128
GPT2 = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768", "model.block_size=1024",
        "model.activation=gelu_tanh", "model.vocab_size=50304", "train.batch_size=1", "train.max_steps=1",
        "train.eval_batches=1", "train.warmup_steps=0", "train.dtype=float32", "generate.compile=false"]
GPT2_TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=256"]  # later --set wins

try:
    import httpx2 as httpx  # what the openai package is built on (openai 3.x)
except ImportError:  # older installs
    import httpx


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def make_gpt2(work: Path, tiny: bool = False) -> Path:
    """A GPT-2-124M-shaped checkpoint with a 50257-token vocabulary, trained for one step; `tiny`: the same
    flavour at 2x64 with the 4096-token BPE vocabulary and a 256-token context (`--quick`)."""
    run = work / ("gpt2-tiny" if tiny else "gpt2-124M")
    if (run / "latest").exists():
        return run
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe([DATA.read_text()], 4096)
    have = tok.vocab_size
    if not tiny:
        tok.tk.add_tokens([f"<x{i}>" for i in range(50257 - have)])  # every id of the 50257 decodes to some text
    tok_path = work / ("gpt2-tiny-tokenizer.json" if tiny else "gpt2-tokenizer.json")
    tok.save(tok_path)
    shape = GPT2 + (GPT2_TINY + [f"model.vocab_size={tok.vocab_size}"] if tiny else [])
    sets = [a for s in shape + [f"tokenizer.path={tok_path}", f"data.path={DATA}"] for a in ("--set", s)]
    subprocess.run([sys.executable, "-m", "llmctl", "pretrain", *sets, "--out", str(run), "--quiet"], check=True,
                   env=_env())
    return run


class Server:
    def __init__(self, ckpt: Path, *args: str):
        if "--compile" not in args and "--no-compile" not in args:
            # the GPT-2 checkpoints made here say generate.compile=false (their one-step pretrain builds no step):
            # serve at llmctl's default, auto (cached compiled steps; on a CPU, traced one-row steps)
            args = (*args, "--set", "generate.compile=auto")
        cmd = [sys.executable, "-m", "llmctl", "serve", "--ckpt", str(ckpt), "--port", "0", *args]
        self.p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env())
        self.lines: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.p.stderr:
                self.lines.append(line)
                if line.startswith("serving "):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(900)
        m = [re.search(r" at (http://\S+)/v1 ", x) for x in self.lines]
        m = [x for x in m if x]
        if not m:
            raise SystemExit("server did not start:\n" + "".join(self.lines))
        self.url = m[0].group(1)
        self.ready_line = next(x for x in self.lines if x.startswith("serving ")).strip()

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(120)


def prompts(ckpt: Path, n: int) -> list[list[int]]:
    """n prompts of exactly PROMPT_TOKENS token ids, from Tiny Shakespeare."""
    from llmctl import loading

    tok = loading.load_model(ckpt, "cpu").tokenizer
    text = DATA.read_text()
    out = []
    for i in range(n):
        ids = tok.encode(text[i * 997 : i * 997 + 400])
        out.append(ids[:PROMPT_TOKENS])
    return out


async def stream_events(host: str, port: int, body: dict):
    """One streamed completion over a raw HTTP/1.1 connection (asyncio streams): the lightest client there is in
    Python, so the load generator takes as little as it can of the cores it shares with the server. Yields the
    arrival time and bytes of each server-sent `data: {...}` event and reads the chunked body by hand."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        payload = json.dumps(body).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (host.encode(), len(payload))
                     + payload)
        status = await reader.readline()
        if b" 200 " not in status:
            raise ConnectionError(status.decode(errors="replace").strip())
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            chunked |= line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
        buf = b""
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    return
                data = await reader.readexactly(size + 2)
                buf += data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    return
                buf += data
            *events, buf = buf.split(b"\n\n")
            for e in events:
                if e.startswith(b"data: {"):
                    yield time.perf_counter(), e
    finally:
        writer.close()


async def _load_raw(url: str, clients: int, seconds: float, ps: list[list[int]], fields: dict | None = None) -> dict:
    host, port = url.split("//")[1].rsplit(":", 1)

    async def one(body: dict, deadline: float, seen) -> None:
        async for now, event in stream_events(host, int(port), body):
            if now >= deadline:
                return  # hang up: the window is over (the server frees the slot)
            seen(now, event)

    return await _window(clients, seconds, ps, one, (ConnectionError, OSError, asyncio.IncompleteReadError), fields)


async def _load_httpx(url: str, clients: int, seconds: float, ps: list[list[int]], fields: dict | None = None) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=clients + 8)) as c:
        async def one(body: dict, deadline: float, seen) -> None:
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    now = time.perf_counter()
                    if now >= deadline:
                        return
                    if line.startswith("data: {"):
                        seen(now, line.encode())

        return await _window(clients, seconds, ps, one, (httpx.HTTPError,), fields)


USAGE = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


def event_tokens(event: bytes) -> tuple[int, int | None]:
    """(tokens the streamed event carries, the request's completion_tokens if the event reports usage). A text piece
    counts one token (llmctl and llama-server both hold back a token whose text is incomplete UTF-8 and send it
    with the next, so usage settles the count at the end); a choice's closing piece (empty text) and a usage-only
    chunk count none. Byte checks, no JSON parsing: the load generator shares the server's cores."""
    m = USAGE.search(event) if b'"usage"' in event else None
    used = int(m.group(1)) if m else None
    if b'"text": ""' in event or b'"text":""' in event or b'"choices": []' in event or b'"choices":[]' in event:
        return 0, used
    return 1, used


def pct(values: list[float], q: float):
    """The q-quantile of sorted values (nearest rank below), None when empty."""
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


async def _window(clients: int, seconds: float, ps: list[list[int]], one, errors: tuple,
                  fields: dict | None = None) -> dict:
    """C clients streaming back-to-back requests for `seconds` through `one(body, deadline, seen)`; tokens counted
    as they arrive in the window (`event_tokens`). `fields` change the request body (scripts/bench_structured.py
    sends sampled and constrained requests; the llama-server comparison bans the end tokens). Inter-token latency:
    the gaps between a request's successive text events."""
    start = time.perf_counter()
    deadline = start + seconds
    tokens, ttft, itl, waiting, done = [0], [], [], [0], []
    cpu0 = time.process_time()

    async def client(k: int) -> None:
        n = k
        while time.perf_counter() < deadline:
            body = {"prompt": ps[n % len(ps)], "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, **(fields or {})}
            n += clients
            sent, first, last, got = time.perf_counter(), [None], [0.0], [0]

            def seen(now: float, event: bytes) -> None:
                k, used = event_tokens(event)
                if used is not None:  # the request's end: count the tokens no event stood for
                    done.append(used)
                    k = max(k, used - got[0])
                    tokens[0] += k
                    return
                if not k:
                    return
                if first[0] is None:
                    first[0] = now
                    ttft.append(now - sent)
                else:
                    itl.append(now - last[0])
                last[0] = now
                got[0] += k
                tokens[0] += k

            try:
                await one(body, deadline, seen)
            except errors:
                pass
            if first[0] is None and time.perf_counter() >= deadline:
                waiting[0] += 1

    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    ttft.sort()
    itl.sort()
    want = (fields or {}).get("max_tokens", NEW_TOKENS)
    return {"tokens_per_s": tokens[0] / seconds, "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "itl_p50_s": pct(itl, 0.5), "itl_p99_s": pct(itl, 0.99), "first_tokens": len(ttft),
            "waiting_at_end": waiting[0], "completed": len(done), "completed_short": sum(u < want for u in done),
            "load_generator_cpu_pct": 100 * (time.process_time() - cpu0) / wall}


LOADERS = {"raw": _load_raw, "httpx": _load_httpx}


OFFLINE = r"""
import json, sys, time
from llmctl.commands import inference as inference_cmd
from llmctl import loading
ckpt, batch, compile_ = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ps = json.loads(sys.stdin.read())
compile_ = {"auto": None, "true": True, "false": False}[compile_]
loaded = loading.for_inference(loading.load_model(ckpt), compile=compile_)
tok = loaded.tokenizer
rows = [{"prompt": tok.decode(p)} for p in ps[: 2 * batch]]
s = inference_cmd.sampling_settings(loaded, flags={"max_new_tokens": %d, "temperature": 0})
inference_cmd.complete_rows(loaded, rows[:batch], s, batch_size=batch)  # warm-up
t = time.perf_counter()
out = inference_cmd.complete_rows(loaded, rows, s, batch_size=batch)
wall = time.perf_counter() - t
print(json.dumps({"tokens_per_s": sum(r["completion_tokens"] for r in out) / wall}))
""" % NEW_TOKENS


def offline(ckpt: Path, batch: int, ps: list[list[int]], compile_: str) -> dict:
    r = subprocess.run([sys.executable, "-c", OFFLINE, str(ckpt), str(batch), compile_], input=json.dumps(ps),
                       capture_output=True, text=True, env=_env(), timeout=1800)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _median(rows: list[dict], key: str):
    vals = [x[key] for x in rows if x.get(key) is not None]
    return round(statistics.median(vals), 4) if vals else None


def bench_model(name: str, ckpt: Path, clients: list[int], seconds: float, rounds: int, extra: list[str],
                compile_: str, load=_load_raw) -> dict:
    ps = prompts(ckpt, 256)
    cont = Server(ckpt, *extra)
    single = Server(ckpt, *extra, "--set", "serve.slots=1")
    print(f"{name}: {cont.ready_line}", file=sys.stderr, flush=True)
    runs: dict = {c: {"serve": [], "one_at_a_time": [], "offline": []} for c in clients}
    try:
        asyncio.run(load(cont.url, 2, 3, ps))  # warm both servers up
        asyncio.run(load(single.url, 1, 3, ps))
        for r in range(rounds):
            for c in clients:
                runs[c]["serve"].append(asyncio.run(load(cont.url, c, seconds, ps)))
                runs[c]["one_at_a_time"].append(asyncio.run(load(single.url, c, seconds, ps)))
                runs[c]["offline"].append(offline(ckpt, min(c, 16), ps, compile_))
                got = {k: round(v[-1]["tokens_per_s"], 1) for k, v in runs[c].items()}
                print(f"  round {r + 1} C={c}: {got}", file=sys.stderr, flush=True)
    finally:
        cont.stop()
        single.stop()

    table = []
    for c in clients:
        row = {"clients": c}
        for mode, rows in runs[c].items():
            for key in rows[0]:
                row[f"{mode}_{key}"] = _median(rows, key)
        row["serve_vs_one_at_a_time"] = round(row["serve_tokens_per_s"] / row["one_at_a_time_tokens_per_s"], 2)
        row["serve_vs_offline"] = round(row["serve_tokens_per_s"] / row["offline_tokens_per_s"], 2)
        table.append(row)
    return {"model": name, "checkpoint": str(ckpt), "server": cont.ready_line, "rows": table, "raw": runs}


PAIRS = [("float32", ["--dtype", "float32", "--quantize", "none"], "f32"), ("int8", ["--quantize", "int8"], "q8_0")]
"""llmctl's precision (and its serve flags) against the closest GGUF type llama.cpp runs."""


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, with waited-for children) a process has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def llama_server_args(binary: str, gguf: Path, port: int, slots: int, threads: int, context: int) -> list[str]:
    """llama-server's command line: `slots` parallel slots of `context` tokens each (the KV cache holds them all),
    continuous batching, `threads` threads for decoding and prefill, no web UI."""
    return [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots),
            "--cont-batching", "--threads", str(threads), "--threads-batch", str(threads),
            "-c", str(slots * context), "--no-webui"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama.cpp's `llama-server` on one GGUF file (log in FILE.log), ready when /health answers 200."""

    def __init__(self, binary: str, gguf: Path, slots: int, context: int):
        port = free_port()
        self.cmd = llama_server_args(binary, gguf, port, slots, len(os.sched_getaffinity(0)), context)
        self.log = gguf.with_suffix(".log")
        with open(self.log, "w") as log:
            self.p = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        t = time.monotonic()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.p.poll() is not None or time.monotonic() - t > 300:
                self.stop()
                raise SystemExit(f"llama-server did not start ({' '.join(self.cmd)}):\n" + self.log.read_text()[-3000:])
            time.sleep(0.5)
        self.ready_line = f"llama-server on {gguf.name} at {self.url} ({slots} slots)"

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(120)


def export_gguf(ckpt: Path, outtype: str, work: Path) -> Path:
    out = work / f"{ckpt.name}-{outtype}.gguf"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "llmctl", "export", "--ckpt", str(ckpt), "--format", "gguf",
                        "--outtype", outtype, "--out", str(out), "--overwrite"], check=True, env=_env(),
                       stdout=subprocess.DEVNULL)
    return out


def model_facts(ckpt: Path) -> tuple[int, list[int]]:
    """The model's context length and the ids that end its generation (banned in the comparison)."""
    from llmctl import loading

    loaded = loading.load_model(ckpt, "cpu")
    return loaded.cfg.model.block_size, list(loaded.tokenizer.end_ids)


def measured(server, load, clients: int, seconds: float, ps: list[list[int]], fields: dict) -> dict:
    """One load window, with the server process's CPU use over it (100 = one core busy)."""
    cpu, t = proc_cpu_s(server.p.pid), time.perf_counter()
    out = asyncio.run(load(server.url, clients, seconds, ps, fields))
    out["server_cpu_pct"] = 100 * (proc_cpu_s(server.p.pid) - cpu) / (time.perf_counter() - t)
    return out


def llama_version(binary: str) -> str:
    r = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    return next((x.strip() for x in (r.stdout + r.stderr).splitlines() if x.startswith("version")), "unknown")


def bench_llama(ckpt: Path, binary: str, clients: list[int], seconds: float, rounds: int, extra: list[str],
                slots: int, load=_load_raw, compiled: bool = False) -> dict:
    """`llmctl serve` against llama-server on the same model (exported to GGUF) at the closest precisions, both
    with `slots` slots, rounds interleaved: every (round, clients) runs each server in turn (odd rounds in reverse
    order, so no side always goes first). Both generate exactly
    NEW_TOKENS tokens: llama-server with ignore_eos, llmctl with its end ids banned through logit_bias. `compiled`:
    llmctl's float32 server runs its compiled decode steps (built first if missing; int8 on a CPU has none)."""
    work = ckpt.parent
    context, end_ids = model_facts(ckpt)
    ps = prompts(ckpt, 256)
    fields = {"ours": {"logit_bias": {str(i): -100 for i in end_ids}}, "llama": {"ignore_eos": True}}
    servers: dict = {}
    try:
        for prec, flags, outtype in PAIRS:
            more = ["--compile"] if compiled and prec == "float32" else []
            servers[("ours", prec)] = Server(ckpt, *extra, *flags, *more, "--set", f"serve.slots={slots}")
            servers[("llama", prec)] = LlamaServer(binary, export_gguf(ckpt, outtype, work), slots, context)
        for (side, _), srv in servers.items():
            print(f"  {srv.ready_line}", file=sys.stderr, flush=True)
            asyncio.run(load(srv.url, 2, 3, ps, fields[side]))  # warm-up
        runs = {k: {c: [] for c in clients} for k in servers}
        for r in range(rounds):
            for c in clients:
                for key, srv in list(servers.items())[:: -1 if r % 2 else 1]:  # odd rounds in reverse order
                    runs[key][c].append(measured(srv, load, c, seconds, ps, fields[key[0]]))
                got = {f"{s}-{p}": round(v[c][-1]["tokens_per_s"], 1) for (s, p), v in runs.items()}
                print(f"  round {r + 1} C={c}: {got}", file=sys.stderr, flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    rows = []
    for prec, _, outtype in PAIRS:
        for c in clients:
            row = {"clients": c, "llmctl": prec, "llama_cpp": outtype}
            for side in ("ours", "llama"):
                got = runs[(side, prec)][c]
                for key in got[0]:
                    row[f"{'llmctl' if side == 'ours' else 'llama'}_{key}"] = _median(got, key)
            row["llmctl_vs_llama"] = round(row["llmctl_tokens_per_s"] / row["llama_tokens_per_s"], 2) \
                if row["llama_tokens_per_s"] else None
            rows.append(row)
    some = servers[("llama", PAIRS[0][0])]
    return {"binary": binary, "version": llama_version(binary), "slots": slots, "threads": len(os.sched_getaffinity(0)),
            "command": " ".join(some.cmd), "rows": rows,
            "raw": {f"{s}-{p}": v for (s, p), v in runs.items()}}


def http_stack() -> dict:
    """The versions of the server's HTTP side (uvicorn picks httptools and uvloop when they are installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("fastapi", "uvicorn", "httptools", "uvloop"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpe", type=Path, help="a run of configs/shakespeare-bpe.yaml (trained beforehand)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-serve")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, help="default: benchmarks/serve.json (--quick: WORK/serve-quick.json)")
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--client", choices=sorted(LOADERS), default="raw",
                    help="the load generator's HTTP client: raw asyncio streams (default, the least CPU) or httpx")
    ap.add_argument("--llama-server", metavar="PATH",
                    help="llama.cpp's llama-server binary (scripts/build_llama_server.sh): also compare llmctl serve "
                         "with it on the GPT-2 shape, float32 vs f32 and int8 vs q8_0")
    ap.add_argument("--slots", type=int, default=16, help="parallel slots of both servers in that comparison")
    ap.add_argument("--compile", action="store_true",
                    help="in that comparison, llmctl's float32 server runs compiled decode steps (--compile)")
    ap.add_argument("--peer-only", action="store_true",
                    help="with --llama-server: only the comparison (no one-at-a-time and offline rounds)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: a 2x64 GPT-2-flavour model, clients 1 and 4, 3 s windows, 1 round")
    a = ap.parse_args()
    if a.quick:
        a.clients, a.seconds, a.rounds = "1,4", 3.0, 1
    a.out = a.out or (a.work / "serve-quick.json" if a.quick else ROOT / "benchmarks" / "serve.json")
    return a


def main() -> None:
    a = parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    clients = [int(c) for c in a.clients.split(",")]
    import torch

    from llmctl.hardware import cpu_name

    results = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
               "seconds": a.seconds, "rounds": a.rounds, "client": a.client, "http": http_stack(),
               "quick": a.quick, "models": []}
    load = LOADERS[a.client]
    if not a.skip_gpt2:
        ckpt = make_gpt2(a.work, tiny=a.quick)
        extra = ["--no-compile"] if a.quick else []
        name = "gpt2-tiny" if a.quick else "gpt2-124M"
        m = {"model": name, "checkpoint": str(ckpt)}
        if not (a.peer_only and a.llama_server):
            m = bench_model(name, ckpt, clients, a.seconds, a.rounds, extra, "false" if a.quick else "auto", load)
        if a.llama_server:
            m["vs_llama_server"] = bench_llama(ckpt, a.llama_server, clients, a.seconds, a.rounds, extra, a.slots,
                                               load, compiled=a.compile)
        results["models"].append(m)
    if a.bpe is not None:
        results["models"].append(bench_model("shakespeare-bpe", a.bpe, clients, a.seconds, a.rounds,
                                             ["--compile"], "true", load))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.out.exists():  # keep what earlier runs recorded beside (e.g. "history")
        old = json.loads(a.out.read_text())
        if a.peer_only and a.llama_server:
            results = with_peer_rows(old, results)
        else:
            results = {**{k: v for k, v in old.items() if k not in results}, **results}
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    report(results)


def with_peer_rows(old: dict, new: dict) -> dict:
    """A --peer-only run's llama-server comparison added to the file's earlier results (its own rows and models
    stay), with this run's settings beside the comparison (they may differ from the file's)."""
    run = {k: new[k] for k in ("cpu", "cores", "torch", "python", "prompt_tokens", "new_tokens", "seconds", "rounds",
                               "client", "http")}
    models = {m["model"]: m for m in old.get("models", [])}
    for m in new["models"]:
        entry = models.setdefault(m["model"], {"model": m["model"], "checkpoint": m["checkpoint"]})
        entry["vs_llama_server"] = {**m["vs_llama_server"], "run": run}
    return {**old, "models": list(models.values())}


def report(results: dict) -> None:
    for m in results["models"]:
        if "rows" in m:
            print(f"\n{m['model']}  ({m['server']})")
            print(f"{'C':>3} {'serve tok/s':>12} {'1-at-a-time':>12} {'offline':>9} {'x1':>6} {'x off':>6} "
                  f"{'ttft p50':>9} {'ttft p99':>9} {'gen cpu%':>8}")
            for r in m["rows"]:
                print(f"{r['clients']:>3} {r['serve_tokens_per_s']:>12.1f} {r['one_at_a_time_tokens_per_s']:>12.1f} "
                      f"{r['offline_tokens_per_s']:>9.1f} {r['serve_vs_one_at_a_time']:>6.2f} "
                      f"{r['serve_vs_offline']:>6.2f} "
                      f"{r['serve_ttft_p50_s'] or 0:>9.3f} {r['serve_ttft_p99_s'] or 0:>9.3f} "
                      f"{r['serve_load_generator_cpu_pct'] or 0:>8.1f}")
        if "vs_llama_server" in m:
            v = m["vs_llama_server"]
            print(f"\n{m['model']}: llmctl serve vs llama-server ({v['version']}; {v['command']})")
            print(f"{'C':>3} {'precision':>13} {'tok/s':>13} {'x':>5} {'ttft p50':>13} {'ttft p99':>13} "
                  f"{'itl p50 ms':>11} {'itl p99 ms':>11} {'cpu %':>9} {'done/short':>11}")
            for r in v["rows"]:
                def two(key: str, scale: float = 1.0, f: str = ".3f") -> str:
                    x, y = r[f"llmctl_{key}"], r[f"llama_{key}"]
                    return f"{(x or 0) * scale:{f}}/{(y or 0) * scale:{f}}"

                print(f"{r['clients']:>3} {r['llmctl'] + '/' + r['llama_cpp']:>13} {two('tokens_per_s', f='.1f'):>13} "
                      f"{r['llmctl_vs_llama'] or 0:>5.2f} {two('ttft_p50_s'):>13} {two('ttft_p99_s'):>13} "
                      f"{two('itl_p50_s', 1e3, '.1f'):>11} {two('itl_p99_s', 1e3, '.1f'):>11} "
                      f"{two('server_cpu_pct', f='.0f'):>9} "
                      f"{two('completed', f='.0f') + ' ' + two('completed_short', f='.0f'):>11}")


if __name__ == "__main__":
    main()
