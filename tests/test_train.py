import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY, Recorder, invoke, sets
from llmctl import checkpoint as ckpt
from llmctl import distributed, rundir
from llmctl.commands import training as training_cmd
from llmctl.config import TrainConfig
from llmctl.errors import LlmctlError
from llmctl.optim import lr_at
from llmctl.rundir import read_status


def test_schedule_warmup_cosine_floor():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=2000)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 101)
    assert lr_at(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(1050, cfg) == pytest.approx(5.5e-4)
    assert lr_at(2000, cfg) == pytest.approx(1e-4)
    assert lr_at(5000, cfg) == pytest.approx(1e-4)


def losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


SMALL = [*TINY, "train.max_steps=12", "train.log_interval=1", "train.eval_interval=6", "train.save_interval=4",
         "model.dropout=0.1"]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    full = tmp_path / "full"
    training_cmd.pretrain(None, SMALL, full)
    part = tmp_path / "part"

    def stop_at_7(state):
        if state.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # finish this step, save, exit 143

    with pytest.raises(LlmctlError) as e:
        training_cmd.pretrain(None, SMALL, part, on_step=stop_at_7)
    assert e.value.status == 143
    assert read_status(part)["status"] == "interrupted"
    assert (part / "step-0000007").is_dir()
    training_cmd.pretrain(None, SMALL, part, resume=True)
    assert read_status(part)["status"] == "finished"
    assert losses(part) == losses(full)  # bit-identical on CPU, dropout included
    assert len(losses(full)) == 12


MUON_WSD = [*SMALL, "model.arch=llama", "model.activation=relu2", "model.qk_norm=true", "model.zero_init_proj=true",
            "model.tie_embeddings=false", "train.optimizer=muon", "train.head_lr=0.003", "train.lr_schedule=wsd",
            "train.decay_steps=5", "train.warmup_steps=2", "train.grad_accum=2"]


def test_muon_and_wsd_interrupted_then_resumed_equal_uninterrupted(tmp_path):
    """The SIGTERM in the decay (step 9 of 12, decay from step 7): Muon's momentum, AdamW's moments and the schedule
    all resume exactly, with gradient accumulation."""
    full, part = tmp_path / "full", tmp_path / "part"
    training_cmd.pretrain(None, MUON_WSD, full)

    def stop_at_9(state):
        if state.step == 9:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(LlmctlError) as e:
        training_cmd.pretrain(None, MUON_WSD, part, on_step=stop_at_9)
    assert e.value.status == 143
    state = ckpt.load(part / "step-0000009").train_state()
    assert any("momentum_buffer" in s for s in state["optimizer"]["state"].values())  # Muon's, saved
    training_cmd.pretrain(None, MUON_WSD, part, resume=True)
    assert losses(part) == losses(full) and len(losses(full)) == 12


def test_stop_at_loss_ends_the_run_finished_and_saved_at_the_first_validation_below(tmp_path):
    out = tmp_path / "run"
    summary = training_cmd.pretrain(None, [*SMALL, "train.stop_at_loss=4.2"], out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [6] and vals[0]["val_loss"] <= 4.2 and vals[0]["val_seconds"] > 0
    assert summary["steps"] == 6 and read_status(out)["status"] == "finished"
    assert ckpt.read_latest(out).name == "step-0000006"


def test_training_on_many_tiny_shards_equals_one_file_and_resumes_exactly(tmp_path, monkeypatch):
    """The blocks of step k are the same whatever the sharding (reads cross shard boundaries), and a run on sharded
    data stopped and resumed gives the uninterrupted losses."""
    from llmctl import corpus

    one = tmp_path / "one"
    training_cmd.pretrain(None, SMALL, one)
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 4096)  # pieces of 4 KB, so shards of ~4k tokens
    monkeypatch.setenv("LLMCTL_CACHE_DIR", str(tmp_path / "cache"))
    sharded = [*SMALL, "data.shard_tokens=1024", f"data.cache_dir={tmp_path / 'cache'}"]
    many = tmp_path / "many"

    def stop_at_5(state):
        if state.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(LlmctlError):
        training_cmd.pretrain(None, sharded, many, on_step=stop_at_5)
    training_cmd.pretrain(None, sharded, many, resume=True)
    manifests = list((tmp_path / "cache" / "tokens").glob("*/manifest.json"))
    assert len(json.loads(manifests[0].read_text())["shards"]) > 100
    assert losses(many) == losses(one)


def test_diverged_run_exits_3_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "nan"

    def poison(state):
        if state.step == 5:
            for p in distributed.unwrap(plan["model"]).parameters():
                p.data.fill_(float("nan"))

    plan = {}
    with pytest.raises(LlmctlError) as e:
        training_cmd.pretrain(None, SMALL, out, on_step=poison, on_plan=lambda p: plan.update(model=p.model))
    assert e.value.status == 3 and "step 6" in e.value.message
    assert read_status(out)["status"] == "diverged"
    assert (out / "latest").read_text().strip() == "step-0000004"


def _llmctl(*args: str, pause_save: tuple[int, float] | None = None) -> subprocess.Popen:
    """`llmctl ARGS` in a new process; `pause_save` (step, seconds): that step's checkpoint write stops half-way for
    that long, leaving `.saving` in the run directory (tests/pause_save.py)."""
    how = (["-m", "llmctl"] if pause_save is None
           else [os.path.join(os.path.dirname(__file__), "pause_save.py"), *map(str, pause_save)])
    return subprocess.Popen([sys.executable, *how, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def test_sigterm_mid_run_exits_143_then_resumes_bit_identical(tmp_path):
    args = [*TINY, "train.max_steps=60", "train.log_interval=1", "train.eval_interval=20", "train.save_interval=0"]
    part = tmp_path / "part"
    p = _llmctl("pretrain", *sets(*args), "--out", str(part), "--quiet")
    _wait_for(lambda: (part / "metrics.jsonl").exists() and len((part / "metrics.jsonl").read_text().splitlines()) >= 5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    status = read_status(part)
    assert status["status"] == "interrupted" and status["exit_status"] == 143
    assert "Resume with: llmctl pretrain" in err and "--resume" in err and "Traceback" not in err
    stopped_at = ckpt.read_latest(part)
    assert stopped_at is not None and 5 <= int(stopped_at.name.split("-")[1]) < 60
    training_cmd.pretrain(None, args, part, resume=True)
    full = tmp_path / "full"
    training_cmd.pretrain(None, args, full)
    assert losses(part) == losses(full) and len(losses(full)) == 60


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "train.max_steps=40", "train.save_interval=10", "train.keep_best=false"]
    p = _llmctl("pretrain", *sets(*args), "--out", str(out), "--quiet", pause_save=(20, 60))
    _wait_for(lambda: (out / ".saving").exists())  # step 20's files are half written, the process sleeps
    p.kill()
    p.wait(timeout=30)
    assert list(out.glob(".tmp-step-0000020-*")), "the interrupted write is left as a hidden temporary"
    assert ckpt.read_latest(out).name == "step-0000010"
    assert ckpt.load(out).meta["step"] == 10  # passes verification
    assert read_status(out)["status"] == "running"  # the killed process could not say otherwise
    events = Recorder()
    summary = training_cmd.pretrain(None, args, out, resume=True, events=events)
    assert summary["steps"] == 40 and read_status(out)["status"] == "finished"
    assert any("resuming from" in m and "step-0000010" in m for m in events.logs)
    assert not list(out.glob(".tmp-step-*"))


def test_second_run_into_a_busy_run_directory_is_refused_and_stale_lock_cleared(tmp_path, runner):
    out = tmp_path / "busy"
    out.mkdir()
    with rundir.RunLock(out):
        r = invoke(runner, "pretrain", *sets(*TINY), "--out", out, "--overwrite")
        assert r.exit_code == 2 and "in use by another llmctl process" in r.stderr and f"pid {os.getpid()}" in r.stderr
    (out / ".lock").write_text("pid 999999 on elsewhere since yesterday")  # left by a killed process
    events = Recorder()
    training_cmd.pretrain(None, [*TINY, "train.max_steps=2"], out, overwrite=True, events=events)
    assert any("stale lock" in m for m in events.logs)


def test_preflight_refuses_when_the_disk_is_too_small(tmp_path, runner, monkeypatch):
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    r = invoke(runner, "pretrain", *sets(*TINY), "--out", tmp_path / "x")
    assert r.exit_code == 2 and "free" in r.stderr and "checkpoint needs" in r.stderr
    assert not (tmp_path / "x").exists()


def test_disk_full_mid_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from llmctl import checkpoint as ck_mod

    real = ck_mod.save_file
    calls = {"n": 0}

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            import errno

            real(tensors, path, *a, **k)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck_mod, "save_file", flaky)
    out = tmp_path / "full-disk"
    with pytest.raises(LlmctlError) as e:
        training_cmd.pretrain(None, [*TINY, "train.max_steps=12", "train.save_interval=4", "train.keep_best=false"],
                              out)
    assert e.value.status == 2 and "no space left" in e.value.message and "step-0000004 is kept" in e.value.message
    assert "--resume" in e.value.message
    assert ckpt.read_latest(out).name == "step-0000004" and ckpt.load(out).meta["step"] == 4
    assert read_status(out)["status"] == "failed" and not list(out.glob(".tmp-*"))


def test_disk_full_inside_torch_save_is_the_same_clear_error(tmp_path, monkeypatch):
    from llmctl import checkpoint as ck_mod

    real = ck_mod.torch.save
    calls = {"n": 0}

    def short_write(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # how torch's zip writer reports a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1287488 vs 1287376")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(ck_mod.torch, "save", short_write)
    out = tmp_path / "full-disk"
    with pytest.raises(LlmctlError) as e:
        training_cmd.pretrain(None, [*TINY, "train.max_steps=12", "train.save_interval=4", "train.keep_best=false"],
                              out)
    assert e.value.status == 2 and "no space left" in e.value.message and "step-0000004 is kept" in e.value.message
    assert ckpt.read_latest(out).name == "step-0000004" and not list(out.glob(".tmp-*"))


@pytest.mark.slow
def test_a_really_full_disk_is_one_clear_error_and_keeps_the_last_checkpoint(tmp_path, runner):
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        out = disk / "run"  # checkpoints of ~0.4 MB fill it after a few, in whichever writer
        r = invoke(runner, "pretrain", *sets(*TINY, "train.max_steps=40", "train.save_interval=2",
                                             "train.keep_last=100", "train.keep_best=false"), "--out", out, "--quiet")
        assert r.exit_code == 2, r.output
        assert "no space left on the disk" in r.stderr and "is kept" in r.stderr and "Traceback" not in r.output
        kept = ckpt.read_latest(out)
        assert kept is not None and ckpt.load(kept).meta["step"] >= 2 and not list(out.glob(".tmp-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # lazy: never left mounted


def test_a_new_start_removes_the_unfinished_writes_of_killed_processes(tmp_path):
    out = tmp_path / "run"
    training_cmd.pretrain(None, [*TINY, "train.max_steps=4"], out)
    for name in (".tmp-step-0000006-abc", ".tmp-step-0000008-def", ".old-step-0000004-123"):
        (out / name).mkdir()
        (out / name / "model.safetensors").write_bytes(b"partial")
    training_cmd.pretrain(None, [*TINY, "train.max_steps=6"], out, resume=True)
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))
    assert ckpt.read_latest(out).name == "step-0000006"


def test_nonfinite_steps_can_be_skipped_up_to_a_limit(tmp_path):
    plan = {}

    def poison_grads_once(state):
        if state.step == 3:
            m = distributed.unwrap(plan["model"])
            m.wte.weight.register_hook(lambda g: g * float("nan") if state.step == 3 else g)

    out, events = tmp_path / "skip", Recorder()
    summary = training_cmd.pretrain(None, [*SMALL, "train.skip_nonfinite=1", "model.dropout=0"], out, events=events,
                                on_step=poison_grads_once, on_plan=lambda p: plan.update(model=p.model))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped") == "gradient norm" for r in rows) and summary["steps"] == 12
    # the skip is a warning event in plain words (the console adds "warning:"), not a log line
    assert events.warnings == ["step 4: the gradient norm is nan; step skipped (1 of train.skip_nonfinite=1)"]
    assert not any("warning" in m or "skipped" in m for m in events.logs)
    (bar,) = events.of("train")  # one training progress, closed when the loop ended; MFU rides on logged steps
    assert bar.closed and bar.total == 12 and bar.start == 0 and [d for d, _ in bar.updates][-1] == 12
    logged = [f for _, f in bar.updates if "tokens_per_sec" in f]
    assert logged and all("mfu" in f and "loss" in f and "lr" in f for f in logged)


def test_keep_best_and_keep_last(tmp_path):
    out = tmp_path / "best"
    training_cmd.pretrain(None, [*TINY, "train.max_steps=20", "train.eval_interval=5", "train.save_interval=5",
                             "train.keep_last=1"], out)
    names = sorted(p.name for p in out.glob("step-*"))
    best = ckpt.read_pointer(out, ckpt.BEST)
    assert best is not None and best.name in names and "step-0000020" in names
    assert len(names) <= 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert json.loads((best / "meta.json").read_text())["metrics"]["val_loss"] == min(r["val_loss"] for r in rows)


def test_second_ctrl_c_aborts_at_once(tmp_path):
    out = tmp_path / "run"
    p = _llmctl("pretrain", *sets(*TINY, "train.max_steps=40", "train.save_interval=10", "train.keep_best=false"),
                "--out", str(out), "--quiet", pause_save=(10, 60))
    _wait_for(lambda: (out / ".saving").exists())  # stuck in a slow save
    p.send_signal(signal.SIGINT)  # first Ctrl-C: would finish the step and save
    time.sleep(0.3)
    t0 = time.time()
    p.send_signal(signal.SIGINT)  # second Ctrl-C: abort now
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and time.time() - t0 < 20
    assert read_status(out)["status"] == "interrupted" and "Traceback" not in err


def test_work_after_training_follows_a_finished_run_and_resume_finishes_what_a_signal_stopped(tmp_path):
    import dataclasses

    class Work:
        status_key = "recorded"

        def __init__(self):
            self.runs, self.resumed = [], []

        def __call__(self, run):
            self.runs.append(run)

        def again(self, out, resume_cmd, events):
            self.resumed.append((out, resume_cmd))
            rundir.write_status(out, "finished", recorded="done")

    out, work, plans = tmp_path / "run", Work(), []
    args = [*TINY, "train.max_steps=2", "train.eval_interval=0"]
    summary = training_cmd.pretrain(None, args, out, after_training=[work], on_plan=plans.append)
    (run,) = work.runs  # once, after the run finished and was saved
    assert run.out == out and run.task == "lm" and run.cfg.train.max_steps == 2 and run.device.type == "cpu"
    assert run.train_seconds == summary["train_seconds"] and run.resume_cmd.endswith("--resume")
    assert read_status(run.out)["status"] == "finished"
    with pytest.raises(dataclasses.FrozenInstanceError):  # the plan is decided before it is handed on
        plans[0].kind = "finetune"

    with pytest.raises(LlmctlError, match="already complete at step 2"):  # nothing was stopped: nothing to resume
        training_cmd.pretrain(None, args, out, resume=True, after_training=[work])
    rundir.write_status(out, "finished", recorded="interrupted")  # a signal stopped the work after training
    with pytest.raises(LlmctlError, match="already complete at step 2"):  # without that work there is none to do
        training_cmd.pretrain(None, args, out, resume=True)
    again = training_cmd.pretrain(None, args, out, resume=True, after_training=[work])
    assert work.resumed == [(out, run.resume_cmd)] and len(work.runs) == 1  # done again, not trained again
    assert again["run"] == str(out) and again["steps"] == 2 and "recorded" not in again
    assert read_status(out)["recorded"] == "done"


def test_the_compiled_decode_step_is_built_after_training_only_where_the_cli_asks(tmp_path, monkeypatch):
    from llmctl import aot
    from llmctl.commands.decode_step import DecodeStep

    built = []

    def build(model, batch, length, path):  # a real build is tested in test_generate
        built.append((batch, length))
        raise LlmctlError("no C++ compiler (stub)")

    monkeypatch.setattr(aot, "build", build)
    args = [*TINY, "train.max_steps=2", "train.eval_interval=0", "generate.compile=true"]
    training_cmd.pretrain(None, args, tmp_path / "plain")  # a library call passes no work after training
    assert built == [] and "decode_step" not in read_status(tmp_path / "plain")
    events = Recorder()
    training_cmd.pretrain(None, args, tmp_path / "cli", after_training=[DecodeStep()], events=events)
    assert built == [(1, 32)] and read_status(tmp_path / "cli")["decode_step"] == "failed"
    assert any("the decode step was not compiled (no C++ compiler (stub))" in m for m in events.logs)


def test_resume_skips_a_damaged_checkpoint_with_a_warning(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "train.max_steps=4", "train.save_interval=2", "train.eval_interval=0", "train.keep_best=false"]
    training_cmd.pretrain(None, args, out)
    weights = out / "step-0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")
    events = Recorder()
    training_cmd.pretrain(None, [*args, "train.max_steps=6"], out, resume=True, events=events)
    assert len(events.warnings) == 1 and events.warnings[0].startswith("skipping step-0000004: ")  # the CLI styles it
    assert any("resuming from" in m and "step-0000002" in m for m in events.logs)
    assert ckpt.read_latest(out).name == "step-0000006"
