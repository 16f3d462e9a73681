"""Reading and writing files safely: atomic writes, content hashes, and text / JSONL input whose every problem
becomes one clear `LlmctlError` naming the file (and the line).

Every file or directory that must never be seen half written (run files, the token cache, downloads, exports)
is written through `atomic_file`, `atomic_path`, `atomic_dir` or `write_atomic` here: under a temporary name
beside it, then renamed into place in one step. Checkpoints add their own verification on top (`checkpoint.save`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO, Iterator

from .errors import LlmctlError


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Temporary names that become the real files: created like open() and mkdir() would (the user's umask)
#
# `tempfile.mkstemp` and `mkdtemp` create 0600 files and 0700 directories whatever the umask, so everything that
# is written under a temporary name and renamed into place (run files, checkpoints, exports, the token cache)
# would stay unreadable to the rest of a group on a shared filesystem. These two are the one place that gives
# such names the permissions a plain open() / mkdir() would (0644 / 0755 under umask 022), and `apply_umask` the
# files written into them by libraries that do not follow the umask; the names are still created exclusively
# (O_EXCL), so the writes stay atomic.

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc/self/status, kernel 4.7+).

    Elsewhere it is read the only portable way, by setting and restoring it, under a lock so that two readers
    cannot interleave (a thread creating a file in that instant would get the temporary mask 0o077, which only
    removes permissions, never adds them)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _chmod_fd(fd: int, mode: int) -> None:
    try:
        os.fchmod(fd, mode)
    except OSError:  # a filesystem without permissions (some network or FAT mounts): keep what it gave
        pass


def temp_file(directory: Path, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """(open fd, path) of a new, exclusively created file in `directory`, with the umask's permissions."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    _chmod_fd(fd, 0o666 & ~current_umask())
    return fd, Path(name)


def temp_dir(directory: Path, prefix: str) -> Path:
    """A new, exclusively created directory in `directory`, with the umask's permissions."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return path
    try:
        _chmod_fd(fd, 0o777 & ~current_umask())
    finally:
        os.close(fd)
    return path


def apply_umask(path: Path) -> None:
    """Give a file or directory written into one of those temporary names the umask's permissions, for writers
    that do not follow it (safetensors' save_file creates its files 0600). Symbolic links are left alone."""
    path = Path(path)
    if path.is_symlink():
        return
    try:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes: a file or directory appears complete, by one rename, or not at all


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary name beside `path`, for a writer that takes a file name (a library's save function); `suffix`
    ends it, for writers that insist on one (AOTInductor's packager wants ".pt2").

    When the block ends, what was written there replaces `path` in one rename (readers see the old file or the
    whole new one), with the umask's permissions; when it fails, the temporary goes, and with it the space of a
    partial write (a full disk)."""
    path = Path(path)
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        apply_umask(tmp)  # (a writer may have created the file anew, with its own mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """`path` opened for writing ("w": UTF-8 text, "wb": bytes) under a temporary name: flushed to the disk and
    renamed into place when the block ends, removed when it fails (see `atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never a torn one."""
    with atomic_file(path) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: Path, replace: bool = False) -> Iterator[Path]:
    """A new, empty temporary directory beside `path` (its parent is created) to fill; when the block ends it
    becomes `path` in one rename, complete, and the files in it get the umask's permissions. When it fails, it is
    removed.

    Where `path` exists by then, `replace` deletes it first (an export written again); without it the one there
    stays and this one is dropped (a cache entry that another process finished first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(path.parent, prefix=f".{path.name}.")
    try:
        yield tmp
        for f in tmp.iterdir():
            apply_umask(f)  # (safetensors writes its files 0600)
        if replace and path.exists():
            shutil.rmtree(path)
        try:
            publish_dir(tmp, path)
        except OSError:
            if replace or not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (nothing there once renamed)


def publish_dir(build: Path, path: Path) -> None:
    """Give a directory filled under another name (complete) its real name, in one rename: readers that look for
    `path` find all of it or nothing."""
    os.rename(build, path)


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file given through `what` (an option or key name, used in messages)."""
    p = Path(path)
    if not p.is_file():
        raise LlmctlError(f"{what} {p} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlmctlError(f"{what} {p} is not UTF-8 text") from None


def read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-empty line; a .json file may instead hold one array of objects."""
    text = read_text(path, what)
    if Path(path).suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlmctlError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        rows = list(enumerate(data, 1))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise LlmctlError(f"{what} {path} line {n} is not valid JSON ({e.msg}); "
                                  "fix or remove that line") from None
    for n, obj in rows:
        if not isinstance(obj, dict):
            raise LlmctlError(f"{what} {path} line {n} must be a JSON object")
    return rows
