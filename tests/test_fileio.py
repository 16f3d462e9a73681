"""Files written under temporary names get the user's umask (not mkstemp's 0600 / mkdtemp's 0700), atomically."""

import contextlib
import os
import stat
from pathlib import Path

from conftest import TINY, invoke
from llmctl import fileio
from llmctl.commands import training as training_cmd


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def modes(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of everything under root (root itself as '.')."""
    out = {".": mode(root)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = mode(p)
    return out


def assert_umask_modes(root: Path, file_mode: int, dir_mode: int) -> None:
    wrong = {k: oct(m) for k, m in modes(root).items()
             if m != (dir_mode if (root / k).is_dir() else file_mode)}
    assert not wrong, wrong


def test_current_umask_reads_without_changing_it():
    with umask(0o027):
        assert fileio.current_umask() == 0o027
        assert fileio.current_umask() == 0o027  # (reading did not reset it)
    with umask(0o002):
        assert fileio.current_umask() == 0o002


def test_write_atomic_and_temp_names_honour_the_umask(tmp_path):
    for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o077, 0o600, 0o700)):
        with umask(mask):
            target = tmp_path / f"status-{mask:o}.json"
            fileio.write_atomic(target, "one")
            assert mode(target) == file_mode and target.read_text() == "one"
            fileio.write_atomic(target, "two")  # replacing keeps the umask's mode, and the new content
            assert mode(target) == file_mode and target.read_text() == "two"
            fd, name = fileio.temp_file(tmp_path, prefix=".x.")
            os.close(fd)
            d = fileio.temp_dir(tmp_path, prefix=".d.")
            assert (mode(name), mode(d)) == (file_mode, dir_mode)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".status")) == []  # no temporary left


def test_run_directory_token_cache_and_export_follow_the_umask(tmp_path, runner):
    """Under umask 022 everything a run writes is 0644 / 0755: config.yaml, status.json, latest, metrics.jsonl, the
    step-* checkpoints and all their files, the token cache; and so is an export directory (`llmctl export`)."""
    run, cache, export = tmp_path / "run", tmp_path / "cache", tmp_path / "hf"
    with umask(0o022):
        training_cmd.pretrain(None, [*TINY, "train.max_steps=4", "train.save_interval=2", "train.eval_interval=2",
                                 f"data.cache_dir={cache}"], run)
        names = {p.name for p in run.iterdir()}
        assert {"config.yaml", "status.json", "latest", "best", "metrics.jsonl", "tokenizer.json",
                "step-0000002", "step-0000004"} <= names, names
        assert_umask_modes(run, 0o644, 0o755)
        assert_umask_modes(cache, 0o644, 0o755)
        r = invoke(runner, "export", "--ckpt", run, "--out", export)
        assert r.exit_code == 0, r.output
        assert (export / "config.json").exists()
        assert_umask_modes(export, 0o644, 0o755)


def test_atomic_writes_appear_whole_or_not_at_all(tmp_path):
    """A failed write leaves the old file and no temporary; a directory appears by one rename, and an existing one
    stays (a cache entry another process finished first) unless it is to be replaced (an export written again)."""
    target = tmp_path / "shard.bin"
    fileio.write_atomic(target, "old")
    try:
        with fileio.atomic_file(target, "wb") as f:
            f.write(b"half")
            raise OSError("the disk is full")
    except OSError:
        pass
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["shard.bin"]
    with fileio.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # (the new content is not there until the block ends)
    assert target.read_bytes() == b"new"
    entry = tmp_path / "cache" / "entry"
    for replace, text, expected in ((False, "first", "first"), (False, "second", "first"), (True, "third", "third")):
        with fileio.atomic_dir(entry, replace=replace) as d:
            (d / "f.txt").write_text(text)
            assert not (entry / "f.txt").exists() or (entry / "f.txt").read_text() != text
        assert (entry / "f.txt").read_text() == expected
    assert sorted(p.name for p in entry.parent.iterdir()) == ["entry"]  # no temporary directory left
