import json
import os
import signal

import pytest

from conftest import TINY
from llmctl import commands
from llmctl.checkpoint import read_status
from llmctl.config import TrainConfig
from llmctl.errors import LlmctlError
from llmctl.optim import lr_at


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
    commands.pretrain(None, SMALL, full)
    part = tmp_path / "part"

    def stop_at_7(state):
        if state.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # finish this step, save, exit 143

    with pytest.raises(LlmctlError) as e:
        commands.pretrain(None, SMALL, part, on_step=stop_at_7)
    assert e.value.status == 143
    assert read_status(part)["status"] == "interrupted"
    assert (part / "step-0000007").is_dir()
    commands.pretrain(None, SMALL, part, resume=True)
    assert read_status(part)["status"] == "finished"
    assert losses(part) == losses(full)  # bit-identical on CPU, dropout included
    assert len(losses(full)) == 12


def test_diverged_run_exits_3_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "nan"

    def poison(state):
        if state.step == 5:
            for p in commands.unwrap(plan["model"]).parameters():
                p.data.fill_(float("nan"))

    plan = {}
    with pytest.raises(LlmctlError) as e:
        commands.pretrain(None, SMALL, out, on_step=poison, on_plan=lambda p: plan.update(model=p.model))
    assert e.value.status == 3 and "step 6" in e.value.message
    assert read_status(out)["status"] == "diverged"
    assert (out / "latest").read_text().strip() == "step-0000004"
