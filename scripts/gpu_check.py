#!/usr/bin/env python
"""The measuring half of the GPU check; `scripts/gpu_check.sh` installs what is missing, then runs this.

Phases, in order of what matters most when time runs short (each in its own process, each result written to the
JSON file as soon as it is known, so a run cut short still returns what it measured):
  1. machine: the GPU's name, memory, capability; versions of Python, torch, CUDA, transformers;
  2. tests: the CUDA-marked tests (`pytest -m cuda tests/test_cuda.py`), counts and failures from its JUnit XML;
  3. train: `configs/gpt2-small.yaml` (GPT-2 124M) on a generated corpus, bf16 autocast: first its dry run
     (`llmctl pretrain --dry-run`: memory estimate, the dry run's own peak), then a few hundred steps eager and
     with `train.compile`, in process through `llmctl.commands.training.pretrain`, reading tokens/s (steady state: the
     first steps, which hold compilation, excluded), MFU from llmctl's own peak table (`llmctl.estimate`) and
     peak GPU memory (`torch.cuda.max_memory_allocated`) in the training process itself;
  4. decode: llmctl (eager, compiled ahead of time, weight-only int8) against transformers' `generate` with the
     same weights in bf16 at batch 1 and 16 (`scripts/bench_infer.py`'s measurement, greedy, 16-token prompt,
     200 new tokens), tokens/s and the ratio to transformers.
`--quick` shrinks every shape so the whole check runs on a CPU in well under a minute (CI runs
`scripts/gpu_check.sh --quick --device cpu`); the JSON then has the same keys, with null where a figure does not
apply (GPU memory, compiled runs: compiling on 2 CPU cores alone takes over a minute).

    python scripts/gpu_check.py --out DIR [--quick] [--device cuda|cpu]     (normally through gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from itertools import accumulate
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "llmctl-gpu-check/1"
GOAL_MFU = 0.45  # GPT-2 124M, bf16, train.compile, on an H100/H200-class GPU
GOAL_DECODE = 2.0  # llmctl's decode tokens/s over transformers' generate, batch 1, bf16
GOAL_MFU_GPUS = r"H100|H200|H800|GH200"

TRAIN_RUN_KEYS = ["tokens_per_sec", "mfu", "step_ms_median", "tokens_per_sec_whole_run", "mfu_whole_run",
                  "seconds_to_first_step", "train_seconds", "wall_seconds", "steps", "final_loss", "val_loss",
                  "peak_memory_bytes", "peak_memory_reserved_bytes"]
# (name, implementation, batch, compiled, quantize), in the order they run: the goal's figures first
DECODE = [("transformers_b1", "transformers", 1, False, "none"),
          ("transformers_b16", "transformers", 16, False, "none"),
          ("llmctl_b1", "llmctl", 1, False, "none"), ("llmctl_compiled_b1", "llmctl", 1, True, "none"),
          ("llmctl_b16", "llmctl", 16, False, "none"), ("llmctl_int8_b1", "llmctl", 1, False, "int8"),
          ("llmctl_int8_b16", "llmctl", 16, False, "int8"), ("llmctl_compiled_b16", "llmctl", 16, True, "none")]
DECODE_KEYS = ["impl", "batch", "compiled", "quantize", "tokens_per_sec", "ms_per_step", "ttft_ms", "first_call_s",
               "peak_memory_bytes"]

FULL = dict(steps=300, warmup_excluded=30, corpus_bytes=6_000_000, decode_shape="gpt2-124M", prompt=16, new=200,
            repeats=3, train_sets=["train.log_interval=10"])
QUICK = dict(steps=12, warmup_excluded=2, corpus_bytes=200_000, prompt=8, new=24, repeats=1,
             decode_shape=dict(arch="gpt2", n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=512,
                               activation="gelu_tanh"),
             train_sets=["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
                         "model.vocab_size=384", "tokenizer.vocab_size=320", "train.batch_size=4",
                         "train.warmup_steps=2", "train.log_interval=2"])


def skeleton() -> dict:
    """Every key the check writes, all null: the JSON of any run, quick or full, has exactly these."""
    k = dict.fromkeys
    return {
        "schema": SCHEMA, "mode": None, "device": None, "gpu_name": None,
        "gpu": k(["name", "count", "capability", "memory_bytes", "multiprocessors"]),
        "host": k(["cpu", "cpu_count", "platform", "python", "torch", "torch_cuda", "transformers", "datasets",
                   "llmctl_commit"]),
        "install": k(["python", "torch", "torch_cuda", "torch_kept", "wheels", "installed", "llmctl"]),
        "started": None, "seconds": None,
        "tests": k(["command", "exit_status", "collected", "passed", "failed", "errors", "skipped", "seconds",
                    "failures", "skip_reasons"]),
        "train": {**k(["config", "overrides", "steps", "warmup_steps_excluded", "batch_size", "grad_accum",
                       "block_size", "vocab_size", "tokens_per_step", "parameters", "precision", "flops_per_token",
                       "peak_flops", "peak_flops_source", "corpus_bytes", "train_tokens"]),
                  "eager": k(TRAIN_RUN_KEYS), "compiled": k(TRAIN_RUN_KEYS)},
        "memory": k(["estimate_bytes", "estimate_checkpointed_bytes", "device_capacity_bytes",
                     "dry_run_measured_peak_bytes", "dry_run_tokens_per_sec", "dry_run_mfu", "eager_peak_bytes",
                     "compiled_peak_bytes", "estimate_over_eager_peak", "estimate_over_compiled_peak"]),
        "decode": {**k(["model", "dtype", "prompt_tokens", "new_tokens", "repeats"]),
                   "settings": {name: k(DECODE_KEYS) for name, *_ in DECODE},
                   "vs_transformers": k(["b1_eager", "b1_compiled", "b1_best", "b16_eager", "b16_compiled",
                                         "b16_best"])},
        "goals": {"train_mfu": k(["target", "value", "met", "applies"]),
                  "decode_b1_vs_transformers": k(["target", "value", "met", "applies"])},
        "skipped": [], "errors": [], "ok": None,
    }


def key_paths(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, v in d.items():
        out.add(prefix + key)
        if isinstance(v, dict):
            out |= key_paths(v, prefix + key + ".")
    return out


class Report:
    """The JSON being filled in; `put` only accepts keys of the skeleton, and every change is saved at once."""

    def __init__(self, path: Path):
        self.path = path
        self.data = skeleton()

    def put(self, dotted: str, value: Any) -> None:
        *parents, last = dotted.split(".")
        d = self.data
        for p in parents:
            d = d[p]
        if not isinstance(d, dict) or last not in d:
            raise KeyError(f"{dotted} is not a key of the GPU check's JSON (add it to skeleton())")
        d[last] = value
        self.save()

    def get(self, dotted: str) -> Any:
        d = self.data
        for p in dotted.split("."):
            d = d[p]
        return d

    def note(self, kind: str, phase: str, why: str) -> None:
        self.data[kind].append({"phase": phase, "why": why})
        print(f"gpu check: {phase}: {'skipped' if kind == 'skipped' else 'FAILED'}: {why}", flush=True)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------------------------------------------
# Workers: each measurement in a fresh process (its own CUDA context, allocator peak and compile caches)


def worker_info(spec: dict) -> dict:
    import torch

    from llmctl import hardware

    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cpu": hardware.cpu_name(), "gpu": None}
    if spec["device"] == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                      "capability": f"{p.major}.{p.minor}", "memory_bytes": int(p.total_memory),
                      "multiprocessors": p.multi_processor_count}
    return out


def worker_train(spec: dict) -> dict:
    """`llmctl pretrain` in this process (dry run or real), timing every step and reading the GPU's peak."""
    import torch

    from llmctl import distributed, estimate, hardware
    from llmctl.commands import training as training_cmd
    from llmctl.events import Events
    from llmctl.plan import describe

    class StderrLog(Events):  # the run's log lines, as they come (no progress: the steps are timed here)
        def log(self, message: str) -> None:
            print(message, file=sys.stderr, flush=True)

    cuda = spec["device"] == "cuda"
    info: dict = {}
    stamps: list[tuple[int, float, int]] = []

    def on_plan(plan) -> None:
        d = describe(plan)
        peak = hardware.peak_flops(plan.device, plan.amp, plan.cfg.data.cache_dir)
        info.update(flops_per_token=estimate.flops_per_token(distributed.unwrap(plan.model), plan.cfg.model)["train"],
                    peak_flops=peak["flops"], peak_flops_source=peak["source"], tokens_per_step=d["tokens_per_step"],
                    parameters=d["parameters"], precision=d["precision"], batch_size=d["batch_size"],
                    grad_accum=d["grad_accum"], block_size=plan.cfg.model.block_size,
                    vocab_size=plan.cfg.model.vocab_size, train_tokens=d.get("train_tokens"))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        info["t_plan"] = time.perf_counter()

    def on_step(state) -> None:
        stamps.append((state.step, time.perf_counter(), state.tokens))

    t0 = time.perf_counter()
    result = training_cmd.pretrain(ROOT / "configs/gpt2-small.yaml", spec["overrides"], out=Path(spec["out"]),
                                   on_plan=on_plan, on_step=on_step, dry_run=spec["dry_run"],
                                   events=StderrLog())
    wall = time.perf_counter() - t0
    if spec["dry_run"]:
        mem, tm = result["memory"], result.get("time", {})
        return {**info, "estimate_bytes": mem["total"], "estimate_checkpointed_bytes": mem["total_checkpointed"],
                "device_capacity_bytes": mem["device_capacity"],
                "dry_run_measured_peak_bytes": tm.get("measured_peak_memory") if cuda else None,
                "dry_run_tokens_per_sec": tm.get("tokens_per_sec"), "dry_run_mfu": tm.get("mfu"),
                "dry_run_error": tm.get("error")}
    out = {**info, "wall_seconds": round(wall, 2), "train_seconds": result["train_seconds"], "steps": result["steps"],
           "tokens_per_sec_whole_run": result["tokens_per_sec"], "val_loss": result.get("val_loss"),
           "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
           "peak_memory_reserved_bytes": int(torch.cuda.max_memory_reserved()) if cuda else None}
    out["mfu_whole_run"] = hardware.mfu(out["tokens_per_sec_whole_run"], info["flops_per_token"], info["peak_flops"])
    rows = [json.loads(x) for x in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    out["final_loss"] = losses[-1] if losses else None
    if stamps:
        out["seconds_to_first_step"] = round(stamps[0][1] - info["t_plan"], 2)  # model wrapping, compiling, step 1
    skip = spec["warmup_excluded"]
    steady = stamps[skip:]
    if len(steady) >= 2:  # fit syncs on the loss every step, so these stamps are GPU times
        (_, t_0, n0), (_, t_1, n1) = steady[0], steady[-1]
        out["tokens_per_sec"] = (n1 - n0) / (t_1 - t_0)
        out["step_ms_median"] = statistics.median(b[1] - a[1] for a, b in zip(steady, steady[1:])) * 1000
        out["mfu"] = hardware.mfu(out["tokens_per_sec"], info["flops_per_token"], info["peak_flops"])
    return out


def worker_decode(spec: dict) -> dict:
    """bench_infer's measurement for each setting in turn; each row is appended to the result file as it comes."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_infer

    for name in spec["names"]:
        _, impl, batch, compiled, quantize = next(d for d in DECODE if d[0] == name)
        s = dict(shape=spec["shape"], impl=impl, dtype="bfloat16", quantize=quantize, compile=compiled, batch=batch,
                 repeats=spec["repeats"], device=spec["device"], prompt_tokens=spec["prompt"], new_tokens=spec["new"])
        try:
            row = bench_infer.measure(s)
        except Exception as e:  # one setting failing (an export inductor cannot compile, say) is one error
            row = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}
            import traceback

            traceback.print_exc()
        print(f"decode {name}: {row}", file=sys.stderr, flush=True)
        with open(spec["rows"], "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, **row}) + "\n")
    return {}


WORKERS = {"info": worker_info, "train": worker_train, "decode": worker_decode}


# ----------------------------------------------------------------------------------------------------------------
# The driver


class Check:
    def __init__(self, args):
        self.args = args
        self.p = QUICK if args.quick else FULL
        self.out = args.out
        self.work = args.work
        self.report = Report(self.out / "gpu_check.json")
        self.details = self.out / "details.log"  # every worker's and pytest's own output
        self.env = {**os.environ,
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                    "LLMCTL_CACHE_DIR": str(self.work / "cache"),
                    "TORCHINDUCTOR_CACHE_DIR": str(self.work / "inductor"),  # cold: compile times are honest
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("LLMCTL_DEBUG", None)
        if args.quick and args.device == "cpu":
            # one thread per process: figures on a CPU mean nothing here, and a second OpenMP thread that waits for a
            # core another process holds (CI's machine is shared) turns seconds into minutes
            self.env["OMP_NUM_THREADS"] = "1"
        self.deadline = args.deadline or (time.time() + (300 if args.quick else 570))

    # time -------------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.time()

    def has_time(self, phase: str, need: float) -> bool:
        """Whether `need` seconds (a full run's typical time for the phase; a quarter of it with --quick) are left."""
        need = need / 4 if self.args.quick else need
        if self.left() >= need:
            return True
        self.report.note("skipped", phase, f"time budget: {self.left():.0f} s left, needs about {need:.0f} s")
        return False

    # processes --------------------------------------------------------------------------------------------
    def call(self, cmd: list[str], timeout: float, what: str) -> tuple[int, float]:
        """Run `cmd` with its output appended to details.log; its whole process group is killed at `timeout`."""
        with open(self.details, "a", encoding="utf-8") as log:
            log.write(f"\n===== {what}: {' '.join(cmd)}\n")
            log.flush()
            t0 = time.time()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if sys.exc_info()[0] is not subprocess.TimeoutExpired:
                    raise
                rc = 124
            return rc, time.time() - t0

    def worker(self, kind: str, spec: dict, timeout: float, what: str) -> Optional[dict]:
        result = self.work / f"{what}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec),
               "--result", str(result)]
        rc, secs = self.call(cmd, timeout, what)
        if rc == 0 and result.is_file():
            print(f"gpu check: {what} done in {secs:.0f} s", flush=True)
            return json.loads(result.read_text())
        if rc == 124 and self.left() < 15:  # stopped by the time budget, not by a fault of its own
            self.report.note("skipped", what, f"time budget: stopped after {secs:.0f} s")
            return None
        why = f"timed out after {secs:.0f} s" if rc == 124 else f"exit status {rc} after {secs:.0f} s"
        self.report.note("errors", what, f"{why}; last lines: {self.tail()}")
        return None

    def tail(self, n: int = 6) -> str:
        try:
            lines = [x for x in self.details.read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            return ""
        return " | ".join(lines[-n:])[-1500:]

    # phases -----------------------------------------------------------------------------------------------
    def machine(self) -> None:
        r = self.report
        r.put("mode", "quick" if self.args.quick else "full")
        r.put("device", self.args.device)
        r.put("started", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        from importlib.metadata import PackageNotFoundError, version

        def ver(name):
            try:
                return version(name)
            except PackageNotFoundError:
                return None

        commit = None
        try:
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
        r.put("host", {"cpu": None, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(), "torch": None, "torch_cuda": None,
                       "transformers": ver("transformers"), "datasets": ver("datasets"), "llmctl_commit": commit})
        if self.args.install_json and self.args.install_json.is_file():
            given = json.loads(self.args.install_json.read_text())
            r.put("install", {k: given.get(k) for k in r.get("install")})
        info = self.worker("info", {"device": self.args.device}, min(120, self.left()), "info")
        if info:
            r.put("host.torch", info["torch"])
            r.put("host.torch_cuda", info["torch_cuda"])
            r.put("host.cpu", info["cpu"])
            if info["gpu"]:
                r.put("gpu", info["gpu"])
                r.put("gpu_name", info["gpu"]["name"])
        if self.args.device == "cuda" and not (info and info["gpu"]):
            raise SystemExit("gpu check: torch sees no CUDA device; on a machine without one use --quick --device cpu")

    def tests(self) -> None:
        if not self.has_time("tests", 60):
            return
        xml = self.out / "cuda-tests.xml"
        xml.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-rs", "-q", "-p", "no:cacheprovider",
               f"--junitxml={xml}", "tests/test_cuda.py"]
        self.report.put("tests.command", " ".join(["python", *cmd[1:]]))
        rc, secs = self.call(cmd, min(240, self.left() - 30), "tests")
        self.report.put("tests.exit_status", rc)
        self.report.put("tests.seconds", round(secs, 1))
        if not xml.is_file():
            self.report.note("errors", "tests", f"pytest wrote no report (exit {rc}); last lines: {self.tail()}")
            return
        counts = {"collected": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        failures, reasons = [], set()
        for case in ET.parse(xml).getroot().iter("testcase"):
            counts["collected"] += 1
            name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            if case.find("failure") is not None:
                counts["failed"] += 1
                failures.append(name)
            elif case.find("error") is not None:
                counts["errors"] += 1
                failures.append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
                reasons.add((case.find("skipped").get("message") or "").strip())
            else:
                counts["passed"] += 1
        for k, v in counts.items():
            self.report.put(f"tests.{k}", v)
        self.report.put("tests.failures", failures)
        self.report.put("tests.skip_reasons", sorted(reasons))
        print(f"gpu check: cuda-marked tests: {counts['passed']} passed, {counts['skipped']} skipped, "
              f"{counts['failed'] + counts['errors']} failing, of {counts['collected']} ({secs:.0f} s)", flush=True)
        if rc not in (0,) or failures:
            self.report.note("errors", "tests",
                             f"pytest exit {rc}; failing: {', '.join(failures) or 'see details.log'}")
        if self.args.device == "cpu" and counts["skipped"] != counts["collected"]:
            self.report.note("errors", "tests", "on a CPU every cuda-marked test should be skipped")
        if counts["collected"] == 0:
            self.report.note("errors", "tests", "no cuda-marked test was collected")

    def corpus(self) -> Path:
        """A deterministic made-up language: Zipf-distributed words in sentences and paragraphs."""
        path = self.work / "corpus.txt"
        rng = random.Random(1234)
        syllables = [a + b for a in "bdfghklmnprstvz" for b in "aeiou"] + ["an", "el", "in", "or", "us", "ai"]
        words = sorted({"".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
                        for _ in range(6000)})
        rng.shuffle(words)
        cum = list(accumulate(1.0 / (i + 1) for i in range(len(words))))
        parts, size = [], 0
        while size < self.p["corpus_bytes"]:
            para = []
            for _ in range(rng.randint(2, 6)):
                s = " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(4, 18)))
                para.append(s[0].upper() + s[1:] + rng.choice("....!?"))
            text = " ".join(para) + "\n\n"
            parts.append(text)
            size += len(text)
        path.write_text("".join(parts), encoding="utf-8")
        self.report.put("train.corpus_bytes", path.stat().st_size)
        return path

    def train_sets(self, corpus: Path, compiled: bool) -> list[str]:
        steps = self.p["steps"]
        return [f"data.path={corpus}", "tokenizer.vocab_size=4096", "model.vocab_size=50304",
                f"train.max_steps={steps}", "train.grad_accum=1", f"train.warmup_steps={max(2, steps // 10)}",
                "train.eval_interval=0", "train.eval_batches=2", "train.save_interval=0", "train.keep_best=false",
                f"train.device={self.args.device}", "train.dtype=bfloat16", f"train.compile={str(compiled).lower()}",
                "generate.compile=false", *self.p["train_sets"]]

    def train(self) -> None:
        r = self.report
        corpus = self.corpus()
        r.put("train.config", "configs/gpt2-small.yaml")
        r.put("train.steps", self.p["steps"])
        r.put("train.warmup_steps_excluded", self.p["warmup_excluded"])
        r.put("train.overrides",
              [s for s in self.train_sets(corpus, False) if not s.startswith(("data.path", "train.compile"))])
        base = dict(device=self.args.device, warmup_excluded=self.p["warmup_excluded"])
        if self.has_time("dry run", 40):
            dry = self.worker("train", {**base, "overrides": self.train_sets(corpus, False), "dry_run": True,
                                        "out": str(self.work / "dry-run")}, min(240, self.left() - 20), "dry-run")
            if dry:
                self._train_info(dry)
                for k in ("estimate_bytes", "estimate_checkpointed_bytes", "device_capacity_bytes",
                          "dry_run_measured_peak_bytes", "dry_run_tokens_per_sec", "dry_run_mfu"):
                    r.put(f"memory.{k}", dry[k])
                if dry.get("dry_run_error"):
                    r.note("errors", "dry-run", dry["dry_run_error"])
        if self.args.quick and self.args.device == "cpu":
            runs = [("eager", False)]
            r.note("skipped", "train compiled", "--quick on a CPU: torch.compile alone takes about a minute on 2 cores")
        else:
            runs = [("eager", False), ("compiled", True)]
        for name, compiled in runs:
            if not self.has_time(f"train {name}", 100 if compiled else 45):
                continue
            res = self.worker("train", {**base, "overrides": self.train_sets(corpus, compiled), "dry_run": False,
                                        "out": str(self.work / f"run-{name}")}, min(420, self.left() - 15),
                              f"train-{name}")
            if not res:
                continue
            self._train_info(res)
            for k in TRAIN_RUN_KEYS:
                r.put(f"train.{name}.{k}", res.get(k))
            r.put(f"memory.{name}_peak_bytes", res.get("peak_memory_bytes"))
            est = r.get("memory.estimate_bytes")
            if est and res.get("peak_memory_bytes"):
                r.put(f"memory.estimate_over_{name}_peak", round(est / res["peak_memory_bytes"], 3))
            if res.get("steps") != self.p["steps"]:
                r.note("errors", f"train {name}", f"trained {res.get('steps')} of {self.p['steps']} steps")
            if not (isinstance(res.get("final_loss"), float) and math.isfinite(res["final_loss"])):
                r.note("errors", f"train {name}", f"the final loss is {res.get('final_loss')}")

    def _train_info(self, res: dict) -> None:
        for k in ("batch_size", "grad_accum", "block_size", "vocab_size", "tokens_per_step", "parameters", "precision",
                  "flops_per_token", "peak_flops", "peak_flops_source", "train_tokens"):
            if res.get(k) is not None:
                self.report.put(f"train.{k}", res[k])

    def decode(self) -> None:
        r = self.report
        p = self.p
        r.put("decode.model", p["decode_shape"] if isinstance(p["decode_shape"], str) else "tiny gpt2 (quick)")
        r.put("decode.dtype", "bfloat16")
        r.put("decode.prompt_tokens", p["prompt"])
        r.put("decode.new_tokens", p["new"])
        r.put("decode.repeats", p["repeats"])
        cpu_quick = self.args.quick and self.args.device == "cpu"
        names = [d[0] for d in DECODE if not (cpu_quick and d[3])]
        if cpu_quick:
            r.note("skipped", "decode compiled",
                   "--quick on a CPU: building a compiled step takes about 30 s per shape")
        rows_file = self.work / "decode-rows.jsonl"
        rows_file.unlink(missing_ok=True)
        ran = {}  # implementation -> whether its worker ran to the end
        for impl in ("transformers", "llmctl"):
            todo = [n for n in names if n.startswith(impl)]
            if not self.has_time(f"decode {impl}", 30):
                continue
            spec = dict(names=todo, shape=p["decode_shape"], device=self.args.device, prompt=p["prompt"],
                        new=p["new"], repeats=p["repeats"], rows=str(rows_file))
            ran[impl] = self.worker("decode", spec, self.left() - 10, f"decode-{impl}") is not None
        done = {}
        if rows_file.is_file():
            done = {row["name"]: row for row in map(json.loads, rows_file.read_text().splitlines())}
        for name, impl, batch, compiled, quantize in DECODE:
            row = done.get(name)
            if name not in names or impl not in ran:
                continue
            if row is None:  # its worker stopped before it (its error is noted above)
                r.note("skipped", f"decode {name}", "not measured: the decode worker stopped before it")
                continue
            if "error" in row:
                r.note("errors", f"decode {name}", row["error"])
                continue
            r.put(f"decode.settings.{name}", {"impl": impl, "batch": batch, "compiled": compiled, "quantize": quantize,
                                               "tokens_per_sec": row["tokens_per_sec"],
                                               "ms_per_step": row["ms_per_step"],
                                               "ttft_ms": row["ttft_ms"], "first_call_s": row["first_call_s"],
                                               "peak_memory_bytes": row.get("peak_gpu_memory_bytes")})
        for b in (1, 16):
            base = r.get(f"decode.settings.transformers_b{b}.tokens_per_sec")
            eager = r.get(f"decode.settings.llmctl_b{b}.tokens_per_sec")
            comp = r.get(f"decode.settings.llmctl_compiled_b{b}.tokens_per_sec")
            ratio = lambda x: round(x / base, 2) if x and base else None  # noqa: E731
            r.put(f"decode.vs_transformers.b{b}_eager", ratio(eager))
            r.put(f"decode.vs_transformers.b{b}_compiled", ratio(comp))
            r.put(f"decode.vs_transformers.b{b}_best", ratio(max([x for x in (eager, comp) if x], default=None)))

    def goals(self) -> None:
        r = self.report
        cuda = self.args.device == "cuda"
        mfu = r.get("train.compiled.mfu")
        applies = cuda and bool(re.search(GOAL_MFU_GPUS, r.get("gpu_name") or ""))
        r.put("goals.train_mfu", {"target": GOAL_MFU, "value": mfu, "applies": applies,
                                  "met": (mfu >= GOAL_MFU) if applies and mfu is not None else None})
        dec = r.get("decode.vs_transformers.b1_best")
        r.put("goals.decode_b1_vs_transformers", {"target": GOAL_DECODE, "value": dec, "applies": cuda,
                                                  "met": (dec >= GOAL_DECODE) if cuda and dec is not None else None})

    # the summary ------------------------------------------------------------------------------------------
    def summary(self) -> str:
        d = self.report.data

        def size(b):
            return "-" if not b else f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"

        def pct(x):
            return "-" if x is None else f"{100 * x:.1f}%"

        def num(x):
            return "-" if x is None else f"{x:,.0f}"

        t, m, dec, ts = d["train"], d["memory"], d["decode"], d["tests"]
        peak = t["peak_flops"]
        lines = [f"llmctl GPU check ({d['mode']}, {d['device']}): {d['gpu_name'] or d['host']['cpu']}; torch "
                 f"{d['host']['torch']} (CUDA {d['host']['torch_cuda']}), Python {d['host']['python']}; "
                 f"{d['seconds']} s"]
        if ts["collected"] is not None:
            lines.append(f"cuda-marked tests: {ts['passed']} passed, {ts['skipped']} skipped, "
                         f"{(ts['failed'] or 0) + (ts['errors'] or 0)} failing of {ts['collected']}"
                         + (f" ({', '.join(ts['failures'])})" if ts["failures"] else ""))
        shape = "GPT-2 124M" if d["mode"] == "full" else "shrunk to a tiny shape (--quick)"
        lines.append(f"train {t['config']}, {shape}: {num(t['parameters'])} parameters, {t['steps']} steps of "
                     f"{t['batch_size']} x {t['block_size']} tokens, {t['precision']}; MFU against "
                     f"{'-' if peak is None else f'{peak / 1e12:.3g}'} TFLOP/s ({t['peak_flops_source']})")
        for name in ("eager", "compiled"):
            x = t[name]
            if x["steps"] is None:
                lines.append(f"  {name:8s} not run")
                continue
            lines.append(f"  {name:8s} {num(x['tokens_per_sec'])} tok/s, MFU {pct(x['mfu'])} (steady state; whole run "
                         f"{num(x['tokens_per_sec_whole_run'])} tok/s, MFU {pct(x['mfu_whole_run'])}); "
                         f"{x['step_ms_median'] and round(x['step_ms_median'], 1)} ms/step; first step after "
                         f"{x['seconds_to_first_step']} s; final loss {x['final_loss']}; peak memory "
                         f"{size(x['peak_memory_bytes'])}")
        lines.append(f"memory: dry-run estimate {size(m['estimate_bytes'])} (with activation checkpointing "
                     f"{size(m['estimate_checkpointed_bytes'])}), the dry run's own peak "
                     f"{size(m['dry_run_measured_peak_bytes'])}; estimate / measured peak: eager "
                     f"{m['estimate_over_eager_peak']}, compiled {m['estimate_over_compiled_peak']}")
        lines.append(f"decode {dec['model']}, {dec['dtype']}, {dec['prompt_tokens']}-token prompt + "
                     f"{dec['new_tokens']} new tokens, greedy, tokens/s:")
        for b in (1, 16):
            s = dec["settings"]
            row = ", ".join(f"{n.replace(f'_b{b}', '')} {num(s[n]['tokens_per_sec'])}"
                            for n, *_ in DECODE if n.endswith(f"_b{b}"))
            v = dec["vs_transformers"]
            lines.append(f"  batch {b:2d}: {row}; llmctl / transformers: eager {v[f'b{b}_eager']}, compiled "
                         f"{v[f'b{b}_compiled']}")
        g = d["goals"]
        for key, label in (("train_mfu", f"GPT-2 124M bf16 compiled MFU >= {pct(GOAL_MFU)} on an H100/H200"),
                           ("decode_b1_vs_transformers", f"bf16 decode at batch 1 >= {GOAL_DECODE}x transformers")):
            x = g[key]
            state = ("does not apply here" if not x["applies"] else
                     {True: "met", False: "NOT met", None: "not measured"}[x["met"]])
            value = pct(x["value"]) if key == "train_mfu" else x["value"]
            lines.append(f"goal: {label}: {value} ({state})")
        for e in d["skipped"]:
            lines.append(f"skipped: {e['phase']}: {e['why']}")
        for e in d["errors"]:
            lines.append(f"error: {e['phase']}: {e['why']}")
        return "\n".join(lines) + "\n"

    def run(self) -> int:
        t0 = time.time()
        try:
            self.machine()
            self.tests()
            self.train()
            self.decode()
            self.goals()
        except KeyboardInterrupt:
            self.report.note("errors", "check", "interrupted")
        finally:
            self.report.put("seconds", round(time.time() - t0 + self.args.install_seconds, 1))
        missing = key_paths(skeleton()) ^ key_paths(self.report.data)
        if missing:
            self.report.note("errors", "json", f"keys differ from the skeleton: {sorted(missing)}")
        errors = self.report.data["errors"]
        if self.args.quick:  # CI: nothing may be skipped but what a CPU cannot do in time
            errors = errors + [s for s in self.report.data["skipped"] if s["phase"] not in
                               ("train compiled", "decode compiled")]
        self.report.put("ok", not errors)
        text = self.summary()
        (self.out / "gpu_check.txt").write_text(text)
        print("\n" + text, end="", flush=True)
        print(f"gpu check: {'ok' if not errors else 'FAILED'}; wrote {self.out / 'gpu_check.json'} and gpu_check.txt "
              f"(details.log holds every step's output)", flush=True)
        return 0 if not errors else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/gpu-check", help="where the JSON, summary and logs go")
    ap.add_argument("--work", type=Path, help="scratch folder (corpus, runs, caches); default: a temporary one")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, a few steps: the whole check in under a minute")
    ap.add_argument("--steps", type=int, help="training steps per run (default 300; --quick 12)")
    ap.add_argument("--deadline", type=float, help="Unix time by which the check must end (phases that would not "
                                                   "fit are skipped); default: 9.5 minutes from now (--quick: 5)")
    ap.add_argument("--install-json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--install-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = WORKERS[args.worker](json.loads(args.spec))
        args.result.write_text(json.dumps(result, default=str))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.work is None
    if scratch:
        args.work = Path(tempfile.mkdtemp(prefix="llmctl-gpu-check-"))
    args.work.mkdir(parents=True, exist_ok=True)
    check = Check(args)
    if args.steps:
        check.p = {**check.p, "steps": args.steps, "warmup_excluded": min(check.p["warmup_excluded"], args.steps // 3)}
    try:
        status = check.run()
    finally:
        if scratch:
            shutil.rmtree(args.work, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
