"""`llmctl runs`: the status of finished, interrupted (SIGTERM), failed and crashed runs; `runs compare`."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, invoke, sets
from llmctl import runs
from llmctl.commands import training as training_cmd
from llmctl.errors import LlmctlError
from llmctl.rundir import read_status, write_status

SHORT = [*TINY, "train.max_steps=6", "train.eval_interval=3", "train.log_interval=1"]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_run):
    """finished (the shared tiny run), interrupted by SIGTERM at step 2, failed at step 4, crashed."""
    d = tmp_path_factory.mktemp("many")
    (d / "finished").symlink_to(tiny_run, target_is_directory=True)

    def sigterm(state):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes the step, saves, raises exit 143

    with pytest.raises(LlmctlError) as e:
        training_cmd.pretrain(None, SHORT, d / "interrupted", on_step=sigterm)
    assert e.value.status == 143

    def boom(state):
        if state.step == 4:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        training_cmd.pretrain(None, [*SHORT, "train.lr=5e-4"], d / "failed", on_step=boom)

    gone = subprocess.Popen(["true"])
    gone.wait()
    (d / "crashed").mkdir()
    write_status(d / "crashed", "running", step=0)
    status = json.loads((d / "crashed" / "status.json").read_text())
    (d / "crashed" / "status.json").write_text(json.dumps({**status, "pid": gone.pid}))
    (d / "not-a-run").mkdir()
    return d


def test_runs_labels_each_status(runs_dir, runner):
    r = invoke(runner, "runs", runs_dir, "--json")
    assert r.exit_code == 0, r.output
    rows = {x["name"]: x for x in json.loads(r.stdout)["runs"]}
    assert set(rows) == {"finished", "interrupted", "failed", "crashed"}
    assert rows["finished"]["status"] == "finished" and rows["finished"]["steps"] == 30
    assert rows["interrupted"]["status"] == "interrupted" and rows["interrupted"]["detail"] == "SIGTERM"
    assert rows["interrupted"]["steps"] == 2
    assert rows["failed"]["status"] == "failed" and "boom" in rows["failed"]["detail"]
    assert rows["failed"]["steps"] == 4
    assert rows["crashed"]["status"] == "crashed"
    fin = rows["finished"]
    vals = [json.loads(x).get("val_loss") for x in (runs_dir / "finished" / "metrics.jsonl").read_text().splitlines()]
    assert fin["best_val_loss"] == min(v for v in vals if v is not None)
    assert fin["tokens"] == 30 * 4 * 32 and fin["tokens_per_sec"] > 0

    table = invoke(runner, "runs", runs_dir)
    assert table.exit_code == 0
    for words in ("finished", "interrupted (SIGTERM)", "failed", "crashed", "best val", "tokens/s"):
        assert words in table.stdout


def test_runs_compare(runs_dir, runner):
    r = invoke(runner, "runs", "compare", runs_dir / "interrupted", runs_dir / "failed", "--json")
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)
    assert c["config_diff"] == [{"key": "train.lr", "a": 0.001, "b": 0.0005}]
    assert c["metrics"]["a"]["status"] == "interrupted" and c["metrics"]["b"]["status"] == "failed"
    assert c["metrics"]["b"]["val_loss"] is not None  # evaluated at step 3 before failing
    text = invoke(runner, "runs", "compare", runs_dir / "finished", runs_dir / "failed")
    assert text.exit_code == 0 and "train.max_steps" in text.stdout and "final metrics" in text.stdout


@pytest.mark.parametrize("args,words", [
    (["runs", "compare", "only-one"], "usage"),
    (["runs", "compare", "nope-a", "nope-b"], "run not found"),
    (["runs", "no-such-dir"], "not a directory"),
    (["runs", "a", "b"], "compare"),
])
def test_runs_bad_input(runner, args, words, tmp_path):
    r = invoke(runner, *args)
    assert r.exit_code == 2 and words in r.stderr, r.output


def test_torn_metrics_line_is_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "tokens": 10, "time": 1.0}\n{"step": 2, "lo')
    s = runs.summarize(tmp_path)
    assert s["steps"] == 1 and s["loss"] == 2.0 and s["status"] == "unknown"


def test_runs_show_the_latest_checkpoint_beside_the_logged_steps(runs_dir, runner):
    """A run that died between saves logged more steps than its latest checkpoint holds (a resume starts there)."""
    rows = {x["name"]: x for x in json.loads(invoke(runner, "runs", runs_dir, "--json").stdout)["runs"]}
    assert (rows["finished"]["steps"], rows["finished"]["checkpoint_step"]) == (30, 30)
    assert (rows["interrupted"]["steps"], rows["interrupted"]["checkpoint_step"]) == (2, 2)  # saved on SIGTERM
    assert (rows["failed"]["steps"], rows["failed"]["checkpoint_step"]) == (4, 3)  # the best at step 3's evaluation
    assert rows["crashed"]["checkpoint_step"] is None
    table = invoke(runner, "runs", runs_dir).stdout
    assert "checkpoint" in table
    failed = next(line for line in table.splitlines() if line.strip().startswith("failed"))
    assert "4/6" in failed and failed.split("4/6", 1)[1].split()[0] == "3", failed


# ------------------------------------------------------------------------------------------------------------------
# A run whose process is gone without a final status (kill -9): `crashed`, not `running`


def _state(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _wait_for(what, cond, timeout: float = 60):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_killed_process_not_yet_reaped_is_crashed(tmp_path):
    """A zombie (killed, its parent has not waited for it yet: a busy or stopped launcher, one that never waits)
    still answers signal 0; it used to keep the run `running` for as long as the parent lived."""
    code = ("import sys, time; from llmctl.rundir import write_status; "
            "write_status(sys.argv[1], 'running', step=0); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
    try:
        _wait_for("status.json", lambda: (tmp_path / "status.json").exists())
        assert runs.status_label(read_status(tmp_path))[0] == "running"
        p.send_signal(signal.SIGKILL)
        _wait_for("the zombie", lambda: _state(p.pid) == "Z")  # not reaped: we do not wait() yet
        state, detail = runs.status_label(read_status(tmp_path))
        assert state == "crashed" and str(p.pid) in detail
    finally:
        p.kill()
        p.wait()
    assert runs.summarize(tmp_path)["status"] == "crashed"


def test_a_reused_pid_or_another_host_is_not_taken_for_the_run(tmp_path):
    write_status(tmp_path, "running", step=0)  # this process: alive
    status = read_status(tmp_path)
    assert status["pid"] == os.getpid() and status["host"] == socket.gethostname()
    assert runs.status_label(status) == ("running", None)
    if status["pid_start"] is not None:  # Linux: a live process that started at another time is not the run
        state, _ = runs.status_label({**status, "pid_start": status["pid_start"] + "0"})
        assert state == "crashed"
    gone = subprocess.Popen(["true"])
    gone.wait()
    state, detail = runs.status_label({**status, "pid": gone.pid, "host": "elsewhere.example"})
    assert state == "running" and "elsewhere.example" in detail  # only that machine can tell


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_kill_9_of_rank_0_under_torchrun_shows_crashed(tmp_path, runner):
    """torchrun (2 CPU processes): kill -9 rank 0, the pid status.json names. While the agent has not reaped it
    (stopped here, to make that window long) and after it has, `llmctl runs` says crashed, with the logged steps
    and the latest checkpoint's step."""
    from test_distributed import BASE, _children

    out = tmp_path / "killed"
    args = [*BASE, "train.max_steps=100000", "train.eval_interval=0", "train.save_interval=5", "train.batch_size=4",
            "train.dist_timeout=30"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmctl",
           "pretrain", *sets(*args), "--out", str(out), "--quiet"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = False
    try:
        def saved() -> bool:
            if p.poll() is not None:
                pytest.fail(f"torchrun ended early ({p.returncode}): {p.communicate()[1][-3000:]}")
            return (out / "latest").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 8

        _wait_for("a checkpoint", saved, timeout=120)
        ranks = _children(p.pid)
        assert sorted(ranks) == [0, 1] and read_status(out)["pid"] == ranks[0], (ranks, read_status(out))
        os.kill(p.pid, signal.SIGSTOP)  # the agent cannot reap its children now
        stopped = True
        os.kill(ranks[0], signal.SIGKILL)
        _wait_for("rank 0's zombie", lambda: _state(ranks[0]) == "Z")
        row = json.loads(invoke(runner, "runs", out, "--json").stdout)["runs"][0]
        assert row["status"] == "crashed", row
        assert row["checkpoint_step"] % 5 == 0 and 5 <= row["checkpoint_step"] <= row["steps"], row
        os.kill(p.pid, signal.SIGCONT)
        stopped = False
        p.communicate(timeout=90)
    finally:
        if stopped:
            os.kill(p.pid, signal.SIGCONT)
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode != 0
    assert read_status(out)["status"] == "running"  # nobody was left to write a final status
    assert json.loads(invoke(runner, "runs", out, "--json").stdout)["runs"][0]["status"] == "crashed"


def test_runs_of_one_run_directory_lists_that_run_not_its_checkpoints(tiny_run, runner):
    rows = json.loads(invoke(runner, "runs", tiny_run, "--json").stdout)["runs"]
    assert [r["name"] for r in rows] == [tiny_run.name] and rows[0]["status"] == "finished"
