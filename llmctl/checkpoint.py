"""The one checkpoint format, written atomically, verified on load, never unpickling arbitrary objects.

run_dir/
  config.yaml, tokenizer.json, metrics.jsonl, status.json
  step-000200/                 one checkpoint: complete or absent
    model.safetensors          weights (tied weights stored once)
    train_state.pt             optimizer, RNG and loop state; loaded with torch.load(weights_only=True)
    config.yaml                the resolved config (model.vocab_size filled in)
    tokenizer.json             absent only in a checkpoint imported without one (`llmctl import hf`)
    meta.json                  step, tokens, metrics, versions, and a sha256 for every file above
  latest                       a small text file naming the newest complete checkpoint, replaced atomically

A checkpoint is written into a hidden temporary directory, flushed, verified, then renamed into place; only
then does `latest` move and are old checkpoints pruned, so a crash at any moment leaves the last good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LlmctlError

FORMAT = "llmctl-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
LATEST = "latest"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop entries that alias an earlier tensor (tied embeddings), which safetensors cannot store twice."""
    seen: set = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.device.type != "meta" else k
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous().cpu()
    return out


def step_name(step: int) -> str:
    return f"step-{step:07d}"


@dataclass
class Checkpoint:
    """A verified checkpoint on disk."""

    path: Path
    meta: dict

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def config(self) -> dict:
        return yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))

    @property
    def has_tokenizer(self) -> bool:
        return "tokenizer.json" in self.meta["files"]

    def tokenizer_json(self) -> str:
        if not self.has_tokenizer:
            raise LlmctlError(
                f"{self.path} has no tokenizer (it was imported without one); pass --tokenizer FILE with a "
                "tokenizer.json (infer, eval, export) or --set tokenizer.path=FILE (finetune)"
            )
        return (self.path / "tokenizer.json").read_text(encoding="utf-8")

    def weights(self, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.path / name))
        except (SafetensorError, OSError, ValueError) as e:
            raise LlmctlError(f"checkpoint file {self.path / name} cannot be read ({e}); use another checkpoint") from None

    def train_state(self) -> dict:
        p = self.path / TRAIN_STATE
        if not p.exists():
            raise LlmctlError(f"{self.path} has no {TRAIN_STATE}, so training cannot resume from it (it holds weights only)")
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # an unpickling refusal or a corrupt file: both mean "do not trust it"
            raise LlmctlError(f"checkpoint file {p} cannot be loaded safely ({str(e).splitlines()[0][:200]})") from None


def save(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    config_yaml: str,
    tokenizer_json: Optional[str],
    train_state: Optional[dict] = None,
    meta: Optional[dict] = None,
    extra_files: Optional[dict[str, dict[str, torch.Tensor]]] = None,
    weights_name: str = WEIGHTS,
) -> Path:
    """Write one checkpoint atomically and point `latest` at it. Returns its path.

    `tokenizer_json` is None only for an imported model that came without a tokenizer."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / step_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=run_dir))
    try:
        save_file(unique_tensors(weights), str(tmp / weights_name))
        for name, tensors in (extra_files or {}).items():
            save_file(unique_tensors(tensors), str(tmp / name))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        pause = os.environ.get("LLMCTL_TEST_PAUSE_SAVE")  # test hook: lets a test kill us mid-write
        if pause:
            (run_dir / ".saving").write_text(str(os.getpid()))
            time.sleep(float(pause))
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[f.name] = sha256_file(f)
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__,
            **(meta or {}),
            "files": files,
        }
        (tmp / "meta.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after resuming): swap, never delete before the new one is in
            old = run_dir / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(run_dir / LATEST, final.name + "\n")
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob("step-*") if p.is_dir() and (p / "meta.json").exists())


def prune(run_dir: Path, keep_last: int, protect: tuple[str, ...] = ()) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, never the one `latest` names or any in `protect`."""
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    latest = read_latest(run_dir)
    keep = {p.name for p in ckpts[-keep_last:]} | set(protect) | ({latest.name} if latest else set())
    removed = []
    for p in ckpts:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for stale in run_dir.glob(".tmp-step-*"):  # leftovers of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    return removed


def read_latest(run_dir: Path) -> Optional[Path]:
    p = Path(run_dir) / LATEST
    if not p.exists():
        return None
    name = p.read_text(encoding="utf-8").strip()
    target = Path(run_dir) / name
    return target if name and target.is_dir() else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (-> its latest checkpoint)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LlmctlError(f"checkpoint not found: {p} (give a run directory or one of its step-* checkpoints)")
    if not p.is_dir():
        raise LlmctlError(f"checkpoint must be a directory (a run directory or a step-* checkpoint), got a file: {p}")
    if (p / "meta.json").exists():
        return p
    latest = read_latest(p)
    if latest is not None:
        return latest
    ckpts = list_checkpoints(p)
    if ckpts:
        return ckpts[-1]
    raise LlmctlError(f"{p} holds no checkpoint (no meta.json, no latest, no step-* directories)")


def load(path: str | Path, verify: bool = True) -> Checkpoint:
    """Resolve and verify a checkpoint: every file listed in meta.json must exist and match its sha256."""
    ckpt = resolve(path)
    try:
        meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LlmctlError(f"{ckpt / 'meta.json'} is unreadable ({e}); the checkpoint is damaged, use another one") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        raise LlmctlError(f"{ckpt} is not an llmctl checkpoint (meta.json lacks format/files); import other formats with `llmctl import`")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise LlmctlError(f"{ckpt} was written by a newer llmctl (format {meta['format_version']}); upgrade llmctl")
    if "config.yaml" not in meta["files"]:  # tokenizer.json may be absent (see Checkpoint.tokenizer_json)
        raise LlmctlError(f"{ckpt} lacks config.yaml in its manifest; the checkpoint is incomplete")
    if verify:
        for name, digest in meta["files"].items():
            f = ckpt / name
            if not f.is_file():
                raise LlmctlError(f"checkpoint file missing: {f}; the checkpoint is incomplete, use another one")
            if sha256_file(f) != digest:
                raise LlmctlError(f"checkpoint file {f} fails its sha256 check (corrupt or modified); use another checkpoint")
    return Checkpoint(ckpt, meta)


def write_status(run_dir: Path, state: str, **extra: Any) -> None:
    """status.json: running | finished | interrupted | failed | diverged, with when and why."""
    path = Path(run_dir) / "status.json"
    prev = {}
    if path.exists():
        try:
            prev = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            prev = {}
    info = {**prev, **extra, "status": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if state == "running":
        info.setdefault("started", info["updated"])
        info["pid"] = os.getpid()
    write_atomic(path, json.dumps(info, indent=2) + "\n")


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
