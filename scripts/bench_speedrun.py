#!/usr/bin/env python
"""Time to a target loss on Tiny Shakespeare (character level): nanoGPT, llmctl's default and llmctl's speedrun.

The rule (issue 34): the target is nanoGPT's final validation loss on its CPU config (1.905 measured here; --target
to re-measure). nanoGPT's figure is the whole-process wall time of its `train.py` run of that config, with
evaluation off (`bench_train.run_nanogpt`: 2000 steps). An llmctl figure is the whole-process wall time (start-up
included) of a run with `train.stop_at_loss` at the target, which ends at the first validation at or below it,
minus its validation passes (`val_seconds` in metrics.jsonl): they measure, they do not train. Validation is one
full pass over nanoGPT's split (the last 10 % of the characters), about every 20k training tokens (RECIPES).

The three run alternately, round after round, as whole processes; each figure is the median over the rounds.

    python scripts/bench_speedrun.py --nanogpt ../peers/nanoGPT --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import prepare_nanogpt, run_nanogpt, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.905  # nanoGPT's final validation loss on its CPU config (issue 34)
# each llmctl run with its validation interval: about 20k tokens apart in both (batch 12 x 64, batch 32 x 64)
RECIPES = {"llmctl default": ("configs/shakespeare-char.yaml", 25),
           "llmctl speedrun": ("configs/shakespeare-char-speedrun.yaml", 10)}


def run_llmctl(config: str, eval_interval: int, data: Path, target: float, extra: list[str]) -> dict:
    """One whole `llmctl pretrain` process that stops at the target: its time to target by the rule."""
    out = Path(tempfile.mkdtemp(prefix="speedrun-")) / "run"
    sets = [f"data.path={data}", f"train.stop_at_loss={target}", f"train.eval_interval={eval_interval}",
            "train.eval_batches=null", "train.save_interval=0", "train.keep_best=false", *extra]
    cmd = [sys.executable, "-m", "llmctl", "pretrain", "-c", str(ROOT / config), "--out", str(out), "--quiet",
           "--json"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"llmctl failed:\n{p.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out.parent, ignore_errors=True)
    vals = [r for r in rows if "val_loss" in r]
    val_s = sum(r["val_seconds"] for r in vals)
    reached = vals[-1]["val_loss"] <= target
    return {"time_to_target_s": wall - val_s if reached else None, "wall_s": wall, "val_seconds": val_s,
            "validations": len(vals), "step": vals[-1]["step"], "val_loss": vals[-1]["val_loss"],
            "train_seconds": vals[-1]["time"], "reached": reached}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/tinyshakespeare.txt")
    ap.add_argument("--nanogpt", type=Path, default=ROOT.parent / "nanoGPT", help="a clone of karpathy/nanoGPT")
    ap.add_argument("--target", type=float, default=TARGET)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["nanoGPT", *RECIPES], action="append", help="run only these (tuning)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="an override for the llmctl runs")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/speedrun.json")
    args = ap.parse_args()
    names = args.only or ["nanoGPT", *RECIPES]
    if "nanoGPT" in names:
        if not (args.nanogpt / "train.py").exists():
            raise SystemExit(f"no nanoGPT clone at {args.nanogpt} (git clone https://github.com/karpathy/nanoGPT)")
        prepare_nanogpt(args.nanogpt, args.data)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            if name == "nanoGPT":
                res = run_nanogpt(args.nanogpt, 2000)
                res["time_to_target_s"] = res["wall_s"]
            else:
                res = run_llmctl(*RECIPES[name], args.data, args.target, args.extra)
            results[name].append(res)
            print(f"round {r + 1}: {name:16s} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in res.items()), file=sys.stderr, flush=True)
    summary = {}
    base = (statistics.median(x["time_to_target_s"] for x in results["nanoGPT"]) if "nanoGPT" in results else None)
    print(f"\n{'run':18s} {'time to target (s)':>19s} {'vs nanoGPT':>11s} {'step':>6s}")
    for name, runs in results.items():
        times = [x["time_to_target_s"] for x in runs]
        t = statistics.median(times) if None not in times else None
        ratio = round(t / base, 3) if t is not None and base else None
        step = statistics.median(x.get("step", 2000) for x in runs)
        summary[name] = {"time_to_target_s": round(t, 1) if t is not None else None, "ratio_vs_nanogpt": ratio,
                         "step": step, "runs": runs}
        print(f"{name:18s} {t if t is not None else float('nan'):>19.1f} {ratio or float('nan'):>10.3f}x {step:>6}")
    write_result(args.json, {
        "target": args.target, "rounds": args.rounds,
        "rule": "whole-process wall time of a run stopping at the first full validation <= target, minus its "
                "validation passes; nanoGPT: its whole 2000-step train.py run, evaluation off",
        "configs": RECIPES, "overrides": args.extra, "results": summary})


if __name__ == "__main__":
    main()
