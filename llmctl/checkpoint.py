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

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LlmctlError
from .fileio import apply_umask, sha256_file, temp_dir, write_atomic

FORMAT = "llmctl-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"  # full model weights
ADAPTER = "adapter.safetensors"  # LoRA adapter only (the base is referenced in meta.json)
HEAD = "head.safetensors"  # a task head (classification)
TRAIN_STATE = "train_state.pt"
CONFIG = "config.yaml"  # the resolved config (a run directory holds a copy too)
TOKENIZER = "tokenizer.json"
META = "meta.json"
LATEST = "latest"
BEST = "best"


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
        return yaml.safe_load((self.path / CONFIG).read_text(encoding="utf-8"))

    @property
    def has_tokenizer(self) -> bool:
        return TOKENIZER in self.meta["files"]

    def tokenizer_json(self) -> str:
        if not self.has_tokenizer:
            raise LlmctlError(
                f"{self.path} has no tokenizer (it was imported without one); pass --tokenizer FILE with a "
                "tokenizer.json (infer, eval, export) or --set tokenizer.path=FILE (finetune)"
            )
        return (self.path / TOKENIZER).read_text(encoding="utf-8")

    def weights(self, name: str = WEIGHTS) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.path / name))
        except (SafetensorError, OSError, ValueError) as e:
            raise LlmctlError(f"checkpoint file {self.path / name} cannot be read ({e}); "
                              "use another checkpoint") from None

    def train_state(self) -> dict:
        p = self.path / TRAIN_STATE
        if not p.exists():
            raise LlmctlError(f"{self.path} has no {TRAIN_STATE}, so training cannot resume from it "
                              "(it holds weights only)")
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
    tmp = temp_dir(run_dir, prefix=f".tmp-{final.name}-")  # 0755 under umask 022, like the files written into it
    try:
        save_file(unique_tensors(weights), str(tmp / weights_name))
        for name, tensors in (extra_files or {}).items():
            save_file(unique_tensors(tensors), str(tmp / name))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        (tmp / CONFIG).write_text(config_yaml, encoding="utf-8")
        if tokenizer_json is not None:
            (tmp / TOKENIZER).write_text(tokenizer_json, encoding="utf-8")
        files = {}
        for f in sorted(tmp.iterdir()):
            apply_umask(f)  # safetensors writes 0600 files: give them what open() would (0644 under umask 022)
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
        (tmp / META).write_text(json.dumps(info, indent=2), encoding="utf-8")
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
    load(final)  # verify what is on disk before anything points at it or older checkpoints go
    write_atomic(run_dir / LATEST, final.name + "\n")
    return final


# how the writers of a checkpoint report a full disk when they do not raise OSError(ENOSPC): torch.save's zip
# writer ("[enforce fail at inline_container.cc] . unexpected pos N vs M", "PytorchStreamWriter failed writing
# file"), safetensors ("No space left on device (os error 28)")
DISK_FULL_SIGNS = ("no space left on device", "disk quota exceeded", "unexpected pos", "failed writing file",
                   "os error 28", "os error 122")


