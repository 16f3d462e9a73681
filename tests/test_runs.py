"""`llmctl runs`: the status of finished, interrupted (SIGTERM), failed and crashed runs; `runs compare`."""

import json
import os
import signal
import subprocess

import pytest

from conftest import TINY, invoke
from llmctl import commands, runs
from llmctl.checkpoint import write_status
from llmctl.errors import LlmctlError

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
        commands.pretrain(None, SHORT, d / "interrupted", on_step=sigterm)
    assert e.value.status == 143

    def boom(state):
        if state.step == 4:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        commands.pretrain(None, [*SHORT, "train.lr=5e-4"], d / "failed", on_step=boom)

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
