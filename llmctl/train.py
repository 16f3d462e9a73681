"""The one training loop, shared by pretraining and every kind of finetuning.

`fit` receives the model, its optimizer, a function that returns the micro-batches of a step, and a loss function;
evaluation and saving are callbacks. It knows nothing of files, data formats or the CLI, so pretraining,
finetuning, LoRA and classification differ only in what they pass in.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, NoReturn, Optional, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainConfig
from .errors import EXIT_DIVERGED, LlmctlError
from .evaluate import lm_logits
from .events import SILENT, Events, Progress
from .interrupt import STOP, Stopped
from .optim import lr_at

Batch = dict[str, torch.Tensor]
# metrics where higher is better
MAXIMIZED = ("accuracy", "f1", "macro_f1", "precision", "recall", "val_accuracy", "val_margin", "val_reward")


@dataclass
class LoopState:
    """Where a run is: restored on resume, stored in every checkpoint."""

    step: int = 0  # optimizer steps completed
    tokens: int = 0  # tokens trained on so far, summed over ranks
    elapsed: float = 0.0  # seconds spent training (excluding evaluation and saving)
    best: Optional[float] = None  # best value of the tracked metric so far
    best_step: Optional[int] = None
    skipped: int = 0  # non-finite steps skipped so far (train.skip_nonfinite)
    evals_since_best: int = 0  # for early stopping (train.patience)
    stopped_early: bool = False
    eval_due: bool = False  # a signal stopped the validation pass of `step`: a resumed run does it first
    last_eval: dict = field(default_factory=dict)


class Interrupted(LlmctlError):
    """SIGINT / SIGTERM arrived; a checkpoint was written (when a save callback exists)."""


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy; labels of -100 (prompt or padding) are not trained on."""
    logits = lm_logits(model, batch)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


# ------------------------------------------------------------------------------------------------------------------
# RNG state: everything that makes a resumed run bit-identical to an uninterrupted one


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: reading every GPU would create a context on each of them from every rank
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]  # older checkpoints hold a list with one state per GPU
        torch.cuda.set_rng_state(cuda[torch.cuda.current_device()] if isinstance(cuda, (list, tuple)) else cuda)


def _tuple(x: Any) -> Any:
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------------------


class Validator:
    """Validation policy: when a pass is due (every `eval_interval` steps, at the end, or the pass a signal
    stopped), which metric is tracked and which direction is better, and when patience runs out."""

    def __init__(self, cfg: TrainConfig, run: Optional[Callable[[int], dict]]):
        self.cfg, self.run = cfg, run  # run: step -> {"val_loss": ...}, polling STOP between batches
        self.maximize = cfg.best_mode == "max" or (cfg.best_mode == "auto" and cfg.best_metric in MAXIMIZED)

    def due(self, state: LoopState, last: bool) -> bool:
        interval = self.cfg.eval_interval and state.step % self.cfg.eval_interval == 0
        return self.run is not None and bool(interval or last or state.eval_due)

    def reached(self, result: dict) -> bool:
        """Whether `result` reaches train.stop_at_loss (the run ends there)."""
        target, loss = self.cfg.stop_at_loss, result.get("val_loss")
        return target is not None and loss is not None and loss <= target

    def judge(self, state: LoopState, result: dict) -> tuple[bool, bool]:
        """Record `result` in `state`: (a new best, patience exhausted)."""
        cfg = self.cfg
        state.last_eval = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        value = result.get(cfg.best_metric)
        improved = value is not None and (state.best is None
                                          or (value > state.best if self.maximize else value < state.best))
        if improved:
            state.best, state.best_step = value, state.step
        state.evals_since_best = 0 if improved else state.evals_since_best + 1
        return improved, bool(cfg.patience) and value is not None and state.evals_since_best >= cfg.patience


class Saver(Protocol):
    """What the loop asks about checkpoints (llmctl.saver.Saver is the one implementation)."""

    def begin(self, state: LoopState) -> None: ...
    def reason(self, state: LoopState, last: bool, improved: bool, stop_early: bool) -> Optional[str]: ...
    def save(self, state: LoopState, reason: str) -> Any: ...
    def on_stop(self, state: LoopState) -> Any: ...


@dataclass
class Hooks:
    """What the loop calls out to. All optional but `batches`."""

    batches: Callable[[int], list[Batch]]  # step -> micro-batches for this rank
    loss: Callable[[nn.Module, Batch], torch.Tensor] = lm_loss
    validate: Optional[Callable[[int], dict]] = None  # step -> {"val_loss": ...}: one validation pass
    saver: Optional[Saver] = None  # decides when to checkpoint, and writes
    log_metrics: Callable[[dict], None] = lambda row: None  # one row of metrics.jsonl
    no_sync: Optional[Callable[[], ContextManager]] = None  # skip the gradient all-reduce on non-final micro-steps
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # average a scalar over ranks
    sync_stop: Callable[[Optional[int]], Optional[int]] = lambda signum: signum  # agree on a stop signal over ranks
    clip_grads: Optional[Callable[[list, float], torch.Tensor]] = None  # (params, max_norm or 0) -> global norm
    on_step: Optional[Callable[[LoopState], None]] = None  # test hook
    step_metrics: Optional[Callable[[], dict]] = None  # the step's metrics besides its loss, {name: scalar tensor}
    world_size: int = 1  # processes training together (scales a variable-length batch's token count)


