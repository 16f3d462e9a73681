"""Reading run directories back: one summary per run, a table of runs, and a comparison of two runs.

A run directory (docs/runs.md#run-directories-and-checkpoints) holds config.yaml, metrics.jsonl and status.json;
`summarize` reads them without loading any weights, so listing hundreds of runs is quick.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Optional

from .checkpoint import read_latest
from .errors import LlmctlError
from .rundir import SIGNALS, is_run, process_start, process_state, read_config, read_evals, read_metrics, read_status


def _alive(pid: Any, identity: Optional[str] = None) -> bool:
    """Whether the process that wrote a `running` status.json still runs here.

    A zombie (killed, not yet reaped by its parent: a torchrun agent that is busy or stopped, a launcher that never
    waits) is gone, although signal 0 still reaches it; so is a live process whose start time differs from the
    one recorded (its pid was reused, after a reboot or wrapping around)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists but not ours: /proc still tells whether it is the same process
    except (ValueError, TypeError, OverflowError):
        return True  # no usable pid recorded: assume it still runs
    if process_state(int(pid)) in ("Z", "X", "x"):
        return False
    if identity is not None:
        now = process_start(int(pid))
        if now is not None and now != identity:
            return False
    return True


def status_label(status: dict) -> tuple[str, Optional[str]]:
    """(status, detail): status.json's state, with `crashed` for a run whose process is gone while `running`."""
    state = status.get("status") or "unknown"
    detail = None
    if state == "interrupted":
        detail = SIGNALS.get(status.get("exit_status"))
    elif state in ("failed", "diverged"):
        detail = status.get("error")
    elif state == "running" and "pid" in status:
        host = status.get("host")
        if host and host != socket.gethostname():
            detail = f"on {host}, process {status['pid']}: only that machine can tell whether it still runs"
        elif not _alive(status["pid"], status.get("pid_start")):
            state, detail = "crashed", f"process {status['pid']} is gone without a final status"
    return state, detail


def checkpoint_step_of(run_dir: Path) -> Optional[int]:
    """The step of the checkpoint `latest` names (from its name, step-NNNNNNN: no weights are read), or None."""
    latest = read_latest(run_dir)
    if latest is None:
        return None
    digits = latest.name.rpartition("-")[2]
    return int(digits) if latest.name.startswith("step-") and digits.isdigit() else None


def summarize(run_dir: Path) -> dict:
    """Name, status, steps, tokens, losses and throughput of one run."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    rows = read_metrics(run_dir)
    cfg = read_config(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    state, detail = status_label(status) if status else ("unknown", "no status.json")
    last = train_rows[-1] if train_rows else {}
    # steps reached: metrics.jsonl knows them even when the run died before a checkpoint or a final status
    steps = max(int(r.get("step", 0)) for r in rows) if rows else status.get("steps", status.get("step"))
    # ... and the checkpoint a resume would start from, which lags behind when the run died between saves
    checkpoint_step = checkpoint_step_of(run_dir)
    tps = status.get("tokens_per_sec") if state == "finished" else None
    if tps is None and last.get("time"):
        tps = round(last.get("tokens", 0) / last["time"], 1) if last["time"] > 0 else None
    return {
        "name": run_dir.name,
        "path": str(run_dir),
        "status": state,
        "detail": detail,
        "kind": status.get("kind"),
        "steps": steps,
        "checkpoint_step": checkpoint_step,
        "max_steps": (cfg.get("train") or {}).get("max_steps", status.get("max_steps")),
        "tokens": last.get("tokens", status.get("tokens")),
        "loss": last.get("loss"),
        "val_loss": val_rows[-1]["val_loss"] if val_rows else None,
        "best_val_loss": min((r["val_loss"] for r in val_rows if isinstance(r["val_loss"], (int, float))),
                             default=None),
        "tokens_per_sec": tps,
        "train_seconds": status.get("train_seconds", last.get("time")),
        "updated": status.get("updated"),
        "evals": read_evals(run_dir),  # lm-eval metrics from `llmctl eval --tasks` ({"task/metric": value})
    }


def list_runs(directory: Path) -> list[dict]:
    """Summaries of every run directory directly inside `directory` (or of `directory` itself if it is one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LlmctlError(f"{directory} is not a directory of runs; give the folder that holds them (default: runs/)")
    if is_run(directory) and not any(is_run(p) for p in directory.iterdir()):
        return [summarize(directory)]
    return [summarize(p) for p in sorted(directory.iterdir()) if is_run(p)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def require_run(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise LlmctlError(f"run not found: {path}")
    if not is_run(path):
        raise LlmctlError(f"{path} is not a run directory (no status.json, metrics.jsonl or config.yaml)")
    return path


def compare(a: Path, b: Path) -> dict:
    """The config keys whose values differ between two runs (dotted), and each run's final metrics."""
    a, b = require_run(a), require_run(b)
    ca, cb = _flatten(read_config(a)), _flatten(read_config(b))
    diff = [{"key": k, "a": ca.get(k), "b": cb.get(k)} for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    keys = ("status", "steps", "checkpoint_step", "tokens", "loss", "val_loss", "best_val_loss", "tokens_per_sec",
            "train_seconds")
    sa, sb = summarize(a), summarize(b)
    evals = sorted(set(sa["evals"]) | set(sb["evals"]))  # lm-eval results either run has
    return {
        "a": str(a),
        "b": str(b),
        "config_diff": diff,
        "metrics": {"a": {**{k: sa[k] for k in keys}, **{k: sa["evals"].get(k) for k in evals}},
                    "b": {**{k: sb[k] for k in keys}, **{k: sb["evals"].get(k) for k in evals}}},
    }
