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
and the load generator's own CPU use (it runs on the same cores as the server).

Models: a GPT-2-124M shape (random weights from one seed, 12x768, context 1024, and a 50257-token vocabulary: a BPE
tokenizer trained on Tiny Shakespeare padded with added tokens, so every id decodes), made with `llmctl pretrain`
for one step; and the model of configs/shakespeare-bpe.yaml (--bpe RUN, trained beforehand). Both at llmctl's
default precision (int8 for the GPT-2 shape on an x86 CPU, float32 for the small one, with its compiled step).

    python scripts/bench_serve.py --bpe runs/shakespeare-bpe           # about 15 minutes on 2 cores
    python scripts/bench_serve.py --bpe runs/shakespeare-bpe --clients 1,16 --seconds 10 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
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

try:
    import httpx2 as httpx  # what the openai package is built on (openai 3.x)
except ImportError:  # older installs
    import httpx


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def make_gpt2(work: Path) -> Path:
    """A GPT-2-124M-shaped checkpoint with a 50257-token vocabulary, trained for one step."""
    run = work / "gpt2-124M"
    if (run / "latest").exists():
        return run
    from llmctl.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe([DATA.read_text()], 4096)
    have = tok.vocab_size
    tok.tk.add_tokens([f"<x{i}>" for i in range(50257 - have)])  # every id of the 50257 decodes to some text
    tok_path = work / "gpt2-tokenizer.json"
    tok.save(tok_path)
    sets = [a for s in GPT2 + [f"tokenizer.path={tok_path}", f"data.path={DATA}"] for a in ("--set", s)]
    subprocess.run([sys.executable, "-m", "llmctl", "pretrain", *sets, "--out", str(run), "--quiet"], check=True,
                   env=_env())
    return run


class Server:
    def __init__(self, ckpt: Path, *args: str):
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
    arrival time of each server-sent `data: {...}` event (one per token) and reads the chunked body by hand."""
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
                    yield time.perf_counter()
    finally:
        writer.close()


async def _load_raw(url: str, clients: int, seconds: float, ps: list[list[int]], fields: dict | None = None) -> dict:
    host, port = url.split("//")[1].rsplit(":", 1)

    async def one(body: dict, deadline: float, seen) -> None:
        async for now in stream_events(host, int(port), body):
            if now >= deadline:
                return  # hang up: the window is over (the server frees the slot)
            seen(now)

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
                        seen(now)

        return await _window(clients, seconds, ps, one, (httpx.HTTPError,), fields)


async def _window(clients: int, seconds: float, ps: list[list[int]], one, errors: tuple,
                  fields: dict | None = None) -> dict:
    """C clients streaming back-to-back requests for `seconds` through `one(body, deadline, seen)`; tokens counted
    as they arrive in the window. `fields` change the request body (scripts/bench_structured.py sends sampled and
    constrained requests)."""
    start = time.perf_counter()
    deadline = start + seconds
    tokens, ttft, waiting = [0], [], [0]
    cpu0 = time.process_time()

    async def client(k: int) -> None:
        n = k
        while time.perf_counter() < deadline:
            body = {"prompt": ps[n % len(ps)], "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
                    **(fields or {})}
            n += clients
            sent, first = time.perf_counter(), [None]

            def seen(now: float) -> None:
                if first[0] is None:
                    first[0] = now
                    ttft.append(now - sent)
                tokens[0] += 1

            try:
                await one(body, deadline, seen)
            except errors:
                pass
            if first[0] is None and time.perf_counter() >= deadline:
                waiting[0] += 1

    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    ttft.sort()

    def pct(q: float):
        return ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else None

    return {"tokens_per_s": tokens[0] / seconds, "ttft_p50_s": pct(0.5), "ttft_p99_s": pct(0.99),
            "first_tokens": len(ttft), "waiting_at_end": waiting[0],
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

    def med(rows: list[dict], key: str):
        vals = [x[key] for x in rows if x.get(key) is not None]
        return round(statistics.median(vals), 4) if vals else None

    table = []
    for c in clients:
        row = {"clients": c}
        for mode, rows in runs[c].items():
            for key in rows[0]:
                row[f"{mode}_{key}"] = med(rows, key)
        row["serve_vs_one_at_a_time"] = round(row["serve_tokens_per_s"] / row["one_at_a_time_tokens_per_s"], 2)
        row["serve_vs_offline"] = round(row["serve_tokens_per_s"] / row["offline_tokens_per_s"], 2)
        table.append(row)
    return {"model": name, "checkpoint": str(ckpt), "server": cont.ready_line, "rows": table, "raw": runs}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpe", type=Path, help="a run of configs/shakespeare-bpe.yaml (trained beforehand)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-serve")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serve.json")
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--client", choices=sorted(LOADERS), default="raw",
                    help="the load generator's HTTP client: raw asyncio streams (default, the least CPU) or httpx")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    clients = [int(c) for c in a.clients.split(",")]
    import torch

    from llmctl.hardware import cpu_name

    results = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
               "seconds": a.seconds, "rounds": a.rounds, "client": a.client, "http": http_stack(),
               "models": []}
    if not a.skip_gpt2:
        results["models"].append(bench_model("gpt2-124M", make_gpt2(a.work), clients, a.seconds, a.rounds,
                                             [], "auto", LOADERS[a.client]))
    if a.bpe is not None:
        results["models"].append(bench_model("shakespeare-bpe", a.bpe, clients, a.seconds, a.rounds,
                                             ["--compile"], "true", LOADERS[a.client]))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    for m in results["models"]:
        print(f"\n{m['model']}  ({m['server']})")
        print(f"{'C':>3} {'serve tok/s':>12} {'1-at-a-time':>12} {'offline':>9} {'x1':>6} {'x off':>6} "
              f"{'ttft p50':>9} {'ttft p99':>9} {'gen cpu%':>8}")
        for r in m["rows"]:
            print(f"{r['clients']:>3} {r['serve_tokens_per_s']:>12.1f} {r['one_at_a_time_tokens_per_s']:>12.1f} "
                  f"{r['offline_tokens_per_s']:>9.1f} {r['serve_vs_one_at_a_time']:>6.2f} "
                  f"{r['serve_vs_offline']:>6.2f} "
                  f"{r['serve_ttft_p50_s'] or 0:>9.3f} {r['serve_ttft_p99_s'] or 0:>9.3f} "
                  f"{r['serve_load_generator_cpu_pct'] or 0:>8.1f}")


if __name__ == "__main__":
    main()
