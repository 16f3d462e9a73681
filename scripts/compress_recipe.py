#!/usr/bin/env python
"""The compression recipe (docs/compression.md): prune the Tiny Shakespeare BPE model to about half its
non-embedding parameters, distil it back, and compare with the same small shapes trained from scratch.

  teacher     configs/shakespeare-bpe.yaml trained as shipped (trained here if RUNS/teacher is not finished)
  for each pruning axis (width, depth, both) at half the teacher's non-embedding parameters:
    pruned                 `llmctl prune --target-params HALF --by AXIS`, no training
    pruned + distilled     finetune.task=distill from the pruned model, 20% of the teacher's steps
    fresh + distilled      the same distillation from a fresh (random) model of the pruned shape
    scratch 20%            pretrain the pruned shape from scratch for 20% of the teacher's steps
    scratch 100%           ... and for the teacher's full budget
Validation loss is `llmctl eval` (one full pass over the held-out split), mean and spread over seeds. Decode speed
is batch-1 greedy decoding of 200 tokens after a 16-token prompt, eager and compiled, in float32 (what `infer`
picks for these sizes), the median of 5 interleaved rounds, measured alone once training is done. Training jobs
run two at a time with one thread each (2 cores); their wall times are comparable with each other, the
teacher's is its own (alone, two threads).

    python scripts/compress_recipe.py [--runs runs/compress] [--seeds 3] [--full-seeds-for depth]

Re-running skips finished runs, so an interrupted recipe continues. Figures go to benchmarks/compress.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shakespeare-bpe.yaml"
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
AXES = ("width", "depth", "both")
SHAPE_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "mlp_hidden")


def llmctl(*args, threads: int | None = None) -> str:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "llmctl", *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r.stdout


def finished(run: Path) -> bool:
    try:
        return json.loads((run / "status.json").read_text())["status"] == "finished"
    except (OSError, ValueError, KeyError):
        return False


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def val_loss(run: Path) -> float:
    return json.loads(llmctl("eval", "--ckpt", run, "--json", threads=2))["loss"]


def shape_sets(shape: dict) -> list[str]:
    out = []
    for k, v in shape.items():
        out += ["--set", f"model.{k}={v}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "compress")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--all-seeds-for", default=",".join(AXES),
                    help="axes whose rows get every seed (the others get one; runs of other seeds that are already "
                         "finished are counted too)")
    ap.add_argument("--no-train", action="store_true", help="measure and report the runs that are finished only")
    ap.add_argument("--budget", type=float, default=0.2, help="the distillation budget, a fraction of the teacher's")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "compress.json")
    args = ap.parse_args()
    runs: Path = args.runs
    runs.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    teacher = runs / "teacher"
    if not finished(teacher):
        print("training the teacher (configs/shakespeare-bpe.yaml as shipped)", flush=True)
        llmctl("pretrain", "-c", CONFIG, "--set", f"data.path={DATA}", "--out", teacher,
               *(["--resume"] if (teacher / "latest").exists() else []), "--quiet")
    teacher_steps = status(teacher)["steps"]
    steps = int(round(teacher_steps * args.budget))
    from llmctl.loading import load_model

    parent = load_model(teacher, "cpu").model
    half = parent.num_params(embeddings=False) // 2
    common = ["--set", f"data.path={DATA}", "--set", "generate.compile=false", "--set", "train.batch_size=16",
              "--quiet"]

    shapes = {}
    for axis in AXES:
        pruned = runs / axis / "pruned"
        if not finished(pruned):
            llmctl("prune", "--ckpt", teacher, "--target-params", half, "--by", axis, "--data", DATA,
                   "--out", pruned, "--overwrite", "--quiet", threads=2)
        cfg = yaml.safe_load((pruned / "config.yaml").read_text())["model"]
        shapes[axis] = {k: cfg[k] for k in SHAPE_KEYS if cfg.get(k) is not None}

    # every training job: (row name, axis, seed, run dir, llmctl arguments)
    jobs = []
    all_seeds = set(args.all_seeds_for.split(","))
    for axis in AXES:
        shape = shapes[axis]
        for seed in range(args.seeds if axis in all_seeds else 1):
            s = ["--set", f"train.seed={1337 + seed}"]
            kd = ["--set", "finetune.task=distill", "--set", f"finetune.teacher={teacher}"]
            short = ["--set", f"train.max_steps={steps}", "--set", f"train.eval_interval={steps}"]
            jobs.append(("pruned + distilled", axis, seed, runs / axis / f"distill-{seed}",
                         ["finetune", "--from", runs / axis / "pruned", *kd, *short, "--set", "train.lr=1e-3",
                          "--set", f"train.warmup_steps={steps // 10}", *s, *common]))
            jobs.append(("scratch, 20% budget", axis, seed, runs / axis / f"scratch20-{seed}",
                         ["pretrain", "-c", CONFIG, *shape_sets(shape), *short, *s, *common]))
            jobs.append(("fresh + distilled", axis, seed, runs / axis / f"fresh-distill-{seed}",
                         ["finetune", *kd, *shape_sets(shape), "--set", "model.arch=llama", "--set",
                          "model.block_size=128", "--set", "model.dropout=0.2", "--set", "train.lr=2e-3",
                          *short, *s, *common]))
            jobs.append(("scratch, full budget", axis, seed, runs / axis / f"scratch100-{seed}",
                             ["pretrain", "-c", CONFIG, *shape_sets(shape), "--set", f"train.max_steps={teacher_steps}",
                              *s, *common]))
    # the long runs first, so two workers stay busy to the end
    jobs.sort(key=lambda j: j[0] != "scratch, full budget")

    def run(job):
        name, axis, seed, out, cmd = job
        if not finished(out):
            t0 = time.time()
            llmctl(*cmd, "--out", out, "--overwrite", threads=1)
            print(f"{time.time() - t_start:7.0f}s  {axis:5s} {name} seed {seed}: {time.time() - t0:.0f}s", flush=True)
        return job

    if not args.no_train:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, jobs))

    # ---- measurements
    rows = []

    def add(name, axis, dirs, train_steps, shape_of):
        losses = [val_loss(d) for d in dirs]
        walls = [status(d).get("wall_seconds") for d in dirs]
        rows.append({
            "name": name, "axis": axis, "params": None, "params_non_embedding": None, "shape": shape_of,
            "val_loss": statistics.mean(losses),
            "val_loss_spread": (max(losses) - min(losses)) if len(losses) > 1 else 0.0,
            "val_loss_stdev": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "val_losses": losses, "perplexity": float(2.718281828459045 ** statistics.mean(losses)),
            "seeds": len(dirs), "train_steps": train_steps,
            "wall_seconds": statistics.mean(w for w in walls if w is not None) if any(walls) else None,
            "runs": [str(d) for d in dirs],
        })

    add("teacher", "-", [teacher], teacher_steps, None)
    for axis in AXES:
        add("pruned (no training)", axis, [runs / axis / "pruned"], 0, shapes[axis])
        for name, stem, n in (("pruned + distilled", "distill", steps), ("fresh + distilled", "fresh-distill", steps),
                              ("scratch, 20% budget", "scratch20", steps),
                              ("scratch, full budget", "scratch100", teacher_steps)):
            dirs = [d for d in (runs / axis / f"{stem}-{s}" for s in range(args.seeds)) if finished(d)]
            add(name, axis, dirs, n, shapes[axis])

    # parameters and decode speed per shape (the weights do not change the speed)
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_infer import measure

    speed_of = {"-": teacher, **{axis: runs / axis / "pruned" for axis in AXES}}
    params = {}
    for key, ck in speed_of.items():
        m = load_model(ck, "cpu").model
        params[key] = (m.num_params(), m.num_params(embeddings=False))
    samples: dict = {(k, c): [] for k in speed_of for c in (False, True)}
    for key, ck in speed_of.items():  # builds (or loads) each compiled step once before timing
        measure({"ckpt": str(ck), "batch": 1, "dtype": "float32", "quantize": "none", "compile": True,
                 "impl": "llmctl", "repeats": 1})
    for _ in range(5):
        for key, ck in speed_of.items():
            for compiled in (False, True):
                r = measure({"ckpt": str(ck), "batch": 1, "dtype": "float32", "quantize": "none",
                             "compile": compiled, "impl": "llmctl", "repeats": 1})
                samples[(key, compiled)].append(r["tokens_per_sec"])
    for row in rows:
        row["params"], row["params_non_embedding"] = params[row["axis"]]
        row["tok_s_eager"] = statistics.median(samples[(row["axis"], False)])
        row["tok_s_compiled"] = statistics.median(samples[(row["axis"], True)])
    teacher_row = rows[0]
    for row in rows:
        row["val_loss_vs_teacher"] = row["val_loss"] / teacher_row["val_loss"] - 1
        row["speedup_eager"] = row["tok_s_eager"] / teacher_row["tok_s_eager"]
        row["speedup_compiled"] = row["tok_s_compiled"] / teacher_row["tok_s_compiled"]

    result = {"teacher": str(teacher), "teacher_steps": teacher_steps, "budget_steps": steps,
              "target_params_non_embedding": half, "load_average": os.getloadavg(),
              "recipe_seconds": round(time.time() - t_start), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'row':24s} {'axis':6s} {'params':>9s} {'val loss':>15s} {'vs T':>7s} {'eager':>7s} {'compiled':>8s}")
    for r in rows:
        print(f"{r['name']:24s} {r['axis']:6s} {r['params_non_embedding']:9,d} "
              f"{r['val_loss']:7.4f} ±{r['val_loss_spread'] / 2:6.4f} {100 * r['val_loss_vs_teacher']:+6.1f}% "
              f"{r['tok_s_eager']:7.0f} {r['tok_s_compiled']:8.0f}  ({r['seeds']} seeds, {r['train_steps']} steps)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
