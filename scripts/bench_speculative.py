#!/usr/bin/env python
"""Speculative decoding at batch 1: tokens/s of `infer --prompt` with and without `--draft prompt-lookup`.

The same checkpoint, prompt and settings (greedy, eager decoding, float32) on both sides, interleaved in rounds
(plain, speculative, plain, ...; the median of each side is reported, so a busy machine's noise hits both alike).
Tokens/s counts the new tokens over the wall time of the generation (the model is loaded once, outside the clock),
and tokens per CPU second over the process's CPU time (steadier than wall time on a busy machine).
The prompt is the opening of a file (default: Tiny Shakespeare from ../shared/data) and the model continues it:
greedy continuations of a small model repeat the prompt's and their own phrases, which prompt lookup drafts. It also
checks that both sides produce the same tokens (greedy speculative decoding is exact).

With `--prompts FILE.jsonl` (lines of {"prompt", "answer"}: scripts/code_rewrite_corpus.py's heldout.jsonl, an
input-grounded task) the first `--count` prompts run instead, each for as many new tokens as its answer has; the
figures are over all of them (tokens of every prompt / time of every prompt), and the report says how many
completions equal their answer and how close they come (difflib's ratio): the evidence that the model does the task
whose drafts prompt lookup makes.

    flock /tmp/bench.lock nice -n 5 python scripts/bench_speculative.py --ckpt RUN --out benchmarks/speculative.json
    python scripts/bench_speculative.py --ckpt runs/rewrite --prompts runs/rewrite/heldout.jsonl --count 20

`--serve` adds the same prompts sent one at a time (one client, greedy) to `llmctl serve` with and without
`--draft prompt-lookup` (float32, eager), rounds interleaved: tokens/s over the requests' wall time, whether both
servers answer the same text, and the drafting server's acceptance from its /metrics.
"""

from __future__ import annotations

