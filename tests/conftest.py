"""Shared fixtures: one tiny trained checkpoint for the whole session, a private cache, the CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.events import Events, Progress

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"

# a model small enough to train in seconds on 2 CPU cores
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "train.batch_size=4", "train.max_steps=30", "train.eval_interval=15", "train.eval_batches=4",
    "train.log_interval=5", "train.warmup_steps=5", "train.dtype=float32", f"data.path={SHAKESPEARE}",
]


def _share_the_cores() -> None:
    """Under pytest-xdist (`-n N`), each worker (and every process it starts: the CLI, servers, torchrun's ranks)
    gets its share of the cores, so N workers' torch thread pools do not oversubscribe the machine and spin against
    each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


_share_the_cores()


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with the reason (`pytest -rs`), where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here "
                                   f"(torch {torch.__version__}); scripts/gpu_check.sh runs it on a GPU machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# The same bad sampling values, given through every surface (tests/test_sampling.py: --set generate.*, the flags of
# infer, serve and eval, JSONL rows; tests/test_server.py: HTTP requests): (field, value, the words of the one rule)
BAD_SAMPLING = [
    ("temperature", -1, "must not be negative"),
    ("top_p", 1.5, "must be above 0 and at most 1"),
    ("top_k", -3, "must be at least 1, or 0 or -1 for no limit"),
    ("max_new_tokens", 0, "must be at least 1"),
    ("presence_penalty", 2.5, "must be between -2 and 2; 0 = off (got 2.5)"),
    ("frequency_penalty", -3.5, "must be between -2 and 2; 0 = off (got -3.5)"),
    ("stop", [f"s{i}" for i in range(17)], "takes at most 16 strings (got 17)"),
]


def sets(*items: str) -> list[str]:
    """['a=1', 'b=2'] -> ['--set', 'a=1', '--set', 'b=2']"""
    out: list[str] = []
    for i in items:
        out += ["--set", i]
    return out


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    os.environ["LLMCTL_CACHE_DIR"] = str(cache)
    # inductor's own caches (built C++ kernels, autotuning results: llmctl.aot.configure_compile_cache) are shared by
    # the session's xdist workers, so a kernel that two tests' decode steps both need is compiled once; llmctl's
    # cache of compiled steps stays private to each worker
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(shared / "inductor")
    os.environ.pop("LLMCTL_DEBUG", None)
    return cache


@pytest.fixture(scope="session")
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    from llmctl.cli import app

    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, runner) -> Path:
    """A tiny char-level GPT trained for 30 steps through the real CLI; shared by every test that needs one."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    r = invoke(runner, "pretrain", *sets(*TINY), "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    return out


# a ModernBERT-layout encoder of TINY's size, MLM-pretrained for 10 steps
ENCODER = [
    *TINY, "model.arch=llama", "model.causal=false", "model.norm=layernorm", "model.bias=false",
    "model.gate_activation=gelu", "model.embed_norm=true", "model.mlm_head=true", "model.pooler=mlm",
    "model.tie_embeddings=true", "model.sliding_window=16", "model.layer_types=[full,sliding]",
    "model.rope_local_theta=10000", "train.objective=mlm", "train.max_steps=10", "train.eval_interval=5",
    "train.eval_batches=2",
]
_ENCODER_RUN: list[Path] = []


def encoder_run() -> Path:
    """The tiny encoder trained through the real CLI, built once per session on first use (by test_encoders.py's
    tests and test_cli.py's bad-input rows), in the session's private cache directory."""
    if not _ENCODER_RUN:
        out = Path(os.environ["LLMCTL_CACHE_DIR"]) / "runs" / "encoder"
        r = invoke(CliRunner(), "pretrain", *sets(*ENCODER), "--out", out, "--quiet")
        assert r.exit_code == 0, r.output
        _ENCODER_RUN.append(out)
    return _ENCODER_RUN[0]


def disk_fills_on_second_shard(monkeypatch) -> None:
    """The second token shard's file takes half its bytes, then the disk is full (ENOSPC)."""
    import builtins
    import errno

    from llmctl import fileio

    opened: list[str] = []

    def full_open(path, mode="r", *a, **k):
        fh = builtins.open(path, mode, *a, **k)
        if Path(path).name.startswith(".shard-") and ".starts" not in Path(path).name and "w" in mode:
            opened.append(str(path))
            if len(opened) == 2:
                write = fh.write

                def half_then_full(data):
                    write(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, "No space left on device")

                fh.write = half_then_full
        return fh

    monkeypatch.setattr(fileio, "open", full_open, raising=False)  # (shards are written through fileio)


def generate_uncached(model, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_k=None,
                      top_p=None, eos_id=None, seed=None) -> list[int]:
    """The reference the engine is tested against: no cache, a full forward over the last block_size tokens each
    step, the same sampler and generator."""
    import torch

    from llmctl.logits import sample

    device = model.wte.weight.device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    model.eval()
    tokens, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            idx = torch.tensor([tokens[-model.cfg.block_size:]], device=device)
            t = int(sample(model(idx)[:, -1], temperature, top_k, top_p, gen))
            if eos_id is not None and t == eos_id:
                break
            out.append(t)
            tokens.append(t)
    return out


class Recorder(Events):
    """An `llmctl.events.Events` that keeps what work reports, for tests: log lines, warnings, and every progress it
    was asked for (`RecordedProgress`: label, total, the updates and whether it was closed)."""

    def __init__(self):
        self.logs: list[str] = []
        self.warnings: list[str] = []
        self.progresses: list[RecordedProgress] = []

    def log(self, message: str) -> None:
        self.logs.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def progress(self, label: str, total=None, done: int = 0) -> RecordedProgress:
        self.progresses.append(RecordedProgress(label, total, done))
        return self.progresses[-1]

    def of(self, label: str) -> list[RecordedProgress]:
        return [p for p in self.progresses if p.label == label]


class RecordedProgress(Progress):
    def __init__(self, label: str, total, done: int):
        self.label, self.total, self.start = label, total, done
        self.updates: list[tuple[int, dict]] = []
        self.closed = False

    def update(self, done: int, **fields) -> None:
        assert not self.closed, f"an update of the {self.label} progress after it was closed"
        self.updates.append((done, fields))

    def close(self) -> None:
        self.closed = True
