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

from conftest import SHAKESPEARE, Recorder, sets
from llmctl import checkpoint as ckpt
from llmctl import distributed, rundir
from llmctl.commands import training as training_cmd
from llmctl.config import TrainConfig, load_config
from llmctl.distributed import tensor_parallel
from llmctl.errors import LlmctlError
from llmctl.hardware import cpu_has_fast_bf16

# Under pytest-xdist these tests run on one worker, one after another: their module fixtures (one-process reference
# runs) are built once, and two torchrun launches of 2-4 ranks each never share the cores with each other.
pytestmark = pytest.mark.xdist_group("torchrun")

# float32, dropout 0: one process with batch B and two with B/2 see the same global batch and must agree
BASE = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "model.dropout=0.0",
    "train.max_steps=20", "train.warmup_steps=5", "train.log_interval=1", "train.eval_interval=10",
    "train.eval_batches=3",
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "llmctl",
           *args]
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
    # under tensor parallelism a group of ranks shares one micro-batch: 4 processes in groups of 2 are 2 replicas
    fsdp_tp = distributed.DistContext(rank=3, world_size=4, parallel="fsdp_tp", tp_size=2)
    assert (fsdp_tp.dp_size, fsdp_tp.dp_rank) == (2, 1) and distributed.check(fsdp_tp, t, None) == 2
    with pytest.raises(LlmctlError) as e:
        distributed.check(fsdp_tp, TrainConfig(batch_size=4, global_batch_size=12), None)
    assert "x 2 data-parallel replicas (4 processes in tensor-parallel groups of 2) = 8" in e.value.message


def test_global_batch_size_in_one_process_trains_like_grad_accum(tmp_path):
    args = [*BASE, "train.max_steps=4", "train.eval_interval=0", "train.batch_size=2"]
    a = training_cmd.pretrain(None, [*args, "train.grad_accum=3"], tmp_path / "a")
    b = training_cmd.pretrain(None, [*args, "train.global_batch_size=6"], tmp_path / "b")
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
    from llmctl.commands.training import TrainOptions

    shown = Recorder()
    opts = TrainOptions(shown, on_plan=lambda plan: None)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    other = opts.for_this_rank()
    assert other.on_plan is None and not distributed.speaks()
    other.events.log("hello")
    other.events.warn("careful")
    with other.events.progress("train", 10) as bar:
        bar.update(1, loss=1.0)
    assert shown.logs == shown.warnings == shown.progresses == []
    with pytest.raises(LlmctlError) as e:  # other ranks name themselves in their error lines
        with distributed.peer_errors():
            raise LlmctlError("bad")
    assert e.value.message == "rank 1: bad"
    monkeypatch.setenv("RANK", "0")
    assert opts.for_this_rank() == opts