import argparse
import difflib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    from llmctl.hardware import cpu_name as name

    return name()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--prompt-chars", type=int, default=40)
    ap.add_argument("--new", type=int, default=400)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled with --seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--prompts", default=None, help="a JSONL file of {prompt, answer} (replaces --text)")
    ap.add_argument("--count", type=int, default=20, help="with --prompts: how many of its prompts")
    ap.add_argument("--serve", action="store_true", help="also through llmctl serve, with and without --draft")
    ap.add_argument("--note", default="", help="what else ran on the machine (goes into the JSON)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from llmctl.loading import for_inference, load_model
    from llmctl.rows import Request, fit_prompt
    from llmctl.sampling import Sampling
    from llmctl.speculative import PromptLookup, Speculation

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = for_inference(load_model(args.ckpt, "cpu"), "float32", "none", compile=False)
    tok, context = loaded.tokenizer, loaded.cfg.model.block_size
    if args.prompts:  # (prompt ids, new tokens, answer)
        items = [json.loads(x) for x in Path(args.prompts).read_text(encoding="utf-8").splitlines()[: args.count]]
        cases = [(fit_prompt(tok, x["prompt"], context, truncate=True), len(tok.encode(x["answer"])), x["answer"])
                 for x in items]
        prompt = f"{len(cases)} prompts of {args.prompts}"
    else:
        prompt = Path(args.text).read_text(encoding="utf-8")[: args.prompt_chars]
        cases = [(fit_prompt(tok, prompt, context, truncate=True), args.new, None)]

    def sampling(new: int) -> Sampling:
        seed = None if args.temperature == 0 else args.seed
        return Sampling(new, temperature=args.temperature, top_k=None, seed=seed)

    def plain() -> tuple[list[list[int]], dict]:
        return [list(loaded.engine.complete(Request(ids, sampling(n)))) for ids, n, _ in cases], {}

    def speculative() -> tuple[list[list[int]], dict]:
        outs, total = [], {}
        for ids, n, _ in cases:
            spec, out = Speculation(PromptLookup(args.ngram), args.k), []
            for row in spec.run(loaded.engine, Request(ids, sampling(n))):
                out += row.new_tokens
            outs.append(out)
            for k in ("drafted", "accepted", "target_forwards"):
                total[k] = total.get(k, 0) + spec.stats.as_dict()[k]
        total["acceptance_rate"] = round(total["accepted"] / max(total["drafted"], 1), 4)
        total["tokens_per_forward"] = round(sum(map(len, outs)) / max(total["target_forwards"], 1), 2)
        return outs, total

    plain(), speculative()  # warm up both paths
    runs: dict[str, list[float]] = {"plain": [], "prompt-lookup": []}
    cpu: dict[str, list[float]] = {"plain": [], "prompt-lookup": []}
    outs, stats = {}, {}
    for _ in range(args.rounds):
        for name, fn in (("plain", plain), ("prompt-lookup", speculative)):
            t0, c0 = time.perf_counter(), time.process_time()
            toks, st = fn()
            n = sum(map(len, toks))
            runs[name].append(n / (time.perf_counter() - t0))
            cpu[name].append(n / (time.process_time() - c0))
            outs[name], stats[name] = toks, st
    texts = [tok.decode(t) for t in outs["prompt-lookup"]]
    answers = [a for _, _, a in cases]
    task = None if answers[0] is None else {
        "exact": sum(t.rstrip() == a.rstrip() for t, a in zip(texts, answers)), "of": len(answers),
        "mean_similarity": round(statistics.mean(difflib.SequenceMatcher(None, t, a).ratio()
                                                 for t, a in zip(texts, answers)), 3)}
    med = {k: statistics.median(v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "checkpoint": str(args.ckpt), "model": {k: getattr(loaded.cfg.model, k) for k in
                                                ("arch", "n_layer", "n_embd", "block_size", "vocab_size")},
        "prompt": prompt, "prompt_tokens": sum(len(c[0]) for c in cases), "new_tokens": sum(c[1] for c in cases),
        "draft_tokens": args.k,
        "lookup_ngram": args.ngram, "rounds": args.rounds, "precision": "float32, eager",
        "temperature": args.temperature,
        "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
        "tokens_per_s_each_round": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "speedup": round(med["prompt-lookup"] / med["plain"], 2),
        "tokens_per_cpu_s": {k: round(v, 1) for k, v in med_cpu.items()},
        "tokens_per_cpu_s_each_round": {k: [round(x, 1) for x in v] for k, v in cpu.items()},
        "speedup_cpu_time": round(med_cpu["prompt-lookup"] / med_cpu["plain"], 2),
        "draft": stats["prompt-lookup"],
        "identical_output": outs["plain"] == outs["prompt-lookup"] if args.temperature == 0 else "n/a (sampled)",
        "task": task,
        "completion": texts[0],
        "cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "note": args.note,
    }
    if args.serve:
        result["serve"] = bench_serve(args, [tok.decode(ids) for ids, _, _ in cases], [n for _, n, _ in cases])
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


def bench_serve(args, prompts: list[str], news: list[int]) -> dict:
    """The prompts through `llmctl serve` one at a time, with and without a prompt-lookup draft."""
    import subprocess

    try:
        import httpx2 as httpx  # what the openai package is built on (openai 3.x)
    except ImportError:
        import httpx

    from llmctl.metrics import parse

    servers = {}
    try:
        for name, more in (("plain", []), ("prompt-lookup", ["--draft", "prompt-lookup"])):
            p = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", "--ckpt", str(args.ckpt), "--port", "0",
                                  "--dtype", "float32", "--quantize", "none", "--no-compile", "--json", *more],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            servers[name] = (p, "")  # (stopped in `finally` even if it never gets ready)
            ready = ""
            while True:  # (serve --json prints one indented object when it listens)
                line = p.stdout.readline()
                if not line:
                    raise SystemExit(f"llmctl serve ({name}) exited before it was ready")
                ready += line
                if line.startswith("}"):
                    break
            servers[name] = (p, json.loads(ready)["url"])
        runs: dict[str, list[float]] = {k: [] for k in servers}
        texts: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            for name, (_, url) in servers.items():
                t0, n, out = time.perf_counter(), 0, []
                for prompt, new in zip(prompts, news):
                    r = httpx.post(url + "/v1/completions", timeout=600, json={
                        "prompt": prompt, "max_tokens": new, "temperature": 0}).json()
                    n += r["usage"]["completion_tokens"]
                    out.append(r["choices"][0]["text"])
                runs[name].append(n / (time.perf_counter() - t0))
                texts[name] = out
        m = parse(httpx.get(servers["prompt-lookup"][1] + "/metrics").text)
    finally:
        for p, _ in servers.values():
            p.terminate()
            p.wait(60)
    med = {k: statistics.median(v) for k, v in runs.items()}
    drafted, kept = m["llmctl_draft_tokens_total"], m["llmctl_draft_accepted_tokens_total"]
    return {"clients": 1, "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
            "tokens_per_s_each_round": {k: [round(x, 1) for x in v] for k, v in runs.items()},
            "speedup": round(med["prompt-lookup"] / med["plain"], 2),
            "same_text": texts["plain"] == texts["prompt-lookup"],
            "metrics": {"draft_tokens_total": drafted, "draft_accepted_tokens_total": kept,
                        "draft_forwards_total": m["llmctl_draft_forwards_total"],
                        "draft_acceptance_rate": round(m["llmctl_draft_acceptance_rate"], 4)}}


if __name__ == "__main__":
    main()
