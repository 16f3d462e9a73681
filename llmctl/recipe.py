"""A training run inside its run directory: `run_training` holds the run lock, runs a `TrainPlan` through the one
loop (`train.fit`) with the `Saver`, keeps status.json honest whatever happens, and ends with the work after
training that the caller passed in (`AfterTraining`).

Where a run starts (fresh, from its own latest checkpoint, or another one) is the caller's decision
(`commands.training`), handed over as a `Start`; what follows training belongs to the side that needs it (the
compiled decode step is the inference side's), so nothing here imports it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch

from . import checkpoint as ckpt_io
from . import distributed, estimate, hardware, rundir, tblog
from .config import ADAPTER_METHODS, Config, from_dict
from .distributed import unwrap
from .errors import LlmctlError
from .events import Events, with_fields
from .heads import Classifier
from .interrupt import Stopped
from .loading import restore
from .optim import MuonAdamW, build_optimizer, check_continuation
from .plan import TrainPlan
from .saver import Saver
from .train import Hooks, Interrupted, LoopState, fit


@dataclass(frozen=True)
class Start:
    """Where a run starts, as pretrain or finetune decided it before the plan was built."""

    out: Path  # the run directory
    checkpoint: Optional[ckpt_io.Checkpoint] = None  # the checkpoint whose weights and state it continues
    resumed: bool = False  # --resume: `checkpoint` is the run's own latest, and the run may be finished already
    clear: bool = False  # empty `out` once its lock is held (--overwrite, or --resume of a run that saved nothing)
    resume_cmd: str = ""  # the exact command that continues this run, named in every message about a stop


@dataclass(frozen=True)
class FinishedRun:
    """A run that finished training and is saved, as the work after training sees it."""

    out: Path
    cfg: Config
    task: str  # the task it trained: lm, classification, instruct, distill, dpo, grpo
    device: torch.device  # where it trained
    train_seconds: float
    resume_cmd: str
    events: Events  # how the run reported: the work after it reports the same way


class AfterTraining(Protocol):
    """Work that follows a finished run, owned by the side that needs it and passed in from above (the CLI passes
    the inference side's compiled decode step). It records how it ended under `status_key` in status.json; a
    signal that stops it leaves "interrupted" there and raises Interrupted, and --resume of the finished run then
    calls `again` instead of refusing to train a complete run."""

    status_key: str

    def __call__(self, run: FinishedRun) -> None: ...

    def again(self, out: Path, resume_cmd: str, events: Events) -> None: ...


def load_start(plan: TrainPlan, start: Start, events: Events) -> Optional[dict]:
    """Load the checkpoint a run continues into the plan's modules (weights, adapter, task head); its train state
    (optimizer, loop, RNG), or None for a run from step 0."""
    ck = start.checkpoint
    if ck is None:
        return None
    classifier = unwrap(plan.task.module) if plan.task.kind == "classification" else None
    restore(unwrap(plan.task.backbone), classifier, ck, plan.cfg)
    state = ck.train_state()
    # a WSD decay must fit in the steps left
    check_continuation(state["loop"]["step"], plan.cfg.train, from_dict(ck.config, validate=False).train)
    events.log(f"resuming from {ck.path} (step {ck.meta.get('step')})")
    return state


def finish_stopped_work(start: Start, cfg: Config, after: Sequence[AfterTraining],
                        events: Events) -> Optional[dict]:
    """--resume of a finished run (not asked to train further) whose work after training a signal stopped: do that
    work again; the run's summary. None when there is no such work to finish."""
    ck = start.checkpoint
    if not start.resumed or ck is None or int(ck.meta.get("step") or 0) < cfg.train.max_steps:
        return None
    status = rundir.read_status(start.out)
    stopped = [work for work in after if status.get(work.status_key) == "interrupted"]
    if status.get("status") != "finished" or not stopped:
        return None
    for work in stopped:
        work.again(start.out, start.resume_cmd, events)
    skip = ("status", "updated", "started", "pid", "kind", "task", "max_steps", "step",
            *(work.status_key for work in after))
    return {"run": str(start.out), **{k: v for k, v in rundir.read_status(start.out).items() if k not in skip}}


def run_training(plan: TrainPlan, start: Start, resume_state: Optional[dict], *, events: Events,
                 on_step: Optional[Callable[[LoopState], None]] = None,
                 after_training: Sequence[AfterTraining] = ()) -> Optional[dict]:
    """Hold the run lock, create or continue the run directory, train with `fit`, keep status.json honest, then do
    the work after training. Returns the summary (None on the ranks other than 0 under torchrun)."""
    out = start.out
    if not plan.dist.is_main:  # under torchrun rank 0 owns the run directory; the other ranks only train
        _train_locked(plan, start, events, resume_state, on_step)
        distributed.finish(plan.dist)
        return None
    estimate.preflight(unwrap(plan.model), plan.cfg, plan.device, plan.amp, plan.dist, plan.task.teacher,
                       plan.task.rows_per_example)
    rundir.preflight(out, plan.model)
    # MFU in the training progress and the summary: training FLOPs per token over the device's peak
    flops = estimate.task_flops(plan.task, plan.cfg)["train"]
    peak = hardware.peak_flops(plan.device, plan.amp, plan.cfg.data.cache_dir)["flops"]
    with_mfu = with_fields(events, "train", lambda f: ({"mfu": hardware.mfu(f["tokens_per_sec"], flops, peak)}
                                                       if "tokens_per_sec" in f else {}))
    with rundir.RunLock(out) as lock:
        if lock.stale:
            events.log(f"cleared a stale lock left by a process that is gone ({lock.stale})")
        if start.clear:
            rundir.clear_run(out)
        stale = ckpt_io.remove_stale_temporaries(out)
        if stale:
            events.log(f"removed {len(stale)} unfinished checkpoint write{'s' if len(stale) > 1 else ''} of a killed "
                       "process")
        summary = _train_locked(plan, start, with_mfu, resume_state, on_step)
    distributed.finish(plan.dist)  # torchrun: all ranks leave the process group together
    summary["mfu"] = hardware.mfu(summary.get("tokens_per_sec"), flops, peak)
    finished = FinishedRun(out, plan.cfg, plan.task.kind, plan.device, summary["train_seconds"], start.resume_cmd,
                           events)
    for work in after_training:
        work(finished)
    return summary


def _train_locked(plan: TrainPlan, start: Start, events: Events, resume_state: Optional[dict],
                  on_step: Optional[Callable[[LoopState], None]]) -> dict:
    recipe = Recipe(plan, start, events, on_step)
    recipe.setup()
    recipe.resume(resume_state)
    recipe.train()
    return recipe.finish()


def _split_weights(plan: TrainPlan, full: dict) -> tuple[dict, str, dict]:
    """(weights, their file name, extra files) from the trained module's full state dict: the whole backbone, or
    only the LoRA adapter; plus a task head (a classifier's state has `backbone.*`, `head.*` and maybe `pre.*`)."""
    if plan.task.kind == "classification":
        backbone = {k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}
        extra = {ckpt_io.HEAD: Classifier.head_tensors(full)}
    else:
        backbone, extra = full, {}
    if plan.method in ADAPTER_METHODS:
        return {k: v for k, v in backbone.items() if k.endswith((".lora_a", ".lora_b"))}, ckpt_io.ADAPTER, extra
    return {k: v for k, v in backbone.items() if not k.endswith((".lora_a", ".lora_b"))}, ckpt_io.WEIGHTS, extra


class Recipe:
    """One training run inside its run directory, in torchtune's recipe shape: `setup` (run files, the wrapped
    model, optimizer, grad scaler), `resume` (their state and the loop's, from a checkpoint), `train` (the loop,
    with status.json kept honest whatever happens) and `finish` (the summary)."""

    def __init__(self, plan: TrainPlan, start: Start, events: Events,
                 on_step: Optional[Callable[[LoopState], None]] = None):
        self.plan, self.out, self.resume_cmd = plan, start.out, start.resume_cmd
        self.events, self.on_step = events, on_step
        self.write_status = rundir.write_status if plan.dist.is_main else distributed.discard
        self.state = LoopState()
        self.resumed = False

    def setup(self) -> None:
        plan, t = self.plan, self.plan.cfg.train
        if plan.dist.is_main:
            rundir.write_run_files(self.out, plan.cfg.to_yaml(), plan.tokenizer.to_str())
        self.model = distributed.wrap_model(plan.model, t, plan.dist)  # checkpointing, DDP / FSDP / TP, compile
        self.optimizer = build_optimizer(self.model, t, plan.device.type, per_parameter=plan.dist.tp_size > 1)
        if isinstance(self.optimizer, MuonAdamW):  # every rank the same Newton-Schulz dtype, or the replicas drift
            native = distributed.agree_all(plan.dist, self.optimizer.ns_dtype == torch.bfloat16)
            self.optimizer.ns_dtype = torch.bfloat16 if native else torch.float32
        self.scaler = torch.amp.GradScaler(plan.device.type) if plan.amp == torch.float16 else None

    def resume(self, resume_state: Optional[dict]) -> None:
        """Continue from a checkpoint's train state (None: a fresh run); every rank gets its RNG stream."""
        plan, t = self.plan, self.plan.cfg.train
        if resume_state is not None:
            distributed.load_optimizer_state(self.model, self.optimizer, resume_state["optimizer"], plan.dist)
            if self.scaler is not None and resume_state.get("scaler"):
                self.scaler.load_state_dict(resume_state["scaler"])
            state = self.state = LoopState(**resume_state["loop"])
            if plan.task.load_state is not None and plan.dist.is_main and resume_state.get("task"):
                plan.task.load_state(resume_state["task"])  # (rank 0's: other ranks generate again)
            if (state.step >= t.max_steps and not state.eval_due) or state.stopped_early:
                raise LlmctlError(f"the run is already complete at step {state.step} (train.max_steps={t.max_steps}"
                                  f"{', stopped early' if state.stopped_early else ''}); raise train.max_steps to "
                                  "train further")
            self.resumed = True
        distributed.restore_rng(plan.dist, resume_state, t.seed)

    def _saver(self) -> Saver:
        plan, cfg = self.plan, self.plan.cfg
        meta = {"kind": plan.kind, "task": plan.task.kind, "method": plan.method}
        if plan.base is not None:
            meta["base"] = {"path": str(plan.base.path.resolve()),
                            "sha256": plan.base.meta["files"].get(ckpt_io.WEIGHTS)}
        if plan.task.teacher is not None:
            meta["teacher"] = str(cfg.finetune.teacher)
        return Saver(self.out, cfg, self.model, self.optimizer, self.scaler, plan.dist, plan.tokenizer.to_str(), meta,
                     lambda full: _split_weights(plan, full), self.resume_cmd, self.events, plan.task.state)

    def train(self) -> None:
        """The one loop. A signal, a failure or a divergence ends with its state in status.json and re-raised."""
        plan, out, t = self.plan, self.out, self.plan.cfg.train
        main = plan.dist.is_main
        metrics = (tblog.tee(rundir.MetricsFile(out / rundir.METRICS,
                                                resume_step=self.state.step if self.resumed else None),
                             out, t.log) if main else distributed.Discard())
        self.write_status(out, "running", kind=plan.kind, task=plan.task.kind, step=self.state.step,
                          max_steps=t.max_steps)
        t0 = time.time()
        try:
            hooks = Hooks(batches=plan.task.batches, loss=plan.task.loss, saver=self._saver(),
                          validate=lambda step: plan.task.validate(self.model, step),
                          log_metrics=distributed.per_device_metrics(metrics, plan.dist), on_step=self.on_step,
                          step_metrics=plan.task.step_metrics,
                          world_size=plan.dist.dp_size, **distributed.loop_hooks(self.model, plan.dist))
            with distributed.peer_errors(plan.dist):
                self.state = fit(self.model, self.optimizer, t, hooks, self.state, device=plan.device,
                                 amp_dtype=plan.amp, scaler=self.scaler, tokens_per_step=plan.task.tokens_per_step,
                                 events=distributed.per_device_events(self.events, plan.dist))
        except Stopped as e:  # before the loop took over the signals
            message = (f"interrupted by {e.name} before the first step; nothing was trained. "
                       f"Resume with: {self.resume_cmd}")
            self._ended("interrupted", message, e.status)
            raise Interrupted(message, e.status) from None
        except LlmctlError as e:
            status = rundir.outcome(e.status)
            if status == "interrupted":
                e.message += f". Resume with: {self.resume_cmd}"
            self._ended(status, e.message, e.status)
            raise
        except BaseException as e:
            self._ended("interrupted" if isinstance(e, KeyboardInterrupt) else "failed", f"{type(e).__name__}: {e}")
            raise
        finally:
            metrics.close()
        self.wall = time.time() - t0

    def _ended(self, status: str, error: str, exit_status: Optional[int] = None) -> None:
        extra = {"exit_status": exit_status} if exit_status is not None else {}
        self.write_status(self.out, status, error=error, step=rundir.last_step(self.out), **extra)

    def finish(self) -> dict:
        """The run's summary, also written to status.json as `finished`."""
        plan, out, state, t = self.plan, self.out, self.state, self.plan.cfg.train
        best = ckpt_io.read_pointer(out, ckpt_io.BEST)
        tps = round(state.tokens / state.elapsed, 1) if state.elapsed else None
        summary = {
            "run": str(out),
            "checkpoint": str(ckpt_io.read_latest(out)),
            "best_checkpoint": str(best) if best else None,
            "steps": state.step,
            "stopped_early": state.stopped_early,
            "tokens": state.tokens,
            **{k: v for k, v in state.last_eval.items()},
            f"best_{t.best_metric}": state.best,
            "train_seconds": round(state.elapsed, 2),
            "wall_seconds": round(self.wall, 2),
            "tokens_per_sec": tps,
        }
        if plan.dist.enabled:
            summary["world_size"] = plan.dist.world_size
            summary["tokens_per_sec_per_device"] = round(tps / plan.dist.world_size, 1) if tps else None
        self.write_status(out, "finished", step=state.step, **{k: v for k, v in summary.items() if k != "run"})
        return summary
