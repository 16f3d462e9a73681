"""The inference side's work after training: build the compiled decode step that `llmctl infer` will use for the
new run, so that the model is fast from its first generation. The CLI passes `DecodeStep()` to pretrain and
finetune as work after training (`recipe.AfterTraining`); the training code imports nothing of it."""

from __future__ import annotations

from pathlib import Path

from .. import checkpoint as ckpt_io
from .. import rundir
from ..errors import LlmctlError
from ..events import Events
from ..interrupt import Stopped
from ..loading import for_inference, load_model
from ..recipe import FinishedRun
from ..train import Interrupted

STATUS_KEY = "decode_step"  # status.json: built, failed, or interrupted (a signal stopped the build)
COMPILE_AFTER_S = 300.0  # CPU runs at least this long end by compiling their decode step (~0.5 min, <= 10% of them)


class DecodeStep:
    """After a CPU run that trained a language model: build the compiled decode step that `llmctl infer` then uses
    by default (generate.compile auto). With generate.compile auto only after a run of COMPILE_AFTER_S or more,
    with true after any run, with false never. Not for int8 (the CPU default from 10M parameters up) or
    classifiers. A failed build is reported, not fatal: training is done. A signal stops the build (status.json's
    `decode_step` says "interrupted"); `--resume` then builds it (`again`)."""

    status_key = STATUS_KEY

    def __call__(self, run: FinishedRun) -> None:
        mode = run.cfg.generate.compile
        if mode is False or run.task == "classification" or run.device.type != "cpu" or not run.out.is_dir():
            return
        if mode == "auto" and run.train_seconds < COMPILE_AFTER_S:
            return
        _build(run.out, run.resume_cmd, run.events)

    def again(self, out: Path, resume_cmd: str, events: Events) -> None:
        """--resume of the finished run whose build a signal stopped: the build, whatever the run's length."""
        events.log("--resume: the run is finished; building the compiled decode step its stop interrupted")
        _build(out, resume_cmd, events)


def _build(out: Path, resume_cmd: str, events: Events) -> None:
    """Build the step `infer --prompt` will use for the run in `out`, and record how it went in status.json."""
    try:
        loaded = for_inference(load_model(out, "cpu"), compile="auto", events=events)  # what `infer` will run
        if loaded.engine.store is None:  # int8: never compiled
            return
        events.log("building the compiled decode step `llmctl infer` will use for this run "
                   "(--set generate.compile=false skips this)")
        engine = loaded.engine
        engine.open(1, engine.cache_length(1 + loaded.cfg.generate.max_new_tokens), build=True)  # `infer --prompt`
        engine.close()
    except Stopped as e:  # the run is complete and saved: only the build is given up
        rundir.write_status(out, "finished", **{STATUS_KEY: "interrupted"})
        raise Interrupted(f"interrupted by {e.name} while compiling the decode step; the run is finished and saved "
                          f"({ckpt_io.read_latest(out)}). Build the step with: {resume_cmd}", e.status) from None
    except Exception as e:  # (LlmctlError from a failed build, or anything else: the finished run stays finished)
        why = e.message if isinstance(e, LlmctlError) else f"{type(e).__name__}: {e}"
        events.log(f"the decode step was not compiled ({why}); `llmctl infer` decodes eagerly until `--compile`")
        rundir.write_status(out, "finished", **{STATUS_KEY: "failed"})
    else:
        rundir.write_status(out, "finished", **{STATUS_KEY: "built"})
