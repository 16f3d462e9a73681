"""Controlled sentiment generation on SST-2 (the DPO paper's IMDb experiment, on data we have): one command.

  policy  = the language model the SST-2 recipe pretrains (configs/sst2-lm.yaml; scripts/sst2_recipe.sh step 1)
  reward  = the SST-2 classifier that recipe finetunes from it (configs/sst2-classify.yaml), P("positive" | text)
  prompts = the first 2-4 words of SST-2 training sentences; held out: the same of dev sentences

Stages (each writes under RUNS and is skipped when its output is there, so a stopped run continues):
  1. pretrain the policy and finetune the classifier with the CLI (reduced steps: --lm-steps, --cls-steps), unless
     --policy / --classifier name runs made before;
  2. prompts: --train-prompts from train.tsv, --heldout-prompts from dev.tsv;
  3. pairs: --pair-samples completions per training prompt sampled from the policy by llmctl's engine (temperature
     1, the policy's own distribution), scored by the classifier; best = chosen, worst = rejected (ties skipped),
     written as TRL's columns prompt / chosen / rejected;
  4. DPO with llmctl (`finetune.task: dpo`) for each --betas, and TRL's DPOTrainer (--trl-python, a separate venv)
     on `llmctl export --format hf` of the same policy with the same pairs and settings; TRL's model comes back
     through `llmctl import hf`;
  5. GRPO (`finetune.task: grpo`, reward `classifier:RUN:LABEL`), when this llmctl has it (else skipped, said);
  6. every policy measured the same way: --eval-samples completions per held-out prompt (same seeds, temperature
     1), mean reward, and the KL to the starting policy along them (the exact KL of the next-token distributions,
     summed over a completion's tokens, averaged over completions); writes RUNS/sentiment_rl.json, a table, a plot.

Usage: PYTHONPATH=. python scripts/sentiment_rl_recipe.py [--runs runs/sentiment-rl] [--policy RUN --classifier RUN]
       [--trl-python /work/venv-trl/bin/python] [--betas 0.1] ...   (python scripts/sentiment_rl_recipe.py -h)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmctl.commands.inference import classify_texts  # noqa: E402
from llmctl.loading import for_inference, load_model  # noqa: E402
from llmctl.rows import Request  # noqa: E402
from llmctl.sampling import Sampling  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--runs", default="runs/sentiment-rl", help="where every stage writes")
    a("--sst2", default=str(ROOT.parent / "shared/data/sst2"), help="the folder of train.tsv and dev.tsv")
    a("--policy", help="a language-model run to start from (skips its pretraining)")
    a("--classifier", help="an SST-2 classifier run to reward with (skips its finetuning)")
    a("--lm-steps", type=int, default=96, help="pretraining steps of the policy (the SST-2 recipe: 1500)")
    a("--cls-steps", type=int, default=120, help="finetuning steps of the classifier (the SST-2 recipe: 2000)")
    a("--train-prompts", type=int, default=128)
    a("--heldout-prompts", type=int, default=64)
    a("--pair-samples", type=int, default=4, help="completions per training prompt; best and worst make a pair")
    a("--eval-samples", type=int, default=4, help="completions per held-out prompt when measuring a policy")
    a("--max-new-tokens", type=int, default=24)
    a("--betas", default="0.1", help="comma-separated DPO betas (the first one also runs TRL and GRPO)")
    a("--steps", type=int, default=8, help="optimizer steps of DPO (both)")
    a("--batch-size", type=int, default=16, help="pairs per DPO step (both)")
    a("--lr", type=float, default=2e-4)
    a("--grpo", action=argparse.BooleanOptionalAction, default=True, help="run GRPO (--no-grpo: leave it out)")
    a("--group-size", type=int, default=4, help="GRPO completions per prompt")
    a("--grpo-steps", type=int, default=12)
    a("--grpo-batch-size", type=int, default=8, help="prompts per GRPO step (x --group-size completions)")
    a("--timing-rounds", type=int, default=1, help="interleaved short DPO runs of each, for the step time")
    a("--timing-steps", type=int, default=8)
    a("--trl-python", default="/work/venv-trl/bin/python", help="a python with trl installed; '' skips TRL")
    a("--seed", type=int, default=1337)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# The CLI, timed


def llmctl(args: list[str], log: Path, stdout: Path | None = None) -> float:
    """Run one llmctl command (this checkout's), its output to `log` (its stdout to `stdout` when given); the
    seconds it took."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f, contextlib.ExitStack() as stack:
        o = stack.enter_context(open(stdout, "w")) if stdout else f
        r = subprocess.run([sys.executable, "-m", "llmctl", *args], stdout=o, stderr=f, cwd=ROOT, env=env)
    if r.returncode:
        raise SystemExit(f"llmctl {' '.join(args[:2])} failed (exit {r.returncode}); see {log}")
    return round(time.perf_counter() - start, 1)


def train_models(a, runs: Path, times: dict) -> tuple[str, str]:
    """The policy and the classifier: given, or made by the SST-2 recipe's configs (reduced steps)."""
    policy, cls = a.policy or str(runs / "lm"), a.classifier or str(runs / "cls")
    train = f"data.path={a.sst2}/train.tsv"
    if not a.policy and not (runs / "lm" / "latest").exists():
        times["pretrain"] = llmctl(["pretrain", "-c", "configs/sst2-lm.yaml", "--set", train, "--set",
                                    f"train.max_steps={a.lm_steps}", "--set", f"train.seed={a.seed}", "--out",
                                    policy, "--overwrite", "--quiet"], runs / "lm.log")
    if not a.classifier and not (runs / "cls" / "best").exists():
        times["classifier"] = llmctl(["finetune", "-c", "configs/sst2-classify.yaml", "--from", policy, "--set",
                                      train, "--set", f"train.max_steps={a.cls_steps}", "--set",
                                      f"train.eval_interval={a.cls_steps // 2}", "--set", f"train.seed={a.seed}",
                                      "--out", cls, "--overwrite", "--quiet"], runs / "cls.log")
    dev = runs / "cls-dev.json"
    if not dev.exists():
        llmctl(["eval", "--ckpt", f"{cls}/best" if (Path(cls) / "best").exists() else cls, "--data",
                f"{a.sst2}/dev.tsv", "--json"], dev)
    return policy, cls


# ----------------------------------------------------------------------------------------------------------------
# Prompts and samples


def prefixes(path: str, column: str, n: int, seed: int) -> list[str]:
    """The first 2-4 words (drawn per sentence) of `n` sentences of at least 8 words, in a seeded order."""
    with open(path) as f:
        rows = [r[column] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    rows = [r.split() for r in rows if len(r.split()) >= 8]
    rng = random.Random(seed)
    rng.shuffle(rows)
    return [" ".join(w[: rng.randint(2, 4)]) for w in rows[:n]]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample(loaded, prompts: list[str], k: int, max_new: int, seed: int) -> list[dict]:
    """`k` completions of each prompt by llmctl's engine (continuous batching), temperature 1 and no top-k/top-p:
    the policy's own distribution. Row i*k+j has seed seed+i*k+j, so every policy sees the same random stream."""
    tok = loaded.tokenizer
    reqs = [Request(tok.encode(p), Sampling(max_new, temperature=1.0, seed=seed + i * k + j))
            for i, p in enumerate(prompts) for j in range(k)]
    index = {id(r): n for n, r in enumerate(reqs)}
    out: list[dict] = [{} for _ in reqs]
    for row in loaded.engine.run(reqs, slots=64):
        if row.done:
            n = index[id(row.request)]
            out[n] = {"prompt": prompts[n // k], "completion": row.text, "ids": list(row.tokens),
                      "n_prompt": len(row.request.prompt), "eos": row.finish_reason == "eos"}
    return out


def rewards(cls, label: str, texts: list[str]) -> list[float]:
    """P(label | text) under the classifier."""
    return [r["probabilities"][label] for r in classify_texts(cls, texts, batch_size=64)]


def positive_label(cls) -> str:
    labels = [str(x) for x in cls.labels]
    for want in ("positive", "1"):
        if want in labels:
            return want
    raise SystemExit(f"the classifier's labels {labels} name no positive class")


def make_pairs(samples: list[dict], scores: list[float], k: int, tok) -> tuple[list[dict], dict]:
    """Best and worst of each prompt's k completions; skipped: ties, equal texts, and completions whose text does
    not tokenize after the prompt as it did alone (TRL tokenizes prompt + answer together, llmctl apart)."""
    pairs, skipped = [], {"tie": 0, "same_text": 0, "tokenization": 0, "empty": 0}
    for i in range(0, len(samples), k):
        group = sorted(((r, s) for r, s in zip(scores[i: i + k], samples[i: i + k]) if s["completion"].strip()),
                       key=lambda x: x[0])
        if len(group) < 2:
            skipped["empty"] += 1
            continue
        (lo, worst), (hi, best) = group[0], group[-1]
        if hi == lo:
            skipped["tie"] += 1
        elif best["completion"] == worst["completion"]:
            skipped["same_text"] += 1
        elif any(tok.encode(s["prompt"] + s["completion"]) != tok.encode(s["prompt"]) + tok.encode(s["completion"])
                 for s in (best, worst)):
            skipped["tokenization"] += 1
        else:
            pairs.append({"prompt": best["prompt"], "chosen": best["completion"], "rejected": worst["completion"],
                          "reward_chosen": round(hi, 6), "reward_rejected": round(lo, 6)})
    return pairs, skipped


# ----------------------------------------------------------------------------------------------------------------
# Measuring a policy


def loaded_for_sampling(path: str):
    loaded = load_model(path, device="cpu")
    return for_inference(loaded, dtype="float32", compile=False)


def measure(path: str, start: str, cls: str, label: str, prompts: Path, a, runs: Path, name: str) -> dict:
    """`llmctl eval --reward`: --eval-samples completions per held-out prompt, sampled the same way (temperature 1,
    no top-k/top-p, the same seeds) from every policy; mean reward and the KL to the starting policy."""
    out = runs / f"eval-{name.replace(' ', '_').replace('=', '')}.json"
    if not out.exists():
        seconds = llmctl(["eval", "--ckpt", path, "--reward", f"classifier:{cls}:{label}", "--prompts", str(prompts),
                          "--reference", start, "--samples", str(a.eval_samples), "--seed", str(a.seed + 1),
                          "--temperature", "1", "--top-k", "0", "--max-new-tokens", str(a.max_new_tokens),
                          "--set", "generate.top_p=null", "--json"], out.with_suffix(".log"), stdout=out)
        r = json.loads(out.read_text())
        out.write_text(json.dumps({**r, "eval_seconds": seconds}))
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------------------------
# Training the policies


def matched_settings(a, beta: float) -> list[str]:
    """llmctl's DPO settings, each matched by sentiment_rl_trl.py's DPOConfig: sigmoid loss without label smoothing,
    constant learning rate without warmup, AdamW (0.9, 0.999, 1e-8) without weight decay, gradient norm clipped to
    1, float32, dropout off, every pair trained (no validation split)."""
    sets = {"finetune.task": "dpo", "finetune.dpo_loss": "sigmoid", "finetune.beta": beta,
            "finetune.label_smoothing": 0.0, "train.max_steps": a.steps, "train.batch_size": a.batch_size,
            "train.lr": a.lr, "train.lr_schedule": "constant", "train.warmup_steps": 0, "train.weight_decay": 0.0,
            "train.beta1": 0.9, "train.beta2": 0.999, "train.eps": 1e-8, "train.grad_clip": 1.0,
            "train.dtype": "float32", "model.dropout": 0.0, "data.val_fraction": 0.0, "train.eval_interval": 0,
            "train.log_interval": 1, "train.seed": a.seed}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def step_seconds(times: list[float]) -> float:
    """Wall seconds per optimizer step from the elapsed time at each step's end, the first (warm-up) step left out."""
    return round((times[-1] - times[0]) / (len(times) - 1), 4)


def dpo_llmctl(a, runs: Path, policy: str, pairs: Path, beta: float, name: str = "", steps: int = 0) -> dict:
    """llmctl's DPO run (`steps` instead of --steps when given), with its wall time per step."""
    name = name or f"dpo-llmctl-b{beta}"
    out = runs / name
    if not (out / "latest").exists():
        sets = matched_settings(a, beta) + (["--set", f"train.max_steps={steps}"] if steps else [])
        seconds = llmctl(["finetune", "--from", policy, "--set", f"data.path={pairs}", *sets, "--out", str(out),
                          "--overwrite", "--quiet"], runs / f"{name}.log")
        (out / "wall.json").write_text(json.dumps({"seconds": seconds}))
    m = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r and "time" in r]
    return {"path": str(out), "step_seconds": step_seconds([r["time"] for r in m]), "steps": m[-1]["step"],
            "final": {k: m[-1][k] for k in ("loss", "margin", "accuracy", "kl") if k in m[-1]},
            "command_seconds": json.loads((out / "wall.json").read_text())["seconds"]}


def import_hf(hf: Path, out: Path, policy: str, runs: Path) -> None:
    """`llmctl import hf`, storing the policy's own tokenizer.json. The imported config names the special tokens
    (<eos>, <pad>), so eval --reward takes the tokenizer for another one than the policy's: TRL's model is measured
    against the starting policy imported the same way (round_trip checks that it is the same model)."""
    tok = next(p for p in (Path(policy) / "tokenizer.json", *sorted(Path(policy).glob("step-*/tokenizer.json")))
               if p.exists())
    llmctl(["import", "hf", str(hf), "--out", str(out), "--tokenizer", str(tok), "--overwrite"],
           runs / f"import-{out.name}.log")


@torch.no_grad()
def round_trip(policy: str, imported: Path) -> float:
    """The largest difference of the logits of the policy and of its HF export imported back, on a batch of
    training text: the reference TRL's model is measured against is the starting policy itself."""
    a, b = load_model(policy, device="cpu"), load_model(imported, device="cpu")
    ids = torch.tensor([a.tokenizer.encode("the movie is a gorgeous , witty , seductive ride .")])
    return float((a.model(ids).float() - b.model(ids).float()).abs().max())


def train_trl(a, runs: Path, hf: Path, pairs: Path, beta: float, name: str, steps: int) -> dict:
    """scripts/sentiment_rl_trl.py in the TRL venv: DPOTrainer with llmctl's settings; its timing.json."""
    out = runs / name
    if not (out / "timing.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        block = json.loads((hf / "config.json").read_text()).get("max_position_embeddings", 64)
        settings = {"model": str(hf), "pairs": str(pairs), "out": str(out), "beta": beta, "lr": a.lr,
                    "steps": steps, "batch_size": a.batch_size, "seed": a.seed, "max_length": block + 1,
                    "beta2": 0.999, "grad_clip": 1.0}
        (out / "settings.json").write_text(json.dumps(settings, indent=1))
        start = time.perf_counter()
        with open(runs / f"{name}.log", "w") as f:
            r = subprocess.run([a.trl_python, str(ROOT / "scripts/sentiment_rl_trl.py"), str(out / "settings.json")],
                               stdout=f, stderr=subprocess.STDOUT)
        if r.returncode:
            raise SystemExit(f"TRL's DPO failed (exit {r.returncode}); see {runs}/{name}.log")
        (out / "wall.json").write_text(json.dumps({"seconds": round(time.perf_counter() - start, 1)}))
    return json.loads((out / "timing.json").read_text())


def timing_rounds(a, runs: Path, policy: str, pairs: Path, beta: float) -> list[dict]:
    """--timing-rounds short runs of each, interleaved (llmctl, TRL, llmctl, TRL, ...) so that the load of a busy
    machine falls on both alike: seconds per step of each and their ratio per round."""
    rounds = []
    for i in range(a.timing_rounds):
        mine = dpo_llmctl(a, runs, policy, pairs, beta, f"timing-llmctl-{i}", a.timing_steps)["step_seconds"]
        t = train_trl(a, runs, runs / "policy-hf", pairs, beta, f"timing-trl-{i}", a.timing_steps)
        theirs = step_seconds(t["step_ends"])
        rounds.append({"llmctl": mine, "trl": theirs, "ratio": round(mine / theirs, 3)})
    return rounds


def dpo_trl(a, runs: Path, policy: str, pairs: Path, beta: float) -> dict:
    """TRL's DPOTrainer on the HF export of the same policy, then back into llmctl (llmctl import hf)."""
    hf, out, back = runs / "policy-hf", runs / f"dpo-trl-b{beta}", runs / f"dpo-trl-b{beta}-llmctl"
    if not (hf / "config.json").exists():
        llmctl(["export", "--ckpt", policy, "--format", "hf", "--out", str(hf), "--overwrite"], runs / "export.log")
        import_hf(hf, runs / "policy-hf-llmctl", policy, runs)
    train_trl(a, runs, hf, pairs, beta, out.name, a.steps)
    if not (back / "latest").exists() and not (back / "config.yaml").exists():
        import_hf(out / "model", back, policy, runs)
    t = json.loads((out / "timing.json").read_text())
    last = t["log"][-1] if t["log"] else {}
    return {"path": str(back), "reference": str(runs / "policy-hf-llmctl"),
            "round_trip_max_logit_diff": round_trip(policy, runs / "policy-hf-llmctl"),
            "step_seconds": step_seconds(t["step_ends"]), "steps": len(t["step_ends"]),
            "final": {k: last.get(k) for k in ("loss", "rewards/margins", "rewards/accuracies") if k in last},
            "command_seconds": json.loads((out / "wall.json").read_text())["seconds"]}


def grpo(a, runs: Path, policy: str, cls: str, label: str, prompts: Path, beta: float) -> dict | None:
    """GRPO with the classifier as reward, when this llmctl has `finetune.task: grpo` (None otherwise)."""
    out = runs / f"grpo-b{beta}"
    if not (out / "latest").exists():
        sets = {"finetune.task": "grpo", "finetune.reward": f"classifier:{cls}:{label}",
                "finetune.group_size": a.group_size, "finetune.beta": beta, "train.max_steps": a.grpo_steps,
                "train.batch_size": a.grpo_batch_size, "train.lr": a.lr, "train.lr_schedule": "constant",
                "train.warmup_steps": 0, "train.weight_decay": 0.0, "train.beta2": 0.999, "train.dtype": "float32",
                "model.dropout": 0.0, "data.val_fraction": 0.0, "train.eval_interval": 0, "train.log_interval": 1,
                "train.seed": a.seed, "generate.max_new_tokens": a.max_new_tokens, "generate.temperature": 1.0,
                "generate.top_k": "null", "generate.top_p": "null"}
        try:
            llmctl(["finetune", "--from", policy, "--set", f"data.path={prompts}",
                    *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")], "--out", str(out), "--overwrite",
                    "--quiet"], runs / f"grpo-b{beta}.log")
        except SystemExit as e:
            print(f"GRPO skipped: {e}", file=sys.stderr)
            return None
    m = [r for r in read_jsonl(out / "metrics.jsonl") if "time" in r and "reward" in r]
    return {"path": str(out), "step_seconds": step_seconds([r["time"] for r in m]), "steps": m[-1]["step"],
            "final": {k: m[-1][k] for k in ("reward", "kl") if k in m[-1]}}


# ----------------------------------------------------------------------------------------------------------------
# Report


def table(results: dict) -> str:
    lines = [f"{'policy':22s} {'reward':>7s} {'± std':>6s} {'KL':>7s} {'s/step':>7s}"]
    for name, r in results.items():
        step = f"{r['step_seconds']:.3f}" if r.get("step_seconds") is not None else "-"
        lines.append(f"{name:22s} {r['reward']:7.3f} {r['reward_std']:6.3f} {r['kl']:7.3f} "
                     f"{step:>7s}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    """Held-out reward against KL to the starting policy (matplotlib, when installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    marks = {"start,": ("0.5", "x"), "start": ("k", "*"), "dpo-llmctl": ("C0", "o"), "dpo-trl": ("C1", "s"),
             "grpo": ("C2", "^")}
    for name, r in results.items():
        color, marker = next(v for k, v in marks.items() if name.startswith(k))
        ax.scatter(r["kl"], r["reward"], c=color, marker=marker, s=60, label=name)
    start = results["start"]["reward"]
    ax.axhline(start, color="k", lw=0.8, ls=":")
    ax.set_xlabel("KL to the starting policy (nats per completion, held-out prompts)")
    ax.set_ylabel("mean reward P(positive)")
    ax.set_title("SST-2 controlled sentiment: reward vs KL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> None:
    a = parse_args(argv)
    runs = (ROOT / a.runs) if not Path(a.runs).is_absolute() else Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    stamp = runs / "stage-seconds.json"
    times = json.loads(stamp.read_text()) if stamp.exists() else {}
    policy, cls_path = train_models(a, runs, times)
    stamp.write_text(json.dumps(times, indent=1))
    train_prompts = prefixes(f"{a.sst2}/train.tsv", "sentence", a.train_prompts, a.seed)
    heldout = prefixes(f"{a.sst2}/dev.tsv", "content", a.heldout_prompts, a.seed)
    write_jsonl(runs / "prompts-train.jsonl", [{"prompt": p} for p in train_prompts])
    write_jsonl(runs / "prompts-heldout.jsonl", [{"prompt": p} for p in heldout])
    cls_path = f"{cls_path}/best" if (Path(cls_path) / "best").exists() else cls_path  # as eval --data used it
    cls = load_model(cls_path, device="cpu")
    label = positive_label(cls)
    pairs_path = runs / "pairs.jsonl"
    if not pairs_path.exists():
        start = loaded_for_sampling(policy)
        t0 = time.perf_counter()
        samples = sample(start, train_prompts, a.pair_samples, a.max_new_tokens, a.seed)
        scores = rewards(cls, label, [s["prompt"] + s["completion"] for s in samples])
        pairs, skipped = make_pairs(samples, scores, a.pair_samples, start.tokenizer)
        write_jsonl(pairs_path, pairs)
        times["pairs"] = round(time.perf_counter() - t0, 1)
        times["pairs_skipped"] = skipped
        stamp.write_text(json.dumps(times, indent=1))
    n_pairs = len(read_jsonl(pairs_path))
    betas = [float(b) for b in a.betas.split(",")]
    held = runs / "prompts-heldout.jsonl"
    results = {"start": measure(policy, policy, cls_path, label, held, a, runs, "start")}
    rounds: list[dict] = []

    def measured(name: str, info: dict | None) -> None:  # each policy's figures are written as soon as they exist
        if info is not None:
            ref = info.get("reference", policy)
            results[name] = {**measure(info["path"], ref, cls_path, label, held, a, runs, name), **info}
        report(a, runs, results, times, n_pairs, rounds)

    for beta in betas:
        measured(f"dpo-llmctl b={beta}", dpo_llmctl(a, runs, policy, pairs_path, beta))
    if a.trl_python:
        measured(f"dpo-trl b={betas[0]}", dpo_trl(a, runs, policy, pairs_path, betas[0]))
    if a.grpo:
        prompts = runs / "prompts-train.jsonl"
        measured(f"grpo b={betas[0]}", grpo(a, runs, policy, cls_path, label, prompts, betas[0]))
    if a.trl_python and a.timing_rounds:
        rounds += timing_rounds(a, runs, policy, pairs_path, betas[0])
        measured("", None)


def report(a, runs: Path, results: dict, times: dict, n_pairs: int, rounds: list[dict]) -> None:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    summary = {"script": "scripts/sentiment_rl_recipe.py", "cpu": cpu, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "settings": {k: v for k, v in vars(a).items() if k != "trl_python"},
               "classifier_dev": json.loads((runs / "cls-dev.json").read_text()), "pairs": n_pairs,
               "stage_seconds": times, "policies": results}
    dpo = [r for k, r in results.items() if k.startswith("dpo-llmctl")]
    trl = [r for k, r in results.items() if k.startswith("dpo-trl")]
    if dpo and trl:
        summary["llmctl_over_trl_step_time"] = round(dpo[0]["step_seconds"] / trl[0]["step_seconds"], 3)
    if rounds:
        summary["timing_rounds"] = rounds
        print("interleaved timing (s/step llmctl, TRL, ratio):", [(r["llmctl"], r["trl"], r["ratio"]) for r in rounds])
    (runs / "sentiment_rl.json").write_text(json.dumps(summary, indent=2))
    print(table(results))
    if plot(results, runs / "sentiment_rl.png"):
        print(f"plot: {runs}/sentiment_rl.png")
    print(f"summary: {runs}/sentiment_rl.json")


if __name__ == "__main__":
    main()
