"""The run directory: what it holds, who may write it, how far the run got, and the checks before one starts.

    RUN/config.yaml  tokenizer.json   the run's resolved config and tokenizer (a checkpoint holds its own copies)
    RUN/status.json                   running | finished | interrupted | diverged | failed, with when and why
    RUN/metrics.jsonl                 one JSON object per logged step and per evaluation
    RUN/step-*/  latest  best         checkpoints and the pointers to them (`llmctl.checkpoint`)
    RUN/.lock                         held (flock) by the one process that trains the run

Every command that makes, continues, lists or reads a run goes through here: `check_out_dir`, `preflight`,
`resume_point`, `RunLock`, `write_status`, `MetricsFile`; `llmctl.runs` and `llmctl.plot` read with `is_run`,
`read_status`, `read_metrics` and `read_config`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from . import checkpoint as ckpt_io
from .checkpoint import CONFIG, LATEST, TOKENIZER
from .errors import EXIT_DIVERGED, LlmctlError
from .events import Events
from .fileio import write_atomic
from .interrupt import NAMES, exit_status

STATUS = "status.json"
METRICS = "metrics.jsonl"
LOCK = ".lock"
EVALS = "evals"  # lm-eval results, one JSON file per `llmctl eval --tasks` (<time>-<tasks>.json)
SIGNALS = {exit_status(s): name for s, name in NAMES.items()}  # exit status of a run stopped by a signal -> its name


def outcome(status: int) -> str:
    """status.json's state for a run that ended with exit status `status` (an LlmctlError's)."""
    if status in SIGNALS:
        return "interrupted"
    return "diverged" if status == EXIT_DIVERGED else "failed"


def write_run_files(out: Path, config_yaml: str, tokenizer_json: Optional[str]) -> None:
    """The run-level copies of the resolved config and the tokenizer (a checkpoint carries its own)."""
    write_atomic(Path(out) / CONFIG, config_yaml)
    if tokenizer_json is not None:
        write_atomic(Path(out) / TOKENIZER, tokenizer_json)


def is_run(path: Path) -> bool:
    """A run directory; not one of its step-* checkpoints, which hold a config.yaml too (and a meta.json), nor a
    hidden temporary one (a checkpoint or export being written, or left by a killed write)."""
    if path.name.startswith(".") or not path.is_dir() or (path / ckpt_io.META).exists():
        return False
    return any((path / f).exists() for f in (STATUS, METRICS, CONFIG))


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl (a torn last line, from a crash mid-write, is skipped)."""
    path = Path(run_dir) / METRICS
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def read_config(run_dir: Path) -> dict:
    try:
        cfg = yaml.safe_load((Path(run_dir) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch a run that is in use, or to clobber an existing one unless asked. Changes nothing."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LlmctlError(f"--out {out} is a file; give a directory for the run")
    holder = RunLock.holder(out)
    if holder:
        raise LlmctlError(f"{out} is in use by another llmctl process ({holder}); wait for it or stop it first")
    if resume or not [p for p in out.iterdir() if p.name != LOCK]:
        return
    if overwrite:
        looks_like_run = any((out / n).exists() for n in (STATUS, CONFIG, LATEST))
        if not looks_like_run:
            raise LlmctlError(f"--overwrite refuses to delete {out}: it does not look like an llmctl run directory")
        return
    raise LlmctlError(f"--out {out} already holds a run; pass --resume to continue it or --overwrite to replace it")


def clear_run(out: Path) -> None:
    """Empty a run directory for --overwrite (keeping the lock file this process holds)."""
    for p in out.iterdir():
        if p.name == LOCK:
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Size of one checkpoint: weights plus AdamW's two moments per trainable parameter, plus slack."""
    seen, weights, moments = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        weights += p.numel() * p.element_size()
        moments += 2 * p.numel() * 4 if p.requires_grad else 0
    return int((weights + moments) * 1.05) + (1 << 20)


def preflight(out: Path, model: torch.nn.Module) -> None:
    """Before any compute: the output directory is writable and has room for a checkpoint."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise LlmctlError(f"--out {out}: {probe} is not writable; choose another --out")
    need = checkpoint_bytes(model)
    free = shutil.disk_usage(probe).free
    if free < need:
        raise LlmctlError(
            f"--out {out}: only {free / 1e6:,.0f} MB free on that disk, but one checkpoint needs about "
            f"{need / 1e6:,.0f} MB; free some space or choose another --out"
        )


def resume_point(out: Path, events: Events) -> tuple[Optional[ckpt_io.Checkpoint], bool]:
    """--resume: (the checkpoint to continue from, whether to clear `out` first).

    A run stopped before its first checkpoint (a signal during data preparation or the first step, a crash)
    starts again from step 0, so the resume command a stopped run prints always works. A run directory whose
    checkpoints all fail verification, or a folder that holds something else, is refused."""
    entries = [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if entries and not any((out / n).exists() for n in (STATUS, CONFIG, LATEST)):
        raise LlmctlError(f"--resume: {out} holds no llmctl run; choose another --out or drop --resume")
    found = latest_good(out, events) if entries else None
    if found is None and ckpt_io.list_checkpoints(out):
        raise LlmctlError(f"--resume: no checkpoint in {out} passes verification; use --overwrite to start again")
    if found is None:
        events.log(f"--resume: {out} has no checkpoint yet; starting the run from step 0")
    return found, found is None and bool(entries)


def latest_good(run_dir: Path, events: Events) -> Optional[ckpt_io.Checkpoint]:
    """The newest checkpoint of a run that passes verification (a damaged newer one is skipped, with a warning)."""
    cands = ckpt_io.list_checkpoints(run_dir)
    latest = ckpt_io.read_latest(run_dir)
    if latest is not None and latest in cands:  # prefer what `latest` names, then older ones
        cands = [c for c in cands if c.name <= latest.name]
    for c in reversed(cands):
        try:
            return ckpt_io.load(c)
        except LlmctlError as e:
            events.warn(f"skipping {c.name}: {e}")
    return None


class MetricsFile:
    """metrics.jsonl: one JSON object per logged step and per evaluation, flushed as written."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = path
        if resume_step is not None and path.exists():  # drop rows after the step we resume from
            rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in rows if _row_step(ln) <= resume_step]
            write_atomic(path, "".join(r + "\n" for r in kept))
        self.f = open(path, "a", encoding="utf-8")

    def __call__(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def last_step(out: Path) -> Optional[int]:
    latest = ckpt_io.read_latest(out)
    return int(latest.name.split("-")[1]) if latest else None


def write_status(run_dir: Path, state: str, **extra: Any) -> None:
    """status.json: running | finished | interrupted | failed | diverged, with when and why."""
    path = Path(run_dir) / STATUS
    prev = {}
    if path.exists():
        try:
            prev = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            prev = {}
    info = {**prev, **extra, "status": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if state == "running":
        info.setdefault("started", info["updated"])
        # who to ask whether the run still lives (llmctl.runs.status_label): a pid alone is not enough, since pids
        # are reused (after a reboot, or wrapping around) and mean nothing on another machine
        info.update(pid=os.getpid(), pid_start=process_start(os.getpid()), host=socket.gethostname())
    write_atomic(path, json.dumps(info, indent=2) + "\n")


def _proc_stat(pid: int) -> Optional[list[str]]:
    """The fields of /proc/PID/stat after the command name (Linux), or None where there is none to read."""
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()
    except (OSError, ValueError, TypeError, OverflowError):
        return None


def process_start(pid: int) -> Optional[str]:
    """An identity of process `pid` that a later process reusing its pid does not share: the boot it runs in and
    its start time in clock ticks since that boot (Linux); None where the system does not tell."""
    fields = _proc_stat(pid)
    if not fields or len(fields) < 20:
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{boot}:{fields[19]}"  # field 22 of stat (starttime), counted from the state, field 3


def process_state(pid: int) -> Optional[str]:
    """The one-letter state of process `pid` (R, S, D, T, Z for a zombie, X for dead...), None where unknown."""
    fields = _proc_stat(pid)
    return fields[0] if fields else None


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class RunLock:
    """One training process per run directory, through an advisory `flock` on RUN/.lock.

    The kernel drops the lock when its process dies, so a lock file left by a killed run is stale by construction:
    it is detected (the file exists but nobody holds it) and taken over.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: Optional[int] = None
        self.stale: Optional[str] = None  # what a stale lock file said, when one was cleared

    @staticmethod
    def holder(run_dir: Path) -> Optional[str]:
        """Who holds the lock of `run_dir` right now (None when nobody does)."""
        path = Path(run_dir) / LOCK
        if not path.exists():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            return path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = self.path.read_text(encoding="utf-8", errors="replace").strip()
            raise LlmctlError(f"{self.path.parent} is in use by another llmctl process ({who}); "
                              "wait for it or stop it first") from None
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            self.stale = previous
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty file means "released cleanly"
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def save_eval(run_dir: Path, tasks: list[str], result: dict) -> Path:
    """Write one `eval --tasks` result as RUN/evals/<time>-<tasks>.json (atomically, under the run lock)."""
    name = time.strftime("%Y%m%d-%H%M%S") + "-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", "+".join(tasks))[:120] + ".json"
    path = Path(run_dir) / EVALS / name
    with RunLock(run_dir):
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, json.dumps(result, indent=2, default=str) + "\n")
    return path


def read_evals(run_dir: Path) -> dict[str, dict]:
    """The latest value of every lm-eval metric saved in RUN/evals: {"task/metric": value} (stderr left out)."""
    out: dict[str, dict] = {}
    for path in sorted((Path(run_dir) / EVALS).glob("*.json")):  # oldest first: later files win
        try:
            results = json.loads(path.read_text(encoding="utf-8")).get("results", {})
        except (OSError, ValueError, AttributeError):
            continue
        for task, metrics in results.items():
            for key, value in (metrics or {}).items():
                if isinstance(value, (int, float)) and "_stderr" not in key and "," in key:  # "acc,none"
                    out[f"{task}/{key}"] = value
    return out
