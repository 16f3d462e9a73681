#!/usr/bin/env python
"""Structured output at scale: `llmctl serve` on 127.0.0.1 with a small trained model, three JSON schemas.

1. Validity: for each schema (a nested object, enums, an array with minItems/maxItems), N requests (default 200) to
   /v1/completions at temperature 1.0, each with its own seed, `response_format: json_schema`, 16 at a time. Every
   answer must finish with `finish_reason: "stop"`, parse as JSON and validate against its schema (`jsonschema`).
2. Throughput: constrained against free decoding at 16 concurrent clients, with scripts/bench_serve.py's load
   generator (streamed requests back to back for a fixed window, tokens counted as they arrive), in interleaved
   rounds on the same server. A constrained answer ends when its JSON does, so the free requests ask for the mean
   length of that schema's answers (`max_tokens`) at the same temperature: both sides then pay the same prefill and
   HTTP cost per generated token, and the ratio measures the mask (xgrammar's per-step work) alone.

The model: `--run RUN` (any checkpoint with a byte-level BPE tokenizer), or one trained here with
configs/shakespeare-bpe.yaml on Tiny Shakespeare for `--steps` steps (300 by default: about 2 minutes on 2 idle
cores, as the config's 1500 steps take about 10; on 2 cores shared with busy neighbours it ran at 19 s a step, so
benchmarks/structured.json comes from `--run` of a smaller model, see docs/serving.md). The server runs with
`--compile` (its default dtype).

    flock /tmp/bench.lock nice -n 5 python scripts/bench_structured.py          # trains, then about 10 minutes
    python scripts/bench_structured.py --run runs/shakespeare-bpe --requests 20 --seconds 5 --rounds 1 --eager
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402  (the load generator and the server process)

ROOT = bench_serve.ROOT
CLIENTS = 16
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]}},
        "required": ["name", "age", "address"]},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"enum": ["S", "M", "L", "XL"]}, "ok": {"type": "boolean"}},
             "required": ["color", "size", "ok"]},
    "array": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 8}, "minItems": 2,
              "maxItems": 5},
}


def train(work: Path, steps: int) -> Path:
    run = work / f"shakespeare-bpe-{steps}"
    if (run / "latest").exists():
        return run
    sets = [f"data.path={bench_serve.DATA}", f"train.max_steps={steps}", "train.eval_interval=0"]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmctl", "pretrain", "--config", str(ROOT / "configs/shakespeare-bpe.yaml"),
                    *[a for s in sets for a in ("--set", s)], "--out", str(run), "--quiet"], check=True,
                   env=bench_serve._env())
    print(f"trained {run} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return run


def response_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


async def validity(url: str, name: str, ps: list[list[int]], n: int) -> dict:
    """n sampled constrained requests, 16 at a time: finish reasons, parse and validate, answer lengths."""
    import jsonschema

    httpx = bench_serve.httpx
    gate = asyncio.Semaphore(CLIENTS)
    found = {"stop": 0, "other_finish": 0, "invalid_json": 0, "invalid_schema": 0, "replacement_char": 0}
    lengths, examples = [], []

    async def one(c, i: int) -> None:
        body = {"prompt": ps[i % len(ps)], "max_tokens": 256, "temperature": 1.0, "seed": i,
                "response_format": response_format(name)}
        async with gate:
            r = await c.post("/v1/completions", json=body)
        r.raise_for_status()
        ch, usage = r.json()["choices"][0], r.json()["usage"]
        lengths.append(usage["completion_tokens"])
        found["stop" if ch["finish_reason"] == "stop" else "other_finish"] += 1
        found["replacement_char"] += "\ufffd" in ch["text"]
        try:
            jsonschema.validate(json.loads(ch["text"]), SCHEMAS[name])
        except json.JSONDecodeError:
            found["invalid_json"] += 1
        except jsonschema.ValidationError:
            found["invalid_schema"] += 1
        if len(examples) < 3:
            examples.append(ch["text"])

    t = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=CLIENTS + 4)) as c:
        await asyncio.gather(*(one(c, i) for i in range(n)))
    wall = time.perf_counter() - t
    ok = found["stop"] == n and found["invalid_json"] == found["invalid_schema"] == 0
    return {"requests": n, **found, "all_valid": ok, "mean_completion_tokens": round(statistics.mean(lengths), 2),
            "max_completion_tokens": max(lengths), "wall_s": round(wall, 1), "examples": examples}


def throughput(url: str, ps: list[list[int]], lengths: dict, seconds: float, rounds: int) -> list[dict]:
    """Constrained and free windows at 16 clients, interleaved per schema and round; medians and their ratio."""
    load = bench_serve.LOADERS["raw"]
    runs = {name: {"constrained": [], "free": []} for name in SCHEMAS}
    asyncio.run(load(url, 2, 3, ps, {"temperature": 1.0, "response_format": response_format("enum")}))  # warm-up
    for r in range(rounds):
        for name in SCHEMAS:
            kinds = {"constrained": {"temperature": 1.0, "max_tokens": 256, "response_format": response_format(name)},
                     "free": {"temperature": 1.0, "max_tokens": max(1, round(lengths[name]))}}
            for kind in (("constrained", "free") if r % 2 == 0 else ("free", "constrained")):
                runs[name][kind].append(asyncio.run(load(url, CLIENTS, seconds, ps, kinds[kind])))
            got = {k: round(v[-1]["tokens_per_s"], 1) for k, v in runs[name].items()}
            print(f"  round {r + 1} {name}: {got}", file=sys.stderr, flush=True)
    rows = []
    for name, by in runs.items():
        row = {"schema": name, "clients": CLIENTS, "free_max_tokens": max(1, round(lengths[name]))}
        for kind, xs in by.items():
            row[f"{kind}_tokens_per_s"] = round(statistics.median(x["tokens_per_s"] for x in xs), 1)
            row[f"{kind}_ttft_p50_s"] = round(statistics.median(x["ttft_p50_s"] for x in xs), 4)
        row["constrained_vs_free"] = round(row["constrained_tokens_per_s"] / row["free_tokens_per_s"], 3)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained checkpoint with a byte-level BPE tokenizer")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the model made here without --run")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-bench-structured")
    ap.add_argument("--requests", type=int, default=200, help="sampled requests per schema")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "structured.json")
    ap.add_argument("--eager", action="store_true", help="serve without the compiled step (a quick look)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    import torch
    import xgrammar  # noqa: F401  (the structured extra must be there)

    from llmctl.hardware import cpu_name

    run = a.run or train(a.work, a.steps)
    ps = bench_serve.prompts(run, 256)
    server = bench_serve.Server(run, "--no-compile" if a.eager else "--compile")
    print(server.ready_line, file=sys.stderr, flush=True)
    try:
        valid = {}
        for name in SCHEMAS:
            valid[name] = asyncio.run(validity(server.url, name, ps, a.requests))
            print(f"  {name}: {({k: v for k, v in valid[name].items() if k != 'examples'})}", file=sys.stderr,
                  flush=True)
        lengths = {name: v["mean_completion_tokens"] for name, v in valid.items()}
        rows = throughput(server.url, ps, lengths, a.seconds, a.rounds)
    finally:
        server.stop()
    results = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "xgrammar": version("xgrammar"),
               "python": platform.python_version(), "checkpoint": str(run), "server": server.ready_line,
               "schemas": SCHEMAS, "validity": valid, "seconds": a.seconds, "rounds": a.rounds, "throughput": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'schema':>8} {'valid':>9} {'mean tok':>9} {'constrained':>12} {'free':>9} {'ratio':>6}")
    for r in rows:
        v = valid[r["schema"]]
        print(f"{r['schema']:>8} {v['stop']:>4}/{v['requests']:<4} {v['mean_completion_tokens']:>9.1f} "
              f"{r['constrained_tokens_per_s']:>12.1f} {r['free_tokens_per_s']:>9.1f} {r['constrained_vs_free']:>6.3f}")
    if not all(v["all_valid"] for v in valid.values()):
        raise SystemExit("some answers did not finish with stop, parse or validate (see the JSON)")


if __name__ == "__main__":
    main()
