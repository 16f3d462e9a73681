"""The checkpoints of a training run: when one is due and why, what it holds, and which are kept.

`train.fit` asks a `Saver` after every step (`reason`) and on a stop signal (`on_stop`); the saver decides from
`train.save_interval`, `train.keep_best` and the end of the run, gathers the state from every rank, writes it in the
one format (`llmctl.checkpoint`), points `best` at it when it is the best so far, prunes to `train.keep_last`, and
turns a full disk into one clear error that keeps the previous checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError

from . import checkpoint as ckpt_io
from . import distributed
from .config import Config
from .errors import LlmctlError
from .events import Events
from .train import LoopState


class Saver:
    """Checkpoints for one run directory. `split` turns the gathered full state dict into (weights, their file
    name, extra files): the whole backbone or only a LoRA adapter, plus a task head."""

    def __init__(self, out: Path, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: Optional[torch.amp.GradScaler], dist: distributed.DistContext, tokenizer_json: str,
                 meta: dict, split: Callable[[dict], tuple[dict, str, dict]], resume_cmd: str,
                 events: Events, task_state: Optional[Callable[[], dict]] = None):
        self.out, self.cfg, self.model, self.optimizer, self.scaler, self.dist = (
            out, cfg, model, optimizer, scaler, dist)
        self.tokenizer_json, self.meta, self.split, self.resume_cmd, self.events = (
            tokenizer_json, meta, split, resume_cmd, events)
        self.task_state = task_state  # what the task keeps besides the loop (rank 0's: GRPO's rollouts)
        self.config_yaml = cfg.to_yaml()
        self.saved_step: Optional[int] = None  # the step whose state is on disk (or needs none): see `begin`

    def begin(self, state: LoopState) -> None:
        """The loop starts from `state`: a resumed run's is its checkpoint, a fresh run has trained nothing yet.
        A checkpoint written while a validation pass was due (a signal stopped it) is written again after it."""
        self.saved_step = None if state.eval_due else state.step

    def reason(self, state: LoopState, last: bool, improved: bool, stop_early: bool) -> Optional[str]:
        """Why a checkpoint is due after this step (final, early_stop, best, interval), or None; once per step."""
        t = self.cfg.train
        if self.saved_step == state.step:
            return None
        if last:
            return "early_stop" if stop_early else "final"
        if improved and t.keep_best:
            return "best"
        if t.save_interval and state.step % t.save_interval == 0:
            return "interval"
        return None

    def on_stop(self, state: LoopState) -> Optional[Path]:
        """A signal stops the run: save what was trained since the last checkpoint (None when nothing was)."""
        return None if self.saved_step == state.step else self.save(state, "signal")

    def save(self, state: LoopState, reason: str) -> Path:
        """Gather (collective: every rank calls it), write on rank 0, mark best, prune. Returns the checkpoint."""
        gathered = distributed.gather_for_save(self.model, self.optimizer, self.dist)
        self.saved_step = state.step
        if gathered is None:  # not rank 0, which writes the checkpoint
            return self.out / ckpt_io.step_name(state.step)
        full, optimizer_state, rng = gathered
        train_state = {"optimizer": optimizer_state, "scaler": self.scaler.state_dict() if self.scaler else {},
                       "loop": {**state.__dict__}, **rng}
        if self.task_state is not None:
            train_state["task"] = self.task_state()
        meta = {**self.meta, "tokens": state.tokens, "metrics": state.last_eval, "reason": reason}
        weights, name, extra = self.split(full)
        try:
            path = ckpt_io.save(self.out, state.step, weights, self.config_yaml, self.tokenizer_json, train_state, meta,
                                extra_files=extra, weights_name=name)
        except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as a RuntimeError
            if not ckpt_io.is_disk_full(e):
                raise
            kept = ckpt_io.read_latest(self.out)
            raise LlmctlError(
                f"no space left on the disk of {self.out} while saving step {state.step}; "
                + (f"the last good checkpoint {kept} is kept. " if kept else "no checkpoint was written. ")
                + f"Free some space, then resume with: {self.resume_cmd}"
            ) from None
        if state.best_step == state.step:
            ckpt_io.set_best(self.out, path)
        ckpt_io.prune(self.out, self.cfg.train.keep_last)
        self.events.log(f"saved {path}")
        return path
