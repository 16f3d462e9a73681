"""Check `llmctl pretrain --dry-run`'s memory and time estimates against a real run on this machine.

The model is the 6x6x384 GPT (arch gpt2, context 256, char-level Tiny Shakespeare) at batch 8 x 256, default
precision (bf16 autocast on CPU). Three fresh processes:
  1. `llmctl prepare` (so neither measured process tokenizes);
  2. `llmctl pretrain --dry-run --json`: the estimates;
  3. a real run of 5 + 50 steps in a process that records its resident size after its imports, then trains
     through `commands.training.pretrain`, and reports the growth of its peak resident size (VmHWM) over that
     baseline and the time of the 50 steps after the first 5 (steady state).

The first optimizer construction imports torch._dynamo lazily (~70 MB of modules); process 3 imports it with
the others before taking the baseline, so the comparison is about tensors, not modules. A fourth process repeats
the memory measurement (4 steps) with MALLOC_TRIM_THRESHOLD_=0, under which glibc hands freed memory back at once:
the difference between the two is heap that the default allocator keeps after the first step.

    python scripts/check_estimates.py [--data PATH] [--steps 50] [--repeat 1]

Linux only (reads /proc/self/status). Timings on a shared machine are noisy: run it when the machine is quiet,
or use --repeat and look at the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

MODEL = ["model.arch=gpt2", "model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.block_size=256",
         "train.batch_size=8", "train.eval_interval=0", "train.eval_batches=2"]

MEASURE = r"""
import json, sys, time
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
import torch, llmctl.commands.training as training_cmd
import_rss = status("VmRSS")
import torch._dynamo  # imported lazily by the first optimizer; an import, so before the baseline
base = status("VmRSS")
sets, out, warmup = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
stamps = []
training_cmd.pretrain(None, sets, out, on_step=lambda s: stamps.append(time.perf_counter()))
durations = [b - a for a, b in zip(stamps, stamps[1:])]
print(json.dumps({
    "baseline_rss": base, "dynamo_import": base - import_rss,
    "peak_growth": status("VmHWM") - base,
    "steady_seconds": sum(durations[warmup - 1:]), "steps": len(durations[warmup - 1:]),
}))
"""


def run(cmd: list[str], env: dict) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--steps", type=int, default=50, help="steady-state steps of the real run")
    ap.add_argument("--warmup", type=int, default=5, help="steps of the real run not counted")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="extra overrides for both runs")
    args = ap.parse_args()
    env = dict(os.environ)
    sets = [*MODEL, f"data.path={args.data}", *args.set]
    exe = [sys.executable, "-m", "llmctl"]
    run([*exe, "prepare", *sum((["--set", s] for s in sets), [])], env)
    ok = True
    for i in range(args.repeat):
        load_before = os.getloadavg()[0]  # other processes on the machine make both timings meaningless
        with tempfile.TemporaryDirectory() as tmp:
            steps = args.warmup + args.steps
            real_sets = [*sets, f"train.max_steps={steps}", "train.log_interval=10"]
            report = json.loads(run([*exe, "pretrain", *sum((["--set", s] for s in real_sets), []), "--dry-run",
                                     "--json", "--out", f"{tmp}/run"], env))
            m = json.loads(run([sys.executable, "-c", MEASURE, json.dumps(real_sets), f"{tmp}/run", str(args.warmup)],
                               env))
            # the same with glibc returning freed memory at once: what the tensors need, without the heap the
            # default allocator keeps after the first step (memory only: 4 steps reach the peak)
            trim = json.loads(run([sys.executable, "-c", MEASURE, json.dumps([*sets, "train.max_steps=4"]),
                                   f"{tmp}/trim", "2"], {**env, "MALLOC_TRIM_THRESHOLD_": "0"}))
        mem, tm = report["memory"], report["time"]
        est_time = tm["step_seconds"] * m["steps"]
        rows = [
            ("memory: estimate (total)", mem["total"] / 2**20, "MiB"),
            ("memory: measured peak RSS growth", m["peak_growth"] / 2**20, "MiB"),
            ("  same, MALLOC_TRIM_THRESHOLD_=0", trim["peak_growth"] / 2**20, "MiB"),
            ("  dry run's own RSS growth, timed steps", (tm.get("measured_peak_memory") or 0) / 2**20, "MiB"),
            (f"time: estimate for {m['steps']} steps", est_time, "s"),
            (f"time: measured, steps {args.warmup + 1}-{steps}", m["steady_seconds"], "s"),
        ]
        mem_ratio = mem["total"] / m["peak_growth"]
        time_ratio = est_time / m["steady_seconds"]
        print(f"run {i + 1}: {report['parameters']['total']:,} parameters, {report['precision']}, "
              f"batch {report['config']['train']['batch_size']} x {report['config']['model']['block_size']}; "
              f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores)")
        print(f"  memory terms (MiB): weights {mem['weights'] / 2**20:.1f}, gradients {mem['gradients'] / 2**20:.1f}, "
              f"optimizer {mem['optimizer'] / 2**20:.1f}, autocast copies {mem['autocast_copies'] / 2**20:.1f}, "
              f"activations {mem['activations'] / 2**20:.1f} "
              f"(checkpointed {mem['activations_checkpointed'] / 2**20:.1f})")
        print(f"  baseline RSS after imports {m['baseline_rss'] / 2**20:.0f} MiB "
              f"(torch._dynamo's lazy import: {m['dynamo_import'] / 2**20:.0f} MiB of it)")
        for name, value, unit in rows:
            print(f"  {name:40s} {value:10.1f} {unit}")
        print(f"  (memory estimate / measured with MALLOC_TRIM_THRESHOLD_=0: {mem['total'] / trim['peak_growth']:.3f})")
        for what, ratio in (("memory", mem_ratio), ("time", time_ratio)):
            good = abs(ratio - 1) <= 0.25
            ok &= good
            print(f"  {what}: estimate / measured = {ratio:.3f} ({(ratio - 1) * 100:+.1f}%) "
                  f"{'within' if good else 'OUTSIDE'} 25%")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
