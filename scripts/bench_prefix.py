#!/usr/bin/env python
"""Prefix caching on a chat workload: `llmctl serve` with serve.prefix_cache on (the default) against off.

The workload of issue 36: every request shares a 512-token system prompt and carries 1-4 earlier turns of its
conversation. Each client runs conversations one after another; turn j (1..4) of a conversation sends the system
prompt, the j earlier turns and a new message (each `--turn-tokens` tokens of Tiny Shakespeare, from a seeded
random place), so a request's prompt starts with the whole previous request's prompt, as an OpenAI client's does.
Every round sends new conversations (only the system prompt is known to the server from before), the same ones to
both servers, interleaved; the median of the rounds is reported. Measured with scripts/bench_serve.py's raw load
generator: generated tokens/s over the window, time to first token p50/p99, and the cached server's hit rate
(prompt tokens restored from the cache / prompt tokens looked up, from its /metrics).

Model: the GPT-2-124M shape of scripts/bench_serve.py (random weights, context 1024) at llmctl's default serving
precision, or --ckpt RUN. `--quick` is a smoke run of the script itself (a 2-layer model, 2 clients, 3 s): its
numbers mean nothing.

    python scripts/bench_prefix.py                       # GPT-2 shape, 1/4/16 clients, 2 rounds: ~10 minutes
    python scripts/bench_prefix.py --quick --out /tmp/prefix.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402  (the load generator, the server process, the GPT-2-shaped checkpoint)

ROOT = bench_serve.ROOT
SYSTEM_TOKENS = 512
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=1024", "train.batch_size=1",
        "train.max_steps=1", "train.eval_batches=1", "train.warmup_steps=0", "train.dtype=float32"]


def make_tiny(work: Path) -> Path:
    """A 2-layer char-level model with a 1024-token context (for --quick)."""
    run = work / "tiny-1024"
    if not (run / "latest").exists():
        sets = [a for s in TINY + [f"data.path={bench_serve.DATA}"] for a in ("--set", s)]
        subprocess.run([sys.executable, "-m", "llmctl", "pretrain", *sets, "--out", str(run), "--quiet"],
                       check=True, env=bench_serve._env())
    return run


def corpus_ids(ckpt: Path) -> list[int]:
    from llmctl import loading

    tok = loading.load_model(ckpt, "cpu").tokenizer
    return tok.encode(bench_serve.DATA.read_text()[:400_000])


def chat_prompts(ids: list[int], clients: int, conversations: int, turn: int, seed: int) -> list[list[int]]:
    """Prompts ordered for bench_serve's load generator, whose client k sends prompts k, k + C, k + 2C, ...: client
    k's j-th request is turn j % 4 + 1 of its conversation j // 4."""
    rng = random.Random(seed)
    system = ids[:SYSTEM_TOKENS]

    def piece() -> list[int]:
        at = rng.randrange(SYSTEM_TOKENS, len(ids) - turn)
        return ids[at : at + turn]

    chats = {(k, c): [piece() for _ in range(5)] for k in range(clients) for c in range(conversations)}
    return [system + sum(chats[k, j // 4][: j % 4 + 2], [])
            for j in range(4 * conversations) for k in range(clients)]


def hit_rate(url: str) -> dict:
    from llmctl.metrics import parse

    m = parse(bench_serve.httpx.get(url + "/metrics", timeout=30).text)
    looked = m.get("llmctl_prefix_cache_lookup_tokens_total", 0)
    return {"lookups": m.get("llmctl_prefix_cache_lookups_total"), "hits": m.get("llmctl_prefix_cache_hits_total"),
            "token_hit_rate": round(m.get("llmctl_prefix_cache_hit_tokens_total", 0) / looked, 3) if looked else None,
            "blocks": m.get("llmctl_prefix_cache_blocks"), "bytes": m.get("llmctl_prefix_cache_bytes"),
            "evictions": m.get("llmctl_prefix_cache_evictions_total")}


def bench(ckpt: Path, clients: list[int], seconds: float, rounds: int, new_tokens: int, turn: int,
          extra: list[str]) -> dict:
    ids = corpus_ids(ckpt)
    servers = {"on": bench_serve.Server(ckpt, *extra), "off": bench_serve.Server(ckpt, *extra, "--set",
                                                                                  "serve.prefix_cache=false")}
    print(servers["on"].ready_line, file=sys.stderr, flush=True)
    load, fields = bench_serve.LOADERS["raw"], {"max_tokens": new_tokens}
    runs: dict = {c: {"on": [], "off": []} for c in clients}
    try:
        warm = chat_prompts(ids, 2, 1, turn, seed=10**6)
        for s in servers.values():
            asyncio.run(load(s.url, 2, 3, warm, fields))
        for r in range(rounds):
            for c in clients:
                ps = chat_prompts(ids, c, 16, turn, seed=1000 * r + c)  # new conversations each window
                for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    runs[c][mode].append(asyncio.run(load(servers[mode].url, c, seconds, ps, fields)))
                got = {m: (round(v[-1]["tokens_per_s"], 1), v[-1]["ttft_p50_s"]) for m, v in runs[c].items()}
                print(f"  round {r + 1} C={c}: (tok/s, ttft p50) {got}", file=sys.stderr, flush=True)
        cache = hit_rate(servers["on"].url)
    finally:
        for s in servers.values():
            s.stop()

    def med(rows: list[dict], key: str):
        vals = [x[key] for x in rows if x.get(key) is not None]
        return round(statistics.median(vals), 4) if vals else None

    table = []
    for c in clients:
        row: dict = {"clients": c}
        for mode, rows in runs[c].items():
            for key in rows[0]:
                row[f"{mode}_{key}"] = med(rows, key)
        on, off = row["on_ttft_p50_s"], row["off_ttft_p50_s"]
        row["ttft_p50_off_over_on"] = round(off / on, 2) if on and off else None
        row["tokens_per_s_on_over_off"] = round(row["on_tokens_per_s"] / row["off_tokens_per_s"], 2) \
            if row["off_tokens_per_s"] else None
        table.append(row)
    return {"checkpoint": str(ckpt), "server": servers["on"].ready_line, "rows": table, "prefix_cache": cache,
            "raw": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, help="serve this run instead of the GPT-2-124M shape")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-serve")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--turn-tokens", type=int, default=48, help="tokens of each earlier turn and of the new message")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "prefix.json")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 2 clients, 3 s, 1 round")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    if a.quick:
        ckpt, clients, a.seconds, a.rounds, a.new_tokens = make_tiny(a.work), [2], 3.0, 1, 16
        extra = ["--no-compile"]
    else:
        ckpt, clients = a.ckpt or bench_serve.make_gpt2(a.work), [int(c) for c in a.clients.split(",")]
    import torch

    from llmctl.hardware import cpu_name

    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version(), "system_tokens": SYSTEM_TOKENS, "turn_tokens": a.turn_tokens,
              "new_tokens": a.new_tokens, "seconds": a.seconds, "rounds": a.rounds, "quick": a.quick,
              **bench(ckpt, clients, a.seconds, a.rounds, a.new_tokens, a.turn_tokens, extra)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['server']}\nprefix cache: {result['prefix_cache']}")
    print(f"{'C':>3} {'on tok/s':>9} {'off tok/s':>9} {'on p50':>7} {'off p50':>7} {'on p99':>7} {'off p99':>7} "
          f"{'p50 off/on':>10}")
    for r in result["rows"]:
        print(f"{r['clients']:>3} {r['on_tokens_per_s']:>9.1f} {r['off_tokens_per_s']:>9.1f} "
              f"{r['on_ttft_p50_s'] or 0:>7.3f} {r['off_ttft_p50_s'] or 0:>7.3f} {r['on_ttft_p99_s'] or 0:>7.3f} "
              f"{r['off_ttft_p99_s'] or 0:>7.3f} {r['ttft_p50_off_over_on'] or 0:>10.2f}")


if __name__ == "__main__":
    main()