def is_disk_full(e: BaseException) -> bool:
    """Whether `e`, raised by any writer of a checkpoint, means the disk (or the quota) is full."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, (OSError, RuntimeError, SafetensorError)) and any(s in str(e).lower() for s in DISK_FULL_SIGNS)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what killed saves left: `.tmp-step-*` being written and `.old-step-*` being replaced.

    Only the holder of the run lock writes checkpoints, so whatever of these exists when it starts, or once its
    own save is complete, belongs to a process that is gone."""
    removed = []
    for stale in [*Path(run_dir).glob(".tmp-step-*"), *Path(run_dir).glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    return removed


def set_best(run_dir: Path, ckpt: Path) -> None:
    """Point `best` at the checkpoint with the best tracked metric (kept by `prune`)."""
    write_atomic(Path(run_dir) / BEST, Path(ckpt).name + "\n")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.glob("step-*") if p.is_dir() and (p / META).exists())


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, never the ones `latest` and `best` name.

    Called only after a new checkpoint is complete and verified, so there is always a good one on disk.
    """
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    pinned = {p.name for p in (read_latest(run_dir), read_pointer(run_dir, BEST)) if p is not None}
    keep = {p.name for p in ckpts[-keep_last:]} | pinned
    removed = []
    for p in ckpts:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    remove_stale_temporaries(run_dir)
    return removed


def read_pointer(run_dir: Path, name: str) -> Optional[Path]:
    """The checkpoint a pointer file (`latest`, `best`) names, if it exists."""
    p = Path(run_dir) / name
    if not p.is_file():
        return None
    target_name = p.read_text(encoding="utf-8").strip()
    target = Path(run_dir) / target_name
    return target if target_name and target.is_dir() else None


def read_latest(run_dir: Path) -> Optional[Path]:
    return read_pointer(run_dir, LATEST)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, a run directory (-> its latest checkpoint), or a run's `latest`/`best` pointer file."""
    p = Path(path).expanduser()
    if p.is_file() and p.name in (LATEST, BEST):
        target = read_pointer(p.parent, p.name)
        if target is None:
            raise LlmctlError(f"{p} names a checkpoint that does not exist; give a step-* directory instead")
        return target
    if not p.exists():
        raise LlmctlError(f"checkpoint not found: {p} (give a run directory or one of its step-* checkpoints)")
    if not p.is_dir():
        raise LlmctlError(f"checkpoint must be a directory (a run directory or a step-* checkpoint), got a file: {p}")
    if (p / META).exists():
        return p
    latest = read_latest(p)
    if latest is not None:
        return latest
    ckpts = list_checkpoints(p)
    if ckpts:
        return ckpts[-1]
    raise LlmctlError(f"{p} holds no checkpoint (no meta.json, no latest, no step-* directories)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_meta(where: Path, meta: dict) -> None:
    """The fields of meta.json that loading and its callers rely on have the types `save` writes; a hand-edited or
    damaged one is one line naming the file, the field and the fix, not a TypeError later."""

    def bad(field: str, expected: str, fix: str) -> LlmctlError:
        return LlmctlError(f"{where}: {field} must be {expected} (got {meta[field]!r}); {fix}, "
                           "or use another checkpoint")

    if "format_version" in meta and not _is_int(meta["format_version"]):
        raise bad("format_version", "an integer", f"restore it (this llmctl writes {FORMAT_VERSION})")
    if "step" in meta and not (_is_int(meta["step"]) and meta["step"] >= 0):
        named = where.parent.name.rpartition("-")[2]
        fix = f"set it to {int(named)}, the step in the directory name" if named.isdigit() else "restore it"
        raise bad("step", "a non-negative integer", fix)
    base = meta.get("base")
    if base is not None and not (isinstance(base, dict) and all(isinstance(base.get(k), (str, type(None)))
                                                                for k in ("path", "sha256"))):
        raise bad("base", "a mapping with the base checkpoint's path and sha256", "restore it")
    for name, digest in meta["files"].items():
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise LlmctlError(f"{where}: files lists {name!r}, which is not a file name inside the checkpoint; "
                              "the file was edited or damaged: use another checkpoint")
        if not isinstance(digest, str):
            raise LlmctlError(f"{where}: files gives {name} a sha256 of {digest!r}, not a hex string; the file was "
                              "edited or damaged: use another checkpoint")


def load(path: str | Path, verify: bool = True) -> Checkpoint:
    """Resolve and verify a checkpoint: every file listed in meta.json must exist and match its sha256."""
    ckpt = resolve(path)
    try:
        meta = json.loads((ckpt / META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LlmctlError(f"{ckpt / META} is unreadable ({e}); the checkpoint is damaged, use another one") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        raise LlmctlError(f"{ckpt} is not an llmctl checkpoint (meta.json lacks format/files); import other formats "
                          "with `llmctl import`")
    _check_meta(ckpt / "meta.json", meta)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise LlmctlError(f"{ckpt} was written by a newer llmctl (format {meta['format_version']}); upgrade llmctl")
    if WEIGHTS not in meta["files"] and ADAPTER not in meta["files"]:
        raise LlmctlError(f"{ckpt} lists no weights in its manifest; the checkpoint is incomplete")
    if CONFIG not in meta["files"]:  # tokenizer.json may be absent (see Checkpoint.tokenizer_json)
        raise LlmctlError(f"{ckpt} lacks config.yaml in its manifest; the checkpoint is incomplete")
    if verify:
        for name, digest in meta["files"].items():
            f = ckpt / name
            if not f.is_file():
                raise LlmctlError(f"checkpoint file missing: {f}; the checkpoint is incomplete, use another one")
            if sha256_file(f) != digest:
                raise LlmctlError(f"checkpoint file {f} fails its sha256 check (corrupt or modified); "
                                  "use another checkpoint")
    return Checkpoint(ckpt, meta)


