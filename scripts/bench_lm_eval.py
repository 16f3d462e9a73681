#!/usr/bin/env python
"""Wall time of the same lm-eval tasks on the same checkpoint: `llmctl eval --tasks` (llmctl's model inside
lm-eval) against lm-eval's own Hugging Face backend on `llmctl export`'s directory, float32, same batch size,
interleaved rounds (the median is reported). Each run is a fresh process, so both pay their imports and loading.

    python scripts/bench_lm_eval.py --ckpt runs/shakespeare-bpe
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = "shakespeare_next_line,shakespeare_complete,shakespeare_rolling"

HF = r"""
import sys, lm_eval
from lm_eval.tasks import TaskManager
out, tasks, inc, limit, bs = sys.argv[1], sys.argv[2].split(","), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32", tasks=tasks, limit=limit,
                        task_manager=TaskManager(include_path=inc), batch_size=bs, device="cpu")
"""


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--include-path", type=Path, default=ROOT / "tests" / "lm_eval_tasks")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "lm_eval.json")
    a = ap.parse_args()
    export = Path(tempfile.mkdtemp()) / "hf"
    subprocess.run([sys.executable, "-m", "llmctl", "export", "--ckpt", str(a.ckpt), "--out", str(export)],
                   check=True, capture_output=True)
    ours_cmd = [sys.executable, "-m", "llmctl", "eval", "--ckpt", str(a.ckpt), "--tasks", a.tasks, "--include-path",
                str(a.include_path), "--limit", str(a.limit), "--batch-size", str(a.batch_size), "--json"]
    hf_cmd = [sys.executable, "-c", HF, str(export), a.tasks, str(a.include_path), str(a.limit), str(a.batch_size)]
    times: dict[str, list[float]] = {"llmctl": [], "hf": []}
    for r in range(a.rounds):
        times["llmctl"].append(timed(ours_cmd))
        times["hf"].append(timed(hf_cmd))
        print(f"round {r + 1}: llmctl {times['llmctl'][-1]:.1f} s, hf {times['hf'][-1]:.1f} s", file=sys.stderr)
    from llmctl.hardware import cpu_name

    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "checkpoint": str(a.ckpt), "tasks": a.tasks.split(","),
              "limit": a.limit, "batch_size": a.batch_size, "rounds": a.rounds, "seconds": times,
              "median_seconds": med, "hf_over_llmctl": round(med["hf"] / med["llmctl"], 2)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