# ------------------------------------------------------------------------------------------------------------------
# Two processes under torchrun (gloo) against one process with the same global batch


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process, batch 8: the reference (checkpoints at steps 10 and 20)."""
    out = tmp_path_factory.mktemp("dist") / "single"
    training_cmd.pretrain(None, [*BASE, "train.batch_size=8"], out)
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, single) -> tuple[Path, subprocess.CompletedProcess]:
    """Two processes, batch 4 each, FSDP2 with activation checkpointing."""
    out = tmp_path_factory.mktemp("dist") / "fsdp"
    r = torchrun("pretrain",
                 *sets(*BASE, "train.batch_size=4", "train.parallel=fsdp", "train.activation_checkpointing=true"),
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
    assert all(row["tokens_per_sec_per_device"] == pytest.approx(row["tokens_per_sec"] / 2, abs=0.1)
               for row in step_rows)
    assert_same_val_losses(single, out)


def distill_settings(single: Path) -> list[str]:
    return ["finetune.task=distill", f"finetune.teacher={single}", "finetune.distill_alpha=0.7", "train.max_steps=6",
            "train.eval_interval=0"]


@pytest.fixture(scope="module")
def distilled_in_one(tmp_path_factory, single) -> Path:
    """One process, batch 8, distilling `single` into itself: the reference of every parallel layout."""
    one = tmp_path_factory.mktemp("dist") / "distilled"
    training_cmd.finetune(None, [*BASE, "train.batch_size=8", *distill_settings(single)], single, one)
    return one


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "tp"])
def test_distillation_in_two_processes_logs_the_losses_of_one(tmp_path, single, distilled_in_one, parallel):
    """finetune.task=distill under torchrun: the student is wrapped (or sharded) as usual, every rank holds the
    whole teacher."""
    kd, one = distill_settings(single), distilled_in_one
    two = tmp_path / "two"
    per_device = 8 if parallel == "tp" else 4  # (the two ranks of a tensor-parallel group share their micro-batch)
    r = torchrun("finetune", "--from", str(single), *sets(*BASE, f"train.batch_size={per_device}",
                                                          f"train.parallel={parallel}", *kd),
                 "--out", str(two), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(losses(one), losses(two), range(1, 7))
    assert json.loads(r.stdout)["world_size"] == 2


@pytest.mark.slow
def test_ddp_with_muon_logs_the_losses_of_one_process(tmp_path):
    """DDP averages the gradients before the step, so each rank's Muon orthogonalises the same whole matrices as one
    process does; bfloat16 Newton-Schulz on differently summed gradients agrees to a relative 1e-3."""
    muon = [*BASE, "model.arch=llama", "train.optimizer=muon", "train.max_steps=6", "train.eval_interval=0",
            "train.save_interval=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    training_cmd.pretrain(None, [*muon, "train.batch_size=8"], one)
    r = torchrun("pretrain", *sets(*muon, "train.batch_size=4"), "--out", str(two), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) <= 1e-3 * abs(a[s]) for s in a), (a, b)
    assert a[6] < a[1]


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
    training_cmd.pretrain(None, [*BASE, "train.batch_size=8"], out, resume_from=fsdp_run[0] / "step-0000010")
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
# Tensor parallelism (train.parallel=tp, and FSDP x TP on a 2-D mesh) against one process

FLAVOURS = {  # grouped-query attention in the LLaMA flavour; tied embeddings and biases in the GPT-2 one
    "llama-gqa": ["model.arch=llama", "model.n_head=4", "model.n_kv_head=2"],
    "gpt2-tied": ["model.arch=gpt2", "model.n_head=4"],
    # the open families' switches: q/k/v bias, windows, soft-capped scores, Gemma's norms
    "llama-open": ["model.arch=llama", "model.n_head=4", "model.n_kv_head=2",
                   "model.qkv_bias=true", "model.sliding_window=8", "model.attn_softcap=30", "model.post_norms=true",
                   "model.norm_offset=true", "model.embed_scale=true", "model.gate_activation=gelu_tanh"],
}


@pytest.fixture(scope="module")
def single_flavour(tmp_path_factory):
    """One process, batch 8, per flavour: the references for tensor parallelism."""
    made: dict = {}

    def get(flavour: str) -> Path:
        if flavour not in made:
            out = tmp_path_factory.mktemp("tp") / f"single-{flavour}"
            training_cmd.pretrain(None, [*BASE, *FLAVOURS[flavour], "train.batch_size=8"], out)
            made[flavour] = out
        return made[flavour]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tensor_parallel_two_processes_log_the_losses_of_one(tmp_path, single_flavour, flavour):
    single = single_flavour(flavour)
    out = tmp_path / "tp"
    # the two ranks of one tensor-parallel group share their micro-batch: batch 8 is the global batch
    r = torchrun("pretrain", *sets(*BASE, *FLAVOURS[flavour], "train.batch_size=8", "train.parallel=tp"),
                 "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(losses(single), losses(out), range(1, 21))
    assert_same_val_losses(single, out)
    assert r.stderr.count("global batch 8 sequences = 8 per device x 1 accumulation x 1 data-parallel replica "
                          "(2 processes in tensor-parallel groups of 2) (TP)") == 1, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["world_size"] == 2 and summary["tokens"] == 20 * 8 * 32
    # the checkpoint is the one format, q|k|v and gate|up back in their order
    one, two = ckpt.load(single / "step-0000020"), ckpt.load(out / "step-0000020")
    w1, w2 = one.weights(), two.weights()
    assert sorted(w1) == sorted(w2) and all(w1[k].shape == w2[k].shape for k in w1)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < TOL
    o1, o2 = one.train_state()["optimizer"], two.train_state()["optimizer"]
    assert max((o1["state"][i][m] - o2["state"][i][m]).abs().max().item()
               for i in o1["state"] for m in ("exp_avg", "exp_avg_sq")) < TOL
    # ... so it resumes in one process like the single run's own checkpoint
    resumed = tmp_path / "resumed"
    training_cmd.pretrain(None, [*BASE, *FLAVOURS[flavour], "train.batch_size=8"], resumed,
                      resume_from=out / "step-0000010")
    assert_same_losses(losses(single), losses(resumed), range(11, 21))


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["llama-gqa", "gpt2-tied"])
def test_fsdp_times_tensor_parallel_four_processes_log_the_losses_of_one(tmp_path, single_flavour, flavour):
    single = single_flavour(flavour)
    out = tmp_path / "fsdp_tp"
    r = torchrun("pretrain", *sets(*BASE, *FLAVOURS[flavour], "train.batch_size=4", "train.parallel=fsdp_tp",
                                   "train.tp_size=2"), "--out", str(out), "--quiet", nproc=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(losses(single), losses(out), range(1, 21))
    assert_same_val_losses(single, out)
    w1, w2 = ckpt.load(single / "step-0000020").weights(), ckpt.load(out / "step-0000020").weights()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < TOL


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_tensor_parallelism(tmp_path, single_flavour):
    single = single_flavour("llama-gqa")
    out = tmp_path / "resumed"
    r = torchrun("pretrain", *sets(*BASE, *FLAVOURS["llama-gqa"], "train.batch_size=8", "train.parallel=tp"),
                 "--out", str(out), "--resume-from", str(single / "step-0000010"), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(losses(single), losses(out), range(11, 21))


@pytest.mark.slow
def test_tensor_parallel_classification_with_accumulation_matches_one_process(tmp_path, single_flavour):
    base = single_flavour("llama-gqa")
    data = tmp_path / "train.tsv"
    data.write_text("label\tsentence\n"
                    + "".join(f"{i % 2}\t{'good' if i % 2 else 'bad'} words {i}\n" for i in range(48)))
    args = ["finetune.task=classification", f"data.path={data}", "data.text_column=sentence", "train.max_steps=6",
            "train.batch_size=4", "train.grad_accum=2", "train.log_interval=1", "train.eval_interval=3",
            "train.warmup_steps=1", "train.dtype=float32"]
    one = tmp_path / "one"
    training_cmd.finetune(None, args, base, one)
    out = tmp_path / "tp"
    r = torchrun("finetune", "--from", str(base), *sets(*args, "train.parallel=tp"), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_losses(losses(one), losses(out), range(1, 7))
    acc = {p: [row["accuracy"] for row in rows(p) if "accuracy" in row] for p in (one, out)}
    assert acc[one] == acc[out] and len(acc[one]) == 2


@pytest.mark.slow
def test_sigterm_under_tensor_parallelism_saves_and_resumes(tmp_path):
    out = tmp_path / "run"
    dtype = "bfloat16" if cpu_has_fast_bf16() else "float32"  # bf16 autocast where the CPU runs it natively
    args = sets(*BASE, *FLAVOURS["llama-gqa"], "train.batch_size=4", "train.max_steps=100000", "train.eval_interval=0",
                "train.save_interval=0", f"train.dtype={dtype}", "train.activation_checkpointing=true",
                "train.parallel=tp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmctl",
           "pretrain", *args, "--out", str(out), "--quiet"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not ((out / "metrics.jsonl").exists() and len(rows(out)) >= 3):
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.time() - t0 < 180, "the run did not start"
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks: they agree on a step and save
        _, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    status = rundir.read_status(out)
    assert status["status"] == "interrupted" and status["exit_status"] == 143, (status, err[-3000:])
    saved = ckpt.read_latest(out)
    step = ckpt.load(saved).train_state()["loop"]["step"]
    assert saved is not None and step >= 3
    resumed = torchrun("pretrain", *[a.replace("train.max_steps=100000", f"train.max_steps={step + 2}") for a in args],
                       "--out", str(out), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(r["step"] for r in rows(out) if "loss" in r)[-2:] == [step + 1, step + 2]


SHARDS = """
import json, sys, torch, torch.distributed as dist
from llmctl import distributed
from llmctl.config import ModelConfig, TrainConfig
from llmctl.model import Transformer
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out = {}
for name, cfg in {"llama-gqa": ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16,
                                           vocab_size=40),
                  "gpt2-tied": ModelConfig(arch="gpt2", n_layer=2, n_head=4, n_embd=32, block_size=16,
                                           vocab_size=40)}.items():
    torch.manual_seed(0)
    plain = Transformer(cfg)
    model = Transformer(cfg)
    model.load_state_dict(plain.state_dict())
    ctx = distributed.DistContext(rank, rank, world, "tp", torch.device("cpu"), 60.0, world)
    model = distributed.wrap_model(model, TrainConfig(parallel="tp"), ctx)
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(idx) - plain(idx)).abs().max().item()
    local = {n: (p.to_local().numel() if hasattr(p, "to_local") else p.numel(), p.numel())
             for n, p in model.named_parameters()}
    out[name] = {"diff": diff, "local": local, "tied": model.lm_head.weight is model.wte.weight}
