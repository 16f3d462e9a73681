"""Scaling out: DDP and FSDP2 under torchrun on CPU (gloo) give the losses of one process with the same global
batch, checkpoints move between world sizes, and a killed rank stops the others with a clear message."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SHAKESPEARE, sets
from llmctl import checkpoint as ckpt
from llmctl import commands, distributed
from llmctl.config import TrainConfig, load_config
from llmctl.errors import LlmctlError
from llmctl.hardware import cpu_has_fast_bf16

# float32, dropout 0: one process with batch B and two with B/2 see the same global batch and must agree
BASE = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.0",
    "train.max_steps=20", "train.warmup_steps=5", "train.log_interval=1", "train.eval_interval=10", "train.eval_batches=3",
    "train.save_interval=10", "train.keep_last=3", "train.dtype=float32", f"data.path={SHAKESPEARE}",
]
TOL = 1e-5


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run) if "loss" in r}


def assert_same_losses(a: dict[int, float], b: dict[int, float], steps) -> None:
    steps = list(steps)
    assert sorted(b) == steps, sorted(b)
    worst = max(abs(a[s] - b[s]) for s in steps)
    assert worst <= TOL, {s: (a[s], b[s]) for s in steps if abs(a[s] - b[s]) > TOL}


def assert_same_val_losses(a: Path, b: Path) -> None:
    """Evaluation is shared out over the ranks (3 batches: one rank pads under FSDP) and must not change."""
    val_a = {row["step"]: row["val_loss"] for row in rows(a) if "val_loss" in row}
    val_b = {row["step"]: row["val_loss"] for row in rows(b) if "val_loss" in row}
    assert val_a.keys() == val_b.keys() == {10, 20}
    assert all(abs(val_a[s] - val_b[s]) < TOL for s in val_a), (val_a, val_b)


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m llmctl ...` (torchrun itself may not be on PATH)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "llmctl", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------------------------
# In one process: settings and helpers


def test_global_batch_size_derives_grad_accum_and_conflicts_are_config_errors():
    with pytest.raises(LlmctlError) as e:
        load_config(None, ["train.global_batch_size=16", "train.grad_accum=2"])
    assert "set only one" in e.value.message and e.value.status == 2
    with pytest.raises(LlmctlError) as e:
        load_config(None, ["train.global_batch_size=10", "train.batch_size=4"])
    assert "not a multiple of train.batch_size=4" in e.value.message
    t = TrainConfig(batch_size=4, global_batch_size=16)
    assert distributed.check(distributed.DistContext(), t, None) == 4
    two = distributed.DistContext(rank=0, world_size=2, parallel="ddp")
    assert distributed.check(two, t, None) == 2
    with pytest.raises(LlmctlError) as e:
        distributed.check(two, TrainConfig(batch_size=4, global_batch_size=12), None)
    assert "x 2 processes = 8" in e.value.message
    fsdp = distributed.DistContext(rank=0, world_size=2, parallel="fsdp")
    with pytest.raises(LlmctlError, match="float16"):
        distributed.check(fsdp, TrainConfig(), torch.float16)


def test_global_batch_size_in_one_process_trains_like_grad_accum(tmp_path):
    args = [*BASE, "train.max_steps=4", "train.eval_interval=0", "train.batch_size=2"]
    a = commands.pretrain(None, [*args, "train.grad_accum=3"], tmp_path / "a")
    b = commands.pretrain(None, [*args, "train.global_batch_size=6"], tmp_path / "b")
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and a["tokens"] == b["tokens"] == 4 * 6 * 32


def test_activation_checkpointing_keeps_names_and_gradients():
    from llmctl.config import ModelConfig
    from llmctl.model import Transformer

    torch.manual_seed(0)
    plain = Transformer(ModelConfig(arch="llama", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40))
    ckpt_model = Transformer(plain.cfg)
    ckpt_model.load_state_dict(plain.state_dict())
    distributed.checkpoint_blocks(ckpt_model)
    assert list(ckpt_model.state_dict()) == list(plain.state_dict())
    x = torch.randint(0, 40, (2, 16))
    for m in (plain, ckpt_model):
        torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt_model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_only_rank_zero_speaks(monkeypatch):
    from llmctl.train import NullReporter

    shown = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rep, log, on_plan = distributed.rank0_only(object(), shown.append, lambda plan: None)
    assert isinstance(rep, NullReporter) and on_plan is None
    log("hello")
    assert shown == []
    with pytest.raises(LlmctlError) as e:  # other ranks name themselves in their error lines
        with distributed.peer_errors():
            raise LlmctlError("bad")
    assert e.value.message == "rank 1: bad"
    monkeypatch.setenv("RANK", "0")
    rep, log, _ = distributed.rank0_only("rich", shown.append)
    assert rep == "rich" and log == shown.append


# ------------------------------------------------------------------------------------------------------------------
# Two processes under torchrun (gloo) against one process with the same global batch


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process, batch 8: the reference (checkpoints at steps 10 and 20)."""
    out = tmp_path_factory.mktemp("dist") / "single"
    commands.pretrain(None, [*BASE, "train.batch_size=8"], out)
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, single) -> tuple[Path, subprocess.CompletedProcess]:
    """Two processes, batch 4 each, FSDP2 with activation checkpointing."""
    out = tmp_path_factory.mktemp("dist") / "fsdp"
    r = torchrun("pretrain", *sets(*BASE, "train.batch_size=4", "train.parallel=fsdp", "train.activation_checkpointing=true"),
                 "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.mark.slow
def test_ddp_two_processes_log_the_losses_of_one(tmp_path, single):
    out = tmp_path / "ddp"
    r = torchrun("pretrain", *sets(*BASE, "train.batch_size=4"), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(losses(single), losses(out), range(1, 21))
    summary = json.loads(r.stdout)  # one JSON object: only rank 0 printed
    assert summary["world_size"] == 2 and summary["tokens"] == 20 * 8 * 32
    assert r.stderr.count("global batch 8 sequences = 4 per device x 1 accumulation x 2 processes (DDP)") == 1
    assert r.stderr.count("step 20: val_loss") == 1
    step_rows = [row for row in rows(out) if "tokens_per_sec" in row]
    assert all(row["tokens_per_sec_per_device"] == pytest.approx(row["tokens_per_sec"] / 2, abs=0.1) for row in step_rows)
    assert_same_val_losses(single, out)


@pytest.mark.slow
def test_fsdp_two_processes_log_the_losses_of_one(single, fsdp_run):
    out, r = fsdp_run
    assert_same_losses(losses(single), losses(out), range(1, 21))
    assert_same_val_losses(single, out)
    assert "(FSDP)" in r.stderr and json.loads(r.stdout)["world_size"] == 2
    # the checkpoint is the one format: same tensor names and shapes as a single process writes
    one, two = ckpt.load(single / "step-0000020"), ckpt.load(out / "step-0000020")
    w1, w2 = one.weights(), two.weights()
    assert sorted(w1) == sorted(w2)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < TOL
    s1, s2 = one.train_state(), two.train_state()
    assert s1["optimizer"]["param_groups"] == s2["optimizer"]["param_groups"]
    assert len(s2["rng_ranks"]) == 2 and torch.equal(s2["rng"]["torch"], s2["rng_ranks"][0]["torch"])


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(tmp_path, single, fsdp_run):
    out = tmp_path / "resumed"
    commands.pretrain(None, [*BASE, "train.batch_size=8"], out, resume_from=fsdp_run[0] / "step-0000010")
    assert_same_losses(losses(single), losses(out), range(11, 21))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two_processes(tmp_path, single):
    out = tmp_path / "resumed"
    r = torchrun("pretrain", *sets(*BASE, "train.batch_size=4", "train.parallel=fsdp"), "--out", str(out),
                 "--resume-from", str(single / "step-0000010"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(losses(single), losses(out), range(11, 21))


@pytest.mark.slow
def test_resume_with_the_same_world_size_is_exact_with_dropout(tmp_path):
    """Each rank's RNG (dropout) is stored, so a resume in two processes continues bit for bit."""
    args = sets(*BASE, "train.batch_size=4", "train.max_steps=8", "train.save_interval=4", "train.eval_interval=0",
                "model.dropout=0.1")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    r = torchrun("pretrain", *args, "--out", str(full), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun("pretrain", *args, "--out", str(resumed), "--resume-from", str(full / "step-0000004"), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(resumed) == {s: v for s, v in losses(full).items() if s > 4}


# ------------------------------------------------------------------------------------------------------------------
# A rank that dies


def _children(pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (Linux /proc)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            env = dict(x.split("=", 1) for x in (d / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in x)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(d.name)
    return found


@pytest.mark.slow
def test_killing_a_rank_stops_the_others_with_a_clear_message(tmp_path):
    out = tmp_path / "killed"
    # activation checkpointing under DDP rides along, and bf16 autocast where the CPU runs it natively (emulated,
    # its steps would be slow for no gain here); the run would take many minutes
    dtype = "bfloat16" if cpu_has_fast_bf16() else "float32"
    args = [*BASE, "train.max_steps=100000", "train.eval_interval=0", "train.save_interval=0", "train.batch_size=4",
            f"train.dtype={dtype}", "train.activation_checkpointing=true", "train.dist_timeout=60"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmctl",
           "pretrain", *sets(*args), "--out", str(out), "--quiet"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.time() - t0 < 180, "the run did not start"
            time.sleep(0.1)
        ranks = _children(p.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        _, err = p.communicate(timeout=90)  # bounded: not a hang (README "Scaling out": seconds, not dist_timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode != 0
    assert "error: rank 0 of 2: lost contact with the other ranks" in err, err[-3000:]
    assert re.search(r"exitcode\s*:\s*4 ", err), err[-3000:]  # torchrun's summary: the survivor exited with status 4
    status = ckpt.read_status(out)
    assert status["status"] == "failed" and status["exit_status"] == 4 and "lost contact" in status["error"]