def _gradients(model: nn.Module, optimizer: torch.optim.Optimizer, micro: list[Batch], params: list, cfg: TrainConfig,
               hooks: Hooks, device: torch.device, autocast: Callable[[], ContextManager],
               scaler: Optional[torch.amp.GradScaler]) -> tuple[float, float]:
    """Forward and backward over a step's micro-batches (the gradient exchange only on the last), then unscale and
    clip: (the loss averaged over micro-batches and ranks, the global gradient norm before clipping)."""
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sync = contextlib.nullcontext() if (hooks.no_sync is None or i == len(micro) - 1) else hooks.no_sync()
        with sync:
            with autocast():
                loss = hooks.loss(model, batch) / len(micro)
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)
    if hooks.clip_grads is not None:  # (tensor parallel: sharded and replicated gradients together)
        gnorm = hooks.clip_grads(params, cfg.grad_clip)
    elif cfg.grad_clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    return hooks.reduce_mean(total).item(), float(gnorm)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    hooks: Hooks,
    state: LoopState,
    *,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    scaler: Optional[torch.amp.GradScaler] = None,
    tokens_per_step: Optional[int] = None,
    events: Events = SILENT,
) -> LoopState:
    """Train until `cfg.max_steps`, evaluating every `eval_interval` and saving every `save_interval` and at the end.

    A SIGINT / SIGTERM is acted on after the step it arrives in, or between the batches of a validation pass: the
    loop saves (when it trained since the last checkpoint) and raises `Interrupted` (exit 130/143). A loss or
    gradient norm that is not finite raises LlmctlError with exit 3 (nothing is saved then: the last good
    checkpoint stays `latest`). `events` hears the "train" progress (loss, lr, grad_norm every step; tokens_per_sec
    on the logged ones), each validation's results, early stopping, and a warning for a skipped step.
    """
    with events.progress("train", cfg.max_steps, state.step) as bar:  # (closed however the loop ends)
        loop = _Loop(model, optimizer, cfg, hooks, state, device, amp_dtype, scaler, tokens_per_step, events, bar)
        if loop.saver:
            loop.saver.begin(state)
        model.train()
        with STOP.handling(), STOP.deferred():  # a signal is acted on at the points below, never in a step or a save
            # the validation pass a signal stopped comes before anything else
            ended = state.eval_due and loop.after_step(state.step >= cfg.max_steps)
            while state.step < cfg.max_steps and not ended:
                if not loop.step():
                    continue  # a skipped step (not finite) neither validates nor saves
                last = state.step == cfg.max_steps
                ended = loop.after_step(last)  # early stopping ends the run here
                signum = hooks.sync_stop(STOP.signum)
                if signum is not None and not (last or ended):
                    loop.stop(signum)
    return state