json.dump(out, open(sys.argv[1] + f"/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_each_rank_holds_its_share_of_every_tensor_parallel_matrix(tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(SHARDS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for flavour, info in got.items():
            assert info["diff"] < 1e-5, (flavour, info["diff"])  # the sharded forward is the whole model's
            assert info["tied"] is (flavour == "gpt2-tied")
            for name, (mine, whole) in info["local"].items():
                split = tensor_parallel.is_split(name)
                assert split == name.endswith(("attn.qkv.weight", "attn.proj.weight", "mlp.fc.weight",
                                               "mlp.proj.weight", "attn.qkv.bias", "mlp.fc.bias"))
                assert mine * (2 if split else 1) == whole, (flavour, name, mine, whole)


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
            env = dict(x.split("=", 1)
                       for x in (d / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in x)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(d.name)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "tp"])
def test_killing_a_rank_stops_the_others_with_a_clear_message(tmp_path, parallel):
    out = tmp_path / "killed"
    # activation checkpointing under DDP rides along, and bf16 autocast where the CPU runs it natively (emulated,
    # its steps would be slow for no gain here); the run would take many minutes
    dtype = "bfloat16" if cpu_has_fast_bf16() else "float32"
    args = [*BASE, "train.max_steps=100000", "train.eval_interval=0", "train.save_interval=0", "train.batch_size=4",
            f"train.dtype={dtype}", "train.activation_checkpointing=true", "train.dist_timeout=60",
            f"train.parallel={parallel}"]
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
        # bounded: not a hang; a dead rank ends the run in seconds, not dist_timeout (docs/pretraining.md)
        _, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode != 0
    assert "error: rank 0 of 2: lost contact with the other ranks" in err, err[-3000:]
    assert re.search(r"exitcode\s*:\s*4 ", err), err[-3000:]  # torchrun's summary: the survivor exited with status 4
    status = rundir.read_status(out)
    assert status["status"] == "failed" and status["exit_status"] == 4 and "lost contact" in status["error"]


# ------------------------------------------------------------------------------------------------------------------
# Two nodes on one machine: two torchrun agents meeting through a c10d rendezvous, as two machines would


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_two_processes_through_c10d_rendezvous_train_like_one_process(tmp_path):
    """`torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d` twice (the docs' two-node command, both nodes
    here), FSDP2 over gloo, batch 2 per process: 3 steps equal one process with batch 8 (losses and weights)."""
    args = [*BASE, "train.max_steps=3", "train.eval_interval=0", "train.save_interval=3", "train.warmup_steps=1"]
    training_cmd.pretrain(None, [*args, "train.batch_size=8"], tmp_path / "one")
    out, port = tmp_path / "two-nodes", _free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "llmctl-test",
             "-m", "llmctl", "pretrain", *sets(*args, "train.batch_size=2", "train.parallel=fsdp"), "--out", str(out),
             "--json"]
    nodes = [subprocess.Popen(agent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        done = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in done]
    summary = json.loads("".join(stdout for stdout, _ in done))  # one JSON object: rank 0 alone printed
    assert summary["world_size"] == 4
    assert "global batch 8 sequences = 2 per device x 1 accumulation x 4 processes (FSDP)" in "".join(
        err for _, err in done)
    assert_same_losses(losses(tmp_path / "one"), losses(out), range(1, 4))
    w1, w2 = ckpt.load(tmp_path / "one" / "step-0000003").weights(), ckpt.load(out / "step-0000003").weights()
    assert sorted(w1) == sorted(w2) and max((w1[k] - w2[k]).abs().max().item() for k in w1) < TOL


def _agree(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from llmctl.distributed import DistContext, agree_all

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ctx = DistContext(rank=rank, world_size=2, parallel="ddp")
        got = (agree_all(ctx, rank == 0), agree_all(ctx, True))  # rank 0 alone has native bf16; then both
        Path(out, f"{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_on_a_choice_only_when_every_rank_makes_it(tmp_path):
    """Muon's Newton-Schulz dtype is bfloat16 on hosts with native bf16 and float32 elsewhere: mixed hosts must all
    take float32 (agree_all), or the DDP replicas would drift apart."""
    import torch.multiprocessing as mp

    mp.spawn(_agree, args=(f"file://{tmp_path / 'rdzv'}", str(tmp_path)), nprocs=2)
    assert [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)] == [[False, True], [False, True]]
