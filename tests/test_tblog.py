"""TensorBoard logging (`train.log: [tensorboard]`) and its clear error when the package is missing."""

from conftest import TINY, invoke, sets
from llmctl import tblog


def test_tensorboard_scalars_are_written(runner, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    r = invoke(runner, "pretrain", *sets(*TINY, "train.max_steps=4", "train.log_interval=1", "train.log=[tensorboard]"),
               "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_sec", "val/val_loss"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert (out / "metrics.jsonl").exists()  # still written


def test_missing_tensorboard_is_a_config_error(runner, tmp_path, monkeypatch):
    monkeypatch.setattr(tblog, "installed", lambda package: False)
    out = tmp_path / "x"
    r = invoke(runner, "pretrain", *sets(*TINY, "train.log=tensorboard"), "--out", out, "--dry-run")
    assert r.exit_code == 2 and "train.log" in r.stderr and "llmctl[tensorboard]" in r.stderr
    assert not out.exists()
