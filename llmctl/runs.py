"""Reading run directories back: one summary per run, a table of runs, and a comparison of two runs.

A run directory (README "Run directories") holds config.yaml, metrics.jsonl and status.json; `summarize` reads
them without loading any weights, so listing hundreds of runs is quick.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from .checkpoint import read_status
from .errors import LlmctlError

SIGNALS = {130: "SIGINT", 143: "SIGTERM"}


def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("status.json", "metrics.jsonl", "config.yaml"))


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl (a torn last line, from a crash mid-write, is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
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
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists but not ours, or no pid recorded: assume it still runs
    return True


def status_label(status: dict) -> tuple[str, Optional[str]]:
    """(status, detail): status.json's state, with `crashed` for a run whose process is gone while `running`."""
    state = status.get("status") or "unknown"
    detail = None
    if state == "interrupted":
        detail = SIGNALS.get(status.get("exit_status"))
    elif state in ("failed", "diverged"):
        detail = status.get("error")
    elif state == "running" and "pid" in status and not _alive(status["pid"]):
        state, detail = "crashed", f"process {status['pid']} is gone without a final status"
    return state, detail


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
        "max_steps": (cfg.get("train") or {}).get("max_steps", status.get("max_steps")),
        "tokens": last.get("tokens", status.get("tokens")),
        "loss": last.get("loss"),
        "val_loss": val_rows[-1]["val_loss"] if val_rows else None,
        "best_val_loss": min((r["val_loss"] for r in val_rows if isinstance(r["val_loss"], (int, float))), default=None),
        "tokens_per_sec": tps,
        "train_seconds": status.get("train_seconds", last.get("time")),
        "updated": status.get("updated"),
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


def _require_run(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise LlmctlError(f"run not found: {path}")
    if not is_run(path):
        raise LlmctlError(f"{path} is not a run directory (no status.json, metrics.jsonl or config.yaml)")
    return path


def compare(a: Path, b: Path) -> dict:
    """The config keys whose values differ between two runs (dotted), and each run's final metrics."""
    a, b = _require_run(a), _require_run(b)
    ca, cb = _flatten(read_config(a)), _flatten(read_config(b))
    diff = [{"key": k, "a": ca.get(k), "b": cb.get(k)} for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    keys = ("status", "steps", "tokens", "loss", "val_loss", "best_val_loss", "tokens_per_sec", "train_seconds")
    sa, sb = summarize(a), summarize(b)
    return {
        "a": str(a),
        "b": str(b),
        "config_diff": diff,
        "metrics": {"a": {k: sa[k] for k in keys}, "b": {k: sb[k] for k in keys}},
    }
