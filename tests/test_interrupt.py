"""SIGINT / SIGTERM: the first stops the work within seconds wherever it is (data preparation, validation, the
compiled-step build), saves what was trained, and `--resume` continues; a second Ctrl-C aborts at once."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import SHAKESPEARE, TINY, sets
from llmctl import checkpoint as ckpt
from llmctl import rundir
from llmctl.interrupt import STOP, Stopped, in_thread

# ------------------------------------------------------------------------------------------------------------------
# The handler itself


def _signal_soon(signum: int, delay: float = 0.2) -> threading.Timer:
    t = threading.Timer(delay, os.kill, (os.getpid(), signum))
    t.start()
    return t


def test_raising_by_default_recorded_when_deferred():
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN where the shell started the tests in the background)
    with STOP.handling():
        with pytest.raises(Stopped) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises out of the sleep
        assert e.value.status == 143 and e.value.name == "SIGTERM"
    with STOP.handling():
        with STOP.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # nothing raised: recorded
            assert STOP.signum == signal.SIGINT  # what the loop and distributed.polled look at
            with pytest.raises(KeyboardInterrupt) as second:  # a second Ctrl-C aborts even here
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            assert not isinstance(second.value, Stopped)
    assert STOP.signum is None  # each command starts afresh
    assert signal.getsignal(signal.SIGINT) is before  # the handler is gone again: the one before is back


def test_in_thread_returns_raises_and_stays_stoppable():
    assert in_thread(lambda: 41 + 1) == 42
    with pytest.raises(ZeroDivisionError):
        in_thread(lambda: 1 / 0)
    with STOP.handling():
        _signal_soon(signal.SIGINT)
        t0 = time.monotonic()
        with pytest.raises(Stopped):
            in_thread(lambda: time.sleep(30))  # a native call that would not return for long
        assert time.monotonic() - t0 < 3


# ------------------------------------------------------------------------------------------------------------------
# Real runs through the CLI


class Llmctl:
    """`python -m llmctl ...` with its stderr collected line by line as it comes."""

    def __init__(self, *args: str, env: dict | None = None):
        self.p = subprocess.Popen([sys.executable, "-m", "llmctl", *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.p.stderr.readline, "")), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float = 180.0) -> None:
        t0 = time.time()
        while not any(text in line for line in self.lines):
            assert self.p.poll() is None, f"exited {self.p.returncode} before {text!r}:\n" + "".join(self.lines[-30:])
            assert time.time() - t0 < timeout, f"no {text!r} in {timeout} s:\n" + "".join(self.lines[-30:])
            time.sleep(0.05)

    def stop(self, signum: int = signal.SIGINT, limit: float = 10.0) -> tuple[int, str]:
        """Send `signum`; (exit status, stderr). The process must be gone within `limit` seconds."""
        t0 = time.time()
        self.p.send_signal(signum)
        try:
            self.p.wait(timeout=limit + 20)
        finally:
            if self.p.poll() is None:
                self.p.kill()
        took = time.time() - t0
        self.reader.join(5)
        err = "".join(self.lines)
        assert took < limit, f"took {took:.1f} s to stop:\n{err[-3000:]}"
        return self.p.returncode, err


def _resume_command(err: str) -> list[str]:
    line = next(x for x in err.splitlines() if "with: llmctl" in x)
    cmd = shlex.split(line.split("with: ", 1)[1])
    assert cmd[0] == "llmctl"
    return [sys.executable, "-m", "llmctl", *cmd[1:]]


def _big_corpus(tmp: Path, kind: str, mb: int = 20) -> Path:
    """Several seconds of tokenization: Tiny Shakespeare repeated, as one .txt document or paragraphs in JSONL."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    copies = mb * 1_000_000 // len(text) + 1
    if kind == "txt":
        path = tmp / "big.txt"
        path.write_text(text * copies, encoding="utf-8")
    else:
        path = tmp / "big.jsonl"
        rows = "".join(json.dumps({"text": para}) + "\n" for para in text.split("\n\n") if para.strip())
        path.write_text(rows * copies, encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind, num_proc, signum", [("txt", 0, signal.SIGINT), ("jsonl", 2, signal.SIGTERM)],
                         ids=["one-document-sigint", "jsonl-two-threads-sigterm"])