class _Loop:
    """The steps of one `fit`: an optimizer step, what is due after it (validation, checkpoint), and a stop."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, hooks: Hooks,
                 state: LoopState, device: torch.device, amp_dtype: Optional[torch.dtype],
                 scaler: Optional[torch.amp.GradScaler], tokens_per_step: Optional[int], events: Events, bar: Progress):
        self.model, self.optimizer, self.cfg, self.hooks, self.state = model, optimizer, cfg, hooks, state
        self.device, self.scaler, self.tokens_per_step = device, scaler, tokens_per_step
        self.events, self.bar = events, bar
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast = ((lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype
                         else contextlib.nullcontext)
        self.validator, self.saver = Validator(cfg, hooks.validate), hooks.saver
        # throughput over the steps since the last logged one, evaluation and saving time left out
        self.window_t, self.window_tokens = time.perf_counter(), 0

    def step(self) -> bool:
        """One optimizer step over the step's micro-batches: True when it trained, False when it was skipped."""
        state, cfg, hooks, optimizer = self.state, self.cfg, self.hooks, self.optimizer
        t0 = time.perf_counter()
        step = state.step
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        micro = hooks.batches(step)
        # variable-length batches (classification, instruct) are counted as they come
        step_tokens = self.tokens_per_step or hooks.world_size * sum(
            int(b["lengths"].sum()) if "lengths" in b else b["input_ids"].numel() for b in micro)
        loss, gnorm = _gradients(self.model, optimizer, micro, self.params, cfg, hooks, self.device, self.autocast,
                                 self.scaler)
        extra = hooks.step_metrics() if hooks.step_metrics else {}  # (read every step, logged with the loss)
        if not math.isfinite(loss) or (not math.isfinite(gnorm) and self.scaler is None):
            self._skip(step, "loss" if not math.isfinite(loss) else "gradient norm",
                       loss if not math.isfinite(loss) else gnorm)
            return False
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += step_tokens
        state.elapsed += time.perf_counter() - t0
        self._report(loss, lr, gnorm, step_tokens, extra)
        return True

    def _skip(self, step: int, what: str, value: float) -> None:
        """A step whose loss or gradient norm is not finite: skipped while train.skip_nonfinite allows, else the
        run has diverged (exit 3)."""
        state, cfg = self.state, self.cfg
        if state.skipped >= cfg.skip_nonfinite:
            raise LlmctlError(
                f"training diverged at step {step + 1}: the {what} is {value}; "
                "the last good checkpoint is kept. "
                "Lower train.lr, raise train.warmup_steps, or use train.dtype=float32",
                status=EXIT_DIVERGED,
            )
        state.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.events.warn(f"step {step + 1}: the {what} is {value}; step skipped ({state.skipped} of "
                         f"train.skip_nonfinite={cfg.skip_nonfinite})")
        self.hooks.log_metrics({"step": step + 1, "skipped": what})
        state.step += 1

    def _report(self, loss: float, lr: float, gnorm: float, step_tokens: int, extra: dict) -> None:
        """The "train" progress after every step; a metrics row every `log_interval` steps, the first and the last,
        with the task's `extra` metrics (averaged over ranks) after the loss."""
        state, cfg = self.state, self.cfg
        self.window_tokens += step_tokens
        info = {"loss": loss, "lr": lr, "grad_norm": gnorm}
        if state.step % cfg.log_interval == 0 or state.step == cfg.max_steps or state.step == 1:
            now = time.perf_counter()
            tps = self.window_tokens / max(now - self.window_t, 1e-9)
            self.window_t, self.window_tokens = now, 0
            more = {k: round(self.hooks.reduce_mean(v).item(), 6) for k, v in extra.items() if k != "loss"}
            self.hooks.log_metrics({"step": state.step, "loss": round(loss, 6), **more, "lr": lr,
                                    "grad_norm": round(gnorm, 6), "tokens": state.tokens,
                                    "tokens_per_sec": round(tps, 1), "time": round(state.elapsed, 3)})
            info["tokens_per_sec"] = tps
        self.bar.update(state.step, **info)
        if self.hooks.on_step:
            self.hooks.on_step(state)

    def after_step(self, last: bool) -> bool:
        """Validation and the checkpoint due at `state.step`; True when early stopping ends the run here."""
        state, saver = self.state, self.saver
        improved = stop_early = False
        validated = self.validator.due(state, last)
        if validated:
            improved, stop_early = self._validate(last)
        reason = saver.reason(state, last or stop_early, improved, stop_early) if saver else None
        if reason:
            saver.save(state, reason)
        if reason or validated:
            self.window_t = time.perf_counter()  # evaluation and saving time is not training throughput
        return stop_early

    def _validate(self, last: bool) -> tuple[bool, bool]:
        """One validation pass, judged and logged: (a new best, patience exhausted)."""
        state, cfg = self.state, self.cfg
        state.eval_due = True  # until the pass is complete: a checkpoint written on a signal says so
        t0 = time.perf_counter()
        try:
            result = self.validator.run(state.step)  # polls STOP between batches
        except Stopped as e:
            self.stop(e.signum, "during the validation pass ")
        finally:
            self.model.train()
        state.eval_due = False
        seconds = time.perf_counter() - t0
        improved, stop_early = self.validator.judge(state, result)
        self.hooks.log_metrics({"step": state.step, "tokens": state.tokens, "time": round(state.elapsed, 3), **result,
                                "val_seconds": round(seconds, 3)})
        self.events.log(f"step {state.step}: "
                        + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
                        + (" (best)" if improved and not (last or stop_early) else ""))
        if stop_early:
            self.events.log(f"early stop: no better {cfg.best_metric} in {cfg.patience} evaluations "
                            f"(best {state.best:.4f} at step {state.best_step})")
            state.stopped_early = True
        elif self.validator.reached(result):
            self.events.log(f"target reached: val_loss {result['val_loss']:.4f} <= train.stop_at_loss="
                            f"{cfg.stop_at_loss} at step {state.step}")
            state.stopped_early = stop_early = True
        return improved, stop_early

    def stop(self, signum: int, during: str = "") -> NoReturn:
        """Save what was trained since the last checkpoint, then raise Interrupted."""
        path = self.saver.on_stop(self.state) if self.saver else None
        stopped = Stopped(signum)
        raise Interrupted(f"interrupted by {stopped.name} {during}after step {self.state.step}"
                          + (f"; saved {path}" if path else ""), stopped.status)
