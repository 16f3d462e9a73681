#!/usr/bin/env python
"""Training speed, side by side: nanoGPT's train.py vs `llmctl pretrain` on the Tiny Shakespeare char model.

Runs alternately in one session (nanoGPT, llmctl at its default precision, llmctl in float32, repeated), each for
the same 2000 steps of nanoGPT's CPU config with evaluation out of the way, and reports:
  - steady-state training tokens/s: the median per-step rate after the first 100 steps (start-up excluded);
  - whole-process wall time for the run.
Prints a table and writes the figures to a JSON file (the table in docs/results.md#speed comes from it).

nanoGPT is run from a clone beside the project (`--nanogpt`, default ../nanoGPT); its code is never part of
llmctl. Its data is prepared there with its own prepare.py from the same text file.

    python scripts/bench_train.py --data ../shared/data/tinyshakespeare.txt --nanogpt ../peers/nanoGPT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 100  # steps excluded from the steady-state figure


def prepare_nanogpt(nanogpt: Path, data: Path) -> None:
    d = nanogpt / "data" / "shakespeare_char"
    if (d / "train.bin").exists() and (d / "meta.pkl").exists():
        return
    shutil.copyfile(data, d / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=d, check=True, capture_output=True)


def run_nanogpt(nanogpt: Path, steps: int) -> dict:
    out = tempfile.mkdtemp(prefix="nanogpt-")
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
           "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
           "--n_embd=128", f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--dropout=0.0",
           f"--eval_interval={10 * steps}", f"--out_dir={out}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=nanogpt, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    if p.returncode:
        raise SystemExit(f"nanoGPT failed:\n{p.stderr[-2000:]}")
    times = {int(m[1]): float(m[3]) for m in re.finditer(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms", p.stdout)}
    losses = {int(m[1]): float(m[2]) for m in re.finditer(r"iter (\d+): loss ([\d.]+), time ([\d.]+)ms", p.stdout)}
    steady = [t for i, t in times.items() if i >= WARMUP]
    ms = statistics.median(steady)
    return {"tokens_per_sec": 12 * 64 / (ms / 1000), "ms_per_step": ms, "wall_s": wall,
            "final_loss": losses[max(losses)]}


def run_llmctl(data: Path, steps: int, dtype: str | None) -> dict:
    out = Path(tempfile.mkdtemp(prefix="llmctl-")) / "run"
    sets = [f"data.path={data}", f"train.max_steps={steps}", "train.eval_interval=0", "train.eval_batches=2",
            "train.log_interval=1"]
    if dtype:
        sets.append(f"train.dtype={dtype}")
    cmd = [sys.executable, "-m", "llmctl", "pretrain", "-c", str(ROOT / "configs/shakespeare-char-gpt2.yaml"),
           "--out", str(out), "--quiet", "--json"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"llmctl failed:\n{p.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "loss" in r]
    steady = [r["tokens_per_sec"] for r in steps_rows if r["step"] > WARMUP]
    tps = statistics.median(steady)
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"tokens_per_sec": tps, "ms_per_step": 12 * 64 / tps * 1000, "wall_s": wall,
            "final_loss": steps_rows[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/tinyshakespeare.txt")
    ap.add_argument("--nanogpt", type=Path, default=ROOT.parent / "nanoGPT", help="a clone of karpathy/nanoGPT")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/train_vs_nanogpt.json")
    args = ap.parse_args()
    if not (args.nanogpt / "train.py").exists():
        raise SystemExit(f"no nanoGPT clone at {args.nanogpt} (git clone https://github.com/karpathy/nanoGPT there)")
    prepare_nanogpt(args.nanogpt, args.data)

    results: dict[str, list[dict]] = {"nanoGPT fp32": [], "llmctl default (bf16 autocast)": [], "llmctl fp32": []}
    for r in range(args.rounds):
        for name, fn in (("nanoGPT fp32", lambda: run_nanogpt(args.nanogpt, args.steps)),
                         ("llmctl default (bf16 autocast)", lambda: run_llmctl(args.data, args.steps, None)),
                         ("llmctl fp32", lambda: run_llmctl(args.data, args.steps, "float32"))):
            res = fn()
            results[name].append(res)
            print(f"round {r + 1}: {name:32s} {res['tokens_per_sec']:>9,.0f} tok/s  wall {res['wall_s']:.1f} s  "
                  f"final loss {res['final_loss']:.3f}", file=sys.stderr, flush=True)

    base = statistics.median(x["tokens_per_sec"] for x in results["nanoGPT fp32"])
    summary = {}
    print(f"\n{'run':34s} {'tokens/s':>10s} {'vs nanoGPT':>11s} {'wall (s)':>9s}")
    for name, runs in results.items():
        tps = statistics.median(x["tokens_per_sec"] for x in runs)
        wall = statistics.median(x["wall_s"] for x in runs)
        summary[name] = {"tokens_per_sec": round(tps), "ratio_vs_nanogpt": round(tps / base, 2),
                         "wall_s": round(wall, 1), "runs": runs}
        print(f"{name:34s} {tps:>10,.0f} {tps / base:>10.2f}x {wall:>9.1f}")
    write_result(args.json, {"steps": args.steps, "rounds": args.rounds, "warmup_steps_excluded": WARMUP,
                             "config": "configs/shakespeare-char-gpt2.yaml", "results": summary})


def write_result(path: Path, info: dict) -> None:
    """A benchmark's JSON with the machine it ran on (the CPU class every figure holds for) and torch's version."""
    from llmctl import hardware

    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "cpu": hardware.cpu_name(),
               "isa": hardware.cpu_isa(), "load_average_at_end": os.getloadavg()}
    info = {**info, "machine": {**machine, **info.get("machine", {})}}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