def test_a_signal_during_tokenization_stops_within_seconds(tmp_path, kind, num_proc, signum):
    corpus = _big_corpus(tmp_path, kind)
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    run = Llmctl("pretrain", *sets(*TINY, f"data.path={corpus}", f"data.num_proc={num_proc}"), "--out", out,
                 env={"LLMCTL_CACHE_DIR": str(cache)})
    run.wait_for("(cache miss)")
    time.sleep(2.0)
    status, err = run.stop(signum)
    assert status == (130 if signum == signal.SIGINT else 143), err[-3000:]
    assert "Traceback" not in err
    name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    assert (f"error: interrupted by {name} while preparing the run; nothing was trained. "
            "Resume with: llmctl pretrain" in err)
    assert not out.exists()  # nothing was written to --out
    tokens = cache / "tokens"
    # no complete-looking cache entry: only the build folder, whose complete shards a rerun keeps
    assert not tokens.exists() or all(d.name.startswith(".build-") for d in tokens.iterdir()), list(tokens.iterdir())
    assert not list(tokens.rglob("manifest.json"))
    resume = _resume_command(err)
    assert resume[-1] == "--resume"
    if kind == "txt":  # the printed command continues: it prepares the data again and trains the run
        done = subprocess.run(resume, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "LLMCTL_CACHE_DIR": str(cache)})
        assert done.returncode == 0, done.stderr[-3000:]
        assert rundir.read_status(out)["status"] == "finished" and ckpt.read_latest(out).name == "step-0000030"


VAL = [*TINY, "model.n_embd=64", "model.block_size=64", "train.max_steps=4", "train.eval_interval=2",
       "train.eval_batches=null", "train.log_interval=1", "train.warmup_steps=1", "data.val_fraction=0.5",
       "eval.batch_size=8"]


@pytest.mark.slow
def test_a_signal_during_validation_saves_and_resume_validates_first(tmp_path):
    out = tmp_path / "run"
    run = Llmctl("pretrain", *sets(*VAL), "--out", out)
    run.wait_for("step 2/4")  # then the validation pass of step 2 (several seconds)
    time.sleep(0.5)
    status, err = run.stop()
    assert status == 130, err[-3000:]
    assert "error: interrupted by SIGINT during the validation pass after step 2; saved" in err
    saved = ckpt.load(out / "step-0000002")
    loop = saved.train_state()["loop"]
    assert loop["step"] == 2 and loop["eval_due"] is True
    assert rundir.read_status(out)["status"] == "interrupted"
    resumed = subprocess.run(_resume_command(err), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]  # the stopped pass first, then the rest
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert rundir.read_status(out)["status"] == "finished"


@pytest.mark.slow
def test_a_signal_during_the_final_validation_pass_saves_the_last_step(tmp_path):
    out = tmp_path / "run"
    run = Llmctl("pretrain", *sets(*VAL, "train.eval_interval=0", "train.max_steps=3"), "--out", out)
    run.wait_for("step 3/3")
    time.sleep(0.5)
    status, err = run.stop(signal.SIGTERM)
    assert status == 143, err[-3000:]
    assert ckpt.read_latest(out).name == "step-0000003"  # the trained steps are kept (save_interval 0)
    resumed = subprocess.run(_resume_command(err), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "step-0000003" / "meta.json").read_text())["reason"] == "final"
    assert rundir.read_status(out)["status"] == "finished"


@pytest.mark.slow
def test_a_signal_during_the_compiled_step_build_keeps_the_run_and_resume_builds_it(tmp_path):
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    env = {"LLMCTL_CACHE_DIR": str(cache)}
    run = Llmctl("pretrain", *sets(*TINY, "train.max_steps=2", "generate.compile=true"), "--out", out, env=env)
    run.wait_for("building the compiled decode step")
    time.sleep(2.0)
    status, err = run.stop()
    assert status == 130, err[-3000:]
    assert "interrupted by SIGINT while compiling the decode step; the run is finished and saved" in err
    st = rundir.read_status(out)
    assert st["status"] == "finished" and st["decode_step"] == "interrupted" and st["steps"] == 2
    assert not list((cache / "compiled").rglob("*.pt2")) if (cache / "compiled").exists() else True
    resumed = subprocess.run(_resume_command(err), capture_output=True, text=True, timeout=400,
                             env={**os.environ, **env})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert rundir.read_status(out)["decode_step"] == "built"
    assert len(list((cache / "compiled").rglob("*.pt2"))) == 1
